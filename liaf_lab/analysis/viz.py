"""Figures for inspecting distillation: boxes coloured by instance score, scores, masks, detections, curves.

Every function builds a ``matplotlib.figure.Figure`` directly (no pyplot state, never ``plt.show``),
so notebooks display the returned object once and scripts can ``fig.savefig(...)``.
Images are ``[3, H, W]`` tensors (float in [0, 1], or uint8); boxes ``[n, 4]`` (x1, y1, x2, y2) in
the image's pixels.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from ..utils.figures import new_figure, plot_run_curves, plot_training_curves
from ..utils.validation import check_boxes, check_tensor

__all__ = [
    "check_image", "check_levels", "draw_boxes", "draw_mask", "draw_score_bars", "figure_digest", "figure_to_jpeg",
    "figure_to_png",
    "new_figure", "plot_detections", "plot_instance_scores", "plot_masks", "plot_run_curves", "plot_training_curves",
]


# -- helpers shared by the analysis modules ------------------------------------------------------
def figure_to_png(fig: Figure, dpi: int = 80) -> bytes:
    """Render ``fig`` with Agg and return the PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def figure_to_jpeg(fig: Figure, dpi: int = 80, quality: int = 85) -> bytes:
    """Render ``fig`` with Agg and return JPEG bytes (about five times smaller than PNG for photo-like panels)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="jpeg", dpi=dpi, pil_kwargs={"quality": quality})
    return buf.getvalue()


def figure_digest(fig: Figure) -> str:
    """SHA-1 of the Agg-rendered RGBA pixels of ``fig``: equal digests mean identical pictures."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return hashlib.sha1(np.asarray(canvas.buffer_rgba()).tobytes()).hexdigest()


def check_image(image: object, name: str = "image") -> Tensor:
    """Validate an image ``[3, H, W]`` (float or uint8) and return it as float in [0, 1] on the CPU.

    Float images outside [0, 1] (e.g. mean/std normalised) are min-max rescaled for display.
    """
    check_tensor(name, image, ndim=3)
    if image.shape[0] != 3:
        raise ValueError(f"{name} must have shape [3, H, W], got {tuple(image.shape)}")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(image.shape)}")
    img = image.detach().cpu()
    if img.dtype == torch.uint8:
        return img.float() / 255
    img = img.float()
    lo, hi = float(img.min()), float(img.max())
    if lo < 0 or hi > 1:
        img = (img - lo) / max(hi - lo, 1e-12)
    return img


def check_levels(requested: Sequence[str] | None, available: Sequence[str], what: str) -> list[str]:
    """Return ``requested`` (all of ``available`` when None); raise ValueError naming unknown levels."""
    available = list(available)
    if requested is None:
        return available
    requested = [requested] if isinstance(requested, str) else list(requested)
    unknown = [lvl for lvl in requested if lvl not in available]
    if unknown:
        raise ValueError(f"unknown FPN level(s) {unknown} for {what}; available levels: {available}")
    return requested


def _hwc(image: Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


def _as_vector(name: str, values: object, length: int) -> Tensor:
    values = torch.as_tensor(values).detach().cpu().flatten()
    if values.numel() != length:
        raise ValueError(f"{name} has {values.numel()} entries but there are {length} boxes")
    return values


def class_name(label: int, class_names: Sequence[str] | None) -> str:
    """``class_names[label]``, or the label itself where there is no such name."""
    if class_names is not None and 0 <= label < len(class_names):
        return str(class_names[label])
    return str(label)


def _label_color(label: int) -> tuple[float, ...]:
    return colormaps["tab10"](label % 10)


# -- boxes and scores --------------------------------------------------------------------------
def draw_boxes(
    ax: Axes,
    image: Tensor | None,
    boxes: Tensor,
    labels: Tensor | Sequence[int] | None = None,
    scores: Tensor | Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    cmap: str = "viridis",
    vmin: float = 0.0,
    vmax: float | None = None,
    color_by_score: bool = True,
    colorbar: bool = True,
    linewidth: float = 2.0,
) -> ScalarMappable | None:
    """Draw ``image [3, H, W]`` (skipped when None) and ``boxes [n, 4]`` on ``ax``.

    With ``scores [n]`` and ``color_by_score`` the boxes take their colour from ``cmap`` over
    ``[vmin, vmax]`` (``vmax`` defaults to the largest score, at least 1e-6) and a colorbar is
    added; otherwise boxes are coloured by label. Labels (named via ``class_names``) and scores
    are written above each box. Returns the colour mapping when boxes are coloured by score.
    """
    (boxes,) = check_boxes("boxes", [torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)])
    boxes = boxes.detach().cpu()
    n = boxes.shape[0]
    if image is not None:
        img = check_image(image)
        ax.imshow(_hwc(img))
    ax.set_axis_off()
    label_list = _as_vector("labels", labels, n).long().tolist() if labels is not None else None
    score_vec = _as_vector("scores", scores, n).float() if scores is not None else None
    if score_vec is not None and not bool(torch.isfinite(score_vec).all()):
        raise ValueError("scores contains NaN or inf")
    mappable = None
    if score_vec is not None and color_by_score:
        top = float(score_vec.max()) if n else 1.0
        mappable = ScalarMappable(Normalize(vmin, max(vmax if vmax is not None else top, vmin + 1e-6)), colormaps[cmap])
        if colorbar:
            ax.figure.colorbar(mappable, ax=ax, fraction=0.046, pad=0.02, label="instance score")
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        if mappable is not None:
            color = mappable.to_rgba(float(score_vec[i]))
        else:
            color = _label_color(label_list[i]) if label_list is not None else (1.0, 1.0, 1.0, 1.0)
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=linewidth))
        text = []
        if label_list is not None:
            text.append(class_name(label_list[i], class_names))
        if score_vec is not None:
            text.append(f"{float(score_vec[i]):.2f}")
        if text:
            ax.text(x1, y1, " ".join(text), fontsize=7, color="white", va="bottom",
                    bbox={"facecolor": color, "alpha": 0.7, "pad": 1, "edgecolor": "none"})
    return mappable


def draw_score_bars(
    ax: Axes, series: Mapping[str, Tensor], instance_labels: Sequence[str], ymax: float | None = None
) -> None:
    """Grouped bars on ``ax``: one group per instance, one bar per series (each ``[I]``)."""
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(instance_labels))
    for j, (name, values) in enumerate(series.items()):
        ax.bar(x + (j - (len(series) - 1) / 2) * width, torch.as_tensor(values).cpu().numpy(), width, label=name)
    top = ymax if ymax is not None else max(float(torch.as_tensor(v).max()) for v in series.values())
    ax.set_xticks(x, list(instance_labels))
    ax.set_xlabel("instance")
    ax.set_ylabel("score")
    ax.set_ylim(0, max(top, 1e-6) * 1.1)


def plot_instance_scores(
    scores: Tensor | Mapping[str, Tensor],
    instance_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Bar charts of instance scores, series side by side (e.g. ``{"teacher": A_T, "student": A_S}``).

    Each series is ``[I]`` (mean scores: one panel) or ``[K, I]`` (per selector: one panel per
    selector ``E_k`` plus one for the mean over K). A plain tensor is one series.
    """
    series = {"scores": scores} if isinstance(scores, Tensor) else dict(scores)
    if not series:
        raise ValueError("scores is empty: pass a tensor or a dict of name -> [I] or [K, I] tensors")
    series = {name: check_tensor(f"scores[{name!r}]", s).detach().cpu().float() for name, s in series.items()}
    shapes = {tuple(s.shape) for s in series.values()}
    if len(shapes) != 1:
        raise ValueError(f"all score series must have the same shape, got {[tuple(s.shape) for s in series.values()]}")
    shape = shapes.pop()
    if len(shape) not in (1, 2):
        raise ValueError(f"scores must be [I] or [K, I], got shape {shape}")
    num_inst = shape[-1]
    if num_inst == 0:
        raise ValueError("there are no instances to plot (the image has no boxes)")
    labels = list(instance_labels) if instance_labels is not None else [str(i) for i in range(num_inst)]
    if len(labels) != num_inst:
        raise ValueError(f"instance_labels has {len(labels)} entries but there are {num_inst} instances")
    if len(shape) == 1:
        panels = [("mean over selectors", {n: s for n, s in series.items()})]
    else:
        panels = [(f"selector E_{k + 1}", {n: s[k] for n, s in series.items()}) for k in range(shape[0])]
        panels.append(("mean over selectors", {n: s.mean(0) for n, s in series.items()}))
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = new_figure(ncols, nrows, panel=(max(3.0, 0.5 * num_inst + 1.5), 3.0))
    top = max(float(s.max()) for s in series.values())
    for ax, (name, values) in zip(axes.flat, panels, strict=False):
        draw_score_bars(ax, values, labels, ymax=top)
        ax.set_title(name)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def _mask_2d(level: str, mask: object) -> np.ndarray:
    check_tensor(f"masks[{level!r}]", mask)
    m = mask.detach().cpu().float()
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 2:
        raise ValueError(f"masks[{level!r}] must be [H, W], [1, H, W] or [1, 1, H, W], got {tuple(mask.shape)}")
    return m.numpy()


def draw_mask(
    ax: Axes,
    mask: np.ndarray,
    image_size: tuple[int, int],
    stride: float | None = None,
    vmax: float | None = None,
    cmap: str = "magma",
    alpha: float = 0.6,
    vmin: float = 0.0,
) -> ScalarMappable:
    """Overlay a feature-grid ``mask [H_l, W_l]`` on an image of ``image_size`` (H, W) already on ``ax``.

    With ``stride`` each cell covers ``stride x stride`` pixels from the top left (extra cells of
    padded detector features fall outside the view); without it the mask is stretched over the
    image. Colours span ``[vmin, vmax]`` (``vmax`` default ``max(1, mask max)``).
    """
    height, width = image_size
    top = vmax if vmax is not None else max(1.0, float(mask.max()))
    mappable = ScalarMappable(Normalize(vmin, top), colormaps[cmap])
    if stride is not None:
        extent = (0, mask.shape[1] * stride, mask.shape[0] * stride, 0)
    else:
        extent = (0, width, height, 0)
    ax.imshow(mask, cmap=mappable.cmap, norm=mappable.norm, alpha=alpha, extent=extent, interpolation="nearest")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    return mappable


def plot_masks(
    image: Tensor,
    masks: Mapping[str, Tensor],
    boxes: Tensor | None = None,
    scores: Tensor | None = None,
    strides: Mapping[str, float] | None = None,
    levels: Sequence[str] | None = None,
    alpha: float = 0.6,
    cmap: str = "magma",
) -> Figure:
    """One panel per FPN level: ``image [3, H, W]`` with that level's mask overlaid.

    Args:
        masks: level -> ``[H_l, W_l]`` (or ``[1, H_l, W_l]``, ``[1, 1, H_l, W_l]``) mask of this image.
        boxes: ``[n, 4]`` drawn on every panel, coloured by ``scores [n]`` when given.
        strides: level -> pixels per cell; each cell is then drawn over ``stride x stride`` pixels
            from the top-left (right for padded detector features); without it the mask is
            stretched over the image.
        levels: the levels to show (default all of ``masks``).
    All panels share one colour scale ``[0, max(1, max mask)]``.
    """
    img = check_image(image)
    if not isinstance(masks, Mapping) or not masks:
        raise ValueError("masks must be a non-empty dict of level -> [H, W] mask")
    levels = check_levels(levels, list(masks), "masks")
    if strides is not None:
        check_levels(levels, list(strides), "strides")
    arrays = {lvl: _mask_2d(lvl, masks[lvl]) for lvl in levels}
    height, width = img.shape[-2:]
    vmax = max(1.0, max(float(a.max()) for a in arrays.values()))
    fig, axes = new_figure(len(levels), panel=(3.5, 3.5 * height / width + 0.4))
    for ax, lvl in zip(axes[0], levels, strict=True):
        draw_boxes(ax, img, boxes if boxes is not None else torch.zeros(0, 4), scores=scores, colorbar=False)
        mappable = draw_mask(ax, arrays[lvl], (height, width), strides[lvl] if strides is not None else None,
                             vmax=vmax, cmap=cmap, alpha=alpha)
        ax.set_title(f"level {lvl} ({arrays[lvl].shape[0]}x{arrays[lvl].shape[1]})")
    fig.colorbar(mappable, ax=list(axes[0]), fraction=0.03, label="mask weight")
    return fig


# -- detections --------------------------------------------------------------------------------
def _check_det(name: str, det: object, need_scores: bool) -> dict[str, Tensor]:
    if not isinstance(det, Mapping):
        raise ValueError(f"{name} must be a dict with 'boxes' and 'labels'{' and scores' if need_scores else ''}, "
                         f"got {type(det).__name__}")
    keys = ["boxes", "labels", "scores"] if need_scores else ["boxes", "labels"]
    missing = [k for k in keys if k not in det]
    if missing:
        raise ValueError(f"{name} lacks the keys {missing}; it has {list(det)}")
    out = {k: torch.as_tensor(det[k]).detach().cpu() for k in keys}
    n = out["boxes"].reshape(-1, 4).shape[0]
    for k in keys[1:]:
        if out[k].numel() != n:
            raise ValueError(f"{name}[{k!r}] has {out[k].numel()} entries but {name}['boxes'] has {n}")
    out["boxes"] = out["boxes"].reshape(-1, 4).float()
    return out


def plot_detections(
    image: Tensor,
    gt_target: Mapping[str, Tensor],
    detections: Mapping[str, Mapping[str, Tensor]],
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.3,
    max_detections: int = 100,
) -> Figure:
    """Ground truth beside each model's detections on ``image [3, H, W]`` (LIAF-KD Fig. 2).

    Args:
        gt_target: ``{"boxes": [n, 4], "labels": [n]}``.
        detections: model name -> ``{"boxes", "labels", "scores"}`` as torchvision detectors return.
        score_threshold: detections below it are hidden; at most ``max_detections`` are drawn.
    Boxes are coloured by class, consistently across panels.
    """
    img = check_image(image)
    gt = _check_det("gt_target", gt_target, need_scores=False)
    dets = {name: _check_det(f"detections[{name!r}]", d, need_scores=True) for name, d in detections.items()}
    height, width = img.shape[-2:]
    fig, axes = new_figure(1 + len(dets), panel=(3.5, 3.5 * height / width + 0.4))
    draw_boxes(axes[0, 0], img, gt["boxes"], gt["labels"], class_names=class_names)
    axes[0, 0].set_title(f"ground truth ({len(gt['boxes'])})")
    for ax, (name, d) in zip(axes[0, 1:], dets.items(), strict=True):
        keep = (d["scores"] >= score_threshold).nonzero().flatten()
        keep = keep[d["scores"][keep].argsort(descending=True)][:max_detections]
        draw_boxes(ax, img, d["boxes"][keep], d["labels"][keep], d["scores"][keep],
                   class_names=class_names, color_by_score=False)
        ax.set_title(f"{name} ({len(keep)} >= {score_threshold:g})")
    return fig
