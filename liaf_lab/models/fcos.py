"""FCOS (torchvision's ``FCOS``): its head with GroupNorm of any channel count, and its adapter."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead

from .adapter import DenseAdapter


class FCOSHeadGN(FCOSHead):
    """torchvision's ``FCOSHead`` with ``GroupNorm(num_groups)`` so any channel count works.

    torchvision hard-codes ``GroupNorm(32)``, which needs ``in_channels % 32 == 0``; with
    ``num_groups=32`` this module is identical to torchvision's (same parameters and keys).
    """

    def __init__(self, in_channels: int, num_classes: int, num_groups: int, num_convs: int = 4) -> None:
        nn.Module.__init__(self)  # FCOSHead.__init__ would build GroupNorm(32) heads
        norm_layer = partial(nn.GroupNorm, num_groups)
        self.box_coder = BoxLinearCoder(normalize_by_size=True)
        self.classification_head = FCOSClassificationHead(in_channels, 1, num_classes, num_convs, norm_layer=norm_layer)
        self.regression_head = FCOSRegressionHead(in_channels, 1, num_convs, norm_layer=norm_layer)


class FCOSAdapter(DenseAdapter):
    """torchvision's FCOS: one anchor per location, the level's cell (its scale ranges and box coder are defined
    relative to it), ``FCOSHeadGN`` with ``gcd(32, C)`` groups; torchvision publishes COCO weights."""

    arch = "fcos"
    model_class = FCOS
    head_outputs = ("cls_logits", "bbox_regression", "bbox_ctrness")
    weights_keys = ("head.classification_head.cls_logits", "head.regression_head.bbox_reg",
                    "head.regression_head.bbox_ctrness")
    pretrained_class_keys = {"head.classification_head.cls_logits.weight": "anchors",
                             "head.classification_head.cls_logits.bias": "anchors"}

    def default_anchor_sizes(self, strides: Sequence[float], min_size: int) -> tuple[int, ...]:
        """The stride itself, whatever the input size (FCOS's anchor is the location's cell)."""
        return tuple(round(s) for s in strides)

    def anchor_generator(self, sizes: Sequence[float], strides: Sequence[float]) -> AnchorGenerator:
        """One square anchor per location."""
        return AnchorGenerator(tuple((s,) for s in sizes), ((1.0,),) * len(sizes))

    def build(self, backbone: nn.Module, num_classes: int, anchor_generator: AnchorGenerator,
              levels: Sequence[str], min_size: int, max_size: int, **kwargs: Any) -> nn.Module:
        channels = backbone.out_channels
        head = FCOSHeadGN(channels, num_classes, math.gcd(32, channels))
        return FCOS(backbone, num_classes, min_size=min_size, max_size=max_size, anchor_generator=anchor_generator,
                    head=head, **kwargs)
