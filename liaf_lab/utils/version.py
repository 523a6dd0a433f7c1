"""liaf_lab's version, the one place it is written: ``liaf_lab.__version__`` and pyproject.toml (setuptools'
dynamic ``attr``, read from this source without importing torch) take it from here."""

__version__ = "0.1.0"
