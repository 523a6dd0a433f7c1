"""Atomic checkpoints that load with ``weights_only=True``."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or not a liaf_lab checkpoint."""


def previous_path(path: str | Path) -> Path:
    """Where ``save_checkpoint(path, ..., keep_previous=True)`` keeps the checkpoint it replaced."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path: str | Path, state: dict[str, Any], keep_previous: bool = False) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, fsync, then rename.

    A run killed mid-write leaves the previous checkpoint intact. With ``keep_previous`` the file
    being replaced is first renamed to ``previous_path(path)`` (``last.pt`` -> ``last.prev.pt``), so
    two good checkpoints exist after every save; a kill between the two renames leaves only the
    previous one, which ``fit`` resumes from. A full disk raises ``DiskFullError`` naming ``path``.
    """
    path = Path(path)
    with atomic_write(path, "wb", keep_previous=previous_path(path) if keep_previous else None) as f:
        torch.save(state, f)
    return path


def remove_orphan_temporaries(folder: str | Path) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files that runs killed during ``save_checkpoint`` left in ``folder``."""
    folder = Path(folder)
    orphans = [p for p in folder.glob(".*.tmp") if p.is_file()] if folder.is_dir() else []
    for p in orphans:
        p.unlink(missing_ok=True)
    return orphans


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; raise ``CheckpointError`` naming the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise CheckpointError(
                f"checkpoint {path} is not a plain weights file (it holds Python objects; liaf_lab never "
                "unpickles those), or it is damaged; expected a file written by torch.save"
            ) from None
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt and cannot be loaded") from None
    except Exception as err:  # noqa: BLE001 - torch's unpickler raises anything (KeyError, IndexError...) on junk
        first = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt and cannot be loaded ({type(err).__name__}: {first}); "
            "expected a file written by torch.save"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def load_module_state(module: torch.nn.Module, state: Any, source: str | Path, what: str) -> None:
    """``module.load_state_dict(state)`` with errors that name ``source`` and what it was expected to hold.

    ``what`` says what the file should be (e.g. "the stage-1 state of a 'liaf' distiller").
    """
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source} is not a state dict of {what}")
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{label} {items[:3]}{' and more' if len(items) > 3 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("shape of", wrong)) if items]
        raise CheckpointError(f"{source} does not hold {what}: " + "; ".join(parts))
    module.load_state_dict(state)
