"""Where liaf_lab's files are: the project root, and relative paths looked up from the current folder, then from it.

The lowest layer (no liaf_lab import), so that every layer may resolve a shipped file without importing the
experiments' config.
"""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def resolve_path(path: str | Path) -> Path:
    """A relative path from the current folder if it exists there, else from the project root."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    candidate = PROJECT_ROOT / path
    if candidate.exists():
        return candidate
    raise FileNotFoundError(f"{path} not found (looked in {Path.cwd()} and {PROJECT_ROOT})")
