"""What a run writes as it trains: ``metrics.csv``, ``evaluations.jsonl`` and TensorBoard events."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

from ..utils.atomic import atomic_write, write_text
from .run_folder import RunConfigError
from .tracking import TensorBoardLog


class MetricsLog:
    """Per-iteration metrics in ``metrics.csv``; rows past a resumed checkpoint are dropped."""

    def __init__(self, path: Path, resume_from: int) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path.exists() and resume_from > 0:
            with path.open() as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= resume_from]

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def flush(self) -> None:
        fields: list[str] = []
        for row in self.rows:
            fields += [k for k in row if k not in fields]
        with atomic_write(self.path, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)


class EvaluationLog:
    """``evaluations.jsonl``: one line per periodic evaluation, the file rewritten atomically as each is added."""

    def __init__(self, path: Path, resume_from: int) -> None:
        self.path = path
        self.lines: list[str] = []
        if path.exists():  # evaluations past the checkpoint are redone by the resumed run
            self.lines = [line for line in path.read_text().splitlines()
                          if line.strip() and json.loads(line)["iteration"] <= resume_from]
            self._write()

    def _write(self) -> None:
        write_text(self.path, "".join(line + "\n" for line in self.lines))

    def append(self, entry: dict[str, Any]) -> None:
        self.lines.append(json.dumps(entry))
        self._write()


def _open_tensorboard(out: Path, start: int) -> TensorBoardLog:
    """The run's TensorBoard events (``engine.tracking``), opened before training; a folder where the event file
    cannot be written stops the run here, like ``prepare_run_folder``."""
    try:
        return TensorBoardLog(out, start)
    except OSError as err:
        raise RunConfigError(f"TensorBoard folder {out} is not writable ({type(err).__name__}: "
                             f"{err.strerror or err})") from None


class RunLogs:
    """The main process's logs of one run, opened before training (an unwritable folder stops the run there):
    the per-iteration rows (every ``log_every`` iterations and the last), the periodic evaluations and, while
    iterations remain, TensorBoard."""

    def __init__(self, out: Path, start: int, iterations: int, log_every: int) -> None:
        self.metrics = MetricsLog(out / "metrics.csv", start)
        self.evaluations = EvaluationLog(out / "evaluations.jsonl", start)
        self.tensorboard = _open_tensorboard(out, start) if start < iterations else None
        self.iterations, self.log_every = iterations, log_every
        self._tick = time.perf_counter()

    def iteration(self, it: int, row: dict[str, Any]) -> None:
        """Log ``row`` (iteration ``it``, counted from 1) when it is due, with the seconds per iteration since the
        last logged row."""
        if it % self.log_every and it != self.iterations:
            return
        now = time.perf_counter()
        self.metrics.add({"iteration": it, **row, "sec_per_iter": (now - self._tick) / self.log_every})
        if self.tensorboard is not None:
            self.tensorboard.add("train", self.metrics.rows[-1], it)
        self._tick = now

    def evaluation(self, entry: dict[str, Any]) -> None:
        self.evaluations.append(entry)
        if self.tensorboard is not None:
            self.tensorboard.add("eval", entry, entry["iteration"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
