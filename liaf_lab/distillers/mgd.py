"""MGD: Masked Generative Distillation (Yang et al., ECCV 2022), one loss per FPN level (Eq. 2-5).

The student's (aligned) feature is masked at random cells, shared over channels, and a small
generation block must rebuild the teacher's full feature from it. As in the public code
(``FeatureLoss`` in ``det/mmdet/distillation/losses/mgd.py``), a cell is dropped where
``r > 1 - lambda`` for ``r ~ U[0, 1)``, and the summed squared error is divided by the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..utils.options import Fraction, Weight
from .base import FeatureDistiller, KDInputs, LossWeights
from .ops import random_keep_mask
from .registry import register_distiller


def generation_block(channels: int) -> nn.Sequential:
    """Eq. 3, ``G(F) = W_l2(ReLU(W_l1(F)))``: two 3x3 convs ``C_t -> C_t`` (padding 1), PyTorch default init."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, channels, kernel_size=3, padding=1),
    )


@register_distiller("mgd", label="MGD")
class MGDDistiller(FeatureDistiller):
    """``L = alpha * sum_levels sum_{n,c,h,w} (G(f_align(F^S) * M) - F^T)^2 / N`` (Eq. 4-5, per level).

    Args (beyond ``FeatureDistiller``'s):
        alpha: factor on the loss summed over levels (public RetinaNet, RepPoints and SOLO configs
            2e-5; Faster / Mask R-CNN configs 5e-7).
        lambda_mask: the fraction of cells masked, in ``[0, 1]`` (public one-stage configs 0.65;
            two-stage configs 0.45).

    ``f_align`` is a 1x1 conv where student and teacher channels differ (else the identity); the
    random mask draws from ``KDInputs.generator`` level by level in ``self.levels`` order.
    """

    needs = frozenset({"generator"})

    @dataclass(frozen=True)
    class Options(FeatureDistiller.Options):
        alpha: Weight = 2e-5
        lambda_mask: Fraction = 0.65

    def build(self) -> None:
        self.align = self.make_projectors("auto")
        self.generation = nn.ModuleDict({lvl: generation_block(self.teacher_channels[lvl]) for lvl in self.levels})

    def masked_input(self, level: str, student: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Eq. 2 on one level: the aligned student ``f_align(F^S)`` ``[N, C_t, H, W]`` and its random keep
        mask ``M`` ``[N, 1, H, W]`` (``random_keep_mask``, drawn from ``generator``)."""
        aligned = self.align[level](student)
        return aligned, random_keep_mask(aligned, self.lambda_mask, generator)

    def generated(self, level: str, student: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Eq. 3 on Eq. 2's masked student, one level: ``G(f_align(F^S) * M)`` ``[N, C_t, H, W]`` and the keep
        mask ``M`` ``[N, 1, H, W]`` (drawn from ``generator``)."""
        aligned, mask = self.masked_input(level, student, generator)
        return self.generation[level](aligned * mask), mask

    def level_loss(self, level: str, student: Tensor, teacher: Tensor, generator: torch.Generator | None) -> Tensor:
        """Eq. 4 on one level (the public code's ``get_dis_loss``), without ``alpha``: a scalar.

        ``student`` is ``[N, C_s, H, W]``, ``teacher`` ``[N, C_t, H, W]``.
        """
        generated, _ = self.generated(level, student, generator)
        return (generated - teacher).square().sum() / teacher.shape[0]

    def compute_terms(self, inputs: KDInputs) -> dict[str, Tensor]:
        """Eq. 5's distillation part: ``mgd`` = ``alpha`` times Eq. 4 summed over levels."""
        s, t = inputs.student_feats, inputs.teacher_feats
        total = sum(self.level_loss(lvl, s[lvl], t[lvl], inputs.generator) for lvl in self.levels)
        return {self.method_name: self.alpha * total}

    def compute_weight_maps(self, inputs: KDInputs) -> dict[str, dict[str, Tensor]]:
        """``keep mask``: Eq. 2's random mask ``M`` (1 kept, 0 dropped), each level ``[N, H, W]``.

        Drawn from ``inputs.generator`` level by level as ``compute_terms`` draws it, so a generator in
        the same state gives the loss's mask (this call advances it).
        """
        return {"keep mask": {lvl: self.masked_input(lvl, inputs.student_feats[lvl], inputs.generator)[1][:, 0]
                              for lvl in self.levels}}

    def compute_loss_weights(self, inputs: KDInputs) -> LossWeights:
        """``keep mask`` (as ``compute_weight_maps``) and each cell's term of Eq. 4, ``sum_c (G - F^T)^2 / N``
        (``generated``), each level ``[N, H, W]``, from one draw of the masks in the loss's order."""
        maps, cells = {}, {}
        for lvl in self.levels:
            generated, mask = self.generated(lvl, inputs.student_feats[lvl], inputs.generator)
            maps[lvl] = mask[:, 0]
            cells[lvl] = (generated - inputs.teacher_feats[lvl]).square().sum(1) / generated.shape[0]
        return LossWeights({"keep mask": maps}, cells)
