"""FitNet: the plain feature-KD baseline, Eq. 1 with ``M = 1``."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..utils.options import Weight
from .base import FeatureDistiller, KDInputs, LossWeights, feature_cells, feature_mse
from .registry import register_distiller


@register_distiller("fitnet", label="FitNet")
class FitNetDistiller(FeatureDistiller):
    """``L = loss_weight * sum_levels (1/CHW) ||F^T - f_phi(F^S)||^2`` over the whole map (no mask).

    Args (beyond ``FeatureDistiller``'s):
        loss_weight: factor on the loss summed over levels.
        projector: learn a 1x1 conv ``f_phi`` per level (FitNet's adaptation layer). Without it
            the channels of student and teacher must agree.
    """

    @dataclass(frozen=True)
    class Options(FeatureDistiller.Options):
        loss_weight: Weight = 1.0
        projector: bool = True

    def build(self) -> None:
        self.projectors = self.make_projectors(self.projector)

    def compute_terms(self, inputs: KDInputs) -> dict[str, Tensor]:
        s, t = inputs.student_feats, inputs.teacher_feats
        total = sum(feature_mse(t[lvl], self.projectors[lvl](s[lvl])) for lvl in self.levels)
        return {self.method_name: self.loss_weight * total}

    def compute_loss_weights(self, inputs: KDInputs) -> LossWeights:
        """Every cell weighted 1 (``"uniform"``), and each cell's term of Eq. 1 with ``M = 1`` (``feature_cells``)."""
        weights = super().compute_loss_weights(inputs)
        s, t = inputs.student_feats, inputs.teacher_feats
        weights.cells = {lvl: feature_cells(t[lvl], self.projectors[lvl](s[lvl])) for lvl in self.levels}
        return weights
