"""RetinaNet (torchvision's ``RetinaNet``): its adapter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator

from .adapter import DenseAdapter, Target


class RetinaNetAdapter(DenseAdapter):
    """torchvision's RetinaNet: 3 octave scales x 3 ratios of anchors per location (base size 4 x stride at 800 px),
    sigmoid classifier and box deltas per anchor; torchvision publishes COCO weights."""

    arch = "retinanet"
    model_class = RetinaNet
    head_outputs = ("cls_logits", "bbox_regression")
    anchor_stride_factor = 4.0
    weights_keys = ("head.classification_head.cls_logits", "head.regression_head.bbox_reg")
    # "anchors": one block of K class rows per anchor ([A * K, ...]); the layouts: models/pretrained.py.
    pretrained_class_keys = {"head.classification_head.cls_logits.weight": "anchors",
                             "head.classification_head.cls_logits.bias": "anchors"}

    def anchor_generator(self, sizes: Sequence[float], strides: Sequence[float]) -> AnchorGenerator:
        """3 octave scales (``s``, ``s * 2^(1/3)``, ``s * 2^(2/3)``) x 3 ratios (0.5, 1, 2) per level."""
        per_level = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes)
        return AnchorGenerator(per_level, ((0.5, 1.0, 2.0),) * len(sizes))

    def build(self, backbone: nn.Module, num_classes: int, anchor_generator: AnchorGenerator,
              levels: Sequence[str], min_size: int, max_size: int, **kwargs: Any) -> nn.Module:
        return RetinaNet(backbone, num_classes, min_size=min_size, max_size=max_size,
                         anchor_generator=anchor_generator, **kwargs)

    def compute_loss(self, model: nn.Module, targets: list[Target], head_outputs: dict[str, Tensor],
                     anchors: list[Tensor], num_anchors_per_level: list[int]) -> dict[str, Tensor]:
        """torchvision's ``RetinaNet.compute_loss`` (it takes no level counts)."""
        return model.compute_loss(targets, head_outputs, anchors)
