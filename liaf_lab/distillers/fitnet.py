"""FitNet: the plain feature-KD baseline, Eq. 1 with ``M = 1``."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from .base import Channels, FeatureDistiller, KDInputs, feature_mse
from .registry import register_distiller


@register_distiller("fitnet", label="FitNet")
class FitNetDistiller(FeatureDistiller):
    """``L = loss_weight * sum_levels (1/CHW) ||F^T - f_phi(F^S)||^2`` over the whole map (no mask).

    Args (beyond ``FeatureDistiller``'s):
        loss_weight: factor on the loss summed over levels.
        projector: learn a 1x1 conv ``f_phi`` per level (FitNet's adaptation layer). Without it
            the channels of student and teacher must agree.
    """

    def __init__(self, student_channels: Channels, teacher_channels: Channels, strides: Mapping[str, float],
                 loss_weight: float = 1.0, projector: bool = True) -> None:
        super().__init__(student_channels, teacher_channels, strides)
        self.loss_weight = loss_weight
        self.projectors = self.make_projectors(projector)

    def compute_terms(self, inputs: KDInputs) -> dict[str, Tensor]:
        s, t = inputs.student_feats, inputs.teacher_feats
        total = sum(feature_mse(t[lvl], self.projectors[lvl](s[lvl])) for lvl in self.levels)
        return {self.method_name: self.loss_weight * total}
