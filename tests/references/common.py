"""Literal pieces that several methods' references share: the 1x1-conv projector, the sigmoid and the IoU of two
boxes, each written out once."""

from __future__ import annotations

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
