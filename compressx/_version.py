"""compressx's version: one place, read by the package, the export manifest and the build (pyproject.toml)."""

__version__ = "0.1.0"
