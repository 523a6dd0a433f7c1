"""Input checks shared by the library: each raises ``ValueError``/``TypeError`` naming the argument."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def check_tensor(name: str, x: object, ndim: int | None = None, finite: bool = True) -> Tensor:
    """Check that ``x`` is a tensor of rank ``ndim`` (if given) with only finite values."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if finite and x.is_floating_point() and x.numel() and not _all_finite(x):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _all_finite(x: Tensor) -> bool:
    """``torch.isfinite(x).all()`` at the cost of one reduction in the common case.

    A NaN or inf element makes the sum NaN or inf, so a finite sum proves every element finite;
    only a non-finite sum (a bad element, or an overflow of finite ones) needs the full test.
    """
    with torch.no_grad():
        if bool(torch.isfinite(x.sum())):
            return True
        return bool(torch.isfinite(x).all())


def check_boxes(name: str, boxes: object, num_images: int | None = None) -> list[Tensor]:
    """Check per-image boxes: a sequence of ``[n_b, 4]`` (x1, y1, x2, y2) tensors with x2>=x1, y2>=y1."""
    if isinstance(boxes, Tensor) or not isinstance(boxes, Sequence):
        raise TypeError(f"{name} must be a list of [n, 4] tensors, one per image, got {type(boxes).__name__}")
    if num_images is not None and len(boxes) != num_images:
        raise ValueError(f"{name} has {len(boxes)} entries but the features hold {num_images} images")
    for b, box in enumerate(boxes):
        check_tensor(f"{name}[{b}]", box)
        if box.dim() != 2 or box.shape[-1] != 4:
            raise ValueError(f"{name}[{b}] must have shape [n, 4] (x1, y1, x2, y2), got {tuple(box.shape)}")
        bad = (box[:, 2] < box[:, 0]) | (box[:, 3] < box[:, 1])
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"{name}[{b}][{i}] = {box[i].tolist()} is degenerate: expected x2 >= x1 and y2 >= y1"
            )
    return list(boxes)


def check_feature_dict(name: str, feats: object, levels: Sequence[str]) -> Mapping[str, Tensor]:
    """Check a dict of ``[N, C, H, W]`` FPN features holding every level in ``levels``."""
    if not isinstance(feats, Mapping):
        raise TypeError(f"{name} must be a dict of level name -> [N, C, H, W] tensor, got {type(feats).__name__}")
    missing = [lvl for lvl in levels if lvl not in feats]
    if missing:
        raise ValueError(f"{name} lacks the levels {missing}; it has {list(feats)}")
    for lvl in levels:
        check_tensor(f"{name}[{lvl!r}]", feats[lvl], ndim=4)
    return feats
