"""MasKD: masked distillation with receptive tokens (Huang et al., ICLR 2023).

Follows the public code (hunto/MasKD): ``MaskModule``, ``dice_coeff`` and ``MasKDLoss`` in
``mmrazor/mmrazor/models/losses/maskd.py``, stage 1 in ``mmdetection/maskd_hook.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor, nn

from ..utils.options import NonNegativeInt, Range, Weight
from .base import FeatureDistiller, KDInputs, LossWeights, Stage1Output
from .ops import dice_coeff
from .registry import register_distiller

def cell_weight(masks: Tensor, weights: Tensor | None) -> Tensor:
    """``MasKDLoss``'s weight of each cell: ``w = sum_t p_t M_t^2 / sum_HW M_t``, ``[N, H, W]``.

    ``masks`` ``M`` is ``[N, T, H, W]``, ``weights`` ``p`` ``[N, T]`` (``None``: ``p_t = 1/T``, the public
    mean over tokens). Per image the level's loss ``sum_t p_t mean_C [sum_HW (M_t D)^2 / sum_HW M_t]``
    equals ``sum_HW w * mean_C D^2`` for ``D = S - T``.
    """
    per_token = masks.square() / masks.sum(dim=(2, 3), keepdim=True)  # [N, T, H, W]
    if weights is None:
        return per_token.mean(dim=1)
    return (per_token * weights[:, :, None, None]).sum(dim=1)


class MaskModule(nn.Module):
    """The receptive tokens of one FPN level (public ``MaskModule``).

    Args:
        channels: C of the features the tokens read (the teacher's).
        num_tokens: T.
        weight_mask: also learn the token weights ``p`` (conv3x3 -> global average pool -> conv1x1 ->
            softmax over T).

    Tokens are drawn from N(0, 0.01); the convs from N(0, sqrt(2 / (k * k * out_channels))), bias 0.
    """

    def __init__(self, channels: int, num_tokens: int, weight_mask: bool) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.empty(num_tokens, channels).normal_(0, 0.01))
        self.prob = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, num_tokens, kernel_size=1),
        ) if weight_mask else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)

    def masks(self, feats: Tensor) -> Tensor:
        """Public ``forward_mask``: ``sigmoid(token_t . F)`` over channels, ``[N, C, H, W]`` -> ``[N, T, H, W]``."""
        n, c, h, w = feats.shape
        return torch.sigmoid(self.mask_token @ feats.reshape(n, c, h * w)).reshape(n, -1, h, w)

    def token_weights(self, feats: Tensor) -> Tensor:
        """Public ``forward_prob``: the token weights ``p``, ``[N, C, H, W]`` -> ``[N, T]`` (softmax over T)."""
        return torch.softmax(self.prob(feats).flatten(1), dim=1)

    def replace(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """Public ``forward_train`` (stage 1): ``(sum_t p_t * (F * M_t), dice_coeff(M))``.

        ``F`` is ``[N, C, H, W]``; without ``weight_mask`` every ``p_t`` is 1. Returns the replaced
        features ``[N, C, H, W]`` and the scalar dice term.
        """
        masks = self.masks(feats)  # [N, T, H, W]
        if self.prob is not None:
            masks_weighted = masks * self.token_weights(feats)[:, :, None, None]
        else:
            masks_weighted = masks
        return feats * masks_weighted.sum(dim=1, keepdim=True), dice_coeff(masks.flatten(2))


@register_distiller("maskd", label="MasKD")
class MasKDDistiller(FeatureDistiller):
    """MasKD: per FPN level, ``T`` receptive tokens learned in stage 1 mask the distillation in stage 2.

    Stage 1 (``maskd_hook.py``): with the teacher frozen, each level's teacher feature ``F`` is
    replaced by ``sum_t p_t (F * M_t)`` (the view ``maskd``) and fed to the teacher's own head; the
    tokens minimise the teacher's task loss plus ``dice`` (``dice_coeff`` of each level's masks, summed
    over levels with weight 1, as the hook adds each level's term).

    Stage 2 (``MasKDLoss``), term ``maskd``: with ``S = f_phi(F^S)`` (a 1x1 align conv) and masks ``M``
    from the teacher, per level ``L_t = mean_C [sum_HW (M_t (S - F^T))^2 / sum_HW M_t]``, then
    ``sum_t p_t L_t`` (``weight_mask``; else the mean over T), averaged over images and summed over
    levels, times ``loss_weight``. After ``custom_mask_warmup`` training calls ``M`` becomes the teacher
    mask times the student mask (the tokens applied to ``S``, without gradient). The tokens are frozen
    in stage 2 (lr 0 in the public configs): masks and weights carry no gradient there.

    Public configs (teacher R101 -> student R50, 2x schedule): RetinaNet ``loss_weight=7``,
    ``custom_mask_warmup=7000`` (the defaults here); FCOS ``loss_weight=10``, ``custom_mask_warmup=5000``;
    both ``num_tokens=6``, ``weight_mask=True``, ``custom_mask=True``, a conv2d align module. The
    RetinaNet config also adds an L1 loss (weight 1) between the regression head outputs
    (``bbox_head.retina_reg``) of student and teacher; that loss is not part of this distiller.

    Args (beyond ``FeatureDistiller``'s):
        loss_weight: factor on the stage-2 loss summed over levels.
        num_tokens: T receptive tokens per level (at least 2, for the dice term).
        weight_mask: learn token weights ``p`` (stage 1's replacement and stage 2's sum over tokens).
        custom_mask: after the warm-up, multiply the teacher mask by the student's.
        custom_mask_warmup: training calls of ``compute_terms`` before ``custom_mask`` applies.
        projector: learn a 1x1 conv ``f_phi`` per level (the public align module, used even when the
            channels agree); without it the channels must agree.

    The buffer ``kd_steps`` counts the training-mode calls of ``compute_terms`` (the public
    ``_iter``); it is saved with the module, so a resumed run switches masks at the same step.
    """

    two_stage = True

    @dataclass(frozen=True)
    class Options(FeatureDistiller.Options):
        loss_weight: Weight = 7.0
        num_tokens: Annotated[int, Range(ge=2)] = 6  # the dice term compares token pairs
        weight_mask: bool = True
        custom_mask: bool = True
        custom_mask_warmup: NonNegativeInt = 7000
        projector: bool = True

    def build(self) -> None:
        # seeded by the caller: tokens, then the weight convs, level by level
        self.mask_modules = nn.ModuleDict({
            lvl: MaskModule(self.teacher_channels[lvl], self.num_tokens, self.weight_mask) for lvl in self.levels
        })
        self.projectors = self.make_projectors(self.projector)
        self.register_buffer("kd_steps", torch.zeros((), dtype=torch.long))

    # -- stage 2 --------------------------------------------------------------------------------
    def custom_active(self) -> Tensor | None:
        """Whether the student mask multiplies the teacher's now: a 0-d bool tensor (``kd_steps`` past
        ``custom_mask_warmup``, read nowhere), or ``None`` with ``custom_mask`` off."""
        return self.kd_steps >= self.custom_mask_warmup if self.custom_mask else None

    @torch.no_grad()  # the tokens are frozen in stage 2
    def level_masks(self, level: str, student: Tensor, teacher: Tensor,
                    custom: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``MasKDLoss.forward``'s masks on one level: ``M`` ``[N, T, H, W]`` (the teacher's tokens,
        times the student's where ``custom`` is true) and the token weights ``p`` ``[N, T]`` (``None``
        without ``weight_mask``).

        ``student`` is aligned (``[N, C_t, H, W]``), ``teacher`` ``[N, C_t, H, W]``; ``custom`` as
        ``custom_active`` gives it.
        """
        module = self.mask_modules[level]
        mask = module.masks(teacher)  # [N, T, H, W]
        if custom is not None:
            mask = torch.where(custom, mask * module.masks(student.detach()), mask)
        return mask, module.token_weights(teacher) if self.weight_mask else None

    def level_loss(self, level: str, student: Tensor, teacher: Tensor, custom: Tensor | None) -> Tensor:
        """``MasKDLoss.forward`` on one level: a scalar.

        ``student`` is aligned (``[N, C_t, H, W]``), ``teacher`` ``[N, C_t, H, W]``; ``custom`` a 0-d
        bool tensor (use the student mask too) or ``None`` (``custom_mask`` off). The public
        ``sum_t p_t mean_C [sum_HW (M_t (S - T))^2 / sum_HW M_t]``, averaged over images;
        ``sum_HW (M (S - T))^2`` is computed as ``M^2 @ (S - T)^2`` over HW (``[N, T, C]``) without the
        ``[N, T, C, H, W]`` product. (``cell_weight`` gives the same sum as one weight per cell, for
        inspection; the order of the sums here is kept so that earlier runs replay bit for bit.)
        """
        mask, weights = self.level_masks(level, student, teacher, custom)
        flat_mask = mask.flatten(2)  # [N, T, HW]
        sq_diff = (student - teacher).square().flatten(2)  # [N, C, HW]
        loss = (flat_mask.square() @ sq_diff.transpose(1, 2)) / flat_mask.sum(dim=2, keepdim=True)  # [N, T, C]
        if weights is not None:
            return (loss.mean(dim=2) * weights).sum(dim=1).mean()
        return loss.mean()

    def compute_terms(self, inputs: KDInputs) -> dict[str, Tensor]:
        """Stage 2: ``maskd`` = ``loss_weight`` times ``MasKDLoss`` summed over levels.

        In training mode each call advances ``kd_steps`` by one (on the device; read nowhere).
        """
        s, t = inputs.student_feats, inputs.teacher_feats
        custom = self.custom_active()
        total = sum(self.level_loss(lvl, self.projectors[lvl](s[lvl]), t[lvl], custom) for lvl in self.levels)
        if self.training:
            self.kd_steps.add_(1)
        return {self.method_name: self.loss_weight * total}

    def compute_weight_maps(self, inputs: KDInputs) -> dict[str, dict[str, Tensor]]:
        """The masks of ``level_masks`` as the next training call of ``compute_terms`` uses them (student
        mask included once ``kd_steps`` has passed the warm-up), each level ``[N, H, W]``:

        * ``token t`` (t = 1..T): the receptive token's mask ``M_t``;
        * ``cell weight``: ``cell_weight(M, p)``, the factor of each cell's channel-mean squared error
          in the level's loss (before the mean over images and ``loss_weight``).

        The token weights ``p`` are one number per image and token, not spatial: only inside ``cell weight``.
        """
        custom = self.custom_active()
        maps: dict[str, dict[str, Tensor]] = {}
        for lvl in self.levels:
            mask, weights = self.level_masks(lvl, self.projectors[lvl](inputs.student_feats[lvl]),
                                             inputs.teacher_feats[lvl], custom)
            for t in range(self.num_tokens):
                maps.setdefault(f"token {t + 1}", {})[lvl] = mask[:, t]
            maps.setdefault("cell weight", {})[lvl] = cell_weight(mask, weights)
        return maps

    def compute_loss_weights(self, inputs: KDInputs) -> LossWeights:
        """The maps of ``compute_weight_maps`` and each cell's term of ``level_loss``: by ``cell_weight``'s
        identity, ``cell weight`` times the cell's channel-mean squared difference of the aligned student and
        the teacher, divided by the images ``N`` (the mean over images), each level ``[N, H, W]``."""
        weights = super().compute_loss_weights(inputs)
        s, t = inputs.student_feats, inputs.teacher_feats
        weights.cells = {lvl: weights.maps["cell weight"][lvl] * (self.projectors[lvl](s[lvl]) - t[lvl]).square().mean(1)
                         / t[lvl].shape[0] for lvl in self.levels}
        return weights

    # -- stage 1 --------------------------------------------------------------------------------
    def compute_stage1(self, teacher_feats: dict[str, Tensor], boxes: list[Tensor],
                       labels: Sequence[Tensor] | None) -> Stage1Output:
        """Stage 1 (``maskd_hook.py``): the view ``maskd`` (level -> ``sum_t p_t (F * M_t)``,
        ``[N, C_t, H, W]``) for the teacher's head, and ``dice`` (``dice_coeff`` summed over levels)."""
        views, dice = {}, []
        for lvl in self.levels:
            views[lvl], level_dice = self.mask_modules[lvl].replace(teacher_feats[lvl])
            dice.append(level_dice)
        return Stage1Output({self.method_name: views}, {"dice": torch.stack(dice).sum()})

    def stage1_modules(self) -> dict[str, nn.Module]:
        """Stage 1 trains the per-level mask modules (tokens and token-weight convs)."""
        return {"tokens": self.mask_modules}
