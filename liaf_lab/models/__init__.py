"""torchvision detectors on width-scaled ResNet-FPN backbones, and a forward pass that exposes their FPN."""

from .backbones import ScaledResNet, backbone_strides, resnet_fpn
from .detectors import (
    DETECTOR_CLASSES,
    FCOSHeadGN,
    count_parameters,
    create_detector,
    default_anchor_sizes,
    fpn_strides,
    load_weights,
)
from .taps import DetectorOutput, detector_arch, loss_on_features, run_detector

__all__ = [
    "DETECTOR_CLASSES", "DetectorOutput", "FCOSHeadGN", "ScaledResNet", "backbone_strides", "count_parameters",
    "create_detector", "default_anchor_sizes", "detector_arch", "fpn_strides", "load_weights", "loss_on_features",
    "resnet_fpn", "run_detector",
]
