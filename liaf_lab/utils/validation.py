"""Input checks shared by the library: each raises ``ValueError``/``TypeError`` naming the argument.

Checks run once, at the boundary: a public function called by the user, or a distiller's
``forward``/``stage1``. Inner calls pass ``validate=False`` and trust their inputs. The checks that
need values from the device (NaN/inf, degenerate boxes) are fused by ``check_values`` into one read
per device. ``set_debug(True)``, or the environment variable ``LIAF_DEBUG=1``, turns the inner
checks back on everywhere (each function checks its own inputs again). Checks of plain arguments
(sizes, strides: ``check_stride``, ``check_grid_size``) cost nothing on the device and always run.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor

_debug = os.environ.get("LIAF_DEBUG", "0").strip().lower() not in ("", "0", "false", "no", "off")


def set_debug(enabled: bool = True) -> bool:
    """Turn the deep checks (every inner call validates its inputs) on or off; returns the previous setting."""
    global _debug
    previous, _debug = _debug, bool(enabled)
    return previous


def debug_enabled() -> bool:
    """Whether the deep checks are on (``set_debug`` or ``LIAF_DEBUG=1``)."""
    return _debug


def should_validate(validate: bool) -> bool:
    """``validate`` as passed by the caller, forced on in debug mode."""
    return validate or _debug


def check_tensor(name: str, x: object, ndim: int | None = None, finite: bool = True) -> Tensor:
    """Check that ``x`` is a tensor of rank ``ndim`` (if given) with only finite values (if ``finite``)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if finite:
        check_values({name: x})
    return x


def _all_finite(x: Tensor) -> bool:
    """``torch.isfinite(x).all()`` at the cost of one reduction in the common case.

    A NaN or inf element makes the sum NaN or inf, so a finite sum proves every element finite;
    only a non-finite sum (a bad element, or an overflow of finite ones) needs the full test.
    """
    with torch.no_grad():
        if bool(torch.isfinite(_wide_sum(x))):
            return True
        return bool(torch.isfinite(x).all())


def _wide_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` accumulated in at least float32 (an fp16 sum of finite values overflows easily)."""
    return x.sum(dtype=torch.promote_types(x.dtype, torch.float32))


def _named(name: str, value: Tensor | Mapping[str, Tensor] | Sequence[Tensor]) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` pairs: ``name`` itself, ``name[key!r]`` of a mapping, ``name[i]`` of a sequence."""
    if isinstance(value, Tensor):
        yield name, value
    elif isinstance(value, Mapping):
        yield from ((f"{name}[{k!r}]", v) for k, v in value.items())
    else:
        yield from ((f"{name}[{i}]", v) for i, v in enumerate(value))


def check_values(
    tensors: Mapping[str, Tensor | Mapping[str, Tensor]] | None = None,
    boxes: Mapping[str, Sequence[Tensor]] | None = None,
) -> None:
    """NaN/inf in ``tensors`` and ``boxes``, and degenerate boxes, with one device read per device.

    Args:
        tensors: name -> a tensor, or a dict of tensors (named ``name[key]``); floating ones are checked.
        boxes: name -> per-image ``[n, 4]`` (x1, y1, x2, y2) tensors (named ``name[b]``), already
            checked for type and shape (``check_boxes(..., values=False)``).

    One flag per tensor (``isfinite`` of its sum; for boxes also ``x2 >= x1 and y2 >= y1``) is
    computed on the device and all flags are read at once. Only when that read fails are the tensors
    tested one by one, to raise for the first bad one (a non-finite sum may also be an overflow of
    finite values, which passes).
    """
    named = [nt for name, value in (tensors or {}).items() for nt in _named(name, value)]
    named_boxes = [nb for name, value in (boxes or {}).items() for nb in _named(name, value)]
    flags: dict[torch.device, list[Tensor]] = defaultdict(list)
    with torch.no_grad():
        for _, x in named:
            if x.is_floating_point() and x.numel():
                flags[x.device].append(torch.isfinite(_wide_sum(x)))
        for _, box in named_boxes:
            if box.numel():
                ok = (box[:, 2:] >= box[:, :2]).all()
                flags[box.device].append(ok & torch.isfinite(box).all() if box.is_floating_point() else ok)
    if all(bool(torch.stack(f).all()) for f in flags.values()):
        return
    for name, x in named:  # slow path: find and name the first bad tensor
        if x.is_floating_point() and x.numel() and not _all_finite(x):
            raise ValueError(f"{name} contains NaN or inf")
    for name, box in named_boxes:
        if box.is_floating_point() and box.numel() and not _all_finite(box):
            raise ValueError(f"{name} contains NaN or inf")
        bad = (box[:, 2] < box[:, 0]) | (box[:, 3] < box[:, 1])
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"{name}[{i}] = {box[i].tolist()} is degenerate: expected x2 >= x1 and y2 >= y1")


def check_boxes(name: str, boxes: object, num_images: int | None = None, values: bool = True) -> list[Tensor]:
    """Check per-image boxes: a sequence of ``[n_b, 4]`` (x1, y1, x2, y2) tensors with x2>=x1, y2>=y1.

    ``values=False`` checks types and shapes only (host values); pass the boxes to ``check_values``.
    """
    if isinstance(boxes, Tensor) or not isinstance(boxes, Sequence):
        raise TypeError(f"{name} must be a list of [n, 4] tensors, one per image, got {type(boxes).__name__}")
    if num_images is not None and len(boxes) != num_images:
        raise ValueError(f"{name} has {len(boxes)} entries but the features hold {num_images} images")
    for b, box in enumerate(boxes):
        check_tensor(f"{name}[{b}]", box, finite=False)
        if box.dim() != 2 or box.shape[-1] != 4:
            raise ValueError(f"{name}[{b}] must have shape [n, 4] (x1, y1, x2, y2), got {tuple(box.shape)}")
    boxes = list(boxes)
    if values:
        check_values(boxes={name: boxes})
    return boxes


def check_positive_boxes(targets: Sequence[Mapping[str, Tensor]]) -> None:
    """torchvision's degenerate-box check of a detector's transformed targets (``x2 > x1`` and ``y2 > y1``, strictly),
    as a ``ValueError`` naming the first such box; ``run_detector`` and ``GFL.forward`` run it."""
    for i, t in enumerate(targets):
        bad = (t["boxes"][:, 2:] <= t["boxes"][:, :2]).any(dim=1)
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            raise ValueError(f"targets[{i}]['boxes'][{j}] = {t['boxes'][j].tolist()} (after resizing) has no "
                             "positive width and height")


def check_feature_dict(
    name: str, feats: object, levels: Sequence[str], values: bool = True
) -> Mapping[str, Tensor]:
    """Check a dict of ``[N, C, H, W]`` FPN features holding every level in ``levels``.

    ``values=False`` checks types, levels and ranks only (host values); pass them to ``check_values``.
    """
    if not isinstance(feats, Mapping):
        raise TypeError(f"{name} must be a dict of level name -> [N, C, H, W] tensor, got {type(feats).__name__}")
    missing = [lvl for lvl in levels if lvl not in feats]
    if missing:
        raise ValueError(f"{name} lacks the levels {missing}; it has {list(feats)}")
    for lvl in levels:
        check_tensor(f"{name}[{lvl!r}]", feats[lvl], ndim=4, finite=False)
    if values:
        check_values({name: {lvl: feats[lvl] for lvl in levels}})
    return feats


def check_stride(stride: object) -> float:
    """Check ``stride``: input pixels per feature cell, a positive finite number."""
    if isinstance(stride, bool) or not isinstance(stride, (int, float)) or not 0 < stride < float("inf"):
        raise ValueError(f"stride must be positive and finite (input pixels per feature cell), got {stride!r}")
    return float(stride)


def check_grid_size(name: str, size: object) -> tuple[int, int]:
    """Check ``size``: a feature grid ``(H, W)``, two non-negative ints."""
    if isinstance(size, Tensor) or not isinstance(size, Sequence) or len(size) != 2 \
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in size):
        raise ValueError(f"{name} must be a feature grid (H, W) of two non-negative ints, got {size!r}")
    return int(size[0]), int(size[1])


def check_image_size(image_size: object) -> tuple[int, int]:
    """Check ``image_size``: the padded batch input ``(H, W)``, two positive ints."""
    if isinstance(image_size, Tensor) or not isinstance(image_size, Sequence) or len(image_size) != 2 \
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in image_size):
        raise ValueError(f"image_size must be the padded input size (H, W), two positive ints, got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def check_level_size(name: str, feature: Tensor, stride: float, image_size: tuple[int, int]) -> None:
    """Check that ``feature [N, C, H_l, W_l]`` has the grid ``stride`` gives on ``image_size`` (H, W).

    Accepts ``ceil(H / stride)`` (what strided convs and torchvision's FPN pooling give) or
    ``floor(H / stride)``, per side. Shapes only: no device read.
    """
    got = tuple(feature.shape[-2:])
    ceil = tuple(-int(-s // stride) for s in image_size)
    floor = tuple(int(s // stride) for s in image_size)
    if any(g not in (c, f) for g, c, f in zip(got, ceil, floor, strict=True)):
        want = f"{ceil[0]}x{ceil[1]}" + ("" if ceil == floor else f" (or {floor[0]}x{floor[1]})")
        raise ValueError(
            f"{name} is {got[0]}x{got[1]} but stride {stride:g} on the {image_size[0]}x{image_size[1]} input "
            f"gives {want}: the distiller's strides are wrong for these features "
            "(build it with strides=liaf_lab.fpn_strides(student))"
        )
