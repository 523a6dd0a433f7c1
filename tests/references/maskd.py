"""Literal references of MasKD: the public code (hunto/MasKD: ``MaskModule``, ``dice_coeff``, ``MasKDLoss``,
``maskd_hook.py``) written as Python loops over images, tokens, channels and cells."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from liaf_lab.distillers.maskd import MasKDDistiller


def ref_masks(tokens: Tensor, feats: Tensor) -> Tensor:
    """``forward_mask``: ``M[n, t, h, w] = sigmoid(sum_c token[t, c] F[n, c, h, w])``, ``[N, T, H, W]``."""
    n_img, n_ch, height, width = feats.shape
    images = []
    for n in range(n_img):
        per_token = []
        for t in range(tokens.shape[0]):
            rows = []
            for h in range(height):
                row = []
                for w in range(width):
                    dot = sum(tokens[t, c] * feats[n, c, h, w] for c in range(n_ch))
                    row.append(1 / (1 + torch.exp(-dot)))
                rows.append(torch.stack(row))
            per_token.append(torch.stack(rows))
        images.append(torch.stack(per_token))
    return torch.stack(images)


def ref_weights(prob: nn.Sequential, feats: Tensor) -> Tensor:
    """``forward_prob``: conv3x3 -> mean over cells -> conv1x1 -> softmax over tokens, ``[N, T]``."""
    conv3, conv1 = prob[0], prob[2]
    out = []
    for n in range(feats.shape[0]):
        y = F.conv2d(feats[n : n + 1], conv3.weight, conv3.bias, padding=1)[0]  # [C, H, W]
        pooled = [sum(y[c, h, w] for h in range(y.shape[1]) for w in range(y.shape[2])) / (y.shape[1] * y.shape[2])
                  for c in range(y.shape[0])]
        logits = [conv1.bias[t] + sum(conv1.weight[t, c, 0, 0] * pooled[c] for c in range(len(pooled)))
                  for t in range(conv1.weight.shape[0])]
        exps = [torch.exp(v) for v in logits]
        total = sum(exps)
        out.append(torch.stack([e / total for e in exps]))
    return torch.stack(out)


def ref_dice(masks: Tensor) -> Tensor:
    """``dice_coeff``: mean over images and ordered pairs i != j of ``2 a.b / (a.a + eps + b.b + eps)``."""
    n_img, n_tok = masks.shape[:2]
    flat = masks.reshape(n_img, n_tok, -1)
    values = []
    for n in range(n_img):
        for i in range(n_tok):
            for j in range(n_tok):
                if i != j:
                    a, b = flat[n, i], flat[n, j]
                    values.append(2 * (a * b).sum() / ((a * a).sum() + 1e-12 + (b * b).sum() + 1e-12))
    return sum(values) / len(values)


def ref_stage1(d: MasKDDistiller, teacher: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    """``maskd_hook``: per level ``sum_t p_t (F * M_t)`` (cell by cell) and the dice terms summed over levels."""
    views, dice = {}, 0
    for lvl in d.levels:
        m = d.mask_modules[lvl]
        feats = teacher[lvl]
        masks = ref_masks(m.mask_token, feats)
        p = ref_weights(m.prob, feats) if d.weight_mask else None
        n_img, n_ch, height, width = feats.shape
        out = torch.stack([torch.stack([torch.stack([torch.stack([
            sum((p[n, t] if p is not None else 1) * (feats[n, c, h, w] * masks[n, t, h, w])
                for t in range(masks.shape[1]))
            for w in range(width)]) for h in range(height)]) for c in range(n_ch)]) for n in range(n_img)])
        views[lvl] = out
        dice = dice + ref_dice(masks)
    return views, dice


def ref_maskd_loss(d: MasKDDistiller, student: dict[str, Tensor], teacher: dict[str, Tensor],
                   use_student_mask: bool) -> Tensor:
    """``MasKDLoss.forward``: per level, image, token and channel
    ``sum_HW (M s - M t)^2 / sum_HW M``, mean over C, weighted sum over T (or mean), mean over N; summed
    over levels, times ``loss_weight``. The masks and weights carry no gradient (frozen tokens)."""
    total = 0
    for lvl in d.levels:
        m = d.mask_modules[lvl]
        s = d.projectors[lvl](student[lvl])
        t = teacher[lvl]
        with torch.no_grad():
            mask = ref_masks(m.mask_token, t)
            if use_student_mask:
                mask = mask * ref_masks(m.mask_token, s)
            p = ref_weights(m.prob, t) if d.weight_mask else None
        n_img, n_ch, height, width = t.shape
        per_image = []
        for n in range(n_img):
            per_token = []
            for k in range(mask.shape[1]):
                area = sum(mask[n, k, h, w] for h in range(height) for w in range(width))
                per_channel = []
                for c in range(n_ch):
                    sq = sum((mask[n, k, h, w] * s[n, c, h, w] - mask[n, k, h, w] * t[n, c, h, w]) ** 2
                             for h in range(height) for w in range(width))
                    per_channel.append(sq / area)
                per_token.append(per_channel)
            if p is not None:
                per_image.append(sum(p[n, k] * (sum(row) / n_ch) for k, row in enumerate(per_token)))
            else:
                per_image.append(per_token)
        if p is not None:
            level = sum(per_image) / n_img
        else:
            values = [v for image in per_image for row in image for v in row]
            level = sum(values) / len(values)
        total = total + level
    return d.loss_weight * total
