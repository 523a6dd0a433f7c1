"""Build datasets, detectors and distillers from a config dict (see ``liaf_lab.config``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from .config import resolve_path
from .data import CocoDetectionDataset, KittiDataset, VOCDataset, detection_transforms
from .distillers import FeatureDistiller, create_distiller
from .engine import TrainConfig
from .models import create_detector, fpn_strides

KD_OPTIONS = ("num_selectors", "roi_size", "normalize", "mask_scale", "mask_side", "detach_scores",
              "freeze_selectors", "diversity_weight")


def build_datasets(cfg: dict[str, Any]) -> tuple[Dataset, Dataset]:
    """``(train, val)`` datasets from ``cfg["data"]``: kind ``coco``, ``kitti`` or ``voc``."""
    data = cfg["data"]
    kind = data.get("kind", "coco")
    train_tf, val_tf = detection_transforms(train=True), detection_transforms(train=False)
    if kind == "coco":
        return (CocoDetectionDataset(resolve_path(data["train_images"]), resolve_path(data["train_ann"]), train_tf),
                CocoDetectionDataset(resolve_path(data["val_images"]), resolve_path(data["val_ann"]), val_tf))
    if kind == "kitti":
        root = resolve_path(data["root"])
        return KittiDataset(root, split="train", transforms=train_tf), KittiDataset(root, split="val", transforms=val_tf)
    if kind == "voc":
        root = resolve_path(data["root"])
        return (VOCDataset(root, image_set=data.get("train_set", "train"), transforms=train_tf),
                VOCDataset(root, image_set=data.get("val_set", "val"), transforms=val_tf))
    raise ValueError(f"data.kind must be 'coco', 'kitti' or 'voc', got {kind!r}")


def build_detector(cfg: dict[str, Any], role: str, num_classes: int, weights_path: str | Path | None = None) -> nn.Module:
    """The ``role`` ("teacher" or "student") detector of the config."""
    m = cfg[role]
    return create_detector(m["arch"], num_classes=num_classes, depth=m["depth"], width_mult=m["width_mult"],
                           fpn_channels=m["fpn_channels"], min_size=m["min_size"], max_size=m["max_size"],
                           weights_path=weights_path)


def build_distiller(method: str, cfg: dict[str, Any], student: nn.Module) -> FeatureDistiller | None:
    """``liaf`` or ``fitnet`` distiller between the config's student and teacher FPNs; ``None`` for ``none``."""
    if method == "none":
        return None
    kd = cfg["kd"]
    size = (cfg["student"]["min_size"], cfg["student"]["max_size"])
    common = dict(student_channels=cfg["student"]["fpn_channels"], teacher_channels=cfg["teacher"]["fpn_channels"],
                  strides=fpn_strides(student, size), loss_weight=kd.get("loss_weight", 1.0))
    if method == "liaf":
        options = {k: kd[k] for k in KD_OPTIONS if k in kd}
        if "roi_size" in options:
            options["roi_size"] = tuple(options["roi_size"])
        return create_distiller("liaf", **common, **options)
    return create_distiller(method, **common)


def train_config(cfg: dict[str, Any], section: str, **overrides: Any) -> TrainConfig:
    """The ``TrainConfig`` of a config section (``train_teacher``, ``stage1`` or ``distill``)."""
    return TrainConfig.from_dict({**cfg[section], **overrides})
