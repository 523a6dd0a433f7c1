"""FitNet: the plain feature-KD baseline, Eq. 1 with ``M = 1``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .base import FeatureDistiller, feature_mse
from .registry import register_distiller


@register_distiller("fitnet")
class FitNetDistiller(FeatureDistiller):
    """``L = sum_levels (1/CHW) ||F^T - f_phi(F^S)||^2`` over the whole map (no mask)."""

    def level_loss(self, level: str, student: Tensor, teacher: Tensor, boxes: Sequence[Tensor]) -> Tensor:
        return feature_mse(teacher, self.projectors[level](student))
