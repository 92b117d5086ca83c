"""The package version, in one place: pyproject.toml reads it from here (setuptools' dynamic version), the
package re-exports it as `precompile.__version__`, and the CLI, manifests and cards record it. A module of
its own, importing nothing, so that every module may use it without importing the package `__init__`."""

__version__ = "0.1.0"
