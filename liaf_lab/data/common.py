"""Shared pieces of the dataset loaders: image records, box and image checks, in-memory COCO ground truth.

Every loader parses its annotation files once, at construction, into a list of :class:`ImageRecord`
(boxes as numpy arrays in image pixels, xyxy) and hands it to :class:`DetectionDataset`, which loads the
image and applies the transforms on ``__getitem__``. Evaluation (:meth:`DetectionDataset.coco_gt`) is built
from the same records, so training and evaluation see the same, sanitised, ground truth.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

Target = dict[str, Any]
Transform = Callable[[Any, Target], tuple[Any, Target]]

_MAX_NAMED = 5  # records named in one message before "and N more"


class DatasetWarning(UserWarning):
    """Raised (as a warning) when a loader repairs or drops annotations or images."""


@dataclass
class ImageRecord:
    """One image and its annotations, boxes xyxy in pixels of the untransformed image.

    ``ignore_labels`` holds the class of each ignore region, 0 where the region ignores every class
    (KITTI ``DontCare``). ``areas`` / ``ignore_areas`` are the annotated object areas (COCO ``area``, used
    for AP_S/M/L); ``None``, or NaN for one box, means the box area.
    """

    image_id: int
    path: Path
    width: int
    height: int
    boxes: NDArray[np.float32]  # [n, 4]
    labels: NDArray[np.int64]  # [n]
    ignore_boxes: NDArray[np.float32]  # [m, 4]
    ignore_labels: NDArray[np.int64]  # [m]
    areas: NDArray[np.float32] | None = None  # [n]
    ignore_areas: NDArray[np.float32] | None = None  # [m]


def named(items: Sequence[str]) -> str:
    """``"a, b, c"``: at most ``_MAX_NAMED`` items, then ``" and N more"``."""
    more = f" and {len(items) - _MAX_NAMED} more" if len(items) > _MAX_NAMED else ""
    return ", ".join(items[:_MAX_NAMED]) + more


def duplicates(values: Iterable[Hashable]) -> list[Any]:
    """The values that occur more than once, in order of first occurrence."""
    return [v for v, n in Counter(values).items() if n > 1]


class BoxSanitizer:
    """Clip boxes to the image and drop non-finite and degenerate ones; :meth:`warn` reports each kind once.

    Non-finite boxes (a coordinate inf or NaN) are dropped before clipping, so they are never clipped into
    real boxes.

    Args:
        source: the annotation file or folder named in the warnings.
    """

    def __init__(self, source: Path) -> None:
        self.source = source
        self.clipped: list[str] = []
        self.dropped: list[str] = []
        self.nonfinite: list[str] = []

    def __call__(
        self, boxes: NDArray[np.float32], width: int, height: int, names: Sequence[str]
    ) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
        """Return ``(clipped boxes [n, 4], keep [n])``; ``names[i]`` identifies box ``i`` in warnings."""
        finite = np.isfinite(boxes).all(axis=1)
        clipped = boxes.copy()
        clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
        clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
        area_ok = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        keep = finite & area_ok
        changed = keep & (clipped != boxes).any(axis=1)
        self.clipped += [name for name, c in zip(names, changed, strict=True) if c]
        self.dropped += [name for name, f, a in zip(names, finite, area_ok, strict=True) if f and not a]
        self.nonfinite += [name for name, f in zip(names, finite, strict=True) if not f]
        return clipped, keep

    def record(
        self, image_id: int, path: Path, width: int, height: int, rows: Sequence[Sequence[float]],
        labels: Sequence[int], ignore: Sequence[bool], names: Sequence[str], areas: Sequence[float] | None = None,
    ) -> ImageRecord:
        """An ``ImageRecord`` from raw boxes: clipped, bad ones dropped, ``ignore[i]`` ones as ignore regions.

        ``areas[i]``: the annotated area of box ``i`` (NaN, or ``areas=None``: the box area after clipping).
        """
        boxes, keep = self(as_boxes(rows), width, height, names)
        labels_, ignore_ = np.asarray(labels, dtype=np.int64), np.asarray(ignore, dtype=bool)
        obj, ign = keep & ~ignore_, keep & ignore_
        areas_ = np.full(len(labels_), np.nan, np.float32) if areas is None else np.asarray(areas, dtype=np.float32)
        return ImageRecord(image_id, path, width, height, boxes[obj], labels_[obj], boxes[ign], labels_[ign],
                           areas_[obj], areas_[ign])

    def warn(self) -> None:
        """Emit at most one warning each for clipped, degenerate and non-finite boxes."""
        reports = [
            (self.clipped, "clipped {} boxes that reached outside their image to the image bounds"),
            (self.dropped, "dropped {} degenerate boxes (zero area, as annotated or after clipping)"),
            (self.nonfinite, "dropped {} boxes with non-finite coordinates (inf or NaN)"),
        ]
        for names, what in reports:
            if names:
                warnings.warn(f"{what.format(len(names))} in {self.source}: {named(names)}", DatasetWarning,
                              stacklevel=3)


def image_path(folder: Path, name: str, record: str, allow_outside: bool = False) -> Path:
    """``folder / name``; ``ValueError`` naming ``record`` when ``name`` is absolute or leads out of ``folder``
    (``../``), unless ``allow_outside``. Checked on the path as written, so symbolic links inside ``folder``
    are followed as usual."""
    path = folder / name
    inside = os.path.normpath(path).startswith(os.path.join(os.path.normpath(folder), ""))
    if not inside and not allow_outside:
        raise ValueError(f"image {name!r} ({record}) lies outside the image folder {folder}; allow it explicitly "
                         "(allow_outside_images=True, data.allow_outside_images = true) if it is meant to")
    return path


# 16-bit greyscale modes (PNG, TIFF): scaled to 8 bits; PIL's convert("RGB") would clip them at 255.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _check_mode(im: Image.Image) -> None:
    """``ValueError`` for an image mode liaf_lab cannot map to 8-bit RGB without guessing (float pixels)."""
    if im.mode == "F":
        raise ValueError("32-bit float pixels have no known range; convert the image to 8 or 16 bits")


def _to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB: 16-bit greyscale scaled by 255/65535 (rounded), other modes by PIL's ``convert``."""
    _check_mode(im)
    if im.mode not in _WIDE_MODES:
        return im.convert("RGB")
    values = np.asarray(im).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(f"{im.mode} pixels outside 0..65535 (min {values.min()}, max {values.max()}); convert "
                         "the image to 8 or 16 bits")
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")


def read_image(path: Path, record: str, decode: bool = True) -> Image.Image:
    """The image at ``path`` decoded to 8-bit RGB (16-bit greyscale scaled, not clipped), or with
    ``decode=False`` only its header read (``size``, no pixels).

    ``FileNotFoundError`` / ``OSError`` naming the file and ``record`` when it is missing, cannot be read,
    or holds pixels of no known range (32-bit float).
    """
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} not found ({record})")
    try:
        with Image.open(path) as im:
            if decode:
                return _to_rgb(im)
            _check_mode(im)
            return im
    except (OSError, SyntaxError, ValueError) as e:  # PIL: unidentified format, "image file is truncated", ...
        raise OSError(
            f"cannot {'decode' if decode else 'read'} image {path} ({record}): {e}; "
            f"the loaders' skip_bad_images=True skips such images"
        ) from e


class ImageChecker:
    """Check every image at load time; :meth:`warn` reports the skipped ones once.

    By default only the header is read (cheap): a missing or unidentifiable file, or a size other than the
    annotated one, is an error; a file whose pixel data is broken (a truncated JPEG) fails when
    :class:`DetectionDataset` decodes it, with an ``OSError`` naming the file. With ``skip_bad`` every image
    is decoded once here, and missing or undecodable images are skipped.

    Args:
        source: the annotation file or folder named in the warning.
        skip_bad: decode every image and skip the bad ones instead of raising.
    """

    def __init__(self, source: Path, skip_bad: bool) -> None:
        if not isinstance(skip_bad, bool):
            raise TypeError(f"skip_bad_images must be True or False, got {skip_bad!r}")
        self.source = source
        self.skip_bad = skip_bad
        self.skipped: list[str] = []

    def __call__(self, path: Path, record: str, size: tuple[int, int] | None = None) -> tuple[int, int] | None:
        """``(width, height)`` of the image at ``path``, ``None`` if it was skipped.

        ``size``: the annotated ``(width, height)``; a different image size is a ``ValueError``.
        """
        try:
            actual = read_image(path, record, decode=self.skip_bad).size
        except OSError:
            if not self.skip_bad:
                raise
            self.skipped.append(f"{path.name} ({record})")
            return None
        if size is not None and tuple(size) != actual:
            raise ValueError(
                f"image {path} is {actual[0]}x{actual[1]} but its annotation ({record}) says {size[0]}x{size[1]}"
            )
        return actual

    def warn(self) -> None:
        """Emit one warning if images were skipped."""
        if self.skipped:
            warnings.warn(
                f"skipped {len(self.skipped)} missing or undecodable images (skip_bad_images=True) in {self.source}: "
                f"{named(self.skipped)}",
                DatasetWarning,
                stacklevel=3,
            )


def warn_unused_classes(records: Sequence[ImageRecord], class_names: Sequence[str], source: Path) -> None:
    """One ``DatasetWarning`` naming the declared classes (label ``i + 1`` is ``class_names[i]``) that no box or
    ignore region of ``records`` has."""
    used = {int(c) for r in records for c in (*r.labels, *r.ignore_labels)}
    unused = [name for i, name in enumerate(class_names) if i + 1 not in used]
    if records and unused:
        warnings.warn(f"classes {unused} of {source} occur in none of its {len(records)} images", DatasetWarning,
                      stacklevel=3)


def as_boxes(rows: Sequence[Sequence[float]]) -> NDArray[np.float32]:
    """``[n, 4]`` float32 array from a list of 4-number rows (``[0, 4]`` when empty)."""
    return np.asarray(rows, dtype=np.float32).reshape(-1, 4)


def check_class_names(classes: Sequence[str], where: str) -> list[str]:
    """``classes`` as a list; ``TypeError``/``ValueError`` naming ``where`` unless non-empty distinct strings."""
    if isinstance(classes, str) or not isinstance(classes, Sequence) or not all(isinstance(c, str) for c in classes):
        raise TypeError(f"{where}: classes must be a list of class names, got {classes!r}")
    if not classes:
        raise ValueError(f"{where}: classes is empty")
    repeated = duplicates(classes)
    if repeated:
        raise ValueError(f"{where}: classes {repeated} appear more than once in {list(classes)}")
    return list(classes)


def check_same_classes(train: Any, val: Any) -> None:
    """``ValueError`` listing both lists unless ``train`` and ``val`` have the same ``class_names``, in order.

    Label ``i`` must mean the same class in both, or evaluation scores the wrong classes.
    """
    if list(train.class_names) != list(val.class_names):
        raise ValueError(
            f"train and val datasets have different classes (label i must mean the same class in both): "
            f"train {list(train.class_names)}, val {list(val.class_names)}; give both the same class list "
            f"(classes=..., data.classes in a config)"
        )


def read_json(path: Path) -> Any:
    """Parse a JSON file; ``FileNotFoundError``/``ValueError`` naming the path."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON in {path}: {e}") from None


def coco_from_dict(dataset: Mapping[str, Any]) -> COCO:
    """A pycocotools ``COCO`` object built in memory from a COCO-format dict, without its prints."""
    coco = COCO()
    coco.dataset = dict(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _areas(boxes: NDArray[np.float32], areas: NDArray[np.float32] | None) -> NDArray[np.float32]:
    """``areas`` [n] where given (finite), else the areas of ``boxes`` [n, 4]."""
    box_areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return box_areas if areas is None else np.where(np.isfinite(areas), areas, box_areas)


def records_to_coco(
    records: Sequence[ImageRecord], class_names: Sequence[str], label_to_cat_id: Mapping[int, int]
) -> COCO:
    """Ground truth of ``records`` as a ``COCO`` object; category id ``label_to_cat_id[label]``, ignore
    regions as crowds.

    An ignore region with label 0 becomes one ``iscrowd`` annotation per category, so COCOeval ignores
    detections of every class there.
    """
    images, annotations = [], []
    all_cats = [label_to_cat_id[i + 1] for i in range(len(class_names))]
    for r in records:
        images.append({"id": r.image_id, "file_name": r.path.name, "width": r.width, "height": r.height})
        objects = zip(r.boxes, r.labels, _areas(r.boxes, r.areas), strict=True)
        ignored = zip(r.ignore_boxes, r.ignore_labels, _areas(r.ignore_boxes, r.ignore_areas), strict=True)
        rows = [(b, [label_to_cat_id[int(c)]], a, 0) for b, c, a in objects]
        rows += [(b, [label_to_cat_id[int(c)]] if c else all_cats, a, 1) for b, c, a in ignored]
        for box, cats, area, crowd in rows:
            x1, y1, x2, y2 = (float(v) for v in box)
            for c in cats:
                annotations.append({
                    "id": len(annotations) + 1, "image_id": r.image_id, "category_id": c, "iscrowd": crowd,
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(area),
                })
    categories = [{"id": c, "name": n} for c, n in zip(all_cats, class_names, strict=True)]
    return coco_from_dict({"images": images, "annotations": annotations, "categories": categories})


class DetectionDataset(Dataset):
    """Base of the loaders: ``dataset[i] -> (image [3, H, W] float in [0, 1], target)``.

    ``target``: ``boxes`` [n, 4] float xyxy pixels, ``labels`` [n] int64 in 1..num_classes,
    ``image_id`` int, ``orig_size`` (H, W) before transforms, ``ignore_boxes`` [m, 4] float.
    An image that fails to decode raises an ``OSError`` naming its file and image id.

    Attributes:
        class_names: label ``i + 1`` is ``class_names[i]`` (0 is background).
        label_to_cat_id: label -> category id of :meth:`coco_gt`.
        records: the parsed :class:`ImageRecord` of every image, in dataset order.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        class_names: Sequence[str],
        label_to_cat_id: Mapping[int, int],
        transforms: Transform | None,
    ) -> None:
        from .transforms import detection_transforms

        shared = duplicates(r.path for r in records)
        if shared:
            ids = [str(r.image_id) for r in records if r.path == shared[0]]
            more = f" ({len(shared) - 1} more files are listed more than once)" if len(shared) > 1 else ""
            raise ValueError(f"image file {shared[0]} is listed under image ids {', '.join(ids)}{more}: each image "
                             "must be listed once, with all its boxes")
        self.records = records
        self.class_names = list(class_names)
        self.label_to_cat_id = dict(label_to_cat_id)
        self.transforms = transforms if transforms is not None else detection_transforms(train=False)
        self._coco: COCO | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        r = self.records[index]
        image = read_image(r.path, f"image id {r.image_id}")
        canvas = (r.height, r.width)
        target = {
            "boxes": tv_tensors.BoundingBoxes(r.boxes, format="XYXY", canvas_size=canvas),
            "labels": torch.as_tensor(r.labels, dtype=torch.int64),
            "image_id": r.image_id,
            "orig_size": canvas,
            "ignore_boxes": tv_tensors.BoundingBoxes(r.ignore_boxes, format="XYXY", canvas_size=canvas),
        }
        image, target = self.transforms(image, target)
        plain = {k: v.as_subclass(Tensor) if isinstance(v, Tensor) else v for k, v in target.items()}
        return image.as_subclass(Tensor), plain

    def coco_gt(self) -> COCO:
        """The ground truth of :attr:`records` as a pycocotools ``COCO`` object (untransformed image pixels)."""
        if self._coco is None:
            self._coco = records_to_coco(self.records, self.class_names, self.label_to_cat_id)
        return self._coco

    def __repr__(self) -> str:
        n = sum(len(r.boxes) for r in self.records)
        return f"{type(self).__name__}({len(self)} images, {n} boxes, classes={self.class_names})"
