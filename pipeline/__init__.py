"""kdcache: offline teacher-logit caching for knowledge distillation."""

from kdcache._version import __version__

__all__ = ["__version__"]
