"""Alembic migrations of the registry schema, shipped as the package `apa.migrations`.

`apa.db.session.migrations_dir()` finds this folder through the installed package (or
`APA_MIGRATIONS_DIR`); `alembic.ini`, `env.py` and `script.py.mako` live here, the revisions in
`versions/`.
"""
