"""Shared test setup: make ``tests/reference.py`` importable as ``reference`` from any test file."""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
