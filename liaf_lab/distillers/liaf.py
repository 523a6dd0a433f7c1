"""LIAF-KD: learnable instance attention filtering for FPN feature distillation (Eq. 2-9)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..instance import InstanceSelectors, Normalize, instance_mask, roi_instance_features
from ..validation import check_boxes, check_feature_dict, check_values
from .base import Channels, FeatureDistiller, feature_mse
from .registry import register_distiller

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


@register_distiller("liaf")
class LIAFDistiller(FeatureDistiller):
    """Multi-level LIAF-KD distiller: one ``InstanceSelectors`` and one 1x1 projector per FPN level.

    Stage 1 (Eq. 5): ``stage1`` masks the frozen teacher's features with its own scores so the
    harness can run the teacher's head on them; only the selectors learn. Stage 2 (Eq. 6-9):
    ``forward`` returns ``loss_weight * sum_levels (1/CHW) ||M^T F^T - f_phi(M^S F^S)||^2``.

    Args (beyond ``FeatureDistiller``'s):
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
    """

    def __init__(
        self,
        student_channels: Channels,
        teacher_channels: Channels,
        strides: Mapping[str, float],
        loss_weight: float = 1.0,
        projector: bool = True,
        num_selectors: int = 6,
        roi_size: tuple[int, int] = (7, 7),
        sampling_ratio: int = 2,
        normalize: Normalize = "image",
        mask_scale: MaskScale = "literal",
        mask_side: MaskSide = "separate",
        detach_scores: bool = True,
        freeze_selectors: bool = True,
        diversity_weight: float = 1.0,
    ) -> None:
        super().__init__(student_channels, teacher_channels, strides, loss_weight, projector)
        if mask_scale not in ("literal", "count"):
            raise ValueError(f"mask_scale must be 'literal' or 'count', got {mask_scale!r}")
        if mask_side not in ("separate", "shared"):
            raise ValueError(f"mask_side must be 'separate' or 'shared', got {mask_side!r}")
        self.roi_size = tuple(roi_size)
        self.sampling_ratio = sampling_ratio
        self.mask_scale = mask_scale
        self.mask_side = mask_side
        self.detach_scores = detach_scores
        self.freeze_selectors = freeze_selectors
        self.diversity_weight = diversity_weight
        self.selectors = nn.ModuleDict({
            lvl: InstanceSelectors(num_selectors, self.teacher_channels[lvl], self.roi_size, normalize)
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
        validate: bool = True,
    ) -> Tensor:
        """Eq. 2, 3, 6 on one level: ``[I]`` mean scores, or ``[K, I]`` with ``per_selector``.

        ``feats`` must have the teacher's channels (project student features first when they differ).
        ``validate=False`` skips the input checks (the caller has made them) and reads nothing
        back from the device.
        """
        roi_feats, batch_index = roi_instance_features(
            feats, boxes, self.strides[level], self.roi_size, self.sampling_ratio, validate=validate
        )
        scores = self.selectors[level].scores(roi_feats, batch_index, weight, num_images=len(boxes), validate=False)
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
        """``(M^T, M^S)`` for one level, each ``[N, 1, H, W]``, following the mask options."""
        # The two gradient options are independent: ``freeze_selectors`` stops the gradient into E,
        # ``detach_scores`` the gradient into the features (student and projector) through the scores.
        weight = self.selectors[level].weight
        weight = weight.detach() if self.freeze_selectors else weight
        size = tuple(teacher.shape[-2:])
        student_in = self.student_roi_input(level, student, projected)
        if self.detach_scores:
            teacher, student_in = teacher.detach(), student_in.detach()
        a_t = self.instance_scores(level, teacher, boxes, weight=weight, validate=validate)
        a_s = self.instance_scores(level, student_in, boxes, weight=weight, validate=validate)
        if self.mask_side == "shared":
            m = self.level_mask(level, (a_t + a_s) / 2, boxes, size, validate=False)
            return m, m
        return (self.level_mask(level, a_t, boxes, size, validate=False),
                self.level_mask(level, a_s, boxes, size, validate=False))

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
        self.check_inputs(student_feats, teacher_feats, boxes, image_size)
        return {lvl: self.level_masks(lvl, student_feats[lvl], teacher_feats[lvl], boxes, validate=False)
                for lvl in self.levels}

    # -- losses ---------------------------------------------------------------------------------
    def level_loss(self, level: str, student: Tensor, teacher: Tensor, boxes: Sequence[Tensor]) -> Tensor:
        """Eq. 8-9 on one level.

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
        return feature_mse(m_t * teacher, student_hat)

    def diversity_loss(self) -> Tensor:
        """Eq. 4, averaged over levels."""
        return torch.stack([sel.diversity_loss() for sel in self.selectors.values()]).mean()

    def forward(
        self,
        student_feats: Mapping[str, Tensor],
        teacher_feats: Mapping[str, Tensor],
        boxes: Sequence[Tensor],
        *,
        image_size: tuple[int, int] | None = None,
    ) -> Tensor:
        """Stage-2 loss (Eq. 9 summed over levels); adds ``mu * L_div`` when the selectors still learn.

        Inputs are checked once here (``check_inputs``: one device read); the per-level code reads
        nothing back from the device. ``image_size``: see ``FeatureDistiller.forward``.
        """
        loss = super().forward(student_feats, teacher_feats, boxes, image_size=image_size)
        if not self.freeze_selectors:
            loss = loss + self.diversity_weight * self.diversity_loss()
        return loss

    def stage1(
        self,
        teacher_feats: Mapping[str, Tensor],
        boxes: Sequence[Tensor],
        *,
        image_size: tuple[int, int] | None = None,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Stage 1 (Eq. 5): teacher features masked by the teacher's own scores, and ``mu * L_div``.

        Returns ``(masked_feats, weighted_div)``: ``masked_feats`` holds every level of
        ``teacher_feats`` (levels this distiller does not handle pass unchanged), differentiable in
        the selectors; feed it to the frozen teacher's head to get ``L_task^T``, then minimise
        ``L_task^T + weighted_div``. Inputs are checked once here (one device read); ``image_size``
        (the padded batch input H, W), if given, is checked against the strides as in ``forward``.
        """
        check_feature_dict("teacher_feats", teacher_feats, self.levels, values=False)
        self.check_strides("teacher_feats", teacher_feats, image_size)
        boxes = check_boxes("boxes", boxes, num_images=teacher_feats[self.levels[0]].shape[0], values=False)
        check_values({"teacher_feats": self.at_levels(teacher_feats)}, {"boxes": boxes})
        masked = dict(teacher_feats)
        for lvl in self.levels:
            feats = teacher_feats[lvl].detach()
            scores = self.instance_scores(lvl, feats, boxes, validate=False)
            masked[lvl] = feats * self.level_mask(lvl, scores, boxes, tuple(feats.shape[-2:]), validate=False)
        return masked, self.diversity_weight * self.diversity_loss()

    def selector_parameters(self) -> list[nn.Parameter]:
        """The parameters stage 1 trains."""
        return list(self.selectors.parameters())

    def stage2_parameters(self) -> list[nn.Parameter]:
        """The parameters stage 2 trains besides the student: projectors, and selectors if not frozen."""
        params = list(self.projectors.parameters())
        return params if self.freeze_selectors else params + self.selector_parameters()
