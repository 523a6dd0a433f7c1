"""Literal reference of LD (Localization Distillation): mmdetection's ``LDHead`` LD term."""

from __future__ import annotations

import torch
from torch import Tensor

from liaf_lab.distillers import KDInputs


def ref_softmax(z: list[Tensor]) -> list[Tensor]:
    total = sum(torch.exp(v) for v in z)
    return [torch.exp(v) / total for v in z]


def ref_ld_loss(inputs: KDInputs, levels, loss_weight=0.25, temperature=10.0, mean_over_bins=True,
                avg_factor=4.0, weight_from="student") -> Tensor:
    """mmdetection's ``LDHead.loss_single`` LD term per level, summed: at each positive prior ``p`` (loop over
    images, cells, anchors), ``w_p`` = max over classes of sigmoid(student cls logit); per side,
    ``T^2 * mean_bins p_t (log p_t - log p_s)`` (``knowledge_distillation_kl_div_loss``), times ``w_p``; summed
    and divided by ``avg_factor`` 4; times ``loss_weight``."""
    total = 0
    for lvl in levels:
        s_bins, t_bins = inputs.student_head[lvl]["box_bins"], inputs.teacher_head[lvl]["box_bins"]
        head = inputs.student_head if weight_from == "student" else inputs.teacher_head
        cls = head[lvl]["cls_logits"].detach()
        matched = inputs.assignment[lvl]
        n, _, h, w = s_bins.shape
        a = matched.shape[1] // (h * w)
        k, d = cls.shape[1] // a, s_bins.shape[1] // a
        bins = d // 4
        level_sum = 0
        for i in range(n):
            for y in range(h):
                for x in range(w):
                    for j in range(a):
                        prior = (y * w + x) * a + j
                        if int(matched[i, prior]) < 0:
                            continue
                        weight = max(torch.sigmoid(cls[i, j * k + c, y, x]) for c in range(k))
                        for e in range(4):
                            s = [s_bins[i, j * d + e * bins + b, y, x] / temperature for b in range(bins)]
                            t = [t_bins[i, j * d + e * bins + b, y, x].detach() / temperature for b in range(bins)]
                            ps, pt = ref_softmax(s), ref_softmax(t)
                            kl = sum(q * (torch.log(q) - torch.log(r)) for q, r in zip(pt, ps, strict=True))
                            kl = kl / bins if mean_over_bins else kl
                            level_sum = level_sum + weight * kl * temperature**2
        total = total + level_sum / avg_factor
    return loss_weight * total
