"""Any COCO-format detection set: an ``instances`` JSON plus a folder of images."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from .common import BoxSanitizer, DetectionDataset, Transform, coco_from_dict, read_json


def _field(entry: dict[str, Any], key: str, where: str) -> Any:
    if key not in entry:
        raise ValueError(f"{where} has no {key!r}")
    return entry[key]


class CocoDetectionDataset(DetectionDataset):
    """COCO-format detection data; ``iscrowd`` annotations become ``ignore_boxes``.

    Labels are the categories sorted by id, numbered 1..K (``label_to_cat_id`` maps them back).
    Images without annotations are kept (``boxes`` of shape [0, 4]).

    Args:
        image_dir: folder the images' ``file_name`` entries are relative to.
        ann_file: COCO ``instances`` JSON (``images``, ``annotations``, ``categories``).
        transforms: ``(PIL image, target) -> (image tensor, target)``; default
            ``detection_transforms(train=False)``.
    """

    def __init__(self, image_dir: str | Path, ann_file: str | Path, transforms: Transform | None = None) -> None:
        image_dir, ann_file = Path(image_dir), Path(ann_file)
        data = read_json(ann_file)
        if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= data.keys():
            raise ValueError(f"{ann_file} is not a COCO detection file: it needs 'images', 'annotations', 'categories'")
        cat_ids = sorted(int(_field(c, "id", f"{ann_file}: category {c}")) for c in data["categories"])
        names = {c["id"]: str(_field(c, "name", f"{ann_file}: category id {c['id']}")) for c in data["categories"]}
        cat_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}

        by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for a in data["annotations"]:
            by_image[_field(a, "image_id", f"{ann_file}: annotation {a.get('id')}")].append(a)
        images = {_field(im, "id", f"{ann_file}: image entry {im}"): im for im in data["images"]}
        orphans = sorted(set(by_image) - set(images))
        if orphans:
            a = by_image[orphans[0]][0]
            raise ValueError(
                f"{ann_file}: annotation id {a.get('id')} refers to image id {orphans[0]}, which is not listed"
            )

        sanitize = BoxSanitizer(ann_file)
        records = []
        for image_id, im in images.items():
            where = f"{ann_file}: image id {image_id}"
            path = image_dir / str(_field(im, "file_name", where))
            if not path.is_file():
                raise FileNotFoundError(f"image file {path} not found (image id {image_id} in {ann_file})")
            width, height = int(_field(im, "width", where)), int(_field(im, "height", where))
            rows, labels, crowd, names_ = [], [], [], []
            for a in by_image[image_id]:
                record = f"annotation id {a.get('id')} (image id {image_id})"
                cat = _field(a, "category_id", f"{ann_file}: {record}")
                if cat not in cat_to_label:
                    raise ValueError(f"{ann_file}: {record} has unknown category_id {cat}; categories are {cat_ids}")
                bbox = _field(a, "bbox", f"{ann_file}: {record}")
                if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
                    raise ValueError(f"{ann_file}: {record} has bbox {bbox!r}; expected [x, y, width, height]")
                x, y, w, h = bbox
                rows.append([x, y, x + w, y + h])
                labels.append(cat_to_label[cat])
                crowd.append(bool(a.get("iscrowd", 0)))
                names_.append(record)
            records.append(sanitize.record(image_id, path, width, height, rows, labels, crowd, names_))
        sanitize.warn()
        self.ann_file = ann_file
        super().__init__(records, [names[c] for c in cat_ids], {v: k for k, v in cat_to_label.items()}, transforms)
        self._coco = coco_from_dict(data)  # coco_gt() returns the file as loaded
