"""Detection datasets (procedural shapes, COCO format, KITTI, VOC), box-aware transforms and collation.

Every dataset yields ``(image [3, H, W] float in [0, 1], target)`` with ``target`` holding ``boxes``
[n, 4] xyxy pixels, ``labels`` [n] int64 in 1..num_classes, ``image_id``, ``orig_size`` (H, W) and
``ignore_boxes`` [m, 4], and exposes ``class_names``, ``label_to_cat_id`` and ``coco_gt()`` (the ground truth
built from the same sanitised records).
"""

from __future__ import annotations

from typing import Any

from .coco import CocoDetectionDataset
from .common import DatasetWarning, DetectionDataset, ImageRecord, check_same_classes
from .kitti import KITTI_MERGE, KITTI_TYPES, KittiDataset
from .transforms import collate_fn, detection_transforms
from .voc import VOC_CLASSES, VOCDataset

_SYNTHETIC = ("BACKGROUNDS", "MIN_VISIBLE", "SHAPE_CLASSES", "generate_scenes", "make_sample")

__all__ = [
    "CocoDetectionDataset", "DatasetWarning", "DetectionDataset", "ImageRecord", "KITTI_MERGE", "KITTI_TYPES",
    "KittiDataset", "VOCDataset", "VOC_CLASSES", "check_same_classes", "collate_fn", "detection_transforms",
    *_SYNTHETIC,
]


def __getattr__(name: str) -> Any:
    # The generator is imported on first use so that ``python -m liaf_lab.data.synthetic`` does not find
    # its own module already imported by this package (runpy's RuntimeWarning).
    if name in _SYNTHETIC:
        from . import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
