"""torchvision detectors (and liaf_lab's GFL): a factory on width-scaled ResNet-FPN backbones, one adapter per detector
family (``adapter.py``; the registry ``ADAPTERS`` in ``detectors.py``) and one forward pass that exposes the FPN of
any of them (levels and strides read from feature shapes)."""

from .adapter import DetectorAdapter
from .backbones import ScaledResNet, backbone_strides, eval_mode, fpn_levels, resnet_fpn
from .detectors import (
    ADAPTERS,
    check_image_sizes,
    check_num_classes,
    count_parameters,
    create_detector,
    default_anchor_sizes,
    detector_adapter,
    detector_meta,
    detector_num_classes,
    fpn_strides,
    load_detector_weights,
    match_levels,
    pair_levels,
    save_detector,
    shared_strides,
)
from .taps import DetectorOutput, detector_features, head_outputs, loss_on_features, run_detector

__all__ = [
    "ADAPTERS", "DetectorAdapter", "DetectorOutput", "ScaledResNet", "backbone_strides", "check_image_sizes",
    "check_num_classes",
    "count_parameters", "create_detector", "default_anchor_sizes", "detector_adapter", "detector_features",
    "detector_meta", "detector_num_classes", "eval_mode", "fpn_levels", "fpn_strides", "head_outputs",
    "load_detector_weights",
    "loss_on_features", "match_levels", "pair_levels", "resnet_fpn", "run_detector", "save_detector", "shared_strides",
]
