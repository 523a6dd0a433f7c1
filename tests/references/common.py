"""Literal pieces that several methods' references share: the 1x1-conv projector, the sigmoid, the IoU of two
boxes and the background share of a feature loss, each written out once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn


def ref_align(x: Tensor, conv: nn.Module) -> Tensor:
    """``f_align`` (SAMKD's ``Theta``): identity, or a 1x1 conv written as a sum over input channels."""
    if not isinstance(conv, nn.Conv2d):
        return x
    w, b = conv.weight[:, :, 0, 0], conv.bias
    return torch.stack([sum(w[o, c] * x[:, c] for c in range(x.shape[1])) + b[o] for o in range(w.shape[0])], dim=1)


def ref_sigmoid(x: Tensor) -> Tensor:
    return 1 / (1 + torch.exp(-x))


def ref_iou(a: list[float], b: list[float]) -> float:
    """IoU of two (x1, y1, x2, y2) boxes with continuous coordinates, as torchvision's ``box_iou`` (no eps)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def ref_background_share(sides: Mapping[str, tuple[Tensor, Tensor]], boxes: Sequence[Tensor],
                         strides: Mapping[str, float]) -> dict[str, float]:
    """The share of ``sum_levels (1/NCHW) ||T - S||^2`` (``sides``: level -> ``(T, S)``, each ``[N, C, H, W]``,
    already masked and projected) on cells in no box, per level and ``"total"``, one cell at a time: a cell
    ``(h, w)`` is in a box when ``y1 <= h * stride < y2`` and ``x1 <= w * stride < x2``."""
    parts = {}
    for level, (t, s) in sides.items():
        n_img, c_num, height, width = t.shape
        background = whole = 0.0
        for n in range(n_img):
            for h in range(height):
                for w in range(width):
                    term = sum(float(t[n, c, h, w] - s[n, c, h, w]) ** 2 for c in range(c_num))
                    term /= n_img * c_num * height * width
                    stride = strides[level]
                    inside = any(float(b[1]) <= h * stride < float(b[3]) and float(b[0]) <= w * stride < float(b[2])
                                 for b in boxes[n])
                    whole += term
                    background += 0.0 if inside else term
        parts[level] = (background, whole)
    parts["total"] = (sum(b for b, _ in parts.values()), sum(a for _, a in parts.values()))
    return {k: b / a for k, (b, a) in parts.items()}
