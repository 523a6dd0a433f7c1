"""Literal, slow references of the GFL detector (liaf_lab/models/gfl.py): mmdetection's GFL (``gfl_head.py``,
``gfocal_loss.py``, ``atss_assigner.py``) term by term, as loops over locations and boxes."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import ref_iou


def ref_centre(box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def ref_atss(anchors: list, counts: list[int], gts: list, topk: int = 9) -> list[int]:
    """ATSS (mmdetection ``ATSSAssigner.assign``) box by box, level by level, anchor by anchor."""
    num_anchors = len(anchors)
    assigned = [-1] * num_anchors
    if not gts:
        return assigned
    iou = [[ref_iou(anchors[a], g) for g in gts] for a in range(num_anchors)]
    positive = [[False] * len(gts) for _ in range(num_anchors)]
    for g, box in enumerate(gts):
        gx, gy = ref_centre(box)
        candidates = []
        start = 0
        for n in counts:
            ranked = []
            for a in range(start, start + n):
                ax, ay = ref_centre(anchors[a])
                ranked.append(((ax - gx) * (ax - gx) + (ay - gy) * (ay - gy), a))  # equal distances: lower index first
            candidates += [a for _, a in sorted(ranked)[:min(topk, n)]]
            start += n
        values = [iou[a][g] for a in candidates]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        for a in candidates:
            ax, ay = ref_centre(anchors[a])
            inside = min(ax - box[0], ay - box[1], box[2] - ax, box[3] - ay) > 0.01
            if iou[a][g] >= mean + std and inside:
                positive[a][g] = True
    for a in range(num_anchors):
        best, best_iou = -1, -math.inf
        for g in range(len(gts)):
            if positive[a][g] and iou[a][g] > best_iou:  # strict: equal IoUs keep the first box
                best, best_iou = g, iou[a][g]
        assigned[a] = best
    return assigned


def ref_integral(logits: Tensor, reg_max: int) -> list[Tensor]:
    """Four expected distances: sum_i softmax_i * i over each side's bins."""
    out = []
    for side in range(4):
        bins = [logits[side * (reg_max + 1) + i] for i in range(reg_max + 1)]
        total = sum(torch.exp(b) for b in bins)
        out.append(sum(torch.exp(b) / total * i for i, b in enumerate(bins)))
    return out


def ref_qfl(x: Tensor, y: float, beta: float) -> Tensor:
    """QFL of one logit: -|y - s|^beta * (y log s + (1 - y) log(1 - s)), s = sigmoid(x)."""
    s = torch.sigmoid(x)
    return -abs(y - s) ** beta * (y * torch.log(s) + (1 - y) * torch.log(1 - s))


def ref_dfl(logits: Tensor, y: float) -> Tensor:
    """DFL of one side: -((y_r - y) log S_l + (y - y_l) log S_r)."""
    left = math.floor(y)
    right = left + 1
    total = sum(torch.exp(v) for v in logits)
    log_s = [torch.log(torch.exp(v) / total) for v in logits]
    return -((right - y) * log_s[left] + (y - left) * log_s[right])


def ref_giou_loss(p, t, eps: float = 1e-7) -> Tensor:
    """1 - GIoU of two boxes, with torchvision's generalized_box_iou_loss eps."""
    iw = torch.clamp(torch.minimum(p[2], t[2]) - torch.maximum(p[0], t[0]), min=0)
    ih = torch.clamp(torch.minimum(p[3], t[3]) - torch.maximum(p[1], t[1]), min=0)
    inter = iw * ih
    union = (p[2] - p[0]) * (p[3] - p[1]) + (t[2] - t[0]) * (t[3] - t[1]) - inter
    enclose = (torch.maximum(p[2], t[2]) - torch.minimum(p[0], t[0])) * (torch.maximum(p[3], t[3]) - torch.minimum(p[1], t[1]))
    return 1 - (inter / (union + eps) - (enclose - union) / (enclose + eps))


def ref_gfl_loss(cls: Tensor, bbox: Tensor, anchors: Tensor, counts: list[int], strides: tuple, targets: list,
                 reg_max: int, beta: float = 2.0, giou_weight: float = 2.0, dfl_weight: float = 0.25,
                 topk: int = 9) -> dict[str, Tensor]:
    """GFL's loss (mmdetection ``GFLHead.loss`` / ``loss_single``) image by image, location by location."""
    level_stride = [s for n, s in zip(counts, strides, strict=True) for _ in range(n)]
    qfl, giou, dfl = cls.new_zeros(()), cls.new_zeros(()), cls.new_zeros(())
    num_pos, weight_sum = 0, 0.0
    for i, t in enumerate(targets):
        boxes = t["boxes"].tolist()
        assigned = ref_atss(anchors.tolist(), counts, boxes, topk)
        positives = 0
        for a, g in enumerate(assigned):
            quality, label = 0.0, None
            if g >= 0:
                positives += 1
                s = level_stride[a]
                cx, cy = ref_centre(anchors[a].tolist())
                cx, cy = cx / s, cy / s
                d = ref_integral(bbox[i, a], reg_max)
                pred = [cx - d[0], cy - d[1], cx + d[2], cy + d[3]]
                target = [v / s for v in boxes[g]]
                quality = ref_iou([float(v.detach()) for v in pred], target)
                label = int(t["labels"][g])
                w = max(float(torch.sigmoid(cls[i, a, k].detach())) for k in range(cls.shape[-1]))
                weight_sum += w
                giou = giou + w * ref_giou_loss(pred, [torch.tensor(v, dtype=cls.dtype) for v in target])
                sides = [cx - target[0], cy - target[1], target[2] - cx, target[3] - cy]
                for side, distance in enumerate(sides):
                    y = min(max(distance, 0.0), reg_max - 0.1)
                    dfl = dfl + w * ref_dfl(bbox[i, a, side * (reg_max + 1):(side + 1) * (reg_max + 1)], y) / 4
            for k in range(cls.shape[-1]):
                qfl = qfl + ref_qfl(cls[i, a, k], quality if k == label else 0.0, beta)
        num_pos += max(positives, 1)
    return {"classification": qfl / max(num_pos, 1),
            "bbox_regression": giou_weight * giou / max(weight_sum, 1.0),
            "bbox_dfl": dfl_weight * dfl / max(weight_sum, 1.0)}
