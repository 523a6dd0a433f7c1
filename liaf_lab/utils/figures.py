"""Figures every layer may draw: a pyplot-free figure (``new_figure``) and the training curves of a run folder
(``plot_run_curves``), drawn by the CLI, the demo and a study after training (the engine draws nothing)."""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .atomic import save_figure


def new_figure(ncols: int, nrows: int = 1, panel: tuple[float, float] = (4.0, 4.0)) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure with an ``[nrows, ncols]`` array of axes."""
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


# -- training curves ---------------------------------------------------------------------------
_METRIC_TOKEN = re.compile(r"m?a[pr]\d*[sml]?")
_X_KEYS = ("iteration", "iter", "step", "epoch")


def _is_metric(name: str) -> bool:
    tokens = [t for t in re.split(r"[/_.\-@\s]+", name.lower()) if t]
    return any(_METRIC_TOKEN.fullmatch(t) for t in tokens)


def _to_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def plot_training_curves(
    source: str | Path | Sequence[Mapping[str, Any]],
    x: str | None = None,
    loss_keys: Sequence[str] | None = None,
    metric_keys: Sequence[str] | None = None,
) -> Figure:
    """Loss curves (left) and mAP-type metric curves (right) from a CSV log or a list of records.

    ``x`` defaults to the first of iteration/iter/step/epoch present. Loss keys default to numeric
    columns with "loss" in the name; metric keys to columns with a token like map, ap, ap50, ap_s,
    ar. Empty cells are skipped, so losses per iteration and mAP per epoch can share one log.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"training log {str(path)!r} does not exist")
        with path.open(newline="") as f:
            records: list[Mapping[str, Any]] = list(csv.DictReader(f))
    else:
        records = list(source)
    if not records:
        raise ValueError("the training log holds no records")
    columns = list(dict.fromkeys(k for r in records for k in r))
    if x is None:
        x = next((k for k in _X_KEYS if k in columns), None)
        if x is None:
            raise ValueError(f"no x column found (tried {list(_X_KEYS)}); columns: {columns}")
    elif x not in columns:
        raise ValueError(f"x column {x!r} not in the log; columns: {columns}")
    numeric = [k for k in columns if k != x and any(_to_float(r.get(k)) is not None for r in records)]
    losses = list(loss_keys) if loss_keys is not None else [k for k in numeric if "loss" in k.lower()]
    if metric_keys is not None:
        metrics = list(metric_keys)
    else:
        metrics = [k for k in numeric if _is_metric(k) and "loss" not in k.lower()]
    unknown = [k for k in [*losses, *metrics] if k not in columns]
    if unknown:
        raise ValueError(f"columns {unknown} not in the log; columns: {columns}")
    groups = [(title, keys) for title, keys in (("losses", losses), ("metrics", metrics)) if keys]
    if not groups:
        raise ValueError(f"no loss or metric columns found; columns: {columns}")
    fig, axes = new_figure(len(groups), panel=(5.0, 3.5))
    for ax, (title, keys) in zip(axes[0], groups, strict=True):
        positive = True
        for key in keys:
            pts = [(_to_float(r.get(x)), _to_float(r.get(key))) for r in records]
            pts = [(a, b) for a, b in pts if a is not None and b is not None]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=key)
                positive = positive and min(ys) > 0
        ax.set_title(title)
        ax.set_xlabel(x)
        if title == "losses" and positive:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig


def plot_run_curves(run_dir: str | Path) -> list[Path]:
    """Draw ``curves.png`` in a run folder that ``engine.fit`` wrote, and in its ``stage1/`` sub-folder when a
    student's stage 1 was learned there (``train_student``): the loss terms over iterations (``metrics.csv``) and
    AP/AP50 from ``evaluations.jsonl``. Returns the figures' paths, stage 1's first.

    The CLI, the demo and a study call it after training; the engine draws nothing.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.csv").is_file():
        raise ValueError(f"{str(run_dir)!r} holds no metrics.csv: not the folder of a finished training run")
    return [_plot_one_run(folder) for folder in (run_dir / "stage1", run_dir) if (folder / "metrics.csv").is_file()]


def _plot_one_run(folder: Path) -> Path:
    """``folder/curves.png`` from its ``metrics.csv`` (every column but the iteration, lr and timing) and the AP/AP50
    of its ``evaluations.jsonl``."""
    with (folder / "metrics.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows, columns = list(reader), reader.fieldnames or []
    evals_path = folder / "evaluations.jsonl"
    evals = [json.loads(line) for line in evals_path.read_text().splitlines()] if evals_path.exists() else []
    skip = {"iteration", "lr", "sec_per_iter"}
    loss_keys = [k for k in columns if k not in skip]
    fig = plot_training_curves([*rows, *evals], x="iteration", loss_keys=loss_keys,
                               metric_keys=[k for k in ("AP", "AP50") if any(k in e for e in evals)])
    return save_figure(fig, folder / "curves.png", dpi=90)
