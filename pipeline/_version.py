"""The package version (its own module so stage one can import it without the front door)."""

__version__ = "0.1.0"
