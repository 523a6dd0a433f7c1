"""Pascal VOC detection (``JPEGImages/``, ``Annotations/*.xml``, ``ImageSets/Main/<set>.txt``).

VOC's 1-based inclusive pixel boxes become continuous xyxy as ``(xmin - 1, ymin - 1, xmax, ymax)``
(Detectron2's convention); ``difficult`` objects become ``ignore_boxes`` of their class.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from .common import BoxSanitizer, DetectionDataset, Transform, image_size

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def _parse_objects(xml_path: Path) -> tuple[list[list[float]], list[int], list[bool], list[str]]:
    """``(boxes xyxy, labels 1..20, difficult, record names)`` of every ``<object>`` in one XML file."""
    if not xml_path.is_file():
        raise FileNotFoundError(f"annotation file {xml_path} not found")
    try:
        tree = ET.parse(xml_path)
    except ET.ParseError as e:
        raise ValueError(f"malformed XML in {xml_path}: {e}") from None
    rows, labels, difficult, names = [], [], [], []
    for k, obj in enumerate(tree.getroot().iter("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise ValueError(f"{xml_path}: object {k} has unknown class {name!r}; VOC classes are {VOC_CLASSES}")
        try:
            xmin, ymin, xmax, ymax = (float(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise ValueError(f"{xml_path}: object {k} ({name}) needs numeric bndbox xmin, ymin, xmax, ymax") from None
        rows.append([xmin - 1, ymin - 1, xmax, ymax])
        labels.append(VOC_CLASSES.index(name) + 1)
        difficult.append((obj.findtext("difficult") or "0").strip() == "1")
        names.append(f"{xml_path.name} object {k} ({name})")
    return rows, labels, difficult, names


class VOCDataset(DetectionDataset):
    """Pascal VOC as ``(image [3, H, W], target)``; labels 1..20 in :data:`VOC_CLASSES` order.

    Args:
        root: a ``VOCdevkit/VOC20xx`` folder.
        image_set: the ``ImageSets/Main/<image_set>.txt`` list to load (``train``, ``val``, ``trainval``, ``test``).
        transforms: ``(PIL image, target) -> (image tensor, target)``; default
            ``detection_transforms(train=False)``.

    ``image_id`` is the image's line index in the image-set file.
    """

    def __init__(self, root: str | Path, image_set: str = "train", transforms: Transform | None = None) -> None:
        root = Path(root)
        list_file = root / "ImageSets" / "Main" / f"{image_set}.txt"
        if not list_file.is_file():
            raise FileNotFoundError(f"image-set file {list_file} not found")
        stems = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
        sanitize = BoxSanitizer(root / "Annotations")
        records = []
        for image_id, stem in enumerate(stems):
            image_path = root / "JPEGImages" / f"{stem}.jpg"
            width, height = image_size(image_path, f"id {stem!r} of {list_file}")
            rows, labels, difficult, names = _parse_objects(root / "Annotations" / f"{stem}.xml")
            records.append(sanitize.record(image_id, image_path, width, height, rows, labels, difficult, names))
        sanitize.warn()
        self.root = root
        super().__init__(records, list(VOC_CLASSES), {i + 1: i + 1 for i in range(len(VOC_CLASSES))}, transforms)
