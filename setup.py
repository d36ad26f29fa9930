"""Which packages the `apa` distribution ships; everything else is in pyproject.toml.

`migrations/` stays a top-level folder of the repository and ships as the subpackage
`apa.migrations` (mapped in `[tool.setuptools.package-dir]`), so an installed `apa` finds its
Alembic scripts with `importlib.resources`. pyproject's `packages.find` cannot add a package that
lives outside the folders it searches, so the list is computed here.
"""

from setuptools import find_packages, setup

setup(
    packages=[
        *find_packages("shared", include=["apa", "apa.*"]),
        *find_packages(".", include=["services", "services.*"]),
        *(f"apa.{name}" for name in find_packages(".", include=["migrations", "migrations.*"])),
    ]
)
