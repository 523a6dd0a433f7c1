"""Literal reference of FitNet (Romero et al., 2015) as the LIAF-KD paper writes it: Eq. 1 with ``M = 1``."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor

from .liaf import ref_level_mse


def ref_fitnet_loss(
    student_feats: Mapping[str, Tensor],
    teacher_feats: Mapping[str, Tensor],
    strides: Mapping[str, float],
    projectors: Mapping[str, Callable[[Tensor], Tensor]],
    loss_weight: float = 1.0,
) -> Tensor:
    """Eq. 1 with ``M = 1``: ``sum_levels (1/CHW) ||F^T - f_phi(F^S)||^2`` averaged over the batch."""
    total = None
    for level in strides:
        level_loss = ref_level_mse(teacher_feats[level].detach(), projectors[level](student_feats[level]))
        total = level_loss if total is None else total + level_loss
    return loss_weight * total
