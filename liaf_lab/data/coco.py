"""Any COCO-format detection set: an ``instances`` JSON plus a folder of images."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

from .common import (
    BoxSanitizer, DatasetWarning, DetectionDataset, ImageChecker, Transform, duplicates, image_path, named,
    read_json, warn_unused_classes,
)


def _field(entry: dict[str, Any], key: str, where: str) -> Any:
    if key not in entry:
        raise ValueError(f"{where} has no {key!r}")
    return entry[key]


def _int(entry: dict[str, Any], key: str, where: str) -> int:
    """``entry[key]``, which must be an integer (JSON ``3``, not ``"3"`` or ``true``)."""
    value = _field(entry, key, where)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {key} must be an integer, got {value!r}")
    return value


def _number(value: Any, key: str, where: str) -> float:
    """``value`` as a float; ``TypeError`` naming ``where`` and ``key`` unless it is a JSON number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: {key} must be a number, got {value!r}")
    return float(value)


def _size(entry: dict[str, Any], key: str, where: str) -> int:
    """Image ``width`` / ``height``: a positive whole number."""
    value = _number(_field(entry, key, where), key, where)
    if not (value > 0 and value.is_integer()):
        raise ValueError(f"{where}: {key} must be a positive whole number of pixels, got {value!r}")
    return int(value)


def _entries(data: dict[str, Any], key: str, ann_file: Path) -> list[dict[str, Any]]:
    """``data[key]``, which must be a list of JSON objects."""
    entries = data[key]
    if not isinstance(entries, list):
        raise TypeError(f"{ann_file}: {key!r} must be a list, got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise TypeError(f"{ann_file}: {key}[{i}] must be an object, got {entry!r:.80}")
    return entries


class CocoDetectionDataset(DetectionDataset):
    """COCO-format detection data; ``iscrowd`` annotations become ``ignore_boxes``.

    Labels are the categories sorted by id, numbered 1..K (``label_to_cat_id`` maps them back to the file's
    category ids). Images without annotations are kept (``boxes`` of shape [0, 4]). ``area`` (default: the
    box area) and ``iscrowd`` (default 0) may be absent; :meth:`coco_gt` is built from the sanitised records.

    Args:
        image_dir: folder the images' ``file_name`` entries are relative to.
        ann_file: COCO ``instances`` JSON (``images``, ``annotations``, ``categories``).
        transforms: ``(PIL image, target) -> (image tensor, target)``; default
            ``detection_transforms(train=False)``.
        skip_bad_images: decode every image at load time and skip missing or undecodable ones (one
            ``DatasetWarning``); by default they are errors.
        allow_outside_images: accept a ``file_name`` that is absolute or leads out of ``image_dir``
            (``../``); by default it is an error naming the image.
    """

    def __init__(
        self, image_dir: str | Path, ann_file: str | Path, transforms: Transform | None = None,
        skip_bad_images: bool = False, allow_outside_images: bool = False,
    ) -> None:
        image_dir, ann_file = Path(image_dir), Path(ann_file)
        data = read_json(ann_file)
        if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= data.keys():
            raise ValueError(f"{ann_file} is not a COCO detection file: it needs 'images', 'annotations', 'categories'")
        images, annotations = _entries(data, "images", ann_file), _entries(data, "annotations", ann_file)
        categories = _entries(data, "categories", ann_file)
        cat_ids = [_int(c, "id", f"{ann_file}: category {c}") for c in categories]
        names = {c["id"]: str(_field(c, "name", f"{ann_file}: category id {c['id']}")) for c in categories}
        image_ids = [_int(im, "id", f"{ann_file}: image entry {im}") for im in images]
        ann_ids = [_int(a, "id", f"{ann_file}: annotation entry {a}") for a in annotations]
        for what, ids in (("category", cat_ids), ("image", image_ids), ("annotation", ann_ids)):
            repeated = duplicates(ids)
            if repeated:
                raise ValueError(f"{ann_file}: duplicated {what} ids {named([str(i) for i in repeated])}")
        if not annotations:
            warnings.warn(f"{ann_file} has no annotations: every image is background only", DatasetWarning,
                          stacklevel=2)
        cat_ids.sort()
        cat_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}

        by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for a in annotations:
            by_image[_int(a, "image_id", f"{ann_file}: annotation id {a['id']}")].append(a)
        orphans = sorted(set(by_image) - set(image_ids))
        if orphans:
            a = by_image[orphans[0]][0]
            raise ValueError(
                f"{ann_file}: annotation id {a['id']} refers to image id {orphans[0]}, which is not listed"
            )

        sanitize, check_image = BoxSanitizer(ann_file), ImageChecker(ann_file, skip_bad_images)
        records = []
        for image_id, im in zip(image_ids, images, strict=True):
            where = f"{ann_file}: image id {image_id}"
            file_name = str(_field(im, "file_name", where))
            width, height = _size(im, "width", where), _size(im, "height", where)
            path = image_path(image_dir, file_name, f"image id {image_id} in {ann_file}", allow_outside_images)
            if check_image(path, f"image id {image_id} in {ann_file}", (width, height)) is None:
                continue
            rows, labels, crowd, areas, names_ = [], [], [], [], []
            for a in by_image[image_id]:
                record = f"annotation id {a['id']} (image id {image_id}, {file_name})"
                where = f"{ann_file}: {record}"
                cat = _int(a, "category_id", where)
                if cat not in cat_to_label:
                    raise ValueError(f"{where} has unknown category_id {cat}; categories are {cat_ids}")
                bbox = _field(a, "bbox", where)
                if not (isinstance(bbox, list) and len(bbox) == 4):
                    raise ValueError(f"{where} has bbox {bbox!r}; expected [x, y, width, height]")
                x, y, w, h = (_number(v, "bbox", where) for v in bbox)
                iscrowd = a.get("iscrowd", 0)
                if iscrowd not in (0, 1):
                    raise ValueError(f"{where}: iscrowd must be 0 or 1, got {iscrowd!r}")
                area = _number(a["area"], "area", where) if "area" in a else math.nan  # nan: the box area
                if "area" in a and not (math.isfinite(area) and area >= 0):
                    raise ValueError(f"{where}: area must be a finite number >= 0, got {area!r}")
                rows.append([x, y, x + w, y + h])
                labels.append(cat_to_label[cat])
                crowd.append(bool(iscrowd))
                areas.append(area)
                names_.append(record)
            records.append(sanitize.record(image_id, path, width, height, rows, labels, crowd, names_, areas))
        sanitize.warn()
        check_image.warn()
        if annotations:  # an empty list was warned about above
            warn_unused_classes(records, [names[c] for c in cat_ids], ann_file)
        self.ann_file = ann_file
        super().__init__(records, [names[c] for c in cat_ids], {v: k for k, v in cat_to_label.items()}, transforms)
