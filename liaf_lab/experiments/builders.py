"""Build datasets, detectors and distillers from a config (see ``liaf_lab.experiments.config``): a ``ResolvedConfig``, as the
entry points pass it down, or a dict of the same sections. Nothing here reads a config file."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from .config import ResolvedConfig, check_data, input_size, kd_options, resolve_path
from ..data import KITTI_MERGE, CocoDetectionDataset, KittiDataset, VOCDataset, detection_transforms
from ..data.voc import check_disjoint_image_sets
from ..distillers import BASELINE, FeatureDistiller, create_distiller, method_parts
from ..engine import TrainConfig
from ..engine.seeding import seeded
from ..models import create_detector, fpn_strides


def build_datasets(cfg: dict[str, Any]) -> tuple[Dataset, Dataset]:
    """``(train, val)`` datasets from ``cfg["data"]`` (kind ``coco``, ``kitti``, ``voc`` or ``shapes``; keys in
    docs/data.md).

    Unknown or missing keys, train/val class lists that differ and VOC image sets that share images are
    ``ValueError``s.
    """
    from ..data import check_same_classes

    data, kind = _data(cfg)
    tf = {"train": detection_transforms(train=True), "val": detection_transforms(train=False)}
    if kind in ("coco", "shapes"):
        train, val = (_coco_split(data, s, tf[s]) for s in ("train", "val"))
    elif kind == "kitti":
        train, val = (_kitti_split(data, s, tf[s]) for s in ("train", "val"))
    else:
        train = _voc_split(data, "train", tf["train"])
        # Without data.classes, val takes the classes discovered in train (a class val lacks is no error).
        val = _voc_split(data, "val", tf["val"], train.class_names)
    check_same_classes(train, val)
    return train, val


def build_test_dataset(cfg: dict[str, Any], class_names: Sequence[str] | None = None) -> Dataset | None:
    """The held-out ``test`` split, else ``None``: COCO's ``data.test_images``/``test_ann``, shapes'
    ``num_test``, VOC's ``test_set``, KITTI's ``test_fraction`` or ``test_ids``.

    Studies tune on ``val`` and report on ``test``. ``class_names``: the train set's classes, which a VOC
    test set takes when ``data.classes`` is not set (default: those discovered in the train set).
    """
    data, kind = _data(cfg)
    tf = detection_transforms(train=False)
    if (kind == "coco" and "test_ann" in data) or (kind == "shapes" and data.get("num_test", 0) > 0):
        return _coco_split(data, "test", tf)
    if kind == "kitti" and ("test_fraction" in data or "test_ids" in data):
        return _kitti_split(data, "test", tf)
    if kind == "voc" and "test_set" in data:
        if class_names is None and "classes" not in data:
            class_names = _voc_split(data, "train", tf).class_names
        return _voc_split(data, "test", tf, class_names)
    return None


def _data(cfg: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """``cfg["data"]`` and its kind, checked (``check_data``) unless ``cfg`` is a ``ResolvedConfig``, checked whole
    when it was resolved."""
    data = cfg["data"]
    return data, (data.get("kind", "coco") if isinstance(cfg, ResolvedConfig) else check_data(data))


def _kitti_split(data: dict[str, Any], split: str, transforms) -> KittiDataset:
    options = {k: data[k] for k in ("classes", "merge", "test_fraction", "test_ids") if k in data}
    if "classes" in data and "merge" not in data:  # the default merge, restricted to the kept classes
        options["merge"] = {k: v for k, v in KITTI_MERGE.items() if v in data["classes"]}
    return KittiDataset(resolve_path(data["root"]), split=split, transforms=transforms,
                        skip_bad_images=data.get("skip_bad_images", False), **options)


def _voc_split(data: dict[str, Any], split: str, transforms, class_names: Sequence[str] | None = None) -> VOCDataset:
    """The ``split`` image set, with ``data.classes``, else ``class_names``, else the classes it holds.

    Every split's image set is read first, and two that share an image are a ``ValueError``.
    """
    root = resolve_path(data["root"])
    image_sets = {"train": data.get("train_set", "train"), "val": data.get("val_set", "val")}
    if "test_set" in data:
        image_sets["test"] = data["test_set"]
    check_disjoint_image_sets(root, image_sets)
    return VOCDataset(root, image_sets[split], transforms, data.get("classes", class_names),
                      data.get("skip_bad_images", False))


def _coco_split(data: dict[str, Any], split: str, transforms) -> CocoDetectionDataset:
    skip = data.get("skip_bad_images", False)
    if data.get("kind", "coco") == "shapes":
        root = shapes_cache(data)
        return CocoDetectionDataset(root / split, root / "annotations" / f"instances_{split}.json", transforms,
                                    skip_bad_images=skip)
    return CocoDetectionDataset(resolve_path(data[f"{split}_images"]), resolve_path(data[f"{split}_ann"]), transforms,
                                skip_bad_images=skip, allow_outside_images=data.get("allow_outside_images", False))


def shapes_cache(data: dict[str, Any]) -> Path:
    """The folder of a ``kind = "shapes"`` data section, generated on first use (deterministic from ``seed``).

    It lies under ``cache`` (default ``~/.cache/liaf_lab``), outside the repository; a folder name
    encodes every setting, and generation writes to a temporary folder renamed when complete, so
    concurrent runs never see half a dataset.
    """
    from ..data import generate_scenes

    size, seed = data.get("image_size", 160), data.get("seed", 0)
    counts = {"train": data["num_train"], "val": data["num_val"], "test": data.get("num_test", 0)}
    cache = Path(data.get("cache", "~/.cache/liaf_lab")).expanduser()
    root = cache / f"shapes-seed{seed}-{size}px-{counts['train']}-{counts['val']}-{counts['test']}"
    if root.is_dir():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=cache))
    try:
        for split, n in counts.items():
            if n:
                generate_scenes(tmp, n, (size, size), seed=seed, split=split)
        os.rename(tmp, root)
    except OSError:
        if not root.is_dir():  # another process finished first: use its copy
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def build_detector(cfg: dict[str, Any], role: str, num_classes: int, weights_path: str | Path | None = None,
                   seed: int = 0, class_names: Sequence[str] | None = None,
                   category_ids: Sequence[int] | None = None) -> nn.Module:
    """The ``role`` ("teacher" or "student") detector of the config, initialised from ``(seed, role)``.

    Its input size is ``cfg["input"]``; a relative ``weights_path`` resolves as data paths do (``resolve_path``).
    With ``class_names``, weights saved by ``save_detector`` for other classes are refused. The section's
    pretrained ``weights`` / ``weights_backbone`` are loaded only without ``weights_path`` (a trained detector's
    file replaces them), with ``category_ids`` (``dataset_category_ids``) for torchvision's COCO remap.
    """
    min_size, max_size = input_size(cfg)
    options = dict(cfg[role])
    if weights_path is not None:
        weights_path = resolve_path(weights_path)
        options = {k: v for k, v in options.items() if k not in ("weights", "weights_backbone")}
    for key in ("weights", "weights_backbone"):  # a file: found as data paths are; an enum name: as it is
        if key in options:
            options[key] = _resolve_or_name(options[key])
    with seeded(seed, role):
        return create_detector(num_classes=num_classes, **options, min_size=min_size, max_size=max_size,
                               weights_path=weights_path, class_names=class_names, category_ids=category_ids)


def _resolve_or_name(value: str) -> str:
    """A weights path found from the project root (``resolve_path``), or the value as it is (an enum name)."""
    try:
        return str(resolve_path(value))
    except FileNotFoundError:
        return value


def dataset_category_ids(dataset: Dataset) -> list[int] | None:
    """The category id of each label ``1..K`` of a liaf_lab dataset (``label_to_cat_id``), else ``None``."""
    mapping = getattr(dataset, "label_to_cat_id", None)
    names = getattr(dataset, "class_names", None)
    if mapping is None or names is None:
        return None
    return [int(mapping[label]) for label in range(1, len(names) + 1)]


def build_distiller(method: str, cfg: dict[str, Any], student: nn.Module, seed: int = 0) -> FeatureDistiller | None:
    """The registered distiller ``method`` (or a ``+`` combination) between the config's student and teacher
    FPNs, with its options from ``[kd.<method>]``; ``None`` for ``"none"``.

    Its modules are initialised from ``(seed, "distiller", method)``.
    """
    if method == BASELINE:
        return None
    parts = method_parts(method)
    common = dict(student_channels=cfg["student"]["fpn_channels"], teacher_channels=cfg["teacher"]["fpn_channels"],
                  strides=fpn_strides(student, input_size(cfg)))
    options = kd_options(cfg, method) if len(parts) == 1 else {p: kd_options(cfg, p) for p in parts}
    with seeded(seed, "distiller", method):
        return create_distiller(method, **common, **options)


def train_config(cfg: dict[str, Any], section: str, **overrides: Any) -> TrainConfig:
    """The ``TrainConfig`` of a config section (``train_teacher``, ``stage1`` or ``distill``)."""
    return TrainConfig.from_dict({**cfg[section], **overrides})
