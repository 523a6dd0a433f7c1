"""Processes that share a folder: an exclusive folder lock naming its holder, and workers that end with their parent."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import TracebackType

try:  # POSIX
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
except ImportError:  # Windows
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True


class FolderLockedError(RuntimeError):
    """Another process holds the folder's lock."""


class FolderLock:
    """An exclusive lock on ``folder`` (the file ``folder/.lock`` holds the holder's PID), as a context manager.

    The operating system releases it when the holder exits in any way, ``kill -9`` included, so a
    lock is never left behind. Entering raises ``FolderLockedError`` naming the holder's PID when
    another process (or another ``FolderLock`` of this one) holds it.
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        if not _try_lock(fd):
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FolderLockedError(f"{self.path.parent} is in use by process {holder} (it holds {self.path})")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def exit_with_parent(parent_pid: int, interval: float = 0.5) -> None:
    """End this process (``os._exit``) within ``interval`` seconds of its parent ``parent_pid`` dying.

    Meant as a worker pool's ``initializer``: a daemon thread watches the parent PID, so workers of
    a killed process stop instead of finishing runs nobody collects. It draws no random numbers.
    """
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
