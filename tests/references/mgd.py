"""Literal reference of MGD (Masked Generative Distillation): the public code's loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from liaf_lab.distillers.mgd import MGDDistiller

from .common import ref_align


def ref_generation(x: torch.Tensor, block: torch.nn.Sequential) -> torch.Tensor:
    """Eq. 3: conv3x3 -> ReLU -> conv3x3 (padding 1), from the block's weights."""
    conv1, conv2 = block[0], block[2]
    hidden = torch.relu(F.conv2d(x, conv1.weight, conv1.bias, padding=1))
    return F.conv2d(hidden, conv2.weight, conv2.bias, padding=1)


def ref_mgd_loss(student, teacher, d: MGDDistiller, generator, alpha=None, lambda_mask=None) -> torch.Tensor:
    """The public ``FeatureLoss.get_dis_loss`` per level, literally: draw ``r [N, 1, H, W]``, mask each cell
    where ``r > 1 - lambda``, generate, and sum the squared error cell by cell; divide by N; times alpha."""
    alpha = d.alpha if alpha is None else alpha
    lam = d.lambda_mask if lambda_mask is None else lambda_mask
    total = 0
    for lvl in d.levels:
        s = ref_align(student[lvl], d.align[lvl])
        t = teacher[lvl]
        n_img, _, h, w = t.shape
        r = torch.rand((n_img, 1, h, w), generator=generator, dtype=s.dtype)
        mask = torch.ones(n_img, 1, h, w, dtype=s.dtype)
        for n in range(n_img):
            for i in range(h):
                for j in range(w):
                    if float(r[n, 0, i, j]) > 1 - lam:
                        mask[n, 0, i, j] = 0.0
        generated = ref_generation(s * mask, d.generation[lvl])
        err = 0
        for n in range(n_img):
            for i in range(h):
                for j in range(w):
                    err = err + ((generated[n, :, i, j] - t[n, :, i, j]) ** 2).sum()
        total = total + err / n_img
    return alpha * total
