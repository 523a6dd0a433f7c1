"""Literal, loop-by-loop reference of FGFI: the public code (twangnh/Distilling-Object-Detectors:
``_AnchorTargetLayer.forward``'s ``mask_batch`` and ``trainval_net_sup.py``'s ``sup_loss``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import SIZES
from torch import Tensor, nn

from liaf_lab.distillers.fgfi import FGFIDistiller

from .common import ref_iou


def ref_priors(priors: Tensor, stride: float, scale: float) -> list[list[float]]:
    """Each prior as floats; a point (both sides at most one stride) becomes the ``scale * stride`` square on it."""
    out = []
    side = scale * stride
    for p in priors.tolist():
        if p[2] - p[0] > stride or p[3] - p[1] > stride:
            out.append(p)
        else:
            cx, cy = (p[0] + p[2]) / 2, (p[1] + p[3]) / 2
            out.append([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])
    return out


def ref_masks(priors, boxes, strides, psi: float, scale: float, iou_max: str) -> dict[str, list]:
    """``mask_batch`` of the public ``_AnchorTargetLayer.forward``, image by image, box by box, prior by prior:
    per box the IoU map over the priors, its max (this level, or every level), and every cell with an
    anchor above ``psi * max`` (OR over anchors and boxes)."""
    levels = list(strides)
    plist = {lvl: ref_priors(priors[lvl], strides[lvl], scale) for lvl in levels}
    masks = {lvl: [] for lvl in levels}
    for image_boxes in boxes:
        per_level = {lvl: [[0.0] * SIZES[lvl][1] for _ in range(SIZES[lvl][0])] for lvl in levels}
        for box in image_boxes.tolist():
            iou_map = {lvl: [ref_iou(p, box) for p in plist[lvl]] for lvl in levels}
            for lvl in levels:
                best = max(max(iou_map[other]) for other in levels) if iou_max == "all" else max(iou_map[lvl])
                h, w = SIZES[lvl]
                num_anchors = len(plist[lvl]) // (h * w)
                for i in range(h):
                    for j in range(w):
                        for a in range(num_anchors):
                            if iou_map[lvl][(i * w + j) * num_anchors + a] > psi * best:
                                per_level[lvl][i][j] = 1.0
        for lvl in levels:
            masks[lvl].append(per_level[lvl])
    return masks


def ref_loss(d: FGFIDistiller, student, teacher, boxes, priors) -> Tensor:
    """``sup_loss`` per level, cell by cell: ``sum I (t - f_adap(s))^2 / (2 sum I)`` (0 for an empty mask), the mean
    over levels, times ``loss_weight``; ``f_adap`` from the distiller's conv weights."""
    masks = ref_masks(priors, boxes, d.strides, d.psi, d.point_prior_scale, d.iou_max)
    total = 0
    for lvl in d.levels:
        adapter = d.adapters[lvl]
        conv = adapter[0] if isinstance(adapter, nn.Sequential) else adapter
        adapted = F.conv2d(student[lvl], conv.weight, conv.bias, padding=1)
        if isinstance(adapter, nn.Sequential):
            adapted = torch.relu(adapted)
        n_img, _, h, w = teacher[lvl].shape
        num, count = teacher[lvl].new_zeros(()), 0.0
        for n in range(n_img):
            for i in range(h):
                for j in range(w):
                    if masks[lvl][n][i][j]:
                        num = num + ((teacher[lvl][n, :, i, j] - adapted[n, :, i, j]) ** 2).sum()
                        count += 1
        total = total + (num / (2 * count) if count else num)
    return d.loss_weight * total / len(d.levels)
