"""torchvision detectors (and liaf_lab's GFL): a factory on width-scaled ResNet-FPN backbones, and one forward pass
that exposes the FPN of any torchvision RetinaNet, FCOS or Faster R-CNN, or a GFL (levels and strides read from
feature shapes)."""

from .backbones import ScaledResNet, backbone_strides, eval_mode, fpn_levels, resnet_fpn
from .detectors import (
    DETECTOR_CLASSES,
    FCOSHeadGN,
    check_image_sizes,
    check_num_classes,
    count_parameters,
    create_detector,
    default_anchor_sizes,
    detector_meta,
    detector_num_classes,
    fpn_strides,
    load_detector_weights,
    match_levels,
    pair_levels,
    save_detector,
    shared_strides,
)
from .gfl import GFL
from .taps import DetectorOutput, detector_arch, detector_features, head_outputs, loss_on_features, run_detector

__all__ = [
    "DETECTOR_CLASSES", "GFL", "DetectorOutput", "FCOSHeadGN", "ScaledResNet", "backbone_strides", "check_image_sizes",
    "check_num_classes",
    "count_parameters", "create_detector", "default_anchor_sizes", "detector_arch", "detector_features",
    "detector_meta", "detector_num_classes", "eval_mode", "fpn_levels", "fpn_strides", "head_outputs",
    "load_detector_weights",
    "loss_on_features", "match_levels", "pair_levels", "resnet_fpn", "run_detector", "save_detector", "shared_strides",
]
