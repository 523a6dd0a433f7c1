"""Track LIAF-KD instance scores ``A^T`` and ``A^S`` over distillation iterations for fixed images."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import Tensor, nn

from ..utils.atomic import write_text
from ..distillers import InstanceScorer, KDInputs
from ..experiments.verdicts import paired_interval
from .viz import check_levels, new_figure

__all__ = ["ScoreHistory", "plot_score_gaps"]

_FORMAT = "liaf_lab.ScoreHistory/1"


class ScoreHistory:
    """``A^T`` and ``A^S`` (mean and per selector) per level and instance, one entry per ``record``.

    Call ``record`` every few iterations with the features of a *fixed* set of images (e.g. a small
    validation batch); it runs under ``no_grad`` and changes nothing in the distiller. Records are
    flat dicts ``{iteration, level, side, instance, mean, selectors}`` where ``side`` is
    ``"teacher"`` or ``"student"``, ``mean`` is ``A`` (Eq. 6) and ``selectors`` the K values
    ``softmax(F_ROI E_k)`` (Eq. 3) of that instance. Instances are numbered in the order of the
    concatenated per-image boxes.

    Args:
        levels: the levels to record (default: all of the distiller's).
    """

    def __init__(self, levels: Sequence[str] | None = None) -> None:
        self.levels = list(levels) if levels is not None else None
        self.instances: list[dict[str, Any]] | None = None
        self.records: list[dict[str, Any]] = []

    @torch.no_grad()
    def record(
        self,
        iteration: int,
        distiller: InstanceScorer,
        student_feats: Mapping[str, Tensor],
        teacher_feats: Mapping[str, Tensor],
        boxes: Sequence[Tensor],
    ) -> None:
        """Score every instance of ``boxes`` (N tensors ``[n_b, 4]``) on both sides at ``iteration``.

        ``student_feats`` / ``teacher_feats``: ``{level: [N, C, H, W]}``; student features are
        projected first where the channels differ, as in the loss.
        """
        distiller.check_inputs(KDInputs(student_feats, teacher_feats, boxes))
        levels = check_levels(self.levels, distiller.levels, "the distiller")
        instances = [{"image": b, "box": [float(v) for v in box]}
                     for b, per_image in enumerate(boxes) for box in per_image.tolist()]
        if not instances:
            raise ValueError("boxes hold no instances: record needs images with at least one box")
        if self.instances is None:
            self.instances = instances
            self.levels = levels
        elif [i["image"] for i in instances] != [i["image"] for i in self.instances]:
            raise ValueError(f"boxes hold {len(instances)} instances but the history tracks {len(self.instances)}: "
                             "record the same fixed images every time")
        for lvl in levels:
            student = student_feats[lvl]
            projected = distiller.projectors[lvl](student)
            sides = {
                "teacher": distiller.instance_scores(lvl, teacher_feats[lvl], boxes, per_selector=True),
                "student": distiller.instance_scores(
                    lvl, distiller.student_roi_input(lvl, student, projected), boxes, per_selector=True),
            }
            for side, scores in sides.items():
                scores = scores.float().cpu()  # [K, I]
                means = scores.mean(dim=0)
                for i in range(scores.shape[1]):
                    self.records.append({
                        "iteration": int(iteration), "level": lvl, "side": side, "instance": i,
                        "mean": float(means[i]), "selectors": scores[:, i].tolist(),
                    })

    def tracker(self, student: nn.Module, teacher: nn.Module, distiller: InstanceScorer, images: Sequence[Tensor],
                targets: Sequence[Mapping[str, Tensor]], every: int) -> Callable[[int], None]:
        """``distill(..., on_iteration=history.tracker(...))``: record the scores of the fixed ``images``
        (``targets`` with ``"boxes"``, ``"labels"``) at iteration 0 (now) and every ``every`` iterations.

        Features come from ``kd_inputs_for`` (both detectors in eval mode, modes restored), which draws
        no random numbers, so tracking leaves the training run unchanged.
        """
        from .maps import kd_inputs_for

        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")

        def record(iteration: int) -> None:
            if iteration % every == 0:
                inputs = kd_inputs_for(student, teacher, distiller, images, targets)
                self.record(iteration, distiller, inputs.student_feats, inputs.teacher_feats, inputs.boxes)

        record(0)
        return record

    def gaps(self, level: str | None = None, selector: int | Literal["mean"] = "mean") -> dict[int, float]:
        """Iteration -> the mean over instances of ``|A^S - A^T|`` at ``level`` (default the first)."""
        if not self.records:
            raise ValueError("the ScoreHistory is empty: call record() first")
        level = check_levels(level, self.levels, "the ScoreHistory")[0] if level is not None else self.levels[0]
        sides: dict[tuple[int, int], dict[str, float]] = {}
        for r in self.records:
            if r["level"] == level:
                value = r["mean"] if selector == "mean" else r["selectors"][selector]
                sides.setdefault((r["iteration"], r["instance"]), {})[r["side"]] = value
        out: dict[int, list[float]] = {}
        for (iteration, _), v in sorted(sides.items()):
            out.setdefault(iteration, []).append(abs(v["student"] - v["teacher"]))
        return {it: sum(v) / len(v) for it, v in out.items()}

    def to_records(self) -> list[dict[str, Any]]:
        """The records as a list of new dicts (safe to modify)."""
        return [dict(r, selectors=list(r["selectors"])) for r in self.records]

    def save_json(self, path: str | Path) -> None:
        """Write levels, instances (image index and box) and records as JSON."""
        data = {"format": _FORMAT, "levels": self.levels, "instances": self.instances, "records": self.records}
        write_text(path, json.dumps(data))

    @classmethod
    def load_json(cls, path: str | Path) -> ScoreHistory:
        """Read a history written by ``save_json``."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"{str(path)!r} is not a ScoreHistory JSON file (format {_FORMAT!r})")
        history = cls(data["levels"])
        history.instances = data["instances"]
        history.records = data["records"]
        return history

    def plot(
        self,
        instance: int | Sequence[int] | None = None,
        level: str | None = None,
        selector: int | Literal["mean"] = "mean",
    ) -> Figure:
        """Scores over iterations (left) and the mean gap ``|A^S - A^T|`` (right) at one level.

        Student lines are solid, teacher lines dashed, one colour per instance. ``instance``:
        one, several or all (None); ``level`` defaults to the first recorded; ``selector``: the
        mean ``A`` or one selector's score (0-based k).
        """
        if not self.records:
            raise ValueError("the ScoreHistory is empty: call record() first")
        level = check_levels(level, self.levels, "the ScoreHistory")[0] if level is not None else self.levels[0]
        num_inst = len(self.instances)
        if instance is None:
            chosen = list(range(num_inst))
        else:
            chosen = [instance] if isinstance(instance, int) else list(instance)
        bad = [i for i in chosen if not 0 <= i < num_inst]
        if bad or not chosen:
            raise ValueError(f"instance {bad or chosen} out of range: the history tracks instances 0..{num_inst - 1}")
        num_sel = len(self.records[0]["selectors"])
        if selector != "mean" and not (isinstance(selector, int) and 0 <= selector < num_sel):
            raise ValueError(f"selector must be 'mean' or an int in 0..{num_sel - 1}, got {selector!r}")

        def value(r: dict[str, Any]) -> float:
            return r["mean"] if selector == "mean" else r["selectors"][selector]

        series: dict[tuple[str, int], dict[int, float]] = {}
        for r in self.records:
            if r["level"] == level and r["instance"] in chosen:
                series.setdefault((r["side"], r["instance"]), {})[r["iteration"]] = value(r)
        fig, axes = new_figure(2, panel=(5.0, 3.5))
        ax, gap_ax = axes[0]
        cmap = colormaps["tab10"]
        for i in chosen:
            color = cmap(i % 10)
            for side, style in (("student", "-"), ("teacher", "--")):
                points = sorted(series.get((side, i), {}).items())
                if points:
                    ax.plot(*zip(*points, strict=True), style, color=color, marker="o", markersize=3,
                            label=f"{side} #{i} (image {self.instances[i]['image']})")
        iterations = sorted(set(series.get(("student", chosen[0]), {})) & set(series.get(("teacher", chosen[0]), {})))
        gaps = [sum(abs(series[("student", i)][t] - series[("teacher", i)][t]) for i in chosen) / len(chosen)
                for t in iterations]
        gap_ax.plot(iterations, gaps, marker="o", markersize=3, color="black")
        what = "A (mean over selectors)" if selector == "mean" else f"selector E_{selector + 1}"
        ax.set_title(f"level {level}: {what}")
        ax.set_xlabel("iteration")
        ax.set_ylabel("score")
        ax.legend(fontsize=7, ncol=2)
        gap_ax.set_title("mean |A^S - A^T| over the shown instances")
        gap_ax.set_xlabel("iteration")
        for a in (ax, gap_ax):
            a.grid(alpha=0.3)
        return fig


def plot_score_gaps(histories: Sequence[ScoreHistory], level: str | None = None) -> Figure:
    """The mean ``|A^S - A^T|`` over instances against iterations for several runs (e.g. one per seed):
    one thin line per run, their mean in black with its Student's t 95% interval over runs as a band
    (``liaf_lab.experiments.verdicts.paired_interval``, the interval the notebooks report). The y axis starts at 0; the
    legend sits beside the axes, off the data."""
    if not histories:
        raise ValueError("histories is empty: pass one ScoreHistory per run")
    series = [h.gaps(level) for h in histories]
    iterations = sorted(set.intersection(*(set(s) for s in series)))
    if not iterations:
        raise ValueError("the histories share no recorded iteration: track them with the same `every`")
    values = np.array([[s[it] for it in iterations] for s in series])
    fig, axes = new_figure(1, panel=(6.2, 3.5))
    ax = axes[0, 0]
    for i, row in enumerate(values):
        ax.plot(iterations, row, color=f"C{i}", lw=1, alpha=0.6, label=f"run {i}")
    mean = values.mean(0)
    ax.plot(iterations, mean, color="black", lw=2, label="mean over runs")
    if len(values) > 1:
        low, high = np.array([paired_interval(list(column))[1:] for column in values.T]).T
        ax.fill_between(iterations, low, high, color="grey", alpha=0.25, label="95% t interval of the mean")
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean |A^S - A^T| over instances")
    ax.set_ylim(bottom=0)
    ax.set_title(f"level {level if level is not None else histories[0].levels[0]}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig
