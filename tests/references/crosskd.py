"""Literal reference of CrossKD: the public CrossKD GFL terms (align_scale, KDQualityFocalLoss, bin KL with
class_reduction="sum", GIoU)."""

from __future__ import annotations

import torch
from torch import Tensor

from liaf_lab.distillers import KDInputs
from liaf_lab.distillers.crosskd import CrossKDDistiller

from .bckd import ref_decode, ref_giou
from .common import ref_sigmoid


def ref_align(student: Tensor, teacher: Tensor, conv) -> Tensor:
    """Projector (a 1x1 conv as a sum over channels, or none), then per channel: standardise with explicit
    sums over N, H, W (unbiased deviation, +1e-6) and take the teacher channel's mean and deviation."""
    if isinstance(conv, torch.nn.Conv2d):
        w, b = conv.weight[:, :, 0, 0], conv.bias
        student = torch.stack([sum(w[o, c] * student[:, c] for c in range(student.shape[1])) + b[o]
                               for o in range(w.shape[0])], dim=1)
    out = []
    for c in range(student.shape[1]):
        s, t = student[:, c].flatten(), teacher[:, c].flatten()
        m = s.numel()
        s_mean, t_mean = sum(s) / m, sum(t) / m
        s_std = torch.sqrt(sum((v - s_mean) ** 2 for v in s) / (m - 1))
        t_std = torch.sqrt(sum((v - t_mean) ** 2 for v in t) / (m - 1))
        out.append((student[:, c] - s_mean) / (s_std + 1e-6) * t_std + t_mean)
    return torch.stack(out, dim=1)


def ref_crosskd(d: CrossKDDistiller, inputs: KDInputs, cls_weight=1.0, reg_weight=3.0, box_weight=2.0, T=1.0,
                beta=1.0, mean_over_bins=False) -> dict[str, Tensor]:
    """The public ``pred_mimicking_loss_single`` summed over levels, with loops over images, cells and classes."""
    aligned = {lvl: {b: ref_align(inputs.student_tower[lvl][b], inputs.teacher_tower[lvl][b], d.projectors[b][lvl])
                     for b in ("cls", "reg")} for lvl in d.levels}
    cross = inputs.teacher_head_from(aligned)
    num_pos = max(1, sum(int((m >= 0).sum()) for m in inputs.assignment.values()))
    cls_total = reg_total = box_total = weight_total = 0
    for lvl in d.levels:
        x_cls, t_cls = cross[lvl]["cls_logits"], inputs.teacher_head[lvl]["cls_logits"]
        x_bins, t_bins = cross[lvl]["box_bins"], inputs.teacher_head[lvl]["box_bins"]
        n, k, h, w = x_cls.shape
        per_side = x_bins.shape[1] // 4
        for i in range(n):
            for y in range(h):
                for x in range(w):
                    for c in range(k):
                        p_x, p_t = ref_sigmoid(x_cls[i, c, y, x]), ref_sigmoid(t_cls[i, c, y, x])
                        bce = -(p_t * torch.log(p_x) + (1 - p_t) * torch.log(1 - p_x))
                        cls_total = cls_total + bce * torch.abs(p_x - p_t) ** beta
                    weight = ref_sigmoid(max(t_cls[i, c, y, x] for c in range(k)))
                    weight_total = weight_total + weight
                    for e in range(4):
                        zx = [x_bins[i, e * per_side + b, y, x] / T for b in range(per_side)]
                        zt = [t_bins[i, e * per_side + b, y, x] / T for b in range(per_side)]
                        px = [torch.exp(v) / sum(torch.exp(u) for u in zx) for v in zx]
                        pt = [torch.exp(v) / sum(torch.exp(u) for u in zt) for v in zt]
                        kl = sum(q * (torch.log(q) - torch.log(r)) for q, r in zip(pt, px, strict=True)) * T * T
                        reg_total = reg_total + weight * (kl / per_side if mean_over_bins else kl) / 4
                    prior, stride = inputs.priors[lvl][y * w + x], d.strides[lvl]
                    box_x = ref_decode([x_bins[i, b, y, x] for b in range(4 * per_side)], prior, stride)
                    box_t = ref_decode([t_bins[i, b, y, x] for b in range(4 * per_side)], prior, stride)
                    box_total = box_total + weight * (1 - ref_giou(box_x, box_t))
    return {"cls": cls_weight * cls_total / num_pos, "reg": reg_weight * reg_total / weight_total,
            "box": box_weight * box_total / weight_total}
