"""PKD: General Distillation Framework for Object Detectors via Pearson Correlation Coefficient
(Cao et al., NeurIPS 2022).

One loss per FPN level, summed over levels, as mmrazor's ``PKDLoss`` (the authors' released code):

* Eq. (standardisation): each channel of a level's map is standardised over batch and space,
  ``F_hat = (F - mu_c) / (sigma_c + 1e-6)`` with ``mu_c`` and the unbiased ``sigma_c`` taken over
  ``N x H x W``, on both sides;
* Eq. (PKD loss): ``L = (1 / 2) * (1 / NCHW) ||F_hat^S - F_hat^T||^2``, which equals ``1 - r`` averaged
  over channels with ``r`` the Pearson correlation of the two maps (up to the unbiased ``sigma``
  and the ``1e-6``).

The public code needs equal channels (its detectors all have 256-channel FPNs); here a 1x1 conv
aligns the student where the channels differ, before the standardisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ..utils.options import Weight
from .base import FeatureDistiller, KDInputs, LossWeights, feature_cells
from .ops import channel_standardise
from .registry import register_distiller

def pkd_level_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """The PKD loss of one level (both ``[N, C, H, W]``, the student already aligned): half the mean
    squared difference of the channel-standardised maps, a scalar."""
    return F.mse_loss(channel_standardise(student), channel_standardise(teacher)) / 2


@register_distiller("pkd", label="PKD")
class PKDDistiller(FeatureDistiller):
    """``L = loss_weight * sum_levels (1/2) mean (F_hat^S - F_hat^T)^2`` (see the module docstring).

    Args (beyond ``FeatureDistiller``'s):
        loss_weight: factor on each level's loss (mmrazor's RetinaNet and FCOS-to-RetinaNet configs
            10; Faster R-CNN 6).

    A 1x1 conv aligns the student where the channels differ (else the identity).
    """

    @dataclass(frozen=True)
    class Options(FeatureDistiller.Options):
        loss_weight: Weight = 10.0

    def build(self) -> None:
        self.projectors = self.make_projectors("auto")

    def compute_terms(self, inputs: KDInputs) -> dict[str, Tensor]:
        s, t = inputs.student_feats, inputs.teacher_feats
        total = sum(pkd_level_loss(self.projectors[lvl](s[lvl]), t[lvl]) for lvl in self.levels)
        return {self.method_name: self.loss_weight * total}

    def compute_loss_weights(self, inputs: KDInputs) -> LossWeights:
        """Every cell weighted 1 (``"uniform"``), and each cell's term of ``pkd_level_loss``: half of
        ``feature_cells`` of the channel-standardised maps."""
        weights = super().compute_loss_weights(inputs)
        s, t = inputs.student_feats, inputs.teacher_feats
        weights.cells = {lvl: feature_cells(channel_standardise(t[lvl]), channel_standardise(self.projectors[lvl](s[lvl])))
                         / 2 for lvl in self.levels}
        return weights
