"""What each method weights or masks, on real images: the distiller protocol's ``weight_maps`` computed
from a student and a teacher detector, as in a training step, and drawn over the images; the share of a
method's loss that falls outside every box (``background_share``, from ``loss_weights``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn

from ..distillers import FeatureDistiller, KDInputs
from ..distillers.ops import box_cells
from ..engine.steps import DistillStep
from ..models.backbones import eval_mode
from .viz import check_image, check_levels, draw_boxes, draw_mask, new_figure

__all__ = [
    "background_area", "background_share", "box_regions", "in_boxes", "kd_inputs_for", "method_weight_maps", "paired_maps", "plot_weight_maps",
    "study_background_shares", "summarise_background_shares", "weight_map_summary",
]
SIDES = (" (teacher)", " (student)")


@torch.no_grad()
def kd_inputs_for(student: nn.Module, teacher: nn.Module, distiller: FeatureDistiller, images: Sequence[Tensor],
                  targets: Sequence[Mapping[str, Tensor]], seed: int = 0) -> KDInputs:
    """What ``distiller`` reads in a training step on ``images`` (``[3, H, W]`` each) and ``targets``
    (``{"boxes", "labels"}`` in the images' pixels), with both detectors in eval mode.

    Built by ``DistillStep.kd_inputs``, so features, boxes (in the resized input's pixels), head
    outputs and priors are exactly what training gives; a method's random draws come from a
    generator seeded with ``seed``.
    """
    step = DistillStep(student, teacher, distiller)
    with eval_mode(student), eval_mode(distiller):
        _, inputs = step.kd_inputs(list(images), [dict(t) for t in targets])
    if inputs.generator is not None:
        inputs.generator = torch.Generator(inputs.generator.device).manual_seed(seed)
    return inputs


def method_weight_maps(student: nn.Module, teacher: nn.Module, distiller: FeatureDistiller,
                       images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]],
                       seed: int = 0) -> tuple[KDInputs, dict[str, dict[str, Tensor]]]:
    """``(inputs, maps)``: the step's ``KDInputs`` and ``distiller.weight_maps(inputs)`` (map name ->
    level -> ``[N, H_l, W_l]``, on the CPU). Empty maps: the method weights every cell alike."""
    inputs = kd_inputs_for(student, teacher, distiller, images, targets, seed)
    with eval_mode(distiller):
        maps = distiller.weight_maps(inputs)
    return inputs, {name: {lvl: m.detach().float().cpu() for lvl, m in levels.items()} for name, levels in maps.items()}


def _groups(columns: Sequence[str]) -> list[list[str]]:
    """``columns`` split into runs that share a colour scale: a pair ``"<x> (teacher)"``, ``"<x> (student)"``
    standing next to each other, or one map."""
    groups: list[list[str]] = []
    for name in columns:
        last = groups[-1] if groups else []
        if len(last) == 1 and last[0].endswith(SIDES[0]) and name == last[0][: -len(SIDES[0])] + SIDES[1]:
            last.append(name)
        else:
            groups.append([name])
    return groups


def _paired_order(names: Sequence[str]) -> list[str]:
    """``names`` in order of first appearance, each ``"<x> (teacher)"`` directly followed by its ``"<x> (student)"``."""
    order: list[str] = []
    for name in names:
        base = next((name[: -len(side)] for side in SIDES if name.endswith(side)), None)
        group = [name] if base is None else [base + side for side in SIDES if base + side in names]
        order += [n for n in group if n not in order]
    return order


def paired_maps(names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Map names grouped for one colour scale each: ``(base, members)`` in order of first appearance, a pair
    ``"<x> (teacher)"``, ``"<x> (student)"`` as one group with base ``"<x>"``, any other map alone."""
    return [(members[0].removesuffix(SIDES[0]), members) for members in _groups(_paired_order(names))]


def box_regions(boxes: Tensor, size: tuple[int, int], stride: float) -> Tensor:
    """``[n, H, W]`` bool: the cells of an ``(H, W)`` grid each of the ``boxes [n, 4]`` covers, by the
    ``"corner"`` rule (``ops.box_cells``: the cell's top-left corner in the box, as LIAF-KD's Eq. 7 masks it)."""
    return box_cells(boxes.reshape(-1, 4), stride, size, "corner")


def in_boxes(boxes: Sequence[Tensor], size: tuple[int, int], stride: float) -> Tensor:
    """``[N, H, W]`` bool: the cells of each image's ``(H, W)`` grid that some of its ``boxes[i] [n_i, 4]`` covers
    (``box_regions``)."""
    return torch.stack([box_regions(b, size, stride).any(0) for b in boxes])


def background_area(inputs: KDInputs, strides: Mapping[str, float]) -> float:
    """The share of all cells (every level of the teacher's features, every image) in no box: the background share
    of a loss that weighted every cell alike with the same error everywhere (``background_share``'s reference)."""
    outside = [~in_boxes([b.cpu() for b in inputs.boxes], tuple(f.shape[-2:]), strides[lvl])
               for lvl, f in inputs.teacher_feats.items()]
    return sum(float(o.sum()) for o in outside) / sum(o.numel() for o in outside)


@torch.no_grad()
def background_share(distiller: FeatureDistiller, inputs: KDInputs, **options: Any) -> dict[str, float]:
    """The share of a method's feature loss that falls on cells outside every ground-truth box.

    From ``distiller.loss_weights(inputs, **options)``'s per-cell loss (for LIAF-KD each cell's term of
    Eq. 9, for FitNet of Eq. 1 with ``M = 1``): per level ``sum of the cells in no box / sum of all cells``
    over the batch, and ``"total"``, the same over all levels together (the levels' losses summed, as the
    loss sums them). A cell is in a box by ``box_regions`` (the ``"corner"`` rule). ``options`` change the
    method's options for this measurement only (e.g. ``mask_scale="count"``). Each share lies in ``[0, 1]``;
    NaN where the loss is 0. For a training step's inputs on real images use ``kd_inputs_for``.

    Raises ``ValueError`` for a method whose loss does not split into cells (its ``loss_weights`` give no
    ``cells``).
    """
    weights = distiller.loss_weights(inputs, **options)
    if weights.cells is None:
        raise ValueError(f"{distiller.label}'s loss does not split into cells (its loss_weights give no per-cell "
                         "loss): it has no background share")
    parts = {}
    for lvl, cells in weights.cells.items():
        size = tuple(cells.shape[-2:])
        inside = in_boxes([b.to(cells.device) for b in inputs.boxes], size, distiller.strides[lvl])
        parts[lvl] = (float(cells[~inside].sum()), float(cells.sum()))
    parts["total"] = (sum(bg for bg, _ in parts.values()), sum(whole for _, whole in parts.values()))
    return {name: bg / whole if whole > 0 else math.nan for name, (bg, whole) in parts.items()}


def study_background_shares(study_dir: str | Path, method: str = "liaf", images: int = 16,
                            teacher: str | Path | None = None) -> tuple[list[dict[str, Any]], float]:
    """``background_share`` of every run of ``method`` that a study folder trained, each with its own trained
    student and distiller (the grid variant's options, after its stage 1 and stage 2).

    Every run reads the same first ``images`` validation images with boxes of the study's config, with the
    study's teacher (``study_teacher``; ``teacher`` overrides it). Returns ``(rows, area)``: one row per run
    (``method``, ``variant``, ``seed``, ``"total"`` and one share per level) and ``background_area`` of those images, the
    share a loss that weighted every cell alike would have. ``StudyError`` when the folder has no such run;
    ``ValueError`` for a method whose loss does not split into cells (``background_share``).
    """
    from ..experiments.builders import build_datasets, build_detector
    from ..experiments.study import StudyError, load_study_run, loadable_runs, study_teacher

    found = loadable_runs(study_dir, method)
    if not found:
        raise StudyError(f"{study_dir} has no finished {method!r} run trained in it (adopted runs have no weights)")
    first = load_study_run(study_dir, method, found[0][1], found[0][0])
    _, val = build_datasets(first.config)
    samples = [val[i] for i in range(len(val)) if len(val.records[i].boxes) > 0][:images]
    pictures, targets = [img for img, _ in samples], [target for _, target in samples]
    teacher_model = build_detector(first.config, "teacher", len(first.class_names) + 1,
                                   weights_path=teacher or study_teacher(study_dir),
                                   class_names=first.class_names).eval()
    rows = []
    for variant, seed in found:
        run = first if (variant, seed) == found[0] else load_study_run(study_dir, method, seed, variant)
        inputs = kd_inputs_for(run.student, teacher_model, run.distiller, pictures, targets, seed)
        rows.append({"method": method, "variant": variant, "seed": seed, **background_share(run.distiller, inputs)})
    return rows, background_area(inputs, first.distiller.strides)


def summarise_background_shares(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per method and variant of ``study_background_shares``' rows (in their order; ``method`` is ``""`` where the
    rows do not name one): ``method``, ``variant``, ``seeds`` (how many runs), and the ``"total"`` share's
    ``mean``, ``low`` and ``high`` (smallest and largest) over the seeds; NaN shares (a loss of 0) are left out
    of all three."""
    out: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        out.setdefault((row.get("method", ""), row["variant"]), []).append(float(row["total"]))
    summary = []
    for (method, variant), shares in out.items():
        kept = [v for v in shares if not math.isnan(v)]
        mean, low, high = (sum(kept) / len(kept), min(kept), max(kept)) if kept else (math.nan,) * 3
        summary.append({"method": method, "variant": variant, "seeds": len(shares), "mean": mean, "low": low,
                        "high": high})
    return summary


def _scale(grids: Sequence[Tensor], limits: tuple[float, float] | None) -> tuple[float, float]:
    """``limits`` (checked), else ``(min, max)`` over ``grids``; a constant map's range starts at its value (its
    colour: the scale's bottom)."""
    if limits is not None:
        if not limits[0] < limits[1]:
            raise ValueError(f"limits must be (low, high) with low < high, got {limits}")
        return limits
    vmin, vmax = min(float(g.min()) for g in grids), max(float(g.max()) for g in grids)
    return vmin, vmax if vmax > vmin else vmin + 1.0


def plot_weight_maps(
    images: Sequence[Tensor],
    inputs: KDInputs,
    maps: Mapping[str, Mapping[str, Tensor]],
    strides: Mapping[str, float],
    level: str | None = None,
    names: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
    cmap: str = "magma",
    alpha: float = 0.6,
    limits: tuple[float, float] | None = None,
) -> Figure:
    """A grid of weight maps at one FPN level: one row per image, one column per map.

    Each panel is the image resized as the detector saw it, its ground-truth boxes with class names,
    and the map's cells overlaid (each cell over ``stride x stride`` pixels from the top left). Every
    map has one colour scale for all images, ``[min, max]`` over the images, with a colour bar below
    its column that says so; the two maps of a pair (``"<x> (teacher)"``, ``"<x> (student)"``) stand side by
    side and share one scale and bar. ``limits`` ``(low, high)`` puts every map on that one scale instead (e.g.
    ``(0, 1)`` for masks, so a mask that never exceeds 0.02 looks dark, not as bright as a full-range one).

    Args:
        images: the N images ``[3, H, W]`` the inputs were computed from.
        inputs, maps: what ``method_weight_maps`` returns for them: ``KDInputs`` (boxes and labels in
            the resized input's pixels, each image's resized size) and map name -> level -> ``[N, H_l, W_l]``.
        strides: level -> input pixels per cell (``distiller.strides``).
        level: the level to show (default: the first level of the first map).
        names: the maps to show, in this order (default: all, pairs side by side).
        class_names: label ``i`` -> name (``"background"`` first), for the box captions.
    Raises ``ValueError`` for no maps (a method that weights every cell alike), an unknown map name or
    level, maps of another shape, or an image without boxes.
    """
    if not maps:
        raise ValueError("there are no weight maps to plot: the method weights every cell alike (e.g. FitNet)")
    columns = _paired_order(list(maps)) if names is None else list(names)
    unknown = [n for n in columns if n not in maps]
    if unknown or not columns:
        raise ValueError(f"unknown weight map(s) {unknown or columns}; the maps are {list(maps)}")
    level = check_levels(level, list(maps[columns[0]]), "the weight maps")[0] if level is not None \
        else next(iter(maps[columns[0]]))
    lacking = [n for n in columns if level not in maps[n]]
    if lacking:
        raise ValueError(f"the maps {lacking} have no level {level!r} (they have {[list(maps[n]) for n in lacking]})")
    check_levels([level], list(strides), "strides")
    boxes = list(inputs.boxes)
    if len(images) != len(boxes):
        raise ValueError(f"got {len(images)} images for inputs of {len(boxes)}: pass the images the maps were "
                         "computed from")
    empty = [i for i, b in enumerate(boxes) if len(b) == 0]
    if empty:
        raise ValueError(f"images {empty} have no ground-truth boxes: pick images with objects to compare the maps "
                         "with")
    grids = {}
    for name in columns:
        grid = maps[name][level]
        if not isinstance(grid, Tensor) or grid.dim() != 3 or grid.shape[0] != len(images):
            got = tuple(grid.shape) if isinstance(grid, Tensor) else type(grid).__name__
            raise ValueError(f"maps[{name!r}][{level!r}] must be [{len(images)}, H, W] (one map per image), got {got}")
        grids[name] = grid.detach().float().cpu()
    pictures = []
    for i, image in enumerate(images):
        img = check_image(image, f"images[{i}]")
        size = tuple(inputs.image_sizes[i]) if inputs.image_sizes is not None else tuple(img.shape[1:])
        if size != tuple(img.shape[1:]):
            img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0].clamp(0, 1)
        pictures.append(img)
    height, width = pictures[0].shape[1:]
    fig, axes = new_figure(len(columns), len(pictures), panel=(2.6, 2.6 * height / width + 0.3))
    j = 0
    for group in _groups(columns):
        vmin, vmax = _scale([grids[name] for name in group], limits)
        for name in group:
            for i, img in enumerate(pictures):
                ax = axes[i, j]
                labels = inputs.labels[i] if inputs.labels is not None else None
                draw_boxes(ax, img, boxes[i].detach().cpu(), labels, class_names=class_names, linewidth=1.0)
                mappable = draw_mask(ax, grids[name][i].numpy(), tuple(img.shape[1:]), strides[level], vmin=vmin,
                                     vmax=vmax, cmap=cmap, alpha=alpha)
                if i == 0:
                    ax.set_title(name, fontsize=9)
                if j == 0:
                    ax.text(-0.03, 0.5, f"image {i}", rotation=90, transform=ax.transAxes, ha="right", va="center",
                            fontsize=8)
            j += 1
        fig.colorbar(mappable, ax=list(axes[:, j - len(group):j].flat), location="bottom", fraction=0.04, pad=0.01,
                     label="weight (shared scale)" if limits else "weight (range over the images)")
    grid_h, grid_w = grids[columns[0]].shape[1:]
    fig.suptitle(f"{title + ': ' if title else ''}level {level} ({grid_h}x{grid_w}, stride {strides[level]:g})",
                 fontsize=10)
    return fig


def weight_map_summary(maps: Mapping[str, Mapping[str, Tensor]], level: str) -> list[dict[str, object]]:
    """One row per map that has ``level``: ``map, min, mean, max, cells > 0`` (the share of cells above 0) of its
    ``[N, H, W]`` cells over the images, for ``format_table``."""
    rows = [{"map": name, "min": float(m[level].min()), "mean": float(m[level].float().mean()),
             "max": float(m[level].max()), "cells > 0": float((m[level] > 0).float().mean())}
            for name, m in maps.items() if level in m]
    if not rows:
        raise ValueError(f"no map has level {level!r}: the maps have {sorted({lvl for m in maps.values() for lvl in m})}")
    return rows
