"""Atomic file writes and record reads: every file liaf_lab writes appears whole or not at all.

A write goes to a temporary file in the target's folder (``.NAME.XXXX.tmp``), is flushed and
fsynced, then renamed over the target; a process killed at any moment leaves the previous file (or
none), never a truncated one. A full disk is a ``DiskFullError`` naming the file, whatever layer
(torch's zip writer, matplotlib) the failed write went through. ``read_json`` names the file of a
damaged record.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


class DiskFullError(OSError):
    """The disk filled up while a file was written; the file named keeps its previous content."""

    def __str__(self) -> str:
        return str(self.strerror)


class RecordError(ValueError):
    """A JSON record liaf_lab wrote (``study.json``, ``run.json``, ``result.json``...) is damaged."""


def _no_space(err: BaseException) -> bool:
    """Whether ``err`` or an exception it was raised from is an ``ENOSPC`` (torch wraps it in a RuntimeError)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", keep_previous: Path | None = None,
                 **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file to write ``path`` with; on success it is fsynced and renamed to ``path``.

    ``mode``: ``"w"`` (text, UTF-8 unless ``encoding`` is given) or ``"wb"``. With ``keep_previous``
    an existing ``path`` is first renamed there. On any error the temporary file is removed and
    ``path`` is left as it was; a full disk raises ``DiskFullError`` naming ``path``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "w":
        open_kwargs.setdefault("encoding", "utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if _no_space(err):
            raise DiskFullError(errno.ENOSPC, f"no space left writing {path}", str(path)) from err
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, data: Any, **dumps_kwargs: Any) -> Path:
    """Write ``json.dumps(data, indent=2, **dumps_kwargs)`` to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=2, **dumps_kwargs))


def save_figure(fig: Any, path: str | Path, **savefig_kwargs: Any) -> Path:
    """``fig.savefig`` to ``path`` atomically (the format from the suffix)."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
    return path


def read_json(path: str | Path, what: str = "record") -> Any:
    """The JSON content of ``path``; ``RecordError`` naming the file and ``what`` it is when it is damaged.

    A missing file is a ``FileNotFoundError``, as for ``open``.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordError(f"{what} {path} is damaged ({type(err).__name__}: {err})") from None
