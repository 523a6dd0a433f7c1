"""Literal reference of CWD: mmrazor's ``ChannelWiseDivergence`` on FPN levels."""

from __future__ import annotations

import torch

from liaf_lab.distillers.cwd import CWDDistiller

from .common import ref_align


def ref_cwd_loss(student, teacher, d: CWDDistiller, temperature=None, loss_weight=None) -> torch.Tensor:
    """Per level, image and channel: the teacher's and student's spatial softmax at ``T`` written with
    ``exp`` and sums, ``sum_hw p_t (log p_t - log p_s)``; times ``T^2 / (N C)``, times the weight."""
    tau = d.temperature if temperature is None else temperature
    total = 0
    for lvl in d.levels:
        s, t = ref_align(student[lvl], d.projectors[lvl]), teacher[lvl]
        n, c = t.shape[:2]
        kl = 0
        for i in range(n):
            for ch in range(c):
                zs, zt = s[i, ch].flatten() / tau, t[i, ch].flatten() / tau
                ps = [torch.exp(v) / sum(torch.exp(u) for u in zs) for v in zs]
                pt = [torch.exp(v) / sum(torch.exp(u) for u in zt) for v in zt]
                kl = kl + sum(a * (torch.log(a) - torch.log(b)) for a, b in zip(pt, ps, strict=True))
        total = total + kl * tau**2 / (n * c)
    return (d.loss_weight if loss_weight is None else loss_weight) * total
