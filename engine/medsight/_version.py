"""The package version, in its own module so that submodules can read it without a circular import."""

__version__ = "0.1.0"
