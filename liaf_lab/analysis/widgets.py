"""``MaskInspector``: an ipywidgets viewer of what a distillation method weights, image by image and level by
level. A view over the distiller protocol's ``loss_weights`` (maps, per-instance values, per-cell loss): it lays
out controls, figures and tables from what the method gives, and never changes the distiller."""

from __future__ import annotations

import base64
import html
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import ipywidgets as widgets
import torch
import torch.nn.functional as F
from IPython.display import HTML, clear_output, display
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor, nn

from ..distillers import FeatureDistiller, KDInputs, LossWeights
from ..models.backbones import eval_mode
from ..utils.options import check_value, option_types
from ..utils.validation import check_boxes, check_feature_dict
from .cam import resize_for_detector
from .maps import box_regions, kd_inputs_for, paired_maps
from .viz import (
    check_image, check_levels, class_name, draw_boxes, draw_mask, draw_score_bars, figure_to_jpeg, new_figure,
)

__all__ = ["FeatureSource", "MaskInspector", "MaskView", "VANISHING_SCORE"]

FeatureSource = nn.Module | Callable[[Tensor], Mapping[str, Tensor]] | Sequence[Mapping[str, Tensor]]
"""A torchvision detector, a callable ``[1, 3, H, W] -> {level: [1, C, h, w]}``, or one dict per image."""

VANISHING_SCORE = 0.05
"""When every score shown is below this, the view says why (the method's ``LossWeights.score_note``)."""

# (axes, box x1 y1 x2 y2 in data coordinates, tooltip): a hover region over the figure
_Spot = tuple[Axes, list[float], str]

_COLUMNS = {
    "instance": "index of the box in the image",
    "class": "the box's class (class_names[label])",
    "cells": "cells of the box at this level (box_regions: the cells whose top-left corner lies in the box)",
    "contribution": "sum over the box's cells of the per-cell term of the method's loss; all cells sum to the "
                    "level's loss",
    "share": "contribution / the level's loss",
}


@dataclass
class MaskView:
    """One setting of the inspector and what it shows.

    Attributes:
        settings: ``method``, ``image``, ``level``, ``selector`` and the methods' view options (e.g.
            ``mask_scale``, ``mask_side``, ``normalize``).
        figure: the figure, or None when ``message`` says why there is none.
        rows: the per-instance table, one dict per box of the image (``MaskInspector`` lists the keys).
        notes: remarks shown above the figure (vanishing scores, boxes without cells, ...).
        message: the problem shown instead of a figure, or None.
        color_range: map group (``"M"`` for LIAF-KD's masks ``"M (teacher)"``, ``"M (student)"``) -> the fixed
            ``(vmin, vmax)`` of its colour scale.
        level_loss: where the method's loss splits into cells (``LossWeights.cells``): the sum of the
            per-cell terms at the level over the batch (the image, or all images for a method whose weights
            couple them), without the loss weight; for LIAF-KD its ``level_loss`` (Eq. 9).
        background: with ``level_loss``: the sum of the per-cell terms over this image's cells in no box.
        loss_scope: with ``level_loss``: the images it sums over (``"this image"`` or the batch).
        descriptions: the method's instance columns -> what they mean (``LossWeights.columns``).
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
    descriptions: dict[str, str] = field(default_factory=dict, repr=False)
    loss_scope: str = ""
    html: str = field(default="", repr=False)

    def _repr_html_(self) -> str:
        return self.html


def _is_detector(source: object) -> bool:
    return isinstance(source, nn.Module) and hasattr(source, "transform") and hasattr(source, "backbone")


def _pad_stack(feats: Sequence[Tensor]) -> Tensor:
    """``[1, C, h_i, w_i]`` maps -> ``[B, C, max h, max w]``, zero padded at the bottom/right."""
    height = max(f.shape[-2] for f in feats)
    width = max(f.shape[-1] for f in feats)
    return torch.cat([F.pad(f, (0, width - f.shape[-1], 0, height - f.shape[-2])) for f in feats])


def _on_cpu(weights: LossWeights) -> LossWeights:
    """``weights`` with every tensor as float32 on the CPU."""
    def cpu(levels: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {lvl: v.detach().float().cpu() for lvl, v in levels.items()}

    return replace(weights, maps={m: cpu(v) for m, v in weights.maps.items()},
                   cells=cpu(weights.cells) if weights.cells is not None else None,
                   instances={c: cpu(v) for c, v in weights.instances.items()})


def _view_options(distiller: FeatureDistiller) -> dict[str, tuple[Any, ...]]:
    """The distiller's view options -> their choices (``Literal`` or ``bool`` fields of its ``Options``)."""
    types = option_types(distiller.Options)
    return {name: (False, True) if types[name] is bool else typing.get_args(types[name])
            for name in distiller.view_options}


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
    """Browse what a distillation method weights: pick a method, image and FPN level (and the options the
    method lets a view vary); see its weight maps over the image, its instance scores and a table per instance.

    A view over the distiller protocol's ``loss_weights`` (``LossWeights``), computed from the inputs a training
    step gives the method (``analysis.kd_inputs_for`` with detectors): the figure shows the method's instance
    scores as bars where it gives them (``LossWeights.bars``; the ``selector`` control picks which, e.g.
    LIAF-KD's mean ``A`` of Eq. 6 or one selector ``E_k`` of Eq. 3) and its weight maps at the level (a
    ``"(teacher)"``/``"(student)"`` pair side by side, e.g. LIAF-KD's masks ``M^T`` and ``M^S`` of Eq. 7).
    The table (``instance_table``) has per box: ``instance``, ``label``, ``class``, ``cells`` (the cells it
    covers at the level, ``box_regions``), then the method's per-instance values (``LossWeights.instances``,
    e.g. LIAF-KD's ``A^T E_k``, ``A^S E_k``, ``A^T``, ``A^S``, ``M^T``, ``M^S``) or, for a method that scores
    no instances, each map's mean over the box's cells; and, where the method's loss splits into cells
    (``LossWeights.cells``), ``contribution``: the sum over the box's cells of the per-cell term (for LIAF-KD
    of Eq. 9, ``sum_c (M^T F^T - f_phi(M^S F^S))^2 / (N C H W)``, ``N`` the images of the batch); the terms of
    all cells sum to ``MaskView.level_loss``. Cells in several boxes count for each; ``MaskView.background``
    sums the cells in no box. A method that weights every cell alike (FitNet), an image without boxes, or
    inputs the method cannot use give a message instead of the figure.

    The method's view options (``FeatureDistiller.view_options``, e.g. LIAF-KD's ``mask_scale``,
    ``mask_side`` and ``normalize``) each get a toggle; a view computes the method as a copy of the distiller
    with those options would (``loss_weights(inputs, **options)``), so the distiller itself never changes.
    A method whose weights couple the images of a batch under the options (``per_image``, e.g. LIAF-KD's
    ``normalize="batch"``) is computed on all the inspector's images as one batch.

    Colour scales are fixed and shown by a colour bar: a map group the method gives a range for
    (``LossWeights.color_range``, e.g. LIAF-KD's literal masks ``[0, 1]``) spans it; any other spans
    ``[min(0, min), max]`` over all images (with boxes) at the level under the options, so one colour is one
    weight in every image (per level, since many maps depend on the level's grid, e.g. FGD's
    ``1 / box cells``). When every score shown is below ``VANISHING_SCORE`` a note says why
    (``LossWeights.score_note``). Hovering a box in the figure or a table row shows its values.

    Args:
        images: N images ``[3, H, W]`` (or a ``[N, 3, H, W]`` batch).
        targets: N dicts with ``"boxes" [n, 4]`` (and ``"labels" [n]``, required with detectors), or N box tensors.
        teacher, student: torchvision detectors (the inputs are then exactly a training step's, from
            ``kd_inputs_for``; images and boxes are shown resized like the detectors' transform), or
            feature sources (``FeatureSource``): a callable mapping ``[1, 3, H, W]`` to
            ``{level: [1, C, h, w]}`` or N dicts ``{level: [1, C, h, w]}``, with boxes in the features' frame.
        distiller: the student's distiller (``FeatureDistiller``), shown as ``distiller.label``.
        class_names: label -> name for the bars, boxes and table.
        level: the initial level (default the distiller's first).
        methods: further methods, name -> ``(student, distiller)``, against the same teacher and on the
            same levels (students of the same kind as ``student``: detectors or feature sources).
        seed: seeds the random draws of methods that make them (``kd_inputs_for``).

    Attributes: ``method_dropdown``, ``image_slider``, ``level_dropdown``, ``selector_dropdown`` and one
    ``<option>_toggle`` per view option of the methods (e.g. ``mask_scale_toggle``; ``option_toggles`` by
    name; shown for the methods that have them, in ``score_controls``), ``output``, ``widget`` (the VBox),
    ``current`` (the shown ``MaskView``), ``figure`` and ``message`` (its figure and problem).
    ``view(**settings)`` renders another setting without touching the controls.
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
        self.teacher, self.class_names, self.seed = teacher, class_names, seed
        for i, (image, target) in enumerate(zip(images, targets, strict=True)):
            self._add_image(i, image, target)
        self.levels = list(distiller.levels)
        self._inputs_cache: dict[tuple[str, int], KDInputs] = {}
        self._features_cache: dict[tuple[str, int], dict[str, Tensor]] = {}
        self._weights_cache: dict[tuple, LossWeights] = {}
        self._range_cache: dict[tuple, tuple[float, float]] = {}
        self._hold = False
        self._build_controls(distiller, level)
        self.current: MaskView = MaskView({})
        self.redraw()

    def _add_image(self, i: int, image: Tensor, target: Mapping[str, Tensor] | Tensor) -> None:
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
            img, tgt = resize_for_detector(self.teacher, img, tgt)
        self.images.append(img)
        self.boxes.append(tgt["boxes"].cpu().float())
        self.labels.append(torch.as_tensor(tgt["labels"]).cpu().long() if "labels" in tgt else None)

    def _build_controls(self, distiller: FeatureDistiller, level: str | None) -> None:
        """The method, image and level controls, the selector, and a toggle per view option of any method
        (its value at first the first such method's option)."""
        self.method_dropdown = widgets.Dropdown(options=list(self.methods), value=distiller.label, description="method")
        self.image_slider = widgets.IntSlider(value=0, min=0, max=len(self.images) - 1, description="image")
        start = check_levels(level, self.levels, "the distiller")[0] if level is not None else self.levels[0]
        self.level_dropdown = widgets.Dropdown(options=self.levels, value=start, description="level")
        self.selector_dropdown = widgets.Dropdown(options=[("mean", "mean")], value="mean", description="selector")
        self.option_toggles: dict[str, widgets.ToggleButtons] = {}
        self._choices: dict[str, tuple[Any, ...]] = {}
        for _, d in self.methods.values():
            for name, choices in _view_options(d).items():
                if name not in self.option_toggles:
                    self._choices[name] = choices
                    self.option_toggles[name] = widgets.ToggleButtons(
                        options=choices, value=getattr(d, name), description=name.replace("_", " "))
                    setattr(self, f"{name}_toggle", self.option_toggles[name])
        self.score_controls = widgets.VBox([self.selector_dropdown, widgets.HBox(list(self.option_toggles.values()))])
        self.output = widgets.Output()
        self.widget = widgets.VBox([
            widgets.HBox([self.method_dropdown, self.image_slider, self.level_dropdown]), self.score_controls, self.output])
        self._configure()
        for control in (self.method_dropdown, self.image_slider, self.level_dropdown, self.selector_dropdown,
                        *self.option_toggles.values()):
            control.observe(self._on_change, names="value")

    def _ipython_display_(self) -> None:
        display(self.widget)

    # -- public ---------------------------------------------------------------------------------
    @property
    def settings(self) -> dict[str, Any]:
        """The controls' setting: ``method``, ``image``, ``level``, ``selector`` (a key of the method's
        ``LossWeights.bars``, e.g. ``"mean"`` or ``k`` for LIAF-KD's ``E_{k+1}``) and each view option."""
        return {"method": self.method_dropdown.value, "image": self.image_slider.value,
                "level": self.level_dropdown.value, "selector": self.selector_dropdown.value,
                **{name: toggle.value for name, toggle in self.option_toggles.items()}}

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
            view, spots = self._view(s)
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
        """Fit the controls to the chosen method: its bars in the selector, its view options' toggles; the
        score controls hidden when it has neither."""
        name = self.method_dropdown.value
        bars = self._bars(name)
        own = _view_options(self.methods[name][1])
        for option, toggle in self.option_toggles.items():
            toggle.layout.display = None if option in own else "none"
        self.selector_dropdown.layout.display = None if bars else "none"
        self.score_controls.layout.display = None if bars or own else "none"
        if not bars:
            return
        keep = self.selector_dropdown.value if self.selector_dropdown.value in bars else next(iter(bars))
        self._hold = True
        try:
            self.selector_dropdown.options = [(label, key) for key, (label, _, _) in bars.items()]
            self.selector_dropdown.value = keep
        finally:
            self._hold = False

    def _bars(self, name: str) -> dict[Any, tuple[str, str, str]]:
        """Method ``name``'s ``LossWeights.bars`` (from its first image with boxes; empty where it has none)."""
        first = next(iter(self._images_with_boxes()), None)
        if first is None:
            return {}
        try:
            return self._weights(name, (first,), ()).bars
        except (ValueError, TypeError, RuntimeError):  # the view reports the problem
            return {}

    def _check_settings(self, s: dict[str, Any]) -> dict[str, Any]:
        known = ["method", "image", "level", "selector", *self.option_toggles]
        unknown = sorted(set(s) - set(known))
        if unknown:
            raise ValueError(f"unknown settings {unknown}; the settings are {known}")
        if s["method"] not in self.methods:
            raise ValueError(f"unknown method {s['method']!r}; the inspector has {list(self.methods)}")
        if isinstance(s["image"], bool) or not isinstance(s["image"], int) or not 0 <= s["image"] < len(self.images):
            raise ValueError(f"image must be an index in 0..{len(self.images) - 1}, got {s['image']!r}")
        check_levels([s["level"]], self.levels, "the inspector")
        for name, choices in self._choices.items():
            check_value(name, s[name], typing.Literal[choices])
        bars = self._bars(s["method"])
        if bars and s["selector"] not in bars:
            raise ValueError(f"selector must be one of {list(bars)} for {s['method']}, got {s['selector']!r}")
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
                param = next(distiller.parameters(), None)
                device = param.device if param is not None else torch.device("cpu")
                s_feats, t_feats = (self._source_features(key, source, index)
                                    for key, source in ((f"{name} student", student), ("teacher", self.teacher)))
                labels = self.labels[index]
                inputs = KDInputs({k: v.to(device) for k, v in s_feats.items()},
                                  {k: v.to(device) for k, v in t_feats.items()}, [self.boxes[index].to(device)],
                                  [labels.to(device)] if labels is not None else None)
            distiller.check_inputs(inputs)
            self._inputs_cache[name, index] = inputs
        return self._inputs_cache[name, index]

    def _batch_inputs(self, name: str, batch: tuple[int, ...]) -> KDInputs:
        """The inputs of the images ``batch`` as one batch: each image's own, or its features zero-padded to
        one grid (features, boxes and labels only)."""
        if len(batch) == 1:
            return self._inputs(name, batch[0])
        parts = [self._inputs(name, j) for j in batch]
        labels = [p.labels[0] for p in parts] if all(p.labels is not None for p in parts) else None
        return KDInputs({lvl: _pad_stack([p.student_feats[lvl] for p in parts]) for lvl in self.levels},
                        {lvl: _pad_stack([p.teacher_feats[lvl] for p in parts]) for lvl in self.levels},
                        [p.boxes[0] for p in parts], labels)

    def _images_with_boxes(self) -> list[int]:
        return [j for j, b in enumerate(self.boxes) if len(b)]

    def _options(self, name: str, s: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
        """The view options of method ``name`` that the setting ``s`` changes from the distiller's own."""
        d = self.methods[name][1]
        return tuple((k, s[k]) for k in d.view_options if s[k] != getattr(d, k))

    def _batch(self, name: str, index: int, options: tuple[tuple[str, Any], ...]) -> tuple[int, ...]:
        """Image ``index`` alone, or all images for a method whose weights couple them under ``options``."""
        return (index,) if self.methods[name][1].per_image(**dict(options)) else tuple(range(len(self.images)))

    def _weights(self, name: str, batch: tuple[int, ...], options: tuple[tuple[str, Any], ...]) -> LossWeights:
        """Method ``name``'s ``loss_weights`` on the images ``batch`` under ``options`` (on the CPU, cached)."""
        key = (name, batch, options)
        if key not in self._weights_cache:
            distiller = self.methods[name][1]
            with eval_mode(distiller):
                weights = distiller.loss_weights(self._batch_inputs(name, batch), **dict(options))
            self._weights_cache[key] = _on_cpu(weights)
        return self._weights_cache[key]

    def _image_weights(self, name: str, index: int, options: tuple[tuple[str, Any], ...]
                       ) -> tuple[LossWeights, int, slice]:
        """``(weights, pos, span)``: the weights of image ``index``'s batch, its place in it and its instances'
        span in the batch's instances."""
        batch = self._batch(name, index, options)
        pos = batch.index(index)
        start = sum(len(self.boxes[j]) for j in batch[:pos])
        return self._weights(name, batch, options), pos, slice(start, start + len(self.boxes[index]))

    def _grid(self, name: str, index: int, level: str) -> tuple[int, int]:
        """Image ``index``'s ``(H, W)`` at ``level`` (its own grid; a batch pads it)."""
        return tuple(self._inputs(name, index).teacher_feats[level].shape[-2:])

    def _map_range(self, name: str, members: Sequence[str], level: str,
                   options: tuple[tuple[str, Any], ...]) -> tuple[float, float]:
        """``[min(0, min), max]`` of the maps ``members`` at ``level`` over all images (with boxes)."""
        key = ("maps", name, level, options, *members)
        if key not in self._range_cache:
            values = []
            for j in self._images_with_boxes():
                weights, pos, _ = self._image_weights(name, j, options)
                h, w = self._grid(name, j, level)
                values += [weights.maps[m][level][pos, :h, :w] for m in members]
            lo = min(0.0, min(float(v.min()) for v in values))
            self._range_cache[key] = (lo, max(max(float(v.max()) for v in values), lo + 1e-6))
        return self._range_cache[key]

    def _instance_names(self, index: int) -> list[str]:
        labels = self.labels[index]
        if labels is None:
            return [str(i) for i in range(len(self.boxes[index]))]
        return [f"{i} {class_name(int(lab), self.class_names)}" for i, lab in enumerate(labels.tolist())]

    def _row_head(self, index: int, i: int, cells: int) -> dict[str, Any]:
        labels = self.labels[index]
        label = int(labels[i]) if labels is not None else None
        return {"instance": i, "label": label,
                "class": class_name(label, self.class_names) if label is not None else None, "cells": cells}

    # -- the view ---------------------------------------------------------------------------------
    def _view(self, s: dict[str, Any]) -> tuple[MaskView, list[_Spot]]:
        name, index, level = s["method"], s["image"], s["level"]
        stride = self.methods[name][1].strides[level]
        options = self._options(name, s)
        weights, pos, span = self._image_weights(name, index, options)
        h, w = self._grid(name, index, level)
        maps = {m: levels[level][pos, :h, :w] for m, levels in weights.maps.items() if level in levels}
        if not maps:
            raise ValueError(f"{name} has no map at level {level!r} (its maps: {list(weights.maps)})")
        regions = box_regions(self.boxes[index], (h, w), stride)
        cells = weights.cells[level][pos, :h, :w] if weights.cells is not None else None
        if list(maps) == ["uniform"]:
            share = "" if cells is None or not float(cells.sum()) else (
                f" (of its loss in this image at level {level}, {float(cells[~regions.any(0)].sum() / cells.sum()):.0%} "
                "falls in no box)")
            raise ValueError(f"{name} weights every cell alike (its loss_weights is one uniform map, as FitNet's): "
                             f"there is no mask to show{share}")
        rows = [self._row(index, i, regions[i], {c: v[level][span] for c, v in weights.instances.items()
                                                 if level in v}, maps, cells)
                for i in range(len(self.boxes[index]))]
        groups = paired_maps(list(maps))
        view = MaskView(s, rows=rows, descriptions=dict(weights.columns),
                        color_range={base: weights.color_range.get(base) or self._map_range(name, members, level, options)
                                     for base, members in groups})
        if cells is not None:
            view.level_loss = float(weights.cells[level].sum())
            view.background = float(cells[~regions.any(0)].sum())
            batch = len(weights.cells[level])
            view.loss_scope = "this image" if batch == 1 else f"the batch of all {batch} images"
        view.notes = self._notes(s, weights, span, rows, stride)
        absent = [m for m in weights.maps if m not in maps]
        if absent:
            view.notes.append(f"{name} has no {absent} at level {level}.")
        view.figure, spots = self._draw(view, groups, maps, weights, span, stride)
        return view, spots

    def _row(self, index: int, i: int, region: Tensor, instances: Mapping[str, Tensor], maps: Mapping[str, Tensor],
             cells: Tensor | None) -> dict[str, Any]:
        """Box ``i``'s row: its head, the method's values for it (or each map's mean over its cells) and its
        part of the per-cell loss."""
        row = self._row_head(index, i, int(region.sum()))
        if instances:
            row |= {c: float(v[i]) for c, v in instances.items()}
        else:
            row |= {m: float(a[region].mean()) if region.any() else float("nan") for m, a in maps.items()}
        if cells is not None:
            row["contribution"] = float(cells[region].sum())
        return row

    def _notes(self, s: Mapping[str, Any], weights: LossWeights, span: slice, rows: list[dict[str, Any]],
               stride: float) -> list[str]:
        notes = []
        if weights.bars:
            _, col_t, col_s = weights.bars[s["selector"]]
            top = max(float(weights.instances[c][s["level"]][span].max()) for c in (col_t, col_s))
            if top < VANISHING_SCORE and weights.score_note:
                notes.append(f"Every score here is below {VANISHING_SCORE:g} (largest {top:.3f}): {weights.score_note} "
                             "The table lists the values.")
        else:
            notes.append(f"{s['method']} scores no instances. Shown: what it weights at level {s['level']}, each map's "
                         "colour scale fixed over all images at this level. Table: each map's mean over the box's cells.")
        missed = [r["instance"] for r in rows if r["cells"] == 0]
        if missed:
            notes.append(f"Instances {missed} cover no cell at level {s['level']} (stride {stride:g}): boxes between "
                         "cell corners have no cells of their own there.")
        return notes

    def _draw(self, view: MaskView, groups: list[tuple[str, list[str]]], maps: dict[str, Tensor],
              weights: LossWeights, span: slice, stride: float) -> tuple[Figure, list[_Spot]]:
        """The instance scores (if the method gives bars), then the maps: up to four panels a row, a
        teacher/student pair side by side in one row with one colour bar."""
        s = view.settings
        image, boxes = self.images[s["image"]], self.boxes[s["image"]]
        names = self._instance_names(s["image"])
        panels = [["bars"]] * bool(weights.bars) + [members for _, members in groups]
        ncols = min(4, sum(len(p) for p in panels))
        places, line, col = [], 0, 0  # (row, first column) of each panel group
        for members in panels:
            if col + len(members) > ncols:
                line, col = line + 1, 0
            places.append((line, col))
            col += len(members)
        fig, axes = new_figure(ncols, line + 1, panel=(3.6, 3.6 * image.shape[1] / image.shape[2] + 0.6))
        used = set()
        if weights.bars:
            ax = axes[places[0]]
            label, col_t, col_s = weights.bars[s["selector"]]
            draw_score_bars(ax, {f"teacher {col_t}": weights.instances[col_t][s["level"]][span],
                                 f"student {col_s}": weights.instances[col_s][s["level"]][span]}, names, ymax=1.0)
            ax.tick_params(axis="x", labelrotation=45, labelsize=8)
            ax.legend(fontsize=8)
            ax.set_title(f"instance scores, {label}", fontsize=9)
            used.add(id(ax))
        spots: list[_Spot] = []
        for (base, members), (r, c) in zip(groups, places[bool(weights.bars):], strict=True):
            lo, hi = view.color_range[base]
            group_axes = [axes[r, c + k] for k in range(len(members))]
            for ax, member in zip(group_axes, members, strict=True):
                draw_boxes(ax, image, boxes, list(range(len(names))), class_names=names, color_by_score=False,
                           colorbar=False)
                mappable = draw_mask(ax, maps[member].numpy(), tuple(image.shape[-2:]), stride, vmin=lo, vmax=hi)
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


def _column_title(column: str, view: MaskView) -> str:
    return view.descriptions.get(column) or _COLUMNS.get(column, f"{column}: its mean over the box's cells")


def _column_format(column: str, view: MaskView) -> str:
    """The method's instance values with three decimals, the share in percent, anything else with three digits."""
    return ".3f" if column in view.descriptions else ".1%" if column == "share" else ".3g"


def _table(view: MaskView) -> str:
    """The per-instance table; each row's ``title`` lists its values (where the loss splits into cells: a share
    column and the totals)."""
    rows = [dict(row) for row in view.rows]
    if view.level_loss is not None:
        for row in rows:
            row["share"] = row["contribution"] / view.level_loss if view.level_loss else float("nan")
    columns = [c for c in rows[0] if c != "label"] if rows else []
    head = "".join(f"<th title='{html.escape(_column_title(c, view))}'>{html.escape(c)}</th>" for c in columns)
    body = "".join(f"<tr title='{html.escape(_tooltip(row))}'>"
                   + "".join(f"<td>{html.escape(_fmt(row[c], _column_format(c, view)))}</td>" for c in columns) + "</tr>"
                   for row in rows)
    foot = ""
    if view.level_loss is not None:
        foot = (f"<tfoot><tr><td colspan='{len(columns)}'>background (cells in no box): {view.background:.4g}; "
                f"level loss (the sum of every cell's term, over {view.loss_scope}): {view.level_loss:.4g}"
                "</td></tr></tfoot>")
    return ("<div style='overflow-x:auto;max-width:100%'>"
            "<table class='liaf-instances' style='font-size:11px;border-collapse:collapse'>"
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody>{foot}</table></div>")
