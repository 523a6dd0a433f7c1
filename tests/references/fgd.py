"""Literal, loop-by-loop reference of FGD: the public code (yzd-v/FGD ``FeatureLoss``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from liaf_lab.distillers.fgd import FGDDistiller, GcBlock


def ref_attention(x: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """``get_attention`` cell by cell: ``S [N, H, W]``, ``C [N, C]``."""
    n, c, h, w = x.shape
    spatial, channel = [], []
    for i in range(n):
        cells = torch.stack([x[i, :, a, b].abs().mean() / temperature for a in range(h) for b in range(w)])
        spatial.append((h * w * torch.softmax(cells, dim=0)).view(h, w))
        chans = torch.stack([x[i, k].abs().mean() / temperature for k in range(c)])
        channel.append(c * torch.softmax(chans, dim=0))
    return torch.stack(spatial), torch.stack(channel)


def ref_masks(boxes, stride: float, size: tuple[int, int]) -> tuple[list[list[list[float]]], list[list[list[float]]]]:
    """``Mask_fg`` / ``Mask_bg`` of the public ``forward`` with Python floats, box by box and cell by cell."""
    height, width = size
    fgs, bgs = [], []
    for image_boxes in boxes:
        fg = [[0.0] * width for _ in range(height)]
        for box in image_boxes:
            x1, y1, x2, y2 = (float(v) / stride for v in box)
            wmin, wmax, hmin, hmax = math.floor(x1), math.ceil(x2), math.floor(y1), math.ceil(y2)
            area = 1.0 / (hmax + 1 - hmin) / (wmax + 1 - wmin)
            for h in range(max(hmin, 0), min(hmax, height - 1) + 1):
                for w in range(max(wmin, 0), min(wmax, width - 1) + 1):
                    fg[h][w] = max(fg[h][w], area)
        bg = [[1.0 if fg[h][w] == 0 else 0.0 for w in range(width)] for h in range(height)]
        total = sum(map(sum, bg))
        if total:
            bg = [[v / total for v in row] for row in bg]
        fgs.append(fg)
        bgs.append(bg)
    return fgs, bgs


def ref_gcblock(x: Tensor, block: GcBlock) -> Tensor:
    """``spatial_pool`` + ``channel_add_conv`` per image with explicit weights: ``[N, C, H, W]``."""
    n, c, h, w = x.shape
    wk, bk = block.conv_mask.weight.view(c), block.conv_mask.bias[0]
    conv1, norm, conv2 = block.channel_add[0], block.channel_add[1], block.channel_add[3]
    w1, w2 = conv1.weight.view(-1, c), conv2.weight.view(c, -1)
    out = []
    for i in range(n):
        logits = torch.stack([torch.dot(wk, x[i, :, a, b]) + bk for a in range(h) for b in range(w)])
        probs = torch.softmax(logits, dim=0)
        context = sum(probs[a * w + b] * x[i, :, a, b] for a in range(h) for b in range(w))
        y = w1 @ context + conv1.bias
        y = (y - y.mean()) / torch.sqrt(y.var(unbiased=False) + norm.eps) * norm.weight.view(-1) + norm.bias.view(-1)
        add = w2 @ torch.relu(y) + conv2.bias
        out.append(x[i] + add[:, None, None])
    return torch.stack(out)


def ref_level(d: FGDDistiller, lvl: str, s: Tensor, t: Tensor, boxes) -> dict[str, Tensor]:
    """One public ``FeatureLoss`` on one level, unweighted, with loops over images and cells."""
    s = d.projectors[lvl](s)
    n, _, h, w = t.shape
    s_sp, s_ch = ref_attention(s, d.temperature)
    t_sp, t_ch = ref_attention(t, d.temperature)
    fg, bg = ref_masks(boxes, d.strides[lvl], (h, w))
    fg_loss = bg_loss = t.new_zeros(())
    for i in range(n):
        for a in range(h):
            for b in range(w):
                scale = torch.sqrt(t_sp[i, a, b]) * torch.sqrt(t_ch[i])
                fea_s, fea_t = s[i, :, a, b] * scale, t[i, :, a, b] * scale
                fg_loss = fg_loss + ((fea_s * math.sqrt(fg[i][a][b]) - fea_t * math.sqrt(fg[i][a][b])) ** 2).sum()
                bg_loss = bg_loss + ((fea_s * math.sqrt(bg[i][a][b]) - fea_t * math.sqrt(bg[i][a][b])) ** 2).sum()
    attention = (s_ch - t_ch).abs().sum() / n + (s_sp - t_sp).abs().sum() / n
    out_s, out_t = ref_gcblock(s, d.gc_student[lvl]), ref_gcblock(t, d.gc_teacher[lvl])
    return {"fg": fg_loss / n, "bg": bg_loss / n, "attention": attention, "global": ((out_s - out_t) ** 2).sum() / n}


def ref_terms(d: FGDDistiller, student, teacher, boxes) -> dict[str, Tensor]:
    """The four weighted terms summed over levels."""
    weights = {"fg": d.alpha_fg, "bg": d.beta_bg, "attention": d.gamma_attention, "global": d.lambda_global}
    levels = [ref_level(d, lvl, student[lvl], teacher[lvl], boxes) for lvl in d.levels]
    return {k: wgt * sum(lv[k] for lv in levels) for k, wgt in weights.items()}
