"""TensorBoard event files in every run folder (``torch.utils.tensorboard``), beside the CSV/JSON record.

``tensorboard --logdir runs/`` then shows every run under ``runs/`` (a study's runs side by side). Tags:
``train/<column>`` for each ``metrics.csv`` column (every loss term, ``loss``, ``lr``, ``grad_norm``, ...), and
``eval/<metric>`` for each evaluation's COCO metrics, at the training iteration. A resumed run opens a new event
file with ``purge_step`` at its checkpoint's next iteration: TensorBoard's reader drops the older file's events from
that step on, so redone iterations never appear twice. Writing events draws no random numbers and changes no
tensor, so it leaves training bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries of ``values`` (bools, strings and the iteration left out)."""
    return {k: float(v) for k, v in values.items()
            if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardLog:
    """The event file of one run folder, opened before training.

    Args:
        out: the run folder (the event file's folder).
        resume_from: the iteration the run resumes from (0 for a new run); events from ``resume_from + 1`` on in the
            folder's older files are purged when read.

    Raises:
        OSError: the event file cannot be created (the caller stops the run before training).
    """

    def __init__(self, out: Path, resume_from: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out), purge_step=resume_from + 1)

    def add(self, group: str, values: Mapping[str, Any], step: int) -> None:
        """``group/<key>`` scalars of the numeric ``values`` at ``step``, flushed (a live run shows them at once)."""
        for key, value in _numbers(values).items():
            self.writer.add_scalar(f"{group}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def log_run_summary(out: Path, step: int, metrics: Mapping[str, Any],
                    hparams: Mapping[str, Any] | None = None) -> None:
    """Append a finished run's final evaluation (``final/<metric>`` at ``step``) to its folder's events, and with
    ``hparams`` one TensorBoard HParams entry (the run's method, seed, grid values; its metrics as ``hparam/<key>``).

    Called once per run, when its result is first written (a study's ``result.json``, the CLI's ``eval.json``).
    """
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    numbers = _numbers(metrics)
    with SummaryWriter(str(out)) as writer:
        for key, value in numbers.items():
            writer.add_scalar(f"final/{key}", value, step)
        if hparams is not None:
            plain = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
            tagged = {f"hparam/{k}": v for k, v in numbers.items()}
            for summary in hparams_summary(plain, tagged):  # experiment, session start, session end
                writer.file_writer.add_summary(summary)
            for key, value in tagged.items():
                writer.add_scalar(key, value, step)
