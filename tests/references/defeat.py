"""Literal, loop-by-loop reference of DeFeat: the public code (ggjy/DeFeat.pytorch: ``get_gt_mask`` /
``_map_roi_levels`` masks, ``batch_processor_kd``'s ``neck-decouple`` losses and ``KLDivergenceLoss``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from helpers import SIZES
from torch import Tensor

from liaf_lab.distillers.base import KDInputs
from liaf_lab.distillers.defeat import DeFeatDistiller

ALL_SIZES = {**SIZES, "a": (8, 10), "b": (4, 5)}  # [H, W] of the tests' levels: STRIDES and test_defeat's BIG_STRIDES


def ref_level_of(box: list[float], num_levels: int) -> int:
    """``_map_roi_levels`` for one box."""
    scale = math.sqrt((box[2] - box[0] + 1) * (box[3] - box[1] + 1))
    return min(max(math.floor(math.log2(scale / 56 + 1e-6)), 0), num_levels - 1)


def ref_masks(boxes, strides, box_levels: str) -> dict[str, list]:
    """``get_gt_mask`` image by image and box by box: the box over the stride, ``int`` (= floor) of its corners
    clipped to the grid, the rectangle ``[ly:ry, lx:rx]`` or, if empty, the single cell ``[ly, lx]``."""
    ranked = sorted(strides, key=lambda lvl: strides[lvl])
    masks = {lvl: [] for lvl in strides}
    for image_boxes in boxes:
        for lvl, stride in strides.items():
            h, w = ALL_SIZES[lvl]
            mask = [[0.0] * w for _ in range(h)]
            for box in image_boxes.tolist():
                if box_levels == "scale" and ref_level_of(box, len(ranked)) != ranked.index(lvl):
                    continue
                x1, y1, x2, y2 = (v / stride for v in box)
                lx, rx = min(max(math.floor(x1), 0), w - 1), min(max(math.floor(x2), 0), w)
                ly, ry = min(max(math.floor(y1), 0), h - 1), min(max(math.floor(y2), 0), h)
                if lx == rx or ly == ry:
                    mask[ly][lx] = 1.0
                else:
                    for i in range(ly, ry):
                        for j in range(lx, rx):
                            mask[i][j] = 1.0
            masks[lvl].append(mask)
    return masks


def ref_kl(s: Tensor, t: Tensor, form: str) -> Tensor:
    """``KL(p_T || p_S)`` of one prior's K logits (already divided by T)."""
    if form == "softmax":
        p = torch.softmax(t, dim=0)
        return (p * (torch.log(p) - torch.log_softmax(s, dim=0))).sum()
    p, q = torch.sigmoid(t), torch.sigmoid(s)
    return (p * (torch.log(p) - torch.log(q)) + (1 - p) * (torch.log(1 - p) - torch.log(1 - q))).sum()


def ref_terms(d: DeFeatDistiller, inputs: KDInputs) -> dict[str, Tensor]:
    """``neck-decouple`` per level (sum over masked cells and channels over ``max(1, 2 * C * count)``), the mean over
    levels; ``KL-decouple`` prior by prior, pooled over levels (sum over ``max(1, count)``), times ``T^2``; weighted."""
    masks = ref_masks(inputs.boxes, d.strides, d.box_levels)
    T = d.temperature
    fg, bg = 0, 0
    kl_sum, kl_count = [0, 0], [0, 0]  # positive, negative
    for lvl in d.levels:
        conv = d.adapters[lvl]
        adapted = F.conv2d(inputs.student_feats[lvl], conv.weight, conv.bias, padding=1)
        teacher = inputs.teacher_feats[lvl]
        n_img, channels, h, w = teacher.shape
        s_cls, t_cls = inputs.student_head[lvl]["cls_logits"], inputs.teacher_head[lvl]["cls_logits"]
        anchors = inputs.priors[lvl].shape[0] // (h * w)
        k = s_cls.shape[1] // anchors
        num, count = [0, 0], [0, 0]  # fg, bg
        for n in range(n_img):
            for i in range(h):
                for j in range(w):
                    side = 0 if masks[lvl][n][i][j] else 1
                    num[side] = num[side] + ((adapted[n, :, i, j] - teacher[n, :, i, j]) ** 2).sum()
                    count[side] += 1
                    for a in range(anchors):
                        kl = ref_kl(s_cls[n, a * k:(a + 1) * k, i, j] / T, t_cls[n, a * k:(a + 1) * k, i, j] / T,
                                    d.head_kl)
                        kl_sum[side] = kl_sum[side] + kl
                        kl_count[side] += 1
        fg = fg + num[0] / max(1.0, 2 * channels * count[0])
        bg = bg + num[1] / max(1.0, 2 * channels * count[1])
    return {
        "fg": d.fg_weight * fg / len(d.levels),
        "bg": d.bg_weight * bg / len(d.levels),
        "cls_pos": d.cls_pos_weight * T ** 2 * kl_sum[0] / max(1, kl_count[0]),
        "cls_neg": d.cls_neg_weight * T ** 2 * kl_sum[1] / max(1, kl_count[1]),
    }
