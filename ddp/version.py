"""The package version, in the one place that imports nothing (pyproject.toml and checkpoints read it)."""
__version__ = "0.1.0"
