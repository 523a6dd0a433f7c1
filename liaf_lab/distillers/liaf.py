"""LIAF-KD: learnable instance attention filtering for FPN feature distillation (Eq. 2-9)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.options import PositiveInt, Weight
from .base import FeatureDistiller, KDInputs, LossWeights, Stage1Output, feature_cells, feature_mse
from .instance import (
    InstanceSelectors,
    LogitScale,
    Normalize,
    instance_mask,
    roi_instance_features,
    score_entropy,
)
from .ops import concat_boxes
from .registry import register_distiller, register_variant

MaskScale = Literal["literal", "count"]
MaskSide = Literal["separate", "shared"]
Side = Literal["teacher", "student"]


def _is_pointwise_conv(module: nn.Module) -> bool:
    """A plain 1x1 conv with bias (the default ``f_phi``), for which masking commutes with ``W``."""
    return (
        isinstance(module, nn.Conv2d) and module.bias is not None and module.kernel_size == (1, 1)
        and module.stride == (1, 1) and module.padding in ((0, 0), "valid") and module.dilation == (1, 1)
        and module.groups == 1
    )


@runtime_checkable
class InstanceScorer(Protocol):
    """What the instance-score tools (``ScoreHistory``) need: a distiller that scores instances with selectors
    per level (LIAF-KD and any variant of it)."""

    levels: list[str]
    strides: dict[str, float]
    selectors: nn.ModuleDict
    projectors: nn.ModuleDict

    def check_inputs(self, inputs: KDInputs) -> None: ...

    def instance_scores(self, level: str, feats: Tensor, boxes: Sequence[Tensor], per_selector: bool = False,
                        weight: Tensor | None = None, *, validate: bool = True) -> Tensor: ...

    def level_masks(self, level: str, student: Tensor, teacher: Tensor, boxes: Sequence[Tensor],
                    projected: Tensor | None = None, *, validate: bool = True) -> tuple[Tensor, Tensor]: ...

    def scaled(self, scores: Tensor, boxes: Sequence[Tensor]) -> Tensor: ...


@register_distiller("liaf", label="LIAF-KD")
class LIAFDistiller(FeatureDistiller):
    """Multi-level LIAF-KD distiller: one ``InstanceSelectors`` and one 1x1 projector per FPN level.

    Stage 1 (Eq. 5): ``stage1`` masks the frozen teacher's features with its own scores so the
    harness can run the teacher's head on them; only the selectors learn. Stage 2 (Eq. 6-9): the
    term ``liaf`` is ``loss_weight * sum_levels (1/CHW) ||M^T F^T - f_phi(M^S F^S)||^2``, and
    ``diversity`` is ``mu * L_div`` while the selectors still learn (``freeze_selectors=False``).

    Args (beyond ``FeatureDistiller``'s):
        loss_weight: factor on the loss summed over levels.
        projector: learn a 1x1 conv ``f_phi`` per level (else the channels must agree).
        num_selectors: K per level (paper: 6).
        roi_size: RoIAlign output (h, w) (assumption: 7 x 7).
        sampling_ratio: RoIAlign samples per bin side.
        normalize: softmax over each image's instances (``"image"``) or the whole batch (``"batch"``).
        mask_scale: ``"literal"`` multiplies cells by ``A_i`` (paper); ``"count"`` by ``A_i`` times
            the number of instances in the softmax group, so an average instance keeps weight 1.
        mask_side: ``"separate"``: ``M^T`` from ``A^T`` on the teacher and ``M^S`` from ``A^S`` on
            the student (paper); ``"shared"``: one mask from ``(A^T + A^S) / 2`` on both.
        detach_scores: no gradient from the scores into the features they read (the student, and
            the projector when the student side reads projected features); the gradient into the
            selectors is governed by ``freeze_selectors`` alone.
        freeze_selectors: keep ``E`` fixed in stage 2; otherwise ``E`` learns from the distillation
            loss plus ``diversity_weight * L_div``.
        diversity_weight: mu of Eq. 5.
        logit_scale: the temperature of Eq. 3 (``InstanceSelectors``): ``"none"`` (paper),
            ``"sqrt_dim"`` (``1/sqrt(C h w)``) or ``"learned"`` (learned in stage 1 with ``E``).
    """

    two_stage = True
    view_options = ("mask_scale", "mask_side", "normalize")

    @dataclass(frozen=True)
    class Options(FeatureDistiller.Options):
        loss_weight: Weight = 1.0
        projector: bool = True
        num_selectors: PositiveInt = 6
        roi_size: tuple[PositiveInt, PositiveInt] = (7, 7)
        sampling_ratio: PositiveInt = 2
        normalize: Normalize = "image"
        mask_scale: MaskScale = "literal"
        mask_side: MaskSide = "separate"
        detach_scores: bool = True
        freeze_selectors: bool = True
        diversity_weight: Weight = 1.0
        logit_scale: LogitScale = "none"

    def build(self) -> None:
        self.projectors = self.make_projectors(self.projector)
        self.selectors = nn.ModuleDict({
            lvl: InstanceSelectors(self.num_selectors, self.teacher_channels[lvl], self.roi_size, self.normalize,
                                   logit_scale=self.logit_scale)
            for lvl in self.levels
        })

    # -- scores and masks ---------------------------------------------------------------------
    def instance_scores(
        self,
        level: str,
        feats: Tensor,
        boxes: Sequence[Tensor],
        per_selector: bool = False,
        weight: Tensor | None = None,
        *,
        factor: Tensor | float | None = None,
        validate: bool = True,
    ) -> Tensor:
        """Eq. 2, 3, 6 on one level: ``[I]`` mean scores, or ``[K, I]`` with ``per_selector``.

        ``weight`` and ``factor`` replace the selectors' rows and logit factor (e.g. detached copies).

        ``feats`` must have the teacher's channels (project student features first when they differ).
        ``validate=False`` skips the input checks (the caller has made them) and reads nothing
        back from the device.
        """
        roi_feats, batch_index = roi_instance_features(
            feats, boxes, self.strides[level], self.roi_size, self.sampling_ratio, validate=validate
        )
        scores = self.selectors[level].scores(roi_feats, batch_index, weight, factor=factor, num_images=len(boxes),
                                               validate=False)
        return scores if per_selector else scores.mean(dim=0)

    def scaled(self, scores: Tensor, boxes: Sequence[Tensor]) -> Tensor:
        """Apply ``mask_scale``: unchanged (literal), or times the size of each softmax group (count)."""
        if self.mask_scale == "literal" or scores.numel() == 0:
            return scores
        if next(iter(self.selectors.values())).normalize == "batch":
            return scores * scores.shape[0]
        # the size of each instance's image group, from host lengths (no device read)
        counts = torch.cat([scores.new_full((len(b),), len(b)) for b in boxes])
        return scores * counts

    def level_mask(
        self, level: str, scores: Tensor, boxes: Sequence[Tensor], size: tuple[int, int], *, validate: bool = True
    ) -> Tensor:
        """Eq. 7 with ``mask_scale`` applied: ``[N, 1, H, W]``."""
        return instance_mask(boxes, self.scaled(scores, boxes), size, self.strides[level], validate=validate)

    def student_roi_input(self, level: str, student: Tensor, projected: Tensor | None) -> Tensor:
        """Features the selectors read on the student side: projected when channels differ.

        ``projected`` (``f_phi(student)``) may be ``None`` when the channels agree; it is not read then.
        """
        same = self.student_channels[level] == self.teacher_channels[level]
        if same:
            return student
        return self.projectors[level](student) if projected is None else projected

    def instance_weights(
        self,
        level: str,
        student: Tensor,
        teacher: Tensor,
        boxes: Sequence[Tensor],
        projected: Tensor | None = None,
        *,
        validate: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Eq. 6 and the instances' factors of Eq. 7 on one level, following the mask options:
        ``(A^T, A^S, W^T, W^S)``, each ``[I]``: the mean scores of teacher and student, and the weights the
        masks ``M^T`` and ``M^S`` multiply each instance's cells by (``mask_scale`` applied; with
        ``mask_side="shared"`` one weight from ``(A^T + A^S) / 2``, the same tensor twice)."""
        # The two gradient options are independent: ``freeze_selectors`` stops the gradient into E,
        # ``detach_scores`` the gradient into the features (student and projector) through the scores.
        selectors = self.selectors[level]
        weight = selectors.weight.detach() if self.freeze_selectors else selectors.weight
        factor = selectors.logit_factor(detach=self.freeze_selectors)
        student_in = self.student_roi_input(level, student, projected)
        if self.detach_scores:
            teacher, student_in = teacher.detach(), student_in.detach()
        a_t = self.instance_scores(level, teacher, boxes, weight=weight, factor=factor, validate=validate)
        a_s = self.instance_scores(level, student_in, boxes, weight=weight, factor=factor, validate=validate)
        if self.mask_side == "shared":
            shared = self.scaled((a_t + a_s) / 2, boxes)
            return a_t, a_s, shared, shared
        return a_t, a_s, self.scaled(a_t, boxes), self.scaled(a_s, boxes)

    def level_masks(
        self,
        level: str,
        student: Tensor,
        teacher: Tensor,
        boxes: Sequence[Tensor],
        projected: Tensor | None = None,
        *,
        validate: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """``(M^T, M^S)`` for one level (Eq. 7 on ``instance_weights``), each ``[N, 1, H, W]``, following the
        mask options."""
        _, _, w_t, w_s = self.instance_weights(level, student, teacher, boxes, projected, validate=validate)
        size, stride = tuple(teacher.shape[-2:]), self.strides[level]
        m_t = instance_mask(boxes, w_t, size, stride, validate=False)
        return (m_t, m_t) if w_s is w_t else (m_t, instance_mask(boxes, w_s, size, stride, validate=False))

    @torch.no_grad()
    def masks(
        self,
        student_feats: Mapping[str, Tensor],
        teacher_feats: Mapping[str, Tensor],
        boxes: Sequence[Tensor],
        *,
        image_size: tuple[int, int] | None = None,
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """``{level: (M^T, M^S)}`` as used by the loss, for inspection."""
        self.check_inputs(KDInputs(student_feats, teacher_feats, boxes, image_size=image_size))
        return {lvl: self.level_masks(lvl, student_feats[lvl], teacher_feats[lvl], boxes, validate=False)
                for lvl in self.levels}

    def compute_weight_maps(self, inputs: KDInputs) -> dict[str, dict[str, Tensor]]:
        """The masks of Eq. 7 (``mask_scale`` and ``mask_side`` applied): ``M (teacher)`` from ``A^T``
        and ``M (student)`` from ``A^S``, each level ``[N, H, W]``."""
        boxes = list(inputs.boxes)
        pairs = {lvl: self.level_masks(lvl, inputs.student_feats[lvl], inputs.teacher_feats[lvl], boxes, validate=False)
                 for lvl in self.levels}
        return {"M (teacher)": {lvl: m_t[:, 0] for lvl, (m_t, _) in pairs.items()},
                "M (student)": {lvl: m_s[:, 0] for lvl, (_, m_s) in pairs.items()}}

    def per_image(self, **options: Any) -> bool:
        """No with ``normalize="batch"``: Eq. 3's softmax then runs over the instances of the whole batch."""
        return options.get("normalize", self.normalize) != "batch"

    def compute_loss_weights(self, inputs: KDInputs) -> LossWeights:
        """The masks of Eq. 7 (``compute_weight_maps``), each cell's term of Eq. 9 (``level_terms``,
        ``feature_cells``), and per instance its scores per selector (Eq. 3) and their means (Eq. 6) on
        both sides and its mask weights (``instance_weights``)."""
        s, t, boxes = inputs.student_feats, inputs.teacher_feats, list(inputs.boxes)
        instances: dict[str, dict[str, Tensor]] = {}
        cells = {}
        for lvl in self.levels:
            a_t, a_s, w_t, w_s = self.instance_weights(lvl, s[lvl], t[lvl], boxes, validate=False)
            for side, feats, mean in (("T", t[lvl], a_t), ("S", self.student_roi_input(lvl, s[lvl], None), a_s)):
                per = self.instance_scores(lvl, feats, boxes, per_selector=True, validate=False)
                for k in range(per.shape[0]):
                    instances.setdefault(f"A^{side} E_{k + 1}", {})[lvl] = per[k]
                instances.setdefault(f"A^{side}", {})[lvl] = mean
            instances.setdefault("M^T", {})[lvl], instances.setdefault("M^S", {})[lvl] = w_t, w_s
            cells[lvl] = feature_cells(*self.level_terms(lvl, s[lvl], t[lvl], boxes))
        bars = {"mean": ("mean A", "A^T", "A^S")}
        bars |= {k: (f"selector E_{k + 1}", f"A^T E_{k + 1}", f"A^S E_{k + 1}")
                 for k in range(self.num_selectors)}
        columns = {f"A^{side} E_{k + 1}": f"{who} score of selector E_{k + 1} (Eq. 3; the masks use the mean over them)"
                   for side, who in (("T", "teacher"), ("S", "student")) for k in range(self.num_selectors)}
        columns |= {"A^T": "teacher score, mean over the selectors (Eq. 6)",
                    "A^S": "student score, mean over the selectors (Eq. 6)",
                    "M^T": f"the instance's weight in the teacher mask (Eq. 7, mask scale {self.mask_scale})",
                    "M^S": f"the instance's weight in the student mask (Eq. 7, mask scale {self.mask_scale})"}
        # literal masks: scores are at most 1 and the background is 1
        ranges = {"M": (0.0, 1.0)} if self.mask_scale == "literal" else {}
        return LossWeights(self.compute_weight_maps(inputs), cells, instances, bars, columns, ranges,
                           self._score_note(boxes))

    def _score_note(self, boxes: Sequence[Tensor]) -> str:
        """Why Eq. 3's scores are small: the softmax spreads 1 over the instances of its group."""
        sizes = [len(b) for b in boxes]
        if self.normalize == "batch" or len(sizes) == 1:
            group = sum(sizes)
            where = "this image" if len(sizes) == 1 else f"the batch of all {len(sizes)} images"
            return (f"the softmax runs over {where}, {group} instances, so each gets about 1/{group} = "
                    f"{1 / max(group, 1):.3f}. With mask scale 'literal' instance cells get weights near 0; 'count' "
                    f"multiplies by {group} so an average instance keeps weight 1.")
        return (f"the softmax runs over each image's instances ({sizes}), so each gets about 1/n. With mask scale "
                "'literal' instance cells get weights near 0; 'count' multiplies by n so an average instance keeps "
                "weight 1.")

    # -- losses ---------------------------------------------------------------------------------
    def level_terms(self, level: str, student: Tensor, teacher: Tensor, boxes: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Eq. 8 on one level: ``(M^T F^T, f_phi(M^S F^S))``, the two sides Eq. 9 compares, each ``[N, C_t, H, W]``.

        For the 1x1 conv ``f_phi(F) = W F + b`` and a mask broadcast over channels,
        ``f_phi(M^S F^S) = M^S (W F^S) + b``: the conv runs once, without its bias, on the unmasked
        student, and one ``addcmul`` applies mask and bias (fewer passes over the feature map and a
        lower peak memory than convolving ``M^S F^S``, which autograd would have to keep).
        """
        proj = self.projectors[level]
        if _is_pointwise_conv(proj):
            linear = F.conv2d(student, proj.weight)  # W F^S
            bias = proj.bias.view(1, -1, 1, 1)
            same = self.student_channels[level] == self.teacher_channels[level]
            projected = None if same else linear + bias  # the student scores read f_phi(F^S)
            m_t, m_s = self.level_masks(level, student, teacher, boxes, projected, validate=False)
            student_hat = torch.addcmul(bias, m_s, linear)
        else:  # identity (projector=False) or a replaced projector: Eq. 9 as written
            m_t, m_s = self.level_masks(level, student, teacher, boxes, validate=False)
            student_hat = proj(m_s * student)
        return m_t * teacher, student_hat

    def level_loss(self, level: str, student: Tensor, teacher: Tensor, boxes: Sequence[Tensor]) -> Tensor:
        """Eq. 9 on one level: ``feature_mse`` of ``level_terms``."""
        return feature_mse(*self.level_terms(level, student, teacher, boxes))

    def diversity_loss(self) -> Tensor:
        """Eq. 4, averaged over levels."""
        return torch.stack([sel.diversity_loss() for sel in self.selectors.values()]).mean()

    def compute_terms(self, inputs: KDInputs) -> dict[str, Tensor]:
        """Stage 2: ``liaf`` (Eq. 9 summed over levels, times ``loss_weight``) and, while the selectors
        still learn, ``diversity`` (``mu * L_div``)."""
        s, t, boxes = inputs.student_feats, inputs.teacher_feats, list(inputs.boxes)
        terms = {self.method_name: self.loss_weight * sum(self.level_loss(lvl, s[lvl], t[lvl], boxes)
                                                          for lvl in self.levels)}
        if not self.freeze_selectors:
            terms["diversity"] = self.diversity_weight * self.diversity_loss()
        return terms

    def compute_stage1(self, teacher_feats: dict[str, Tensor], boxes: list[Tensor],
                       labels: Sequence[Tensor] | None) -> Stage1Output:
        """Stage 1 (Eq. 5): the teacher's features masked by its own scores (the view ``liaf``), and
        ``diversity`` = ``mu * L_div``; minimise the teacher's task loss on the view plus ``diversity``."""
        masked = {}
        for lvl, feats in teacher_feats.items():
            scores = self.instance_scores(lvl, feats, boxes, validate=False)
            masked[lvl] = feats * self.level_mask(lvl, scores, boxes, tuple(feats.shape[-2:]), validate=False)
        return Stage1Output({self.method_name: masked}, {"diversity": self.diversity_weight * self.diversity_loss()})

    def compute_stage1_stats(self, teacher_feats: dict[str, Tensor], boxes: list[Tensor]) -> dict[str, Tensor]:
        """``selector_entropy_<level>``: ``[N, K]``, each selector's normalised score entropy per image
        (``score_entropy``; 1 = uniform, 0 = one instance; NaN below two instances)."""
        stats = {}
        for lvl, feats in teacher_feats.items():
            scores = self.instance_scores(lvl, feats, boxes, per_selector=True, validate=False)
            _, batch_index = concat_boxes(boxes)
            stats[f"selector_entropy_{lvl}"] = score_entropy(scores, batch_index.to(scores.device), len(boxes)).t()
        return stats

    def stage1_modules(self) -> dict[str, nn.Module]:
        """Stage 1 trains the selectors ``E`` (and the learned logit scale)."""
        return {"selectors": self.selectors}

    def stage2_parameters(self) -> list[nn.Parameter]:
        """The projectors, and the selectors unless ``freeze_selectors``."""
        params = list(self.projectors.parameters())
        return params if self.freeze_selectors else params + list(self.selectors.parameters())


# The paper read literally (docs/method.md, "Options the paper leaves open"): Eq. 3's softmax over the
# batched F_ROI without a temperature, Eq. 7's mask A_i on instances and 1 on background, M^T on the
# teacher and M^S on the student. ``liaf`` differs only in ``normalize="image"``.
register_variant("liaf_paper", of="liaf", label="LIAF-KD (paper-literal)", normalize="batch", mask_scale="literal",
                 mask_side="separate", logit_scale="none")
