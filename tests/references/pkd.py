"""Literal reference of PKD: mmrazor's ``PKDLoss`` (Pearson-correlation feature KD)."""

from __future__ import annotations

import torch

from liaf_lab.distillers.pkd import PKDDistiller

from .common import ref_align


def ref_standardise(x: torch.Tensor) -> list[list[float | torch.Tensor]]:
    """Public ``PKDLoss.norm`` channel by channel: the channel's N*H*W values, minus their mean, over their
    unbiased standard deviation + 1e-6 (computed with explicit sums)."""
    out = []
    for c in range(x.shape[1]):
        values = [x[n, c, i, j] for n in range(x.shape[0]) for i in range(x.shape[2]) for j in range(x.shape[3])]
        mean = sum(values) / len(values)
        std = torch.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        out.append([(v - mean) / (std + 1e-6) for v in values])
    return out


def ref_pkd_loss(student, teacher, d: PKDDistiller, loss_weight=None) -> torch.Tensor:
    """``loss_weight * sum_levels mse(norm(S), norm(T)) / 2``, element by element."""
    total = 0
    for lvl in d.levels:
        s_hat, t_hat = ref_standardise(ref_align(student[lvl], d.projectors[lvl])), ref_standardise(teacher[lvl])
        count = sum(len(ch) for ch in t_hat)
        total = total + sum((a - b) ** 2 for sc, tc in zip(s_hat, t_hat, strict=True)
                            for a, b in zip(sc, tc, strict=True)) / count / 2
    return (d.loss_weight if loss_weight is None else loss_weight) * total
