"""Alembic revision scripts (a package only so that they ship with `apa.migrations`)."""
