"""``MaskInspector``: an ipywidgets viewer of what a distillation method weights, image by image and level by
level: LIAF-KD's instance scores, masks and per-instance loss (Eq. 3-9), or any method's ``weight_maps``."""

from __future__ import annotations

import base64
import html
import math
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import ipywidgets as widgets
import torch
import torch.nn.functional as F
from IPython.display import HTML, clear_output, display
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor, nn

from ..distillers import FeatureDistiller, InstanceScorer, KDInputs
from ..distillers.liaf import MaskScale, MaskSide
from ..distillers.instance import Normalize, instance_mask
from ..models.backbones import eval_mode
from ..options import check_value
from ..validation import check_boxes, check_feature_dict
from .cam import _device, resize_for_detector
from .maps import SIDES, _groups, _paired_order, kd_inputs_for
from .viz import (
    _class_name, check_image, check_levels, draw_boxes, draw_mask, draw_score_bars, figure_to_jpeg, new_figure,
)

__all__ = ["FeatureSource", "MaskInspector", "MaskView", "VANISHING_SCORE"]

FeatureSource = nn.Module | Callable[[Tensor], Mapping[str, Tensor]] | Sequence[Mapping[str, Tensor]]
"""A torchvision detector, a callable ``[1, 3, H, W] -> {level: [1, C, h, w]}``, or one dict per image."""

VANISHING_SCORE = 0.05
"""When every score shown is below this, the view explains why (a softmax over many instances)."""

SETTINGS = ("method", "image", "level", "selector", "mask_scale", "mask_side", "normalize")

# (axes, box x1 y1 x2 y2 in data coordinates, tooltip): a hover region over the figure
_Spot = tuple[Axes, list[float], str]

_COLUMNS = {
    "instance": "index of the box in the image",
    "class": "the box's class (class_names[label])",
    "cells": "cells of the box region R_i at this level (the cells Eq. 7 multiplies by the instance's weight)",
    "A^T": "teacher score, mean over the selectors (Eq. 6)",
    "A^S": "student score, mean over the selectors (Eq. 6)",
    "M^T": "the instance's weight in the teacher mask (mask scale applied)",
    "M^S": "the instance's weight in the student mask (mask scale applied)",
    "contribution": "sum over the cells of R_i of the per-cell term of Eq. 9; all cells sum to the level's loss",
    "share": "contribution / the level's loss",
}


@dataclass
class MaskView:
    """One setting of the inspector and what it shows.

    Attributes:
        settings: ``method``, ``image``, ``level``, ``selector``, ``mask_scale``, ``mask_side``, ``normalize``.
        figure: the figure, or None when ``message`` says why there is none.
        rows: the per-instance table, one dict per box of the image (``MaskInspector`` lists the keys).
        notes: remarks shown above the figure (vanishing scores, controls that do not apply, ...).
        message: the problem shown instead of a figure, or None.
        color_range: map (``"M"`` for LIAF-KD's masks) -> the fixed ``(vmin, vmax)`` of its colour scale.
        level_loss: LIAF-KD: the distiller's ``level_loss`` of the batch (the image, or all images with
            ``normalize="batch"``), without ``loss_weight``.
        background: LIAF-KD: the sum of the per-cell terms over this image's cells in no box.
        html: what the widget shows (notes, the figure with hover regions over the boxes, the table).
    """

    settings: dict[str, Any]
    figure: Figure | None = field(default=None, repr=False)
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)
    notes: list[str] = field(default_factory=list, repr=False)
    message: str | None = None
    color_range: dict[str, tuple[float, float]] = field(default_factory=dict)
    level_loss: float | None = None
    background: float | None = None
    html: str = field(default="", repr=False)

    def _repr_html_(self) -> str:
        return self.html


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


def _regions(boxes: Tensor, size: tuple[int, int], stride: float) -> Tensor:
    """``[n, H, W]`` bool: each box's region ``R_i``, the cells ``instance_mask`` (Eq. 7) multiplies by its score."""
    return instance_mask(list(boxes[:, None]), boxes.new_zeros(len(boxes)), size, stride)[:, 0] == 0


def _fmt(value: Any, digits: str = ".3g") -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else format(value, digits)
    return "–" if value is None else str(value)


def _tooltip(row: Mapping[str, Any]) -> str:
    head = f"{row['instance']} {row['class']}" if row["class"] is not None else str(row["instance"])
    return head + "\n" + "\n".join(f"{k}: {_fmt(v)}" for k, v in row.items() if k not in ("instance", "label", "class"))


def _method_pairs(student: FeatureSource, distiller: FeatureDistiller,
                  methods: Mapping[str, tuple[FeatureSource, FeatureDistiller]] | None
                  ) -> dict[str, tuple[FeatureSource, FeatureDistiller]]:
    """The inspector's methods by label: ``distiller`` with ``student`` first, then ``methods``; ``ValueError``
    naming a pair that is not a (student, distiller), reuses the distiller's label or distils other levels."""
    if not isinstance(distiller, FeatureDistiller):
        raise ValueError(f"distiller must be a liaf_lab distiller (FeatureDistiller), got {type(distiller).__name__}")
    pairs: dict[str, tuple[FeatureSource, FeatureDistiller]] = {distiller.label: (student, distiller)}
    for name, pair in (methods or {}).items():
        if name in pairs:
            raise ValueError(f"methods has {name!r}, the name of the distiller itself: choose another name")
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[1], FeatureDistiller)):
            raise ValueError(f"methods[{name!r}] must be a (student, distiller) pair, got {type(pair).__name__}")
        if pair[1].levels != distiller.levels:
            raise ValueError(f"methods[{name!r}] distils the levels {pair[1].levels} but the distiller "
                             f"{distiller.levels}: build every distiller for the same student levels")
        pairs[name] = pair
    return pairs


class MaskInspector:
    """Browse what a distillation method weights: pick a method, image and FPN level (and for LIAF-KD a
    selector and the mask options); see the teacher's and student's masks side by side and a table per instance.

    For LIAF-KD (any ``InstanceScorer``) the figure shows the teacher's and student's instance scores
    (bars, for the mean ``A`` or one selector ``E_k``) and the masks ``M^T`` and ``M^S`` (Eq. 7, as
    ``InstanceScorer.level_masks`` builds them from the mean scores, with the ``mask_scale``,
    ``mask_side`` and ``normalize`` options set from the controls) over the image. The table
    (``instance_table``) has per box: ``instance``, ``label``, ``class``, ``cells`` (the cells of its
    region ``R_i`` at the level), ``A^T E_k`` and ``A^S E_k`` per selector, the means ``A^T`` and
    ``A^S``, its mask weights ``M^T`` and ``M^S`` (``InstanceScorer.scaled``: the value of the mask in
    ``R_i`` where no other box overlaps) and ``contribution``: the sum over the cells of ``R_i`` of the
    per-cell term of Eq. 9, ``sum_c (M^T F^T - f_phi(M^S F^S))^2 / (N C H W)`` (``N`` the images of the
    batch); the terms of all cells sum to the distiller's ``level_loss`` (``MaskView.level_loss``; times
    ``loss_weight`` it is the level's part of the ``liaf`` term). Cells in several boxes count for
    each; ``MaskView.background`` sums the cells in no box.

    For any other method the figure shows its ``weight_maps`` at the level (a ``"(teacher)"``/
    ``"(student)"`` pair side by side), computed from the training step's inputs
    (``analysis.kd_inputs_for`` with detectors), and the table the mean of each map over each box's
    region. A method whose ``weight_maps`` is empty (FitNet), an image without boxes, or inputs the
    method cannot use give a message instead of the figure.

    Colour scales are fixed and shown by a colour bar: LIAF-KD's ``literal`` masks span ``[0, 1]``
    (scores are at most 1, the background is 1) and ``count`` masks ``[0, max]`` over all the
    inspector's images (with boxes) and levels, once per option setting, so one colour is one
    weight in every view of an option. Other methods' maps span ``[min(0, min), max]`` of each map
    (a teacher/student pair together) over all images at the level: the same in every image, but
    per level, since many depend on the level's grid (e.g. FGD's ``1 / box cells``). When every
    score shown is below ``VANISHING_SCORE`` (a softmax over many instances) a note says so.
    Hovering a box in the figure or a table row shows its values.

    Args:
        images: N images ``[3, H, W]`` (or a ``[N, 3, H, W]`` batch).
        targets: N dicts with ``"boxes" [n, 4]`` (and ``"labels" [n]``, required with detectors), or N box tensors.
        teacher, student: torchvision detectors (the inputs are then exactly a training step's, from
            ``kd_inputs_for``; images and boxes are shown resized like the detectors' transform), or
            feature sources (``FeatureSource``): a callable mapping ``[1, 3, H, W]`` to
            ``{level: [1, C, h, w]}`` or N dicts ``{level: [1, C, h, w]}``, with boxes in the features' frame.
        distiller: the student's distiller (``FeatureDistiller``), shown as ``distiller.label``. A LIAF-KD
            distiller's options are set for each view and restored afterwards.
        class_names: label -> name for the bars, boxes and table.
        level: the initial level (default the distiller's first).
        methods: further methods, name -> ``(student, distiller)``, against the same teacher and on the
            same levels (students of the same kind as ``student``: detectors or feature sources).
        seed: seeds the random draws of methods that make them (``kd_inputs_for``).

    Attributes: ``method_dropdown``, ``image_slider``, ``level_dropdown``, ``selector_dropdown``,
    ``mask_scale_toggle``, ``mask_side_toggle``, ``normalize_toggle`` (controls; the last four only
    for instance scorers), ``output``, ``widget`` (the VBox), ``current`` (the shown ``MaskView``),
    ``figure`` and ``message`` (its figure and problem). ``view(**settings)`` renders another setting
    without touching the controls; ``normalize="batch"`` takes the softmax over all the images together.
    """

    def __init__(
        self,
        images: Sequence[Tensor] | Tensor,
        targets: Sequence[Mapping[str, Tensor] | Tensor],
        teacher: FeatureSource,
        student: FeatureSource,
        distiller: FeatureDistiller,
        class_names: Sequence[str] | None = None,
        level: str | None = None,
        *,
        methods: Mapping[str, tuple[FeatureSource, FeatureDistiller]] | None = None,
        seed: int = 0,
    ) -> None:
        self.methods = _method_pairs(student, distiller, methods)
        images = list(images)
        if not images:
            raise ValueError("images is empty: pass at least one [3, H, W] image")
        if len(targets) != len(images):
            raise ValueError(f"targets has {len(targets)} entries but there are {len(images)} images")
        sources = {"teacher": teacher, **{f"methods[{n!r}] student": s for n, (s, _) in self.methods.items()}}
        kinds = {name: _is_detector(source) for name, source in sources.items()}
        self._detectors = all(kinds.values())
        if any(kinds.values()) and not self._detectors:
            raise ValueError(f"teacher and students must all be torchvision detectors or all feature sources; "
                             f"detectors: {[n for n, k in kinds.items() if k]}")
        for name, source in sources.items():
            if not callable(source) and len(source) != len(images):
                raise ValueError(f"{name} holds {len(source)} feature dicts but there are {len(images)} images")
        self.images: list[Tensor] = []
        self.boxes: list[Tensor] = []
        self.labels: list[Tensor | None] = []
        self._samples: list[tuple[Tensor, dict[str, Tensor]]] = []  # what kd_inputs_for reads (detectors)
        for i, (image, target) in enumerate(zip(images, targets, strict=True)):
            tgt = dict(target) if isinstance(target, Mapping) else {"boxes": target}
            if "boxes" not in tgt:
                raise ValueError(f"targets[{i}] has no 'boxes'; it has {list(tgt)}")
            if self._detectors and "labels" not in tgt:
                raise ValueError(f"targets[{i}] has no 'labels': with detectors the inspector builds a training "
                                 "step's inputs (kd_inputs_for), which need the boxes' classes")
            boxes = torch.as_tensor(tgt["boxes"], dtype=torch.float32).reshape(-1, 4)
            (tgt["boxes"],) = check_boxes(f"targets[{i}]['boxes']", [boxes])
            img = check_image(image, f"images[{i}]")
            if self._detectors:
                self._samples.append((img, tgt))
                img, tgt = resize_for_detector(teacher, img, tgt)
            self.images.append(img)
            self.boxes.append(tgt["boxes"].cpu().float())
            self.labels.append(torch.as_tensor(tgt["labels"]).cpu().long() if "labels" in tgt else None)
        self.teacher, self.class_names, self.seed = teacher, class_names, seed
        self.levels = list(distiller.levels)
        self._inputs_cache: dict[tuple[str, int], KDInputs] = {}
        self._features_cache: dict[tuple[str, int], dict[str, Tensor]] = {}
        self._maps_cache: dict[tuple[str, int], dict[str, dict[str, Tensor]]] = {}
        self._range_cache: dict[tuple, tuple[float, float]] = {}
        self._hold = False

        scorers = [d for _, d in self.methods.values() if isinstance(d, InstanceScorer)]
        first = scorers[0] if scorers else None
        self.method_dropdown = widgets.Dropdown(options=list(self.methods), value=distiller.label, description="method")
        self.image_slider = widgets.IntSlider(value=0, min=0, max=len(self.images) - 1, description="image")
        start = check_levels(level, self.levels, "the distiller")[0] if level is not None else self.levels[0]
        self.level_dropdown = widgets.Dropdown(options=self.levels, value=start, description="level")
        self.selector_dropdown = widgets.Dropdown(options=[("mean", "mean")], value="mean", description="selector")
        self.mask_scale_toggle = widgets.ToggleButtons(
            options=typing.get_args(MaskScale), value=first.mask_scale if first else "literal", description="mask scale")
        self.mask_side_toggle = widgets.ToggleButtons(
            options=typing.get_args(MaskSide), value=first.mask_side if first else "separate", description="mask side")
        self.normalize_toggle = widgets.ToggleButtons(
            options=typing.get_args(Normalize), value=first.selectors[first.levels[0]].normalize if first else "image",
            description="softmax")
        self.score_controls = widgets.VBox([
            self.selector_dropdown, widgets.HBox([self.mask_scale_toggle, self.mask_side_toggle]), self.normalize_toggle])
        self.output = widgets.Output()
        self.widget = widgets.VBox([
            widgets.HBox([self.method_dropdown, self.image_slider, self.level_dropdown]), self.score_controls, self.output])
        self._configure()
        for control in (self.method_dropdown, self.image_slider, self.level_dropdown, self.selector_dropdown,
                        self.mask_scale_toggle, self.mask_side_toggle, self.normalize_toggle):
            control.observe(self._on_change, names="value")
        self.current: MaskView = MaskView({})
        self.redraw()

    def _ipython_display_(self) -> None:
        display(self.widget)

    # -- public ---------------------------------------------------------------------------------
    @property
    def settings(self) -> dict[str, Any]:
        """The controls' setting: ``method``, ``image``, ``level``, ``selector`` (``"mean"`` or ``k`` for
        ``E_{k+1}``), ``mask_scale``, ``mask_side``, ``normalize``."""
        return {"method": self.method_dropdown.value, "image": self.image_slider.value,
                "level": self.level_dropdown.value, "selector": self.selector_dropdown.value,
                "mask_scale": self.mask_scale_toggle.value, "mask_side": self.mask_side_toggle.value,
                "normalize": self.normalize_toggle.value}

    @property
    def figure(self) -> Figure | None:
        """The shown view's figure (None when it shows a message)."""
        return self.current.figure

    @property
    def message(self) -> str | None:
        """The problem the shown view reports, or None."""
        return self.current.message

    def view(self, **settings: Any) -> MaskView:
        """The view of the controls' setting with ``settings`` changed (keys of ``settings``), computed
        without touching the controls or the shown view. Data problems (no boxes, no maps) come back as
        ``MaskView.message``; an unknown setting or value raises ``ValueError``."""
        s = self._check_settings({**self.settings, **settings})
        try:
            if len(self.boxes[s["image"]]) == 0:
                raise ValueError(f"image {s['image']} has no boxes: the masks are built from the boxes, so there is "
                                 "nothing to show here (choose another image)")
            distiller = self.methods[s["method"]][1]
            view, spots = self._score_view(s) if isinstance(distiller, InstanceScorer) else self._maps_view(s)
        except (ValueError, TypeError, RuntimeError) as err:
            message = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
            view, spots = MaskView(s, message=message), []
        view.html = _render(view, spots)
        return view

    def instance_table(self, **settings: Any) -> list[dict[str, Any]]:
        """The per-instance rows of the shown view, or of ``view(**settings)`` when settings are given."""
        return (self.view(**settings) if settings else self.current).rows

    def redraw(self) -> None:
        """Recompute the view of the controls and show it (or its problem)."""
        self.current = self.view()
        with self.output:
            clear_output(wait=True)
            display(HTML(self.current.html))

    # -- controls -------------------------------------------------------------------------------
    def _on_change(self, change: dict[str, Any]) -> None:
        if self._hold:
            return
        if change["owner"] is self.method_dropdown:
            self._configure()
        self.redraw()

    def _configure(self) -> None:
        """Fit the score controls to the chosen method: its selectors, or hidden when it scores no instances."""
        distiller = self.methods[self.method_dropdown.value][1]
        scorer = isinstance(distiller, InstanceScorer)
        self.score_controls.layout.display = None if scorer else "none"
        if not scorer:
            return
        num = distiller.selectors[self.levels[0]].num_selectors
        options = [("mean", "mean")] + [(f"E_{k + 1}", k) for k in range(num)]
        keep = self.selector_dropdown.value if self.selector_dropdown.value in ("mean", *range(num)) else "mean"
        self._hold = True
        try:
            self.selector_dropdown.options = options
            self.selector_dropdown.value = keep
        finally:
            self._hold = False

    def _check_settings(self, s: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(s) - set(SETTINGS))
        if unknown:
            raise ValueError(f"unknown settings {unknown}; the settings are {list(SETTINGS)}")
        if s["method"] not in self.methods:
            raise ValueError(f"unknown method {s['method']!r}; the inspector has {list(self.methods)}")
        if isinstance(s["image"], bool) or not isinstance(s["image"], int) or not 0 <= s["image"] < len(self.images):
            raise ValueError(f"image must be an index in 0..{len(self.images) - 1}, got {s['image']!r}")
        check_levels([s["level"]], self.levels, "the inspector")
        for name, choices in (("mask_scale", MaskScale), ("mask_side", MaskSide), ("normalize", Normalize)):
            check_value(name, s[name], choices)
        distiller = self.methods[s["method"]][1]
        if isinstance(distiller, InstanceScorer):
            num = distiller.selectors[self.levels[0]].num_selectors
            if s["selector"] != "mean" and s["selector"] not in range(num):
                raise ValueError(f"selector must be 'mean' or an index in 0..{num - 1} (E_1..E_{num}), "
                                 f"got {s['selector']!r}")
        return s

    # -- data -----------------------------------------------------------------------------------
    def _source_features(self, key: str, source: FeatureSource, index: int) -> dict[str, Tensor]:
        """The features of a feature source (not a detector) for image ``index``, cached under ``key``."""
        if (key, index) not in self._features_cache:
            image = self.images[index]
            if callable(source):
                with torch.no_grad():
                    param = next(source.parameters(), None) if isinstance(source, nn.Module) else None
                    feats = source(image[None].to(param.device if param is not None else "cpu"))
                if not isinstance(feats, Mapping):
                    raise ValueError(f"the {key} returned {type(feats).__name__}, not a dict of FPN levels: pass a "
                                     "torchvision FPN detector, a callable returning {level: [1, C, h, w]}, or "
                                     "precomputed feature dicts")
            else:
                feats = source[index]
            feats = {k: (v[None] if isinstance(v, Tensor) and v.dim() == 3 else v) for k, v in dict(feats).items()}
            check_feature_dict(f"{key} features of image {index}", feats, self.levels)
            self._features_cache[key, index] = {k: v.detach().float() for k, v in feats.items()}
        return self._features_cache[key, index]

    def _inputs(self, name: str, index: int) -> KDInputs:
        """What method ``name`` reads for image ``index`` alone (a batch of one), checked by the distiller."""
        if (name, index) not in self._inputs_cache:
            student, distiller = self.methods[name]
            if self._detectors:
                image, target = self._samples[index]
                inputs = kd_inputs_for(student, self.teacher, distiller, [image], [target], self.seed)
            else:
                device = _device(distiller)
                s_feats, t_feats = (self._source_features(key, source, index)
                                    for key, source in ((f"{name} student", student), ("teacher", self.teacher)))
                labels = self.labels[index]
                inputs = KDInputs({k: v.to(device) for k, v in s_feats.items()},
                                  {k: v.to(device) for k, v in t_feats.items()}, [self.boxes[index].to(device)],
                                  [labels.to(device)] if labels is not None else None)
            distiller.check_inputs(inputs)
            self._inputs_cache[name, index] = inputs
        return self._inputs_cache[name, index]

    def _images_with_boxes(self) -> list[int]:
        return [j for j, b in enumerate(self.boxes) if len(b)]

    # -- LIAF-KD --------------------------------------------------------------------------------
    @torch.no_grad()
    def _score_level(self, name: str, level: str, batch: list[int], options: tuple[str, str, str]) -> dict[str, Tensor]:
        """LIAF-KD at ``level`` on the images ``batch`` as one batch (features zero-padded to one grid),
        with the mask options set: scores ``a_t``, ``a_s [K, I]``, mask weights ``w_t``, ``w_s [I]``, masks
        ``m_t``, ``m_s [B, H, W]`` and the per-cell terms of Eq. 9 ``cells [B, H, W]`` (summing to ``level_loss``)."""
        d = self.methods[name][1]
        inputs = [self._inputs(name, j) for j in batch]
        device = _device(d)
        student = _pad_stack([inp.student_feats[level] for inp in inputs]).to(device)
        teacher = _pad_stack([inp.teacher_feats[level] for inp in inputs]).to(device)
        boxes = [inp.boxes[0].to(device) for inp in inputs]
        with _options(d, *options), eval_mode(d):
            projected = d.projectors[level](student)  # f_phi(F^S)
            a_t = d.instance_scores(level, teacher, boxes, per_selector=True)
            a_s = d.instance_scores(level, d.student_roi_input(level, student, projected), boxes, per_selector=True)
            m_t, m_s = d.level_masks(level, student, teacher, boxes, projected)
            if d.mask_side == "shared":
                w_t = w_s = d.scaled((a_t.mean(0) + a_s.mean(0)) / 2, boxes)
            else:
                w_t, w_s = d.scaled(a_t.mean(0), boxes), d.scaled(a_s.mean(0), boxes)
            student_hat = d.projectors[level](m_s * student)  # f_phi(M^S F^S), Eq. 9 as written
            cells = F.mse_loss(student_hat, m_t * teacher, reduction="none").sum(1) / teacher.numel()
        out = {"a_t": a_t, "a_s": a_s, "w_t": w_t, "w_s": w_s, "m_t": m_t[:, 0], "m_s": m_s[:, 0], "cells": cells}
        return {k: v.float().cpu() for k, v in out.items()}

    def _batch(self, index: int, normalize: str) -> list[int]:
        return list(range(len(self.images))) if normalize == "batch" else [index]

    def _mask_range(self, name: str, options: tuple[str, str, str]) -> tuple[float, float]:
        """``[0, 1]`` for literal masks; for count masks ``[0, max]`` over all images (with boxes) and levels."""
        if options[0] == "literal":
            return 0.0, 1.0
        key = ("M", name, *options)
        if key not in self._range_cache:
            groups = [self._batch(0, "batch")] if options[2] == "batch" else [[j] for j in self._images_with_boxes()]
            top = max(float(torch.maximum(out["m_t"].max(), out["m_s"].max()))
                      for lvl in self.levels for g in groups for out in [self._score_level(name, lvl, g, options)])
            self._range_cache[key] = (0.0, max(top, 1.0))
        return self._range_cache[key]

    def _instance_names(self, index: int) -> list[str]:
        labels = self.labels[index]
        if labels is None:
            return [str(i) for i in range(len(self.boxes[index]))]
        return [f"{i} {_class_name(int(lab), self.class_names)}" for i, lab in enumerate(labels.tolist())]

    def _row_head(self, index: int, i: int, cells: int) -> dict[str, Any]:
        labels = self.labels[index]
        label = int(labels[i]) if labels is not None else None
        return {"instance": i, "label": label,
                "class": _class_name(label, self.class_names) if label is not None else None, "cells": cells}

    def _score_view(self, s: dict[str, Any]) -> tuple[MaskView, list[_Spot]]:
        name, index, level, selector = s["method"], s["image"], s["level"], s["selector"]
        d = self.methods[name][1]
        options = (s["mask_scale"], s["mask_side"], s["normalize"])
        batch = self._batch(index, s["normalize"])
        out = self._score_level(name, level, batch, options)
        pos = batch.index(index)
        start = sum(len(self.boxes[j]) for j in batch[:pos])
        span = slice(start, start + len(self.boxes[index]))
        h, w = self._inputs(name, index).teacher_feats[level].shape[-2:]
        regions = _regions(self.boxes[index], (h, w), d.strides[level])
        cells = out["cells"][pos, :h, :w]
        a_t, a_s = out["a_t"][:, span], out["a_s"][:, span]
        rows = []
        for i in range(a_t.shape[1]):
            row = self._row_head(index, i, int(regions[i].sum()))
            for side, a in (("T", a_t), ("S", a_s)):
                row |= {f"A^{side} E_{k + 1}": float(a[k, i]) for k in range(a.shape[0])}
                row[f"A^{side}"] = float(a[:, i].mean())
            row |= {"M^T": float(out["w_t"][span][i]), "M^S": float(out["w_s"][span][i]),
                    "contribution": float(cells[regions[i]].sum())}
            rows.append(row)
        shown_t, shown_s = (a.mean(0) if selector == "mean" else a[selector] for a in (a_t, a_s))
        notes = []
        top = float(torch.maximum(shown_t.max(), shown_s.max()))
        if top < VANISHING_SCORE:
            group = out["a_t"].shape[1]
            where = f"the batch of all {len(batch)} images" if s["normalize"] == "batch" else "this image"
            notes.append(f"Every score here is below {VANISHING_SCORE:g} (largest {top:.3f}): the softmax runs over "
                         f"{where}, {group} instances, so each gets about 1/{group} = {1 / group:.3f}. With mask scale "
                         f"'literal' instance cells get weights near 0; 'count' multiplies by {group} so an average "
                         "instance keeps weight 1. The table lists the values.")
        missed = [r["instance"] for r in rows if r["cells"] == 0]
        if missed:
            notes.append(f"Instances {missed} cover no cell at level {level} (stride {d.strides[level]:g}): boxes "
                         "between cell corners leave the mask unchanged there.")
        lo, hi = self._mask_range(name, options)
        if s["mask_scale"] == "count":
            notes.append(f"Colour scale [0, {hi:.3g}]: the largest count-mask weight over all images and levels "
                         "with these options.")
        view = MaskView(s, rows=rows, notes=notes, color_range={"M": (lo, hi)}, level_loss=float(out["cells"].sum()),
                        background=float(cells[~regions.any(0)].sum()))
        view.figure, spots = self._draw_scores(view, shown_t, shown_s, out["m_t"][pos, :h, :w], out["m_s"][pos, :h, :w],
                                               d.strides[level])
        return view, spots

    def _draw_scores(self, view: MaskView, shown_t: Tensor, shown_s: Tensor, m_t: Tensor, m_s: Tensor,
                     stride: float) -> tuple[Figure, list[_Spot]]:
        s = view.settings
        index, image, boxes = s["image"], self.images[s["image"]], self.boxes[s["image"]]
        names = self._instance_names(index)
        what = "mean A" if s["selector"] == "mean" else f"selector E_{s['selector'] + 1}"
        fig, axes = new_figure(3, panel=(4.0, 4.0 * image.shape[1] / image.shape[2] + 0.6))
        ax_bar, ax_t, ax_s = axes[0]
        draw_score_bars(ax_bar, {"teacher A^T": shown_t, "student A^S": shown_s}, names, ymax=1.0)
        ax_bar.tick_params(axis="x", labelrotation=45, labelsize=8)
        ax_bar.legend(fontsize=8)
        ax_bar.set_title(f"instance scores, {what}" + ("\n(the masks use the mean A)" if s["selector"] != "mean" else ""))
        lo, hi = view.color_range["M"]
        shared = s["mask_side"] == "shared"
        spots: list[_Spot] = []
        for ax, mask, key, title in ((ax_t, m_t, "M^T", "teacher mask M^T"), (ax_s, m_s, "M^S", "student mask M^S")):
            weights = [row[key] for row in view.rows]
            draw_boxes(ax, image, boxes, list(range(len(names))), weights, names, color_by_score=False, colorbar=False)
            mappable = draw_mask(ax, mask.numpy(), tuple(image.shape[-2:]), stride, vmin=lo, vmax=hi)
            ax.set_title(f"{title}\n({'shared, from (A^T+A^S)/2' if shared else 'from A^' + key[-1]}, {s['mask_scale']})")
            spots += [(ax, box, _tooltip(row)) for box, row in zip(boxes.tolist(), view.rows, strict=True)]
        fig.colorbar(mappable, ax=[ax_t, ax_s], fraction=0.046, pad=0.02,
                     label=f"mask weight ({s['mask_scale']}, fixed [0, {hi:.3g}])")
        fig.suptitle(f"{s['method']} · image {index} · level {s['level']} (stride {stride:g})")
        return fig, spots

    # -- any method's weight maps ---------------------------------------------------------------
    def _weight_maps(self, name: str, index: int) -> dict[str, dict[str, Tensor]]:
        """``distiller.weight_maps`` of method ``name`` on image ``index`` (map -> level -> ``[1, H, W]``, CPU)."""
        if (name, index) not in self._maps_cache:
            distiller = self.methods[name][1]
            with eval_mode(distiller):
                maps = distiller.weight_maps(self._inputs(name, index))
            self._maps_cache[name, index] = {m: {lvl: v.detach().float().cpu() for lvl, v in levels.items()}
                                             for m, levels in maps.items()}
        return self._maps_cache[name, index]

    def _map_range(self, name: str, members: Sequence[str], level: str) -> tuple[float, float]:
        """``[min(0, min), max]`` of the maps ``members`` at ``level`` over all images (with boxes)."""
        key = ("maps", name, level, *members)
        if key not in self._range_cache:
            values = [self._weight_maps(name, j)[m][level] for j in self._images_with_boxes() for m in members]
            lo = min(0.0, min(float(v.min()) for v in values))
            self._range_cache[key] = (lo, max(max(float(v.max()) for v in values), lo + 1e-6))
        return self._range_cache[key]

    def _maps_view(self, s: dict[str, Any]) -> tuple[MaskView, list[_Spot]]:
        name, index, level = s["method"], s["image"], s["level"]
        d = self.methods[name][1]
        maps = self._weight_maps(name, index)
        if not maps:
            raise ValueError(f"{name} weights every cell alike (its weight_maps is empty, as FitNet's): there is no "
                             "mask to show")
        arrays = {m: levels[level][0] for m, levels in maps.items() if level in levels}
        if not arrays:
            raise ValueError(f"{name} has no map at level {level!r} (its maps: {list(maps)})")
        boxes = self.boxes[index]
        regions = {m: _regions(boxes, tuple(a.shape), d.strides[level]) for m, a in arrays.items()}
        rows = []
        for i in range(len(boxes)):
            row = self._row_head(index, i, int(next(iter(regions.values()))[i].sum()))
            row |= {m: float(a[regions[m][i]].mean()) if regions[m][i].any() else float("nan")
                    for m, a in arrays.items()}
            rows.append(row)
        groups = [(members[0].removesuffix(SIDES[0]), members) for members in _groups(_paired_order(list(arrays)))]
        view = MaskView(s, rows=rows,
                        color_range={base: self._map_range(name, members, level) for base, members in groups})
        view.notes.append(f"{name} scores no instances: the selector and the LIAF-KD mask options do not apply. "
                          f"Shown: its weight_maps at level {level}, each map's colour scale fixed over all images "
                          "at this level. Table: each map's mean over the box's cells.")
        absent = [m for m in maps if m not in arrays]
        if absent:
            view.notes.append(f"{name} has no {absent} at level {level}.")
        view.figure, spots = self._draw_maps(view, groups, arrays, d.strides[level])
        return view, spots

    def _draw_maps(self, view: MaskView, groups: list[tuple[str, list[str]]], arrays: dict[str, Tensor],
                   stride: float) -> tuple[Figure, list[_Spot]]:
        """Up to four panels a row, a teacher/student pair side by side in one row with one colour bar."""
        s = view.settings
        image, boxes = self.images[s["image"]], self.boxes[s["image"]]
        names = self._instance_names(s["image"])
        ncols = min(4, len(arrays))
        places, line, col = [], 0, 0  # (row, first column) of each group
        for _, members in groups:
            if col + len(members) > ncols:
                line, col = line + 1, 0
            places.append((line, col))
            col += len(members)
        fig, axes = new_figure(ncols, line + 1, panel=(3.3, 3.3 * image.shape[1] / image.shape[2] + 0.5))
        spots: list[_Spot] = []
        used = set()
        for (base, members), (r, c) in zip(groups, places, strict=True):
            lo, hi = view.color_range[base]
            group_axes = [axes[r, c + k] for k in range(len(members))]
            for ax, member in zip(group_axes, members, strict=True):
                draw_boxes(ax, image, boxes, list(range(len(names))), class_names=names, color_by_score=False,
                           colorbar=False)
                mappable = draw_mask(ax, arrays[member].numpy(), tuple(image.shape[-2:]), stride, vmin=lo, vmax=hi)
                ax.set_title(member, fontsize=9)
                spots += [(ax, box, _tooltip(row)) for box, row in zip(boxes.tolist(), view.rows, strict=True)]
                used.add(id(ax))
            fig.colorbar(mappable, ax=group_axes, fraction=0.046, pad=0.02, label=f"fixed [{lo:.3g}, {hi:.3g}]")
        for ax in axes.flat:
            ax.set_visible(id(ax) in used)
        fig.suptitle(f"{s['method']} · image {s['image']} · level {s['level']} (stride {stride:g})")
        return fig, spots


# -- HTML ---------------------------------------------------------------------------------------
def _render(view: MaskView, spots: Sequence[_Spot]) -> str:
    """The view as HTML: notes, the figure (JPEG) with a hover region (``title``) over each box, the table."""
    if view.figure is None:
        return ("<div class='liaf-inspector'><p class='liaf-message'><b style='color:#b00'>Cannot show this view:</b> "
                f"{html.escape(view.message or '')}</p></div>")
    parts = ["<div class='liaf-inspector'>"]
    parts += [f"<p class='liaf-note' style='color:#8a5a00;max-width:60em'>{html.escape(n)}</p>" for n in view.notes]
    jpeg = base64.b64encode(figure_to_jpeg(view.figure)).decode()
    panels = [ax.get_title().replace("\n", " ") for ax in view.figure.axes if ax.get_visible() and ax.get_title()]
    alt = f"{view.figure.get_suptitle()}: {' | '.join(panels)}"
    parts.append("<div class='liaf-figure' style='position:relative;display:inline-block;line-height:0'>"
                 f"<img src='data:image/jpeg;base64,{jpeg}' alt='{html.escape(alt)}' "
                 "style='display:block;max-width:100%;height:auto'>")
    to_figure = view.figure.transFigure.inverted()
    for ax, (x1, y1, x2, y2), tip in spots:
        (fx1, fy1), (fx2, fy2) = to_figure.transform(ax.transData.transform([(x1, y1), (x2, y2)]))
        frame = ax.get_position()
        left, right = max(min(fx1, fx2), frame.x0), min(max(fx1, fx2), frame.x1)
        bottom, top = max(min(fy1, fy2), frame.y0), min(max(fy1, fy2), frame.y1)
        if right > left and top > bottom:
            parts.append(f"<div class='liaf-box' title='{html.escape(tip)}' style='position:absolute;"
                         f"left:{100 * left:.2f}%;top:{100 * (1 - top):.2f}%;width:{100 * (right - left):.2f}%;"
                         f"height:{100 * (top - bottom):.2f}%'></div>")
    parts.append("</div>")
    parts.append(_table(view))
    parts.append("</div>")
    return "".join(parts)


def _column_title(column: str) -> str:
    side, _, selector = column.partition(" E_")
    if selector and side in ("A^T", "A^S"):
        return f"{'teacher' if side == 'A^T' else 'student'} score of selector E_{selector} (Eq. 3)"
    return _COLUMNS.get(column, f"{column}: its mean over the box's cells")


def _column_format(column: str) -> str:
    """Scores and weights with three decimals, the share in percent, anything else with three digits."""
    return ".3f" if column[:2] in ("A^", "M^") else ".1%" if column == "share" else ".3g"


def _table(view: MaskView) -> str:
    """The per-instance table; each row's ``title`` lists its values (with LIAF-KD: a share column and the totals)."""
    rows = [dict(row) for row in view.rows]
    if view.level_loss is not None:
        for row in rows:
            row["share"] = row["contribution"] / view.level_loss if view.level_loss else float("nan")
    columns = [c for c in rows[0] if c != "label"] if rows else []
    head = "".join(f"<th title='{html.escape(_column_title(c))}'>{html.escape(c)}</th>" for c in columns)
    body = "".join(f"<tr title='{html.escape(_tooltip(row))}'>"
                   + "".join(f"<td>{html.escape(_fmt(row[c], _column_format(c)))}</td>" for c in columns) + "</tr>"
                   for row in rows)
    foot = ""
    if view.level_loss is not None:
        batch = "this image" if view.settings["normalize"] == "image" else "the batch of all images"
        foot = (f"<tfoot><tr><td colspan='{len(columns)}'>background (cells in no box): {view.background:.4g}; "
                f"level loss (Eq. 9, the distiller's level_loss of {batch}): {view.level_loss:.4g}</td></tr></tfoot>")
    return ("<div style='overflow-x:auto;max-width:100%'>"
            "<table class='liaf-instances' style='font-size:11px;border-collapse:collapse'>"
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody>{foot}</table></div>")
