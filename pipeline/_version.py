"""The package version, in one place (pyproject.toml reads it; kdcache/__init__ re-exports it)."""

__version__ = "0.1.0"
