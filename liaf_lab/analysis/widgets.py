"""``MaskInspector``: an ipywidgets viewer of LIAF-KD instance scores and masks per image and level."""

from __future__ import annotations

import html
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import ipywidgets as widgets
import torch
import torch.nn.functional as F
from IPython.display import HTML, Image, clear_output, display
from matplotlib.figure import Figure
from torch import Tensor, nn

from ..distillers import InstanceScorer, KDInputs
from ..models.detectors import match_levels
from ..validation import check_boxes, check_feature_dict
from .cam import fpn_features, resize_for_detector
from .viz import check_image, check_levels, draw_boxes, draw_mask, draw_score_bars, figure_to_png, new_figure

__all__ = ["FeatureSource", "MaskInspector"]

FeatureSource = nn.Module | Callable[[Tensor], Mapping[str, Tensor]] | Sequence[Mapping[str, Tensor]]
"""A torchvision detector, a callable ``[1, 3, H, W] -> {level: [1, C, h, w]}``, or one dict per image."""


@contextmanager
def _options(distiller: InstanceScorer, mask_scale: str, mask_side: str, normalize: str) -> Iterator[None]:
    """Set the distiller's mask options for the block and restore them afterwards, also on error."""
    saved = (distiller.mask_scale, distiller.mask_side, {lvl: s.normalize for lvl, s in distiller.selectors.items()})
    try:
        distiller.mask_scale, distiller.mask_side = mask_scale, mask_side
        for sel in distiller.selectors.values():
            sel.normalize = normalize
        yield
    finally:
        distiller.mask_scale, distiller.mask_side = saved[0], saved[1]
        for lvl, sel in distiller.selectors.items():
            sel.normalize = saved[2][lvl]


def _is_detector(source: object) -> bool:
    return isinstance(source, nn.Module) and hasattr(source, "transform") and hasattr(source, "backbone")


def _pad_stack(feats: Sequence[Tensor]) -> Tensor:
    """``[1, C, h_i, w_i]`` maps -> ``[B, C, max h, max w]``, zero padded at the bottom/right."""
    height = max(f.shape[-2] for f in feats)
    width = max(f.shape[-1] for f in feats)
    return torch.cat([F.pad(f, (0, width - f.shape[-1], 0, height - f.shape[-2])) for f in feats])


class MaskInspector:
    """Pick an image, FPN level, selector (or the mean), side and mask options; see scores and mask.

    The figure shows the image with its boxes coloured by the chosen side's instance scores, the
    teacher's and student's scores side by side, and the chosen side's mask ``M`` (Eq. 7, with the
    ``mask_scale`` option applied) at the chosen level over the image. It redraws whenever a
    control changes. Problems (an image without boxes, features lacking a level, a model that is
    no FPN detector) appear as a message in the output area.

    Args:
        images: N images ``[3, H, W]`` (or a ``[N, 3, H, W]`` batch).
        targets: N dicts with ``"boxes" [n, 4]`` (and optional ``"labels" [n]``), or N box tensors.
        teacher, student: feature sources (``FeatureSource``): a torchvision detector (images and
            boxes are then first resized like the teacher detector's transform, the frame of its
            features; its levels are matched to the distiller's by stride), a callable mapping ``[1, 3, H, W]`` to ``{level: [1, C, h, w]}``, or N
            precomputed dicts ``{level: [1, C, h, w]}``. Boxes must be in the features' frame.
        distiller: a distiller that scores instances (``InstanceScorer``, e.g. LIAF-KD's) whose selectors and projectors score the instances. Its
            options are set for each redraw and restored afterwards.
        class_names: label -> name for the box captions.
        level: the initial level (default the distiller's first).

    Attributes: ``image_slider``, ``level_dropdown``, ``selector_dropdown``, ``side_toggle``,
    ``mask_scale_toggle``, ``mask_side_toggle``, ``normalize_toggle`` (controls), ``output``,
    ``widget`` (the VBox), ``figure`` (the last figure or None) and ``message`` (the last problem
    or None). ``normalize="batch"`` takes the softmax over all the inspector's images together.
    """

    def __init__(
        self,
        images: Sequence[Tensor] | Tensor,
        targets: Sequence[Mapping[str, Tensor] | Tensor],
        teacher: FeatureSource,
        student: FeatureSource,
        distiller: InstanceScorer,
        class_names: Sequence[str] | None = None,
        level: str | None = None,
    ) -> None:
        if not isinstance(distiller, InstanceScorer):
            raise ValueError(f"distiller must score instances (liaf_lab.distillers.InstanceScorer, e.g. a 'liaf' "
                             f"distiller), got {type(distiller).__name__}")
        images = list(images)
        if not images:
            raise ValueError("images is empty: pass at least one [3, H, W] image")
        if len(targets) != len(images):
            raise ValueError(f"targets has {len(targets)} entries but there are {len(images)} images")
        for name, source in (("teacher", teacher), ("student", student)):
            if not callable(source) and len(source) != len(images):
                raise ValueError(f"{name} holds {len(source)} feature dicts but there are {len(images)} images")
        self.images: list[Tensor] = []
        self.boxes: list[Tensor] = []
        self.labels: list[Tensor | None] = []
        for i, (image, target) in enumerate(zip(images, targets)):
            tgt = dict(target) if isinstance(target, Mapping) else {"boxes": target}
            if "boxes" not in tgt:
                raise ValueError(f"targets[{i}] has no 'boxes'; it has {list(tgt)}")
            boxes = torch.as_tensor(tgt["boxes"], dtype=torch.float32).reshape(-1, 4)
            (tgt["boxes"],) = check_boxes(f"targets[{i}]['boxes']", [boxes])
            img = check_image(image, f"images[{i}]")
            if _is_detector(teacher):
                img, tgt = resize_for_detector(teacher, img, tgt)
            self.images.append(img)
            self.boxes.append(tgt["boxes"].cpu().float())
            self.labels.append(torch.as_tensor(tgt["labels"]).cpu().long() if "labels" in tgt else None)
        self.teacher, self.student, self.distiller = teacher, student, distiller
        self.class_names = class_names
        self._cache: dict[tuple[str, int], dict[str, Tensor]] = {}
        levels = distiller.levels
        num_sel = distiller.selectors[levels[0]].num_selectors
        self.image_slider = widgets.IntSlider(value=0, min=0, max=len(self.images) - 1, description="image")
        first = check_levels(level, levels, "the distiller")[0] if level is not None else levels[0]
        self.level_dropdown = widgets.Dropdown(options=levels, value=first, description="level")
        self.selector_dropdown = widgets.Dropdown(
            options=[("mean", "mean")] + [(f"E_{k + 1}", k) for k in range(num_sel)], value="mean",
            description="selector")
        self.side_toggle = widgets.ToggleButtons(options=["teacher", "student"], value="teacher", description="side")
        self.mask_scale_toggle = widgets.ToggleButtons(options=["literal", "count"], value=distiller.mask_scale,
                                                       description="mask scale")
        self.mask_side_toggle = widgets.ToggleButtons(options=["separate", "shared"], value=distiller.mask_side,
                                                      description="mask side")
        self.normalize_toggle = widgets.ToggleButtons(
            options=["image", "batch"], value=distiller.selectors[levels[0]].normalize, description="softmax")
        self.output = widgets.Output()
        controls = [self.image_slider, self.level_dropdown, self.selector_dropdown, self.side_toggle,
                    self.mask_scale_toggle, self.mask_side_toggle, self.normalize_toggle]
        for control in controls:
            control.observe(lambda _change: self.redraw(), names="value")
        self.widget = widgets.VBox([
            widgets.HBox([self.image_slider, self.level_dropdown, self.selector_dropdown]),
            self.side_toggle,
            widgets.HBox([self.mask_scale_toggle, self.mask_side_toggle]),
            self.normalize_toggle,
            self.output,
        ])
        self.figure: Figure | None = None
        self.message: str | None = None
        self.redraw()

    def _ipython_display_(self) -> None:
        display(self.widget)

    # -- data ---------------------------------------------------------------------------------
    def _features(self, side: str, index: int) -> dict[str, Tensor]:
        key = (side, index)
        if key not in self._cache:
            source = self.teacher if side == "teacher" else self.student
            image = self.images[index]
            if _is_detector(source):  # its levels matched to the distiller's by stride
                levels = match_levels(self.distiller.strides, source)
                feats = fpn_features(source, image)
                feats = {lvl: feats[src] for lvl, src in levels.items()}
            elif callable(source):
                with torch.no_grad():
                    param = next(source.parameters(), None) if isinstance(source, nn.Module) else None
                    feats = source(image[None].to(param.device if param is not None else "cpu"))
                if not isinstance(feats, Mapping):
                    raise ValueError(f"the {side} returned {type(feats).__name__}, not a dict of FPN levels: pass a "
                                     "torchvision FPN detector, a callable returning {level: [1, C, h, w]}, or "
                                     "precomputed feature dicts")
            else:
                feats = source[index]
            feats = {k: (v[None] if isinstance(v, Tensor) and v.dim() == 3 else v) for k, v in dict(feats).items()}
            check_feature_dict(f"{side} features of image {index}", feats, self.distiller.levels)
            self._cache[key] = {k: v.detach().float().cpu() for k, v in feats.items()}
        return self._cache[key]

    @torch.no_grad()
    def _compute(self) -> dict[str, Any]:
        index, level = self.image_slider.value, self.level_dropdown.value
        if level not in self.distiller.levels:
            raise ValueError(f"unknown FPN level {level!r}; the distiller has {self.distiller.levels}")
        if len(self.boxes[index]) == 0:
            raise ValueError(f"image {index} has no boxes: LIAF-KD scores instances, so there is nothing to show")
        batch = list(range(len(self.images))) if self.normalize_toggle.value == "batch" else [index]
        pairs = [(self._features("student", j), self._features("teacher", j)) for j in batch]
        for j, (s, t) in zip(batch, pairs):
            self.distiller.check_inputs(KDInputs(s, t, [self.boxes[j]]))
        device = next(self.distiller.parameters()).device
        student = _pad_stack([s[level] for s, _ in pairs]).to(device)
        teacher = _pad_stack([t[level] for _, t in pairs]).to(device)
        boxes = [self.boxes[j].to(device) for j in batch]
        selector = self.selector_dropdown.value
        d = self.distiller
        with _options(d, self.mask_scale_toggle.value, self.mask_side_toggle.value, self.normalize_toggle.value):
            projected = d.projectors[level](student)
            a_t = d.instance_scores(level, teacher, boxes, per_selector=True)
            a_s = d.instance_scores(level, d.student_roi_input(level, student, projected), boxes, per_selector=True)
            a_t, a_s = (a.mean(0) if selector == "mean" else a[selector] for a in (a_t, a_s))
            side_scores = {"teacher": a_t, "student": a_s}[self.side_toggle.value]
            mask_scores = (a_t + a_s) / 2 if d.mask_side == "shared" else side_scores
            mask = d.level_mask(level, mask_scores, boxes, tuple(teacher.shape[-2:]))
        pos = batch.index(index)
        start = sum(len(self.boxes[j]) for j in batch[:pos])
        span = slice(start, start + len(self.boxes[index]))
        h, w = pairs[pos][1][level].shape[-2:]
        return {
            "teacher": a_t[span].cpu(), "student": a_s[span].cpu(), "side": side_scores[span].cpu(),
            "mask": mask[pos, 0, :h, :w].cpu().numpy(), "stride": d.strides[level],
        }

    # -- drawing ------------------------------------------------------------------------------
    def _draw(self, data: dict[str, Any]) -> Figure:
        index, level, side = self.image_slider.value, self.level_dropdown.value, self.side_toggle.value
        image = self.images[index]
        selector = self.selector_dropdown.value
        what = "A (mean)" if selector == "mean" else f"E_{selector + 1}"
        fig, axes = new_figure(3, panel=(4.0, 4.0 * image.shape[1] / image.shape[2] + 0.6))
        ax_img, ax_bar, ax_mask = axes[0]
        draw_boxes(ax_img, image, self.boxes[index], self.labels[index], data["side"], self.class_names)
        ax_img.set_title(f"image {index}: {side} scores {what}")
        names = [str(i) for i in range(len(self.boxes[index]))]
        draw_score_bars(ax_bar, {"teacher": data["teacher"], "student": data["student"]}, names)
        ax_bar.legend(fontsize=8)
        ax_bar.set_title(f"level {level}: {what}")
        draw_boxes(ax_mask, image, self.boxes[index], scores=data["side"], colorbar=False)
        mappable = draw_mask(ax_mask, data["mask"], tuple(image.shape[-2:]), data["stride"])
        fig.colorbar(mappable, ax=ax_mask, fraction=0.046, pad=0.02, label="mask weight")
        mask_of = "shared (A^T + A^S)/2" if self.mask_side_toggle.value == "shared" else side
        ax_mask.set_title(f"mask M ({mask_of}, {self.mask_scale_toggle.value})")
        return fig

    def redraw(self) -> None:
        """Recompute scores and mask for the current controls and show them (or the problem)."""
        try:
            self.figure, self.message = self._draw(self._compute()), None
            shown: Any = Image(data=figure_to_png(self.figure), format="png")
        except (ValueError, TypeError, RuntimeError) as err:
            self.figure = None
            self.message = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
            shown = HTML(f"<b style='color:#b00'>Cannot show this view:</b> {html.escape(self.message)}")
        with self.output:
            clear_output(wait=True)
            display(shown)
