"""Box-aware transforms (torchvision.transforms.v2) and the batch collation for torchvision detectors.

The datasets hand ``(PIL image, target)`` to their transforms with ``target["boxes"]`` and
``target["ignore_boxes"]`` as ``tv_tensors.BoundingBoxes``, so every v2 transform re-exported here
(:class:`Resize`, :class:`RandomHorizontalFlip`, :class:`Normalize`, :class:`ToDtype`, :class:`ToImage`,
:class:`Compose`) moves the boxes with the image. torchvision detectors normalise and resize internally,
so the default pipeline only converts to a float tensor (and flips when training).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms.v2 import Compose, Normalize, RandomHorizontalFlip, Resize, ToDtype, ToImage

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "Compose", "Normalize", "RandomHorizontalFlip", "Resize", "ToDtype",
    "ToImage", "collate_fn", "detection_transforms",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def detection_transforms(train: bool, size: int | None = None, normalize: bool = False) -> Compose:
    """``(PIL image, target) -> (image [3, H', W'] float32 in [0, 1], target)`` with boxes kept consistent.

    Args:
        train: add a random horizontal flip (p = 0.5).
        size: resize so the shorter image side is ``size`` pixels (boxes scaled alike); ``None`` keeps it.
        normalize: subtract the ImageNet mean and divide by its std (then values leave [0, 1]).
    """
    steps: list[Any] = [ToImage()]
    if train:
        steps.append(RandomHorizontalFlip(0.5))
    if size is not None:
        steps.append(Resize(size, antialias=True))
    steps.append(ToDtype(torch.float32, scale=True))
    if normalize:
        steps.append(Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return Compose(steps)


def collate_fn(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """``[(image, target), ...] -> ([image, ...], [target, ...])``: the input torchvision detectors take."""
    return [image for image, _ in batch], [target for _, target in batch]
