"""Shared pieces of the dataset loaders: image records, box sanitising, in-memory COCO ground truth.

Every loader parses its annotation files once, at construction, into a list of :class:`ImageRecord`
(boxes as numpy arrays in image pixels, xyxy) and hands it to :class:`DetectionDataset`, which loads the
image and applies the transforms on ``__getitem__``.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
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

_MAX_NAMED = 5  # records named in one warning before "and N more"


class DatasetWarning(UserWarning):
    """Raised (as a warning) when a loader repairs or drops annotations."""


@dataclass
class ImageRecord:
    """One image and its annotations, boxes xyxy in pixels of the untransformed image.

    ``ignore_labels`` holds the class of each ignore region, 0 where the region ignores every class
    (KITTI ``DontCare``).
    """

    image_id: int
    path: Path
    width: int
    height: int
    boxes: NDArray[np.float32]  # [n, 4]
    labels: NDArray[np.int64]  # [n]
    ignore_boxes: NDArray[np.float32]  # [m, 4]
    ignore_labels: NDArray[np.int64]  # [m]


class BoxSanitizer:
    """Clip boxes to the image and drop degenerate ones; :meth:`warn` reports both once per load.

    Args:
        source: the annotation file or folder named in the warnings.
    """

    def __init__(self, source: Path) -> None:
        self.source = source
        self.clipped = 0
        self.dropped: list[str] = []

    def __call__(
        self, boxes: NDArray[np.float32], width: int, height: int, names: Sequence[str]
    ) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
        """Return ``(clipped boxes [n, 4], keep [n])``; ``names[i]`` identifies box ``i`` in warnings."""
        clipped = boxes.copy()
        clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
        clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
        finite = np.isfinite(clipped).all(axis=1)
        keep = finite & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        self.clipped += int((keep & (clipped != boxes).any(axis=1)).sum())
        self.dropped += [name for name, k in zip(names, keep) if not k]
        return clipped, keep

    def record(
        self, image_id: int, path: Path, width: int, height: int, rows: Sequence[Sequence[float]],
        labels: Sequence[int], ignore: Sequence[bool], names: Sequence[str],
    ) -> ImageRecord:
        """An ``ImageRecord`` from raw boxes: clipped, degenerate ones dropped, ``ignore[i]`` ones as ignore regions."""
        boxes, keep = self(as_boxes(rows), width, height, names)
        labels_, ignore_ = np.asarray(labels, dtype=np.int64), np.asarray(ignore, dtype=bool)
        obj, ign = keep & ~ignore_, keep & ignore_
        return ImageRecord(image_id, path, width, height, boxes[obj], labels_[obj], boxes[ign], labels_[ign])

    def warn(self) -> None:
        """Emit at most one warning for clipped boxes and one for dropped boxes."""
        if self.clipped:
            warnings.warn(
                f"clipped {self.clipped} boxes that reached outside their image to the image bounds in "
                f"{self.source}",
                DatasetWarning,
                stacklevel=3,
            )
        if self.dropped:
            named = ", ".join(self.dropped[:_MAX_NAMED])
            more = f" and {len(self.dropped) - _MAX_NAMED} more" if len(self.dropped) > _MAX_NAMED else ""
            warnings.warn(
                f"dropped {len(self.dropped)} degenerate boxes (zero area after clipping, or not finite) in "
                f"{self.source}: {named}{more}",
                DatasetWarning,
                stacklevel=3,
            )


def as_boxes(rows: Sequence[Sequence[float]]) -> NDArray[np.float32]:
    """``[n, 4]`` float32 array from a list of 4-number rows (``[0, 4]`` when empty)."""
    return np.asarray(rows, dtype=np.float32).reshape(-1, 4)


def image_size(path: Path, record: str) -> tuple[int, int]:
    """``(width, height)`` read from the image header; ``FileNotFoundError`` naming ``record`` if missing."""
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} not found ({record})")
    with Image.open(path) as im:
        return im.size


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


def records_to_coco(records: Sequence[ImageRecord], class_names: Sequence[str]) -> COCO:
    """Ground truth of ``records`` as a ``COCO`` object; category id = label, ignore regions as crowds.

    An ignore region with label 0 becomes one ``iscrowd`` annotation per category, so COCOeval ignores
    detections of every class there.
    """
    images, annotations = [], []
    num_classes = len(class_names)
    for r in records:
        images.append({"id": r.image_id, "file_name": r.path.name, "width": r.width, "height": r.height})
        ignore = [(b, [int(c)] if c else range(1, num_classes + 1)) for b, c in zip(r.ignore_boxes, r.ignore_labels)]
        rows = [(b, [int(c)], 0) for b, c in zip(r.boxes, r.labels)] + [(b, cs, 1) for b, cs in ignore]
        for box, cats, crowd in rows:
            x1, y1, x2, y2 = (float(v) for v in box)
            for c in cats:
                annotations.append({
                    "id": len(annotations) + 1, "image_id": r.image_id, "category_id": c, "iscrowd": crowd,
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                })
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]
    return coco_from_dict({"images": images, "annotations": annotations, "categories": categories})


class DetectionDataset(Dataset):
    """Base of the loaders: ``dataset[i] -> (image [3, H, W] float in [0, 1], target)``.

    ``target``: ``boxes`` [n, 4] float xyxy pixels, ``labels`` [n] int64 in 1..num_classes,
    ``image_id`` int, ``orig_size`` (H, W) before transforms, ``ignore_boxes`` [m, 4] float.

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

        self.records = records
        self.class_names = list(class_names)
        self.label_to_cat_id = dict(label_to_cat_id)
        self.transforms = transforms if transforms is not None else detection_transforms(train=False)
        self._coco: COCO | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        r = self.records[index]
        with Image.open(r.path) as im:
            image = im.convert("RGB")
        if image.size != (r.width, r.height):
            raise ValueError(
                f"image {r.path} is {image.size[0]}x{image.size[1]} but its annotation (image id {r.image_id}) "
                f"says {r.width}x{r.height}"
            )
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
        """The ground truth as a pycocotools ``COCO`` object (boxes in untransformed image pixels)."""
        if self._coco is None:
            self._coco = records_to_coco(self.records, self.class_names)
        return self._coco

    def __repr__(self) -> str:
        n = sum(len(r.boxes) for r in self.records)
        return f"{type(self).__name__}({len(self)} images, {n} boxes, classes={self.class_names})"
