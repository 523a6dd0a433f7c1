"""KITTI 2D object detection (``image_2/*.png`` + ``label_2/*.txt``), LIAF-KD's protocol.

Kept classes (default Car, Pedestrian, Cyclist) are labels 1..K; similar classes are merged into them
(Van -> Car, Person_sitting -> Pedestrian); every other KITTI type, DontCare included, becomes a
class-agnostic ignore region. Without explicit ``ids`` the sorted image ids are split 8:2 into train
and val (first 80% train), after an optional held-out test split is taken out (``kitti_splits``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from .common import BoxSanitizer, DetectionDataset, ImageChecker, Transform, check_class_names, duplicates, named

KITTI_TYPES = ("Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc", "DontCare")
KITTI_MERGE: Mapping[str, str] = MappingProxyType({"Van": "Car", "Person_sitting": "Pedestrian"})
TRAIN_FRACTION = 0.8
_NUM_FIELDS = 15  # type truncated occluded alpha x1 y1 x2 y2 h w l x y z rotation_y


def check_test_split(test_fraction: float | None, test_ids: Sequence[str] | None, prefix: str = "") -> None:
    """Raise ``ValueError`` unless the test split is given at most one way and ``test_fraction`` is in (0, 1).

    ``prefix`` goes before the names in the message (``"data."`` for config keys).
    """
    if test_fraction is not None and test_ids is not None:
        raise ValueError(f"{prefix}test_fraction and {prefix}test_ids are both set: hold the test split out one way")
    if test_fraction is not None and not 0 < test_fraction < 1:
        raise ValueError(f"{prefix}test_fraction={test_fraction!r} must be between 0 and 1, exclusive (the fraction "
                         "of the sorted ids held out as test)")


def kitti_splits(all_ids: Sequence[str], test_fraction: float | None = None,
                 test_ids: Sequence[str] | None = None) -> dict[str, list[str]]:
    """The ids of each split: ``train``, ``val``, ``all``, and ``test`` when one is held out.

    ``test`` is ``test_ids``, or the last ``round(test_fraction * len(all_ids))`` sorted ids; the other
    sorted ids are split 8:2, the first 80% (rounded) ``train`` and the rest ``val``. Without a test split
    this is the 8:2 split of every id. Splits are disjoint and depend only on the ids.
    """
    check_test_split(test_fraction, test_ids)
    all_ids = sorted(all_ids)
    splits = {"all": all_ids}
    rest = all_ids
    if test_fraction is not None:
        n_test = round(test_fraction * len(all_ids))
        rest, splits["test"] = all_ids[:len(all_ids) - n_test], all_ids[len(all_ids) - n_test:]
    elif test_ids is not None:
        held, known, repeated = set(test_ids), set(all_ids), duplicates(test_ids)
        unknown = [i for i in test_ids if i not in known]
        if unknown:
            raise ValueError(f"test_ids names {len(unknown)} ids with no image in image_2/: "
                             f"{named([repr(i) for i in unknown])}")
        if repeated:
            raise ValueError(f"test_ids repeats {len(repeated)} ids: {named([repr(i) for i in repeated])}")
        rest, splits["test"] = [i for i in all_ids if i not in held], sorted(held)
    n_train = round(TRAIN_FRACTION * len(rest))
    splits.update(train=rest[:n_train], val=rest[n_train:])
    if "test" in splits:
        empty = [s for s in ("train", "val", "test") if not splits[s]]
        if empty:
            sizes = ", ".join(f"{s} {len(splits[s])}" for s in ("train", "val", "test"))
            raise ValueError(f"holding out a test split of {len(all_ids)} ids leaves {' and '.join(empty)} empty "
                             f"({sizes}); hold out {'more' if 'test' in empty else 'fewer'} ids")
    return splits


def _read_labels(label_path: Path, label_of: Mapping[str, int]) -> tuple[list[list[float]], list[int], list[str]]:
    """One KITTI label file: the boxes ``[x1, y1, x2, y2]`` of its objects, their labels (``label_of``, 0: an
    ignore region for a type not kept) and where each is written (``"<file> line <k>"``); ``ValueError`` naming
    the line of a malformed row."""
    rows, labels, lines = [], [], []
    for k, line in enumerate(label_path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != _NUM_FIELDS:
            raise ValueError(f"{label_path} line {k}: expected {_NUM_FIELDS} KITTI fields, got {len(fields)}")
        name = fields[0]
        if name not in KITTI_TYPES:
            raise ValueError(f"{label_path} line {k}: unknown class {name!r}; KITTI types are {KITTI_TYPES}")
        try:
            rows.append([float(v) for v in fields[4:8]])
        except ValueError as e:
            raise ValueError(f"{label_path} line {k}: bad box {fields[4:8]}: {e}") from None
        labels.append(label_of.get(name, 0))
        lines.append(f"{label_path.name} line {k}")
    return rows, labels, lines


class KittiDataset(DetectionDataset):
    """KITTI ``training/`` data as ``(image [3, H, W], target)``; ignored types go to ``ignore_boxes``.

    Args:
        root: folder holding ``image_2/`` and ``label_2/`` (KITTI's ``training/``).
        split: ``"train"`` (first 80% of the sorted ids), ``"val"`` (the rest), ``"all"``, or ``"test"``
            when a test split is held out (``test_fraction`` or ``test_ids``; see ``kitti_splits``).
        ids: image ids (file stems, e.g. ``"000042"``) to load instead of ``split``.
        test_fraction: the fraction of the sorted ids held out as ``test`` (the last ones), in (0, 1).
        test_ids: the ids held out as ``test`` instead.
        classes: KITTI types kept as labels 1..K, in this order.
        merge: KITTI type -> kept class it is counted as.
        transforms: ``(PIL image, target) -> (image tensor, target)``; default
            ``detection_transforms(train=False)``.
        skip_bad_images: decode every image at load time and skip missing or undecodable ones (one
            ``DatasetWarning``); by default they are errors.

    ``image_id`` is the image's index in the sorted list of all ids in ``image_2/``.
    """

    def __init__(
        self,
        root: str | Path,
        split: Literal["train", "val", "test", "all"] = "train",
        ids: Sequence[str] | None = None,
        test_fraction: float | None = None,
        test_ids: Sequence[str] | None = None,
        classes: Sequence[str] = ("Car", "Pedestrian", "Cyclist"),
        merge: Mapping[str, str] = KITTI_MERGE,
        transforms: Transform | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        root = Path(root)
        classes = check_class_names(classes, f"KittiDataset({root})")
        for name in [*classes, *merge, *merge.values()]:
            if name not in KITTI_TYPES:
                raise ValueError(f"{name!r} is not a KITTI type; expected one of {KITTI_TYPES}")
        stray = [f"{k} -> {v}" for k, v in merge.items() if v not in classes]
        if stray:
            raise ValueError(f"merge targets must be kept classes {tuple(classes)}, got {', '.join(stray)}")
        image_dir, label_dir = root / "image_2", root / "label_2"
        for d in (image_dir, label_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"{d} not found; root must hold image_2/ and label_2/ (KITTI's training/)")
        all_ids = sorted(p.stem for p in image_dir.glob("*.png"))
        index = {stem: i for i, stem in enumerate(all_ids)}
        if ids is None:
            splits = kitti_splits(all_ids, test_fraction, test_ids)
            if split not in splits:
                hint = " (a test split needs test_fraction or test_ids)" if split == "test" else ""
                raise ValueError(f"split must be one of {sorted(splits)}, got {split!r}{hint}")
            ids = splits[split]
        elif test_fraction is not None or test_ids is not None:
            raise ValueError("ids loads the given images: give it without test_fraction or test_ids")
        label_of = {c: i + 1 for i, c in enumerate(classes)} | {k: classes.index(v) + 1 for k, v in merge.items()}

        sanitize, check_image = BoxSanitizer(label_dir), ImageChecker(image_dir, skip_bad_images)
        records = []
        for stem in ids:
            image_path = image_dir / f"{stem}.png"
            if stem not in index:
                raise FileNotFoundError(f"image file {image_path} not found (requested id {stem!r})")
            label_path = label_dir / f"{stem}.txt"
            if not label_path.is_file():
                raise FileNotFoundError(f"label file {label_path} not found for image {image_path}")
            size = check_image(image_path, f"KITTI id {stem}")
            if size is None:
                continue
            width, height = size
            rows, labels, lines = _read_labels(label_path, label_of)
            ignore = [label == 0 for label in labels]
            records.append(sanitize.record(index[stem], image_path, width, height, rows, labels, ignore, lines))
        sanitize.warn()
        check_image.warn()
        self.root = root
        super().__init__(records, classes, {i + 1: i + 1 for i in range(len(classes))}, transforms)
