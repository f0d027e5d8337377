"""The package version, in one place (read by pyproject and ``prime --version``)."""

__version__ = "0.1.0"
