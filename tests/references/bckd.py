"""Literal reference of BCKD: the public code's two terms (``NovelKDLoss`` and the GIoU ``loss_score_kd`` of
``LDHead.loss_single``)."""

from __future__ import annotations

import torch
from torch import Tensor

from liaf_lab.distillers import KDInputs

from .common import ref_sigmoid


def ref_decode(bins: list[Tensor], prior: Tensor, stride: float) -> list[Tensor]:
    """GFL's integral per side (softmax expectation over the bins) around the prior's centre, in strides."""
    cx, cy = (prior[0] + prior[2]) / 2 / stride, (prior[1] + prior[3]) / 2 / stride
    per_side = len(bins) // 4
    dist = []
    for e in range(4):
        z = bins[e * per_side:(e + 1) * per_side]
        total = sum(torch.exp(v) for v in z)
        dist.append(sum(torch.exp(v) / total * i for i, v in enumerate(z)))
    return [cx - dist[0], cy - dist[1], cx + dist[2], cy + dist[3]]


def ref_giou(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """GIoU of two boxes, written out: intersection, union and the enclosing box."""
    iw = torch.clamp(torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0]), min=0)
    ih = torch.clamp(torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1]), min=0)
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    enclose = (torch.maximum(a[2], b[2]) - torch.minimum(a[0], b[0])) * (torch.maximum(a[3], b[3]) - torch.minimum(a[1], b[1]))
    return inter / union - (enclose - union) / enclose


def ref_bckd(inputs: KDInputs, strides, cls_weight=1.0, loc_weight=4.0, beta=1.0, every_level=False,
             detach_factor=False) -> dict[str, Tensor]:
    """Per level, image, cell, anchor (and class): the public ``novel_kd_loss`` summed over classes and the
    GIoU loss weighted by ``max_k |p_t - p_s|``; a level without positives adds nothing; over ``N_pos``."""
    num_pos = max(1, sum(int((m >= 0).sum()) for m in inputs.assignment.values()))
    cls_total = loc_total = 0
    for lvl, stride in strides.items():
        if not every_level and not bool((inputs.assignment[lvl] >= 0).any()):
            continue
        s_cls, t_cls = inputs.student_head[lvl]["cls_logits"], inputs.teacher_head[lvl]["cls_logits"].detach()
        s_bins, t_bins = inputs.student_head[lvl]["box_bins"], inputs.teacher_head[lvl]["box_bins"].detach()
        n, _, h, w = s_cls.shape
        a = inputs.priors[lvl].shape[0] // (h * w)
        k, d = s_cls.shape[1] // a, s_bins.shape[1] // a
        for i in range(n):
            for y in range(h):
                for x in range(w):
                    for j in range(a):
                        prior = inputs.priors[lvl][(y * w + x) * a + j]
                        gaps = []
                        for c in range(k):
                            s, t = s_cls[i, j * k + c, y, x], t_cls[i, j * k + c, y, x]
                            p_s, p_t = ref_sigmoid(s), ref_sigmoid(t)
                            bce = -(p_t * torch.log(p_s) + (1 - p_t) * torch.log(1 - p_s))
                            factor = (p_t - p_s.detach()) if detach_factor else (p_t - p_s)
                            cls_total = cls_total + bce * torch.abs(factor) ** beta
                            gaps.append(torch.abs(p_t - p_s.detach()))
                        box_s = ref_decode([s_bins[i, j * d + b, y, x] for b in range(d)], prior, stride)
                        box_t = ref_decode([t_bins[i, j * d + b, y, x] for b in range(d)], prior, stride)
                        loc_total = loc_total + max(gaps) * (1 - ref_giou(box_s, box_t))
    return {"cls": cls_weight * cls_total / num_pos, "loc": loc_weight * loc_total / num_pos}
