"""The distiller protocol every method follows (docs/method.md, "The distiller protocol").

A method is one ``FeatureDistiller`` subclass in its own file, registered with
``register_distiller``, its options declared once as a nested ``Options`` dataclass (typed, with
bounds and choices, checked by ``liaf_lab.utils.options``) and its modules made in ``build``. In every
stage-2 step it reads one ``KDInputs`` and returns named loss terms (``loss_terms``); their sum is
the KD loss and each is logged on its own. A method with a learned
stage 1 (LIAF-KD's selectors, MasKD's receptive tokens) sets ``two_stage``, names the modules stage 1
trains (``stage1_modules``) and gives the teacher features to run the frozen teacher's head on
(``stage1``); the engine runs one generic stage 1 for any such method. What trains in stage 2 is
``stage2_parameters``. Nothing outside the registry tests for a method's name or class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils import options as typed
from ..utils.validation import (
    check_boxes,
    check_feature_dict,
    check_image_size,
    check_level_size,
    check_values,
)

Channels = int | Mapping[str, int]
Features = Mapping[str, Tensor]
# What a method may ask for beyond features, boxes, labels and sizes (``FeatureDistiller.needs``); the
# engine computes these only for a method that names them.
OPTIONAL_INPUTS = ("head_outputs", "priors", "generator", "assignment", "head_split")


@dataclass
class KDInputs:
    """What a distiller reads in one stage-2 step (one batch).

    Attributes:
        student_feats: level -> ``[N, C_s, H_l, W_l]``, the student's FPN levels (student level names).
        teacher_feats: level -> ``[N, C_t, H_l, W_l]``: for each student level, the teacher level of the
            same stride, under the student's level name. No gradient flows into it.
        boxes: N tensors ``[n_i, 4]`` (x1, y1, x2, y2) in resized-input pixels.
        labels: N int64 tensors ``[n_i]`` (the boxes' classes), or ``None``.
        image_size: the padded batch input ``(H, W)``, or ``None``.
        image_sizes: each image's resized size ``(h_i, w_i)`` before padding, or ``None``.
        student_head, teacher_head: level -> head output name (e.g. ``cls_logits``) -> ``[N, A*K, H_l, W_l]``;
            given only to methods whose ``needs`` holds ``"head_outputs"``.
        priors: level -> ``[H_l * W_l * A, 4]`` anchors (or points as zero-size boxes) in input pixels;
            given only to methods whose ``needs`` holds ``"priors"``.
        generator: the source of every random draw of the step, given to methods whose ``needs``
            holds ``"generator"`` (the engine derives it from the run's seed and iteration); ``None``:
            torch's default generator.
        assignment: level -> ``[N, P_l]`` int64: the student's own assignment of its priors (in the
            priors' order), the index of the box in its image's ``boxes`` or -1 (a negative); the
            positives are the cells the student's box losses train. Given only to methods whose
            ``needs`` holds ``"assignment"`` (``liaf_lab.models.taps.prior_assignment``).
        student_tower, teacher_tower: level -> branch (e.g. ``"cls"``, ``"reg"``) -> ``[N, C, H_l, W_l]``: each
            detector's head-tower features at the distiller's ``split_index`` (the student's with gradient),
            and ``teacher_head_from``: the frozen teacher's head from that split on, a callable taking such
            features (student level names) and returning level -> ``{"cls_logits", "box_bins"}``. Given
            only to methods whose ``needs`` holds ``"head_split"`` (``taps.tower_features``, ``head_from_split``).
    """

    student_feats: Features
    teacher_feats: Features
    boxes: Sequence[Tensor]
    labels: Sequence[Tensor] | None = None
    image_size: tuple[int, int] | None = None
    image_sizes: Sequence[tuple[int, int]] | None = None
    student_head: Mapping[str, Mapping[str, Tensor]] | None = None
    teacher_head: Mapping[str, Mapping[str, Tensor]] | None = None
    priors: Mapping[str, Tensor] | None = None
    generator: torch.Generator | None = None
    assignment: Mapping[str, Tensor] | None = None
    student_tower: Mapping[str, Mapping[str, Tensor]] | None = None
    teacher_tower: Mapping[str, Mapping[str, Tensor]] | None = None
    teacher_head_from: Callable[[Mapping[str, Mapping[str, Tensor]]], Mapping[str, Mapping[str, Tensor]]] | None = None


@dataclass
class Stage1Output:
    """What a two-stage method's ``stage1`` gives the engine for one batch.

    Attributes:
        views: view name -> level -> teacher features ``[N, C_t, H_l, W_l]`` (differentiable in the
            stage-1 modules) to run the frozen teacher's head on; each view's task loss is a loss term.
        terms: further named loss terms (e.g. a diversity loss), already weighted.
    """

    views: dict[str, dict[str, Tensor]]
    terms: dict[str, Tensor]


def _per_level(name: str, value: Channels, levels: Sequence[str]) -> dict[str, int]:
    if isinstance(value, Mapping):
        missing = [lvl for lvl in levels if lvl not in value]
        if missing:
            raise ValueError(f"{name} lacks the levels {missing}")
        return {lvl: int(value[lvl]) for lvl in levels}
    return {lvl: int(value) for lvl in levels}


def flat_logits(logits: Tensor, num_priors: int) -> Tensor:
    """Head logits ``[N, A*K, H, W]`` (channel ``a*K + k``) -> ``[N, H*W*A, K]`` in the priors' order
    (row-major over H, W, then anchor); ``A = num_priors // (H*W)``."""
    n, channels, h, w = logits.shape
    a = num_priors // (h * w)
    return logits.view(n, a, channels // a, h, w).permute(0, 3, 4, 1, 2).reshape(n, h * w * a, channels // a)


def feature_mse(teacher: Tensor, student: Tensor) -> Tensor:
    """Eq. 9 (and Eq. 1 with ``M = 1``): ``(1/CHW) ||F^T - f_phi(F^S)||^2`` averaged over the batch.

    Both arguments are ``[N, C, H, W]`` and already masked and projected.
    """
    return F.mse_loss(student, teacher, reduction="mean")


def feature_cells(teacher: Tensor, student: Tensor) -> Tensor:
    """Eq. 9 cell by cell: ``sum_c (F^T - f_phi(F^S))^2 / (N C H W)`` -> ``[N, H, W]``; the cells sum to
    ``feature_mse(teacher, student)``.

    Both arguments are ``[N, C, H, W]`` and already masked and projected.
    """
    return (student - teacher).pow(2).sum(1) / teacher.numel()


@dataclass
class LossWeights:
    """What a method weights in its feature loss on one batch, per level and per instance
    (``FeatureDistiller.loss_weights``); what the inspector and ``background_share`` read.

    Attributes:
        maps: map name -> level -> ``[N, H_l, W_l]``: the weights the loss puts on each cell (``weight_maps``,
            pairs named ``"<x> (teacher)"`` / ``"<x> (student)"``); a method that weights every cell alike
            gives one map of ones, ``"uniform"``.
        cells: level -> ``[N, H_l, W_l]``: each cell's term of the method's feature loss (before the loss
            weight), summing over cells and images to the level's loss; ``None`` where the loss does not
            split into cells.
        instances: column -> level -> ``[I]``: a value per instance (the batch's boxes in order), e.g.
            LIAF-KD's scores and mask weights; empty for a method that scores no instances.
        bars: choice -> ``(label, teacher column, student column)``: the instance scores a view may draw
            as bars, the first the default (e.g. LIAF-KD's ``"mean"``, ``"mean A"`` and one per selector ``k``,
            ``"selector E_{k+1}"``).
        columns: instance column -> what it means (for table headers).
        color_range: map name without its side (``"M"`` for ``"M (teacher)"``) -> the range its values
            lie in by construction, where the method knows one.
        score_note: why the scores may all be small (e.g. a softmax over many instances), or ``""``.
    """

    maps: dict[str, dict[str, Tensor]]
    cells: dict[str, Tensor] | None = None
    instances: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    bars: dict[Any, tuple[str, str, str]] = field(default_factory=dict)
    columns: dict[str, str] = field(default_factory=dict)
    color_range: dict[str, tuple[float, float]] = field(default_factory=dict)
    score_note: str = ""


def prior_boxes(priors: Tensor, stride: float, point_prior_scale: float) -> Tensor:
    """The box each prior ``[P, 4]`` stands for -> ``[P, 4]``: the prior itself, or for a point prior
    (both sides ``<= stride``: an anchor-free detector's location, e.g. FCOS's one-cell anchor or a
    zero-size point) the square of side ``point_prior_scale * stride`` centred on it."""
    centre = (priors[:, :2] + priors[:, 2:]) / 2
    half = point_prior_scale * stride / 2
    square = torch.cat([centre - half, centre + half], dim=1)
    point = ((priors[:, 2:] - priors[:, :2]) <= stride).all(dim=1, keepdim=True)
    return torch.where(point, square, priors)


class FeatureDistiller(nn.Module):
    """The base of every distiller: its FPN levels, channels and strides, its options, the input checks, the stages.

    Args:
        student_channels: C of the student's levels (one int for all levels, or per level).
        teacher_channels: C of the teacher's levels.
        strides: level name -> input pixels per cell; the levels that are distilled.
        options: the method's options, declared once as its nested ``Options`` dataclass (typed, with
            bounds and choices: ``liaf_lab.utils.options``) and checked by it; each is also an attribute.

    Subclasses declare ``Options``, make their modules in ``build`` and implement ``compute_terms``
    (and, if ``two_stage``, ``stage1_modules`` and ``compute_stage1``); the public ``loss_terms`` and
    ``stage1`` validate the inputs first.
    """

    method_name: ClassVar[str] = "base"  # set by register_distiller
    label: ClassVar[str] = "base"  # how reports name the method
    needs: ClassVar[frozenset[str]] = frozenset()  # a subset of OPTIONAL_INPUTS
    head_keys: ClassVar[tuple[str, ...]] = ()  # with "head_outputs": the outputs read, e.g. ("cls_logits",)
    split_index: int = 0  # with "head_split": the tower conv after which the heads are split (0: before the towers)
    two_stage: ClassVar[bool] = False
    # options a view may vary (``loss_weights(inputs, **options)``, the inspector's toggles): Literal or bool fields
    view_options: ClassVar[tuple[str, ...]] = ()

    @dataclass(frozen=True)
    class Options(typed.Options):
        """A method's options: a frozen dataclass of typed fields with defaults (none here)."""

    def __init__(self, student_channels: Channels, teacher_channels: Channels, strides: Mapping[str, float],
                 **options: Any) -> None:
        super().__init__()
        if not strides:
            raise ValueError("strides must name at least one level, e.g. {'0': 8, '1': 16}")
        self.strides = {str(k): float(v) for k, v in strides.items()}
        self.levels = list(self.strides)
        self.student_channels = _per_level("student_channels", student_channels, self.levels)
        self.teacher_channels = _per_level("teacher_channels", teacher_channels, self.levels)
        # How many stage-1 iterations the stage-1 modules have had (0: not learned). A combination keeps
        # its parts' counters (its ``two_stage`` is a property over them).
        if type(self).two_stage is True:
            self.register_buffer("stage1_steps", torch.zeros((), dtype=torch.long))
        self.options = self.Options.from_dict(options)
        for name, value in self.options.to_dict().items():
            setattr(self, name, value)
        self.build()

    def build(self) -> None:
        """Make the method's modules from its options (``self.options``, each also an attribute); none here."""

    # -- building blocks ----------------------------------------------------------------------
    def make_projectors(self, mode: bool | Literal["auto"]) -> nn.ModuleDict:
        """Per level a 1x1 conv from student to teacher channels (FitNet's ``f_phi``, the align conv).

        ``mode``: ``True`` always, ``"auto"`` only where the channels differ, ``False`` never (the
        channels must then agree). Elsewhere the projector is the identity.
        """
        if mode is False:
            bad = {lvl: (self.student_channels[lvl], self.teacher_channels[lvl]) for lvl in self.levels
                   if self.student_channels[lvl] != self.teacher_channels[lvl]}
            if bad:
                raise ValueError(f"student and teacher channels differ at levels {bad} (student, teacher); "
                                 "use projector=True to learn a 1x1 projection")
        return nn.ModuleDict({
            lvl: nn.Conv2d(self.student_channels[lvl], self.teacher_channels[lvl], 1)
            if mode is True or (mode == "auto" and self.student_channels[lvl] != self.teacher_channels[lvl])
            else nn.Identity()
            for lvl in self.levels
        })

    def at_levels(self, feats: Features) -> dict[str, Tensor]:
        """The levels of ``feats`` this distiller handles."""
        return {lvl: feats[lvl] for lvl in self.levels}

    # -- input checks ---------------------------------------------------------------------------
    def check_strides(self, name: str, feats: Features, image_size: tuple[int, int] | None) -> None:
        """With ``image_size`` (the padded batch input H, W), check each level's grid against its stride."""
        if image_size is None:
            return
        image_size = check_image_size(image_size)
        for lvl in self.levels:
            check_level_size(f"{name}[{lvl!r}]", feats[lvl], self.strides[lvl], image_size)

    def check_teacher_inputs(self, teacher_feats: Features, boxes: Sequence[Tensor],
                             image_size: tuple[int, int] | None, labels: Sequence[Tensor] | None = None) -> list[Tensor]:
        """Teacher levels, channels, strides, boxes and labels, read from shapes; returns the boxes as a list."""
        check_feature_dict("teacher_feats", teacher_feats, self.levels, values=False)
        for lvl in self.levels:
            if teacher_feats[lvl].shape[1] != self.teacher_channels[lvl]:
                raise ValueError(f"teacher_feats[{lvl!r}] has {teacher_feats[lvl].shape[1]} channels, expected "
                                 f"{self.teacher_channels[lvl]}")
        self.check_strides("teacher_feats", teacher_feats, image_size)
        boxes = check_boxes("boxes", boxes, num_images=teacher_feats[self.levels[0]].shape[0], values=False)
        if labels is not None:
            if len(labels) != len(boxes):
                raise ValueError(f"labels has {len(labels)} entries for {len(boxes)} images")
            for i, (lab, box) in enumerate(zip(labels, boxes, strict=True)):
                if not isinstance(lab, Tensor) or lab.dtype != torch.int64 or lab.shape != box.shape[:1]:
                    got = f"{lab.dtype} {tuple(lab.shape)}" if isinstance(lab, Tensor) else type(lab).__name__
                    raise ValueError(f"labels[{i}] must be an int64 tensor [{box.shape[0]}] (one per box), got {got}")
        return boxes

    def check_inputs(self, inputs: KDInputs) -> None:
        """Validate levels, ranks, channels, batch and grid sizes, strides, labels, finiteness and boxes, and
        that the inputs this method ``needs`` are there.

        Everything but finiteness and box validity is read from shapes; those two take one device
        read for all features and boxes together (``check_values``).
        """
        s_feats, t_feats = inputs.student_feats, inputs.teacher_feats
        check_feature_dict("student_feats", s_feats, self.levels, values=False)
        boxes = self.check_teacher_inputs(t_feats, inputs.boxes, None, inputs.labels)
        for lvl in self.levels:
            s, t = s_feats[lvl], t_feats[lvl]
            if s.shape[1] != self.student_channels[lvl]:
                raise ValueError(f"student_feats[{lvl!r}] has {s.shape[1]} channels, expected {self.student_channels[lvl]}")
            if s.shape[0] != t.shape[0]:
                raise ValueError(f"student_feats[{lvl!r}] {tuple(s.shape)} and teacher_feats[{lvl!r}] "
                                 f"{tuple(t.shape)} differ in batch size")
            if s.shape[2:] != t.shape[2:]:
                raise ValueError(f"student_feats[{lvl!r}] {tuple(s.shape)} and teacher_feats[{lvl!r}] "
                                 f"{tuple(t.shape)} differ in spatial size: teacher and student must see the same "
                                 "batched input (min_size and max_size of teacher and student must match)")
        self.check_strides("student_feats", s_feats, inputs.image_size)
        missing = [what for what, value in (("head_outputs", inputs.student_head), ("head_outputs", inputs.teacher_head),
                                            ("priors", inputs.priors), ("assignment", inputs.assignment),
                                            ("head_split", inputs.student_tower), ("head_split", inputs.teacher_tower),
                                            ("head_split", inputs.teacher_head_from))
                   if what in self.needs and value is None]
        if missing:
            raise ValueError(f"distiller {self.method_name!r} needs {sorted(set(missing))}, which a call with features "
                             "and boxes alone does not give; train it with liaf_lab.distill (DistillStep computes "
                             "them from the detectors) or pass them in KDInputs")
        values = {"student_feats": self.at_levels(s_feats), "teacher_feats": self.at_levels(t_feats)}
        if "head_outputs" in self.needs:
            values |= self.check_head_outputs(inputs)
        if "priors" in self.needs:
            self.check_priors(inputs)
            values["priors"] = self.at_levels(inputs.priors)
            if "head_outputs" in self.needs:
                self.check_head_anchors(inputs)
        if "assignment" in self.needs:
            self.check_assignment(inputs)
            if "box_bins" in self.head_keys:
                self.check_box_bins(inputs)
        if "head_split" in self.needs:
            self.check_towers(inputs)
        check_values(values, {"boxes": boxes})

    def check_head_outputs(self, inputs: KDInputs) -> dict[str, dict[str, Tensor]]:
        """The ``head_keys`` of both sides at every level: ``[N, D, H_l, W_l]`` on the features' grid, the
        same ``D`` on both sides (shapes only). Returns them by name, for the one value check."""
        out = {}
        for lvl in self.levels:
            n, _, h, w = inputs.student_feats[lvl].shape
            for key in self.head_keys:
                shapes = []
                for side, head in (("student_head", inputs.student_head), ("teacher_head", inputs.teacher_head)):
                    x = head.get(lvl, {}).get(key) if isinstance(head, Mapping) else None
                    if x is None:
                        has = {k: list(v) for k, v in head.items()} if isinstance(head, Mapping) else head
                        raise ValueError(f"distiller {self.method_name!r} reads {side}[{lvl!r}][{key!r}], which is "
                                         f"missing (it has {has})")
                    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[0] != n or x.shape[2:] != (h, w):
                        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                        raise ValueError(f"{side}[{lvl!r}][{key!r}] must be [{n}, D, {h}, {w}] (the level's grid), "
                                         f"got {got}")
                    shapes.append(x.shape)
                    out.setdefault(f"{side}[{lvl}]", {})[key] = x
                if shapes[0] != shapes[1]:
                    raise ValueError(f"distiller {self.method_name!r}: student and teacher {key!r} at level {lvl!r} "
                                     f"have shapes {tuple(shapes[0])} and {tuple(shapes[1])}; the two detectors must "
                                     "have the same classes and anchors per cell")
        return out

    def priors_per_cell(self, inputs: KDInputs) -> dict[str, int]:
        """``A`` per level: the priors per cell of the level's grid (from shapes; ``check_priors`` checked them)."""
        return {lvl: inputs.priors[lvl].shape[0] // (inputs.student_feats[lvl].shape[2] * inputs.student_feats[lvl].shape[3])
                for lvl in self.levels}

    def check_head_anchors(self, inputs: KDInputs) -> None:
        """Each head output's channels are ``A * D`` for the ``A`` priors per cell."""
        for lvl, a in self.priors_per_cell(inputs).items():
            for key in self.head_keys:
                channels = inputs.student_head[lvl][key].shape[1]
                if channels % a:
                    raise ValueError(f"distiller {self.method_name!r}: {key!r} at level {lvl!r} has {channels} channels, "
                                     f"not a multiple of the {a} priors per cell")

    def check_assignment(self, inputs: KDInputs) -> None:
        """``assignment[level]`` is an int64 ``[N, A * H_l * W_l]`` for a whole number ``A >= 1`` (shapes only)."""
        for lvl in self.levels:
            m = inputs.assignment.get(lvl) if isinstance(inputs.assignment, Mapping) else None
            n, _, h, w = inputs.student_feats[lvl].shape
            if not isinstance(m, Tensor) or m.dtype != torch.int64 or m.dim() != 2 or m.shape[0] != n \
                    or m.shape[1] == 0 or m.shape[1] % (h * w):
                got = f"{m.dtype} {tuple(m.shape)}" if isinstance(m, Tensor) else type(m).__name__
                raise ValueError(f"distiller {self.method_name!r}: assignment[{lvl!r}] must be an int64 "
                                 f"[{n}, A * {h} * {w}] (one box index or -1 per prior), got {got}")

    def check_towers(self, inputs: KDInputs) -> None:
        """``student_tower`` and ``teacher_tower``: the same branches at every level, each ``[N, C, H_l, W_l]`` on
        the level's grid, ``C`` the side's channels (shapes only)."""
        for lvl in self.levels:
            n, _, h, w = inputs.student_feats[lvl].shape
            branches = []
            for side, tower, c in (("student_tower", inputs.student_tower, self.student_channels[lvl]),
                                   ("teacher_tower", inputs.teacher_tower, self.teacher_channels[lvl])):
                level = tower.get(lvl) if isinstance(tower, Mapping) else None
                if not isinstance(level, Mapping) or not level:
                    raise ValueError(f"distiller {self.method_name!r}: {side} lacks the level {lvl!r}")
                branches.append(sorted(level))
                for branch, x in level.items():
                    if not isinstance(x, Tensor) or tuple(x.shape) != (n, c, h, w):
                        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                        raise ValueError(f"distiller {self.method_name!r}: {side}[{lvl!r}][{branch!r}] must be "
                                         f"[{n}, {c}, {h}, {w}], got {got}")
            if branches[0] != branches[1]:
                raise ValueError(f"distiller {self.method_name!r}: the towers' branches differ at level {lvl!r}: "
                                 f"student {branches[0]}, teacher {branches[1]}")

    def check_box_bins(self, inputs: KDInputs) -> None:
        """``box_bins`` has ``4 * (R + 1)`` channels (``R >= 1``) per prior of the assignment (shapes only)."""
        for lvl in self.levels:
            num_priors = inputs.assignment[lvl].shape[1]
            h, w = inputs.student_feats[lvl].shape[2:]
            bins = inputs.student_head[lvl]["box_bins"].shape[1] * h * w / num_priors
            if bins % 4 or bins < 8:
                raise ValueError(f"distiller {self.method_name!r}: box_bins at level {lvl!r} must have 4 * (R + 1) "
                                 f"channels per prior (R >= 1), got {bins:g} for {num_priors // (h * w)} priors per cell")

    def check_priors(self, inputs: KDInputs) -> None:
        """``priors[level]`` is ``[A * H_l * W_l, 4]`` for a whole number ``A >= 1`` of priors per cell."""
        for lvl in self.levels:
            if lvl not in inputs.priors:
                raise ValueError(f"distiller {self.method_name!r}: priors lack the level {lvl!r}")
            p, (h, w) = inputs.priors[lvl], inputs.student_feats[lvl].shape[2:]
            if not isinstance(p, Tensor) or p.dim() != 2 or p.shape[1] != 4 or p.shape[0] == 0 \
                    or p.shape[0] % (h * w):
                got = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
                raise ValueError(f"priors[{lvl!r}] must be [A * {h} * {w}, 4] (A priors per cell of the level's "
                                 f"grid), got {got}")

    # -- stage 2 --------------------------------------------------------------------------------
    def loss_terms(self, inputs: KDInputs) -> dict[str, Tensor]:
        """The named stage-2 loss terms (weighted; their sum is the KD loss), after checking ``inputs`` once.

        The teacher's features are detached here, so no method can train the teacher.
        """
        self.check_inputs(inputs)
        inputs = replace(inputs, teacher_feats={lvl: inputs.teacher_feats[lvl].detach() for lvl in self.levels})
        return self.compute_terms(inputs)

    def compute_terms(self, inputs: KDInputs) -> dict[str, Tensor]:
        """The method's loss terms on checked inputs (nothing read back from the device)."""
        raise NotImplementedError

    @torch.no_grad()
    def weight_maps(self, inputs: KDInputs) -> dict[str, dict[str, Tensor]]:
        """What the method weights or masks in its loss, for inspection, after checking ``inputs`` once.

        Returns map name -> level -> ``[N, H_l, W_l]`` float maps on the level's grid (the ones the loss
        uses, computed by the same functions). A map that differs between the sides comes as a pair
        named ``"<name> (teacher)"`` and ``"<name> (student)"``. Empty for a method that weights every
        cell alike (e.g. FitNet).
        """
        self.check_inputs(inputs)
        return self.compute_weight_maps(inputs)

    def compute_weight_maps(self, inputs: KDInputs) -> dict[str, dict[str, Tensor]]:
        """``weight_maps`` on checked inputs; none by default."""
        return {}

    @torch.no_grad()
    def loss_weights(self, inputs: KDInputs, **options: Any) -> LossWeights:
        """What the method weights, per level and per instance (``LossWeights``), after checking ``inputs``
        once; with ``options`` (e.g. ``mask_scale="count"``), as a copy of this distiller with those options
        would (``with_options``): this one is left unchanged."""
        self.check_inputs(inputs)
        return (self.with_options(**options) if options else self).compute_loss_weights(inputs)

    def compute_loss_weights(self, inputs: KDInputs) -> LossWeights:
        """``loss_weights`` on checked inputs: by default the ``weight_maps``, or one map of ones
        (``"uniform"``) for a method that weights every cell alike, and no per-cell loss."""
        maps = self.compute_weight_maps(inputs)
        if not maps:
            maps = {"uniform": {lvl: torch.ones_like(inputs.teacher_feats[lvl][:, 0]) for lvl in self.levels}}
        return LossWeights(maps)

    def per_image(self, **options: Any) -> bool:
        """Whether one image's ``loss_weights`` depend on that image alone under these options (default:
        yes); a method whose weights couple the images of a batch says no."""
        return True

    def with_options(self, **changes: Any) -> FeatureDistiller:
        """A new distiller of this class with ``changes`` to its options (checked as the constructor checks
        them; the others as this one's attributes hold them), a copy of this one's weights and buffers, on its
        device, in its dtype and mode; this one is unchanged (nor is torch's random state)."""
        values = {**{name: getattr(self, name) for name in self.options.to_dict()}, **changes}
        with torch.random.fork_rng(devices=[]):
            other = type(self)(self.student_channels, self.teacher_channels, self.strides, **values)
        param = next(self.parameters(), None)
        if param is not None:  # before loading, so no weight passes through another dtype
            other.to(param.device, param.dtype)
        other.load_state_dict(self.state_dict())
        return other.train(self.training)

    def forward(
        self,
        student_feats: Features,
        teacher_feats: Features,
        boxes: Sequence[Tensor],
        *,
        labels: Sequence[Tensor] | None = None,
        image_size: tuple[int, int] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The KD loss (a scalar): the sum of ``loss_terms``, for methods that need only features and boxes.

        Args:
            student_feats, teacher_feats: level name -> ``[N, C, H_l, W_l]``.
            boxes: N tensors ``[n_b, 4]`` in input pixels.
            labels: N int64 tensors ``[n_b]``, for methods that read classes.
            image_size: the padded batch input ``(H, W)``; if given, every level must have the grid
                its stride gives (``ceil`` or ``floor`` of ``H / stride``), else a ``ValueError``.
            generator: for methods that draw random numbers.
        """
        terms = self.loss_terms(KDInputs(student_feats, teacher_feats, boxes, labels, image_size, generator=generator))
        return torch.stack(list(terms.values())).sum()

    def stage2_parameters(self) -> list[nn.Parameter]:
        """The distiller parameters stage 2 trains besides the student: by default all but stage 1's."""
        frozen = {id(p) for m in self.stage1_modules().values() for p in m.parameters()}
        return [p for p in self.parameters() if id(p) not in frozen]

    def train_stage(self, stage: Literal[1, 2]) -> dict[str, nn.Module]:
        """Make exactly what ``stage`` trains require grad, and return the modules its run checkpoints: stage 1
        the stage-1 modules (``stage1_modules``), stage 2 ``stage2_parameters`` (checkpointed as the whole
        distiller, ``{"distiller": self}``)."""
        modules = self.stage1_modules() if stage == 1 else {"distiller": self}
        trained = [p for m in modules.values() for p in m.parameters()] if stage == 1 else self.stage2_parameters()
        for p in self.parameters():
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        return modules

    # -- stage 1 --------------------------------------------------------------------------------
    def stage1_modules(self) -> dict[str, nn.Module]:
        """The modules stage 1 trains and checkpoints, by name (empty for one-stage methods)."""
        return {}

    @property
    def stage1_ready(self) -> bool:
        """Whether stage 2 may run: one-stage, or stage 1 learned (or loaded) at least one iteration."""
        return not self.two_stage or bool(self.stage1_steps)

    def mark_stage1(self, iterations: int) -> None:
        """Record that stage 1 ran ``iterations`` iterations (``learn_stage1`` calls this)."""
        if self.two_stage:
            self.stage1_steps.fill_(iterations)

    def load_stage1_from(self, other: FeatureDistiller) -> None:
        """Take ``other``'s learned stage 1: its stage-1 modules' weights and its recorded iteration count (e.g. to
        run stage 2 from one stage 1 with several seeds). Both must be built alike (same method, levels, shapes);
        anything else, or an ``other`` whose stage 1 never ran, is a ``ValueError``."""
        mine, theirs = self.stage1_modules(), other.stage1_modules()
        if type(self) is not type(other) or mine.keys() != theirs.keys():
            raise ValueError(f"load_stage1_from: a {type(other).__name__} with stage-1 modules {sorted(theirs)} "
                             f"cannot give its stage 1 to a {type(self).__name__} with {sorted(mine)}")
        if not other.two_stage or not other.stage1_ready:
            raise ValueError(f"load_stage1_from: the {type(other).__name__} has no learned stage 1 to give")
        for name, module in mine.items():
            try:
                module.load_state_dict(theirs[name].state_dict())
            except RuntimeError as err:
                raise ValueError(f"load_stage1_from: stage-1 module {name!r} differs in shape: "
                                 f"{str(err).splitlines()[-1].strip()}") from err
        self._copy_stage1_count(other)

    def _copy_stage1_count(self, other: FeatureDistiller) -> None:
        if self.two_stage:
            self.mark_stage1(int(other.stage1_steps))

    def stage1(
        self,
        teacher_feats: Features,
        boxes: Sequence[Tensor],
        *,
        labels: Sequence[Tensor] | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> Stage1Output:
        """Stage 1 on one batch, after checking the inputs once (one device read).

        ``teacher_feats`` (level -> ``[N, C_t, H_l, W_l]``) may hold more levels than this distiller
        handles; the views hold only its levels. Feed each view to the frozen teacher's head and
        minimise its task loss plus ``terms``.
        """
        if not self.two_stage:
            raise ValueError(f"distiller {self.method_name!r} has no stage 1")
        boxes = self.check_teacher_inputs(teacher_feats, boxes, image_size, labels)
        check_values({"teacher_feats": self.at_levels(teacher_feats)}, {"boxes": boxes})
        return self.compute_stage1({lvl: teacher_feats[lvl].detach() for lvl in self.levels}, boxes, labels)

    def compute_stage1(self, teacher_feats: dict[str, Tensor], boxes: list[Tensor],
                       labels: Sequence[Tensor] | None) -> Stage1Output:
        """The method's stage 1 on checked inputs."""
        raise NotImplementedError

    @torch.no_grad()
    def stage1_stats(self, teacher_feats: Features, boxes: Sequence[Tensor]) -> dict[str, Tensor]:
        """Per-image statistics of what stage 1 learned, for reports: name -> ``[N, ...]`` (NaN where
        undefined), e.g. LIAF-KD's selector entropies. Empty for methods that define none."""
        boxes = self.check_teacher_inputs(teacher_feats, boxes, None)
        check_values({"teacher_feats": self.at_levels(teacher_feats)}, {"boxes": boxes})
        return self.compute_stage1_stats({lvl: teacher_feats[lvl] for lvl in self.levels}, boxes)

    def compute_stage1_stats(self, teacher_feats: dict[str, Tensor], boxes: list[Tensor]) -> dict[str, Tensor]:
        """``stage1_stats`` on checked inputs; none by default."""
        return {}
