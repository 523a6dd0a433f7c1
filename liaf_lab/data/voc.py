"""Pascal VOC-layout detection (``JPEGImages/``, ``Annotations/*.xml``, ``ImageSets/Main/<set>.txt``).

VOC's 1-based inclusive pixel boxes become continuous xyxy as ``(xmin - 1, ymin - 1, xmax, ymax)``
(Detectron2's convention); ``difficult`` objects become ``ignore_boxes`` of their class. The classes are
given, or discovered from the XML files of the image set (sorted names), so any dataset in VOC layout loads.
"""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path

from .common import (
    BoxSanitizer, DetectionDataset, ImageChecker, Transform, check_class_names, image_path, named, warn_unused_classes,
)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

_VOCObject = tuple[int, str, list[float], bool]  # (object number in its file, class name, box xyxy, difficult)


def _parse_objects(xml_path: Path) -> list[_VOCObject]:
    """Every ``<object>`` of one XML file, numbered from 1.

    A box of zero size as annotated (``xmax <= xmin`` or ``ymax <= ymin``) is kept without the ``- 1`` shift,
    so the sanitizer drops it as degenerate instead of it becoming a 1-pixel box.
    """
    if not xml_path.is_file():
        raise FileNotFoundError(f"annotation file {xml_path} not found")
    try:
        tree = ET.parse(xml_path)
    except ET.ParseError as e:
        raise ValueError(f"malformed XML in {xml_path}: {e}") from None
    objects = []
    for k, obj in enumerate(tree.getroot().iter("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise ValueError(f"{xml_path}: object {k} has an empty or missing <name>; give its class name")
        try:
            xmin, ymin, xmax, ymax = (float(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise ValueError(f"{xml_path}: object {k} ({name}) needs numeric bndbox xmin, ymin, xmax, ymax") from None
        shift = 1.0 if xmax > xmin and ymax > ymin else 0.0
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        objects.append((k, name, [xmin - shift, ymin - shift, xmax, ymax], difficult))
    return objects


def read_image_set(root: Path, image_set: str) -> list[str]:
    """The image ids (file stems) of ``root/ImageSets/Main/<image_set>.txt``, in file order."""
    list_file = root / "ImageSets" / "Main" / f"{image_set}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"image-set file {list_file} not found")
    return [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]


def check_disjoint_image_sets(root: str | Path, image_sets: Mapping[str, str]) -> None:
    """Raise ``ValueError`` naming the shared images (a few, and their count) if two splits share an image.

    ``image_sets``: split -> image-set name, e.g. ``{"train": "train", "val": "val", "test": "test"}``.
    """
    ids = {split: read_image_set(Path(root), name) for split, name in image_sets.items()}
    for a, b in itertools.combinations(ids, 2):
        in_b = set(ids[b])
        shared = [stem for stem in ids[a] if stem in in_b]
        if shared:
            raise ValueError(
                f"the {a} and {b} image sets ({image_sets[a]!r}, {image_sets[b]!r}) of {root} share {len(shared)} "
                f"images: {named(shared)}; an image in two splits is evaluated on what it was trained or tuned on, "
                "so make the lists disjoint")


class VOCDataset(DetectionDataset):
    """A dataset in Pascal VOC layout as ``(image [3, H, W], target)``; labels 1..K in ``classes`` order.

    Args:
        root: a ``VOCdevkit/VOC20xx`` folder, or any folder in that layout.
        image_set: the ``ImageSets/Main/<image_set>.txt`` list to load (``train``, ``val``, ``trainval``, ``test``).
        transforms: ``(PIL image, target) -> (image tensor, target)``; default
            ``detection_transforms(train=False)``.
        classes: class names, label ``i + 1`` is ``classes[i]``; another name in the XML files is an error.
            ``None``: the sorted names found in the XML files of ``image_set`` (for Pascal VOC with all 20
            classes present, :data:`VOC_CLASSES`, which is sorted).
        skip_bad_images: decode every image at load time and skip missing or undecodable ones (one
            ``DatasetWarning``); by default they are errors.

    ``image_id`` is the image's line index in the image-set file.
    """

    def __init__(
        self, root: str | Path, image_set: str = "train", transforms: Transform | None = None,
        classes: Sequence[str] | None = None, skip_bad_images: bool = False,
    ) -> None:
        root = Path(root)
        list_file = root / "ImageSets" / "Main" / f"{image_set}.txt"
        stems = read_image_set(root, image_set)
        if classes is not None:
            classes = check_class_names(classes, f"VOCDataset({root})")
        check_image = ImageChecker(list_file, skip_bad_images)
        parsed: list[tuple[int, Path, int, int, Path, list[_VOCObject]]] = []
        for image_id, stem in enumerate(stems):
            path = image_path(root / "JPEGImages", f"{stem}.jpg", f"id {stem!r} of {list_file}")
            size = check_image(path, f"id {stem!r} of {list_file}")
            if size is not None:
                xml_path = root / "Annotations" / f"{stem}.xml"
                parsed.append((image_id, path, *size, xml_path, _parse_objects(xml_path)))
        check_image.warn()
        declared = classes is not None
        if classes is None:
            classes = sorted({name for *_, objects in parsed for _, name, _, _ in objects})
            if not classes:
                raise ValueError(f"no <object> in the annotation files of {list_file}; pass classes=[...]")
        label_of = {c: i + 1 for i, c in enumerate(classes)}

        sanitize = BoxSanitizer(root / "Annotations")
        records = []
        for image_id, path, width, height, xml_path, objects in parsed:
            for k, name, _, _ in objects:
                if name not in label_of:
                    raise ValueError(f"{xml_path}: object {k} has unknown class {name!r}; classes are {classes}")
            rows, labels = [box for _, _, box, _ in objects], [label_of[name] for _, name, _, _ in objects]
            difficult = [d for *_, d in objects]
            names = [f"{xml_path.name} object {k} ({name})" for k, name, _, _ in objects]
            records.append(sanitize.record(image_id, path, width, height, rows, labels, difficult, names))
        sanitize.warn()
        if declared:
            warn_unused_classes(records, classes, list_file)
        self.root = root
        super().__init__(records, classes, {i + 1: i + 1 for i in range(len(classes))}, transforms)
