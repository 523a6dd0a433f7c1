"""ResNet-FPN backbones with a width multiplier, built from torchvision's own pieces.

``resnet_fpn`` returns torchvision's ``BackboneWithFPN``: ``forward(x [N, 3, H, W])`` gives an
``OrderedDict`` of FPN levels, each ``[N, fpn_channels, H_l, W_l]``. Level names follow torchvision:
``"0", "1", ...`` for the returned ResNet stages, then ``"p6", "p7"`` (``extra="p6p7"``) or
``"pool"`` (``extra="pool"``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Literal

from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

Extra = Literal["p6p7", "pool"]

RESNET_SPECS: dict[int, tuple[type[BasicBlock | Bottleneck], list[int]]] = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
}

DEFAULT_RETURNED_LAYERS: dict[str, tuple[int, ...]] = {"p6p7": (2, 3, 4), "pool": (1, 2, 3, 4)}


class ScaledResNet(ResNet):
    """torchvision's ResNet with every width scaled by ``width_mult``.

    The stem has ``round(64 * width_mult)`` channels and stage ``i`` (1..4) has
    ``round(64 * width_mult * 2**(i-1))`` planes (times 4 output channels for Bottleneck).
    The stages are built by torchvision's ``ResNet._make_layer``; the convolution init is ResNet's.
    ``forward(x [N, 3, H, W])`` returns the pooled last stage ``[N, stage_channels[-1]]`` (no
    classifier); detection uses ``layer1..layer4`` through ``BackboneWithFPN``.

    Args:
        depth: 18, 34, 50 or 101.
        width_mult: factor on all widths (> 0); 1.0 is the standard ResNet.
        norm_layer: normalisation after each conv; ``nn.BatchNorm2d`` (default, for training from
            scratch) or ``FrozenBatchNorm2d`` (fixed statistics, for pretrained weights).
    """

    def __init__(
        self, depth: int, width_mult: float = 1.0, norm_layer: Callable[[int], nn.Module] | None = None
    ) -> None:
        if depth not in RESNET_SPECS:
            raise ValueError(f"depth must be one of {sorted(RESNET_SPECS)}, got {depth!r}")
        if not width_mult > 0:
            raise ValueError(f"width_mult must be positive, got {width_mult!r}")
        nn.Module.__init__(self)  # ResNet.__init__ hard-codes 64 channels; set up its state here.
        block, layers = RESNET_SPECS[depth]
        widths = [max(1, round(64 * width_mult * 2**i)) for i in range(4)]
        self.depth, self.width_mult = depth, width_mult
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = widths[0], 1, 1, 64
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        self.stage_channels: list[int] = [w * block.expansion for w in widths]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def resnet_fpn(
    depth: int,
    width_mult: float = 1.0,
    fpn_channels: int = 256,
    extra: Extra = "p6p7",
    returned_layers: Sequence[int] | None = None,
    frozen_bn: bool = False,
) -> BackboneWithFPN:
    """A ``ScaledResNet`` under torchvision's ``FeaturePyramidNetwork``.

    Args:
        depth, width_mult: see ``ScaledResNet``.
        fpn_channels: C of every FPN level.
        extra: ``"p6p7"``: ``LastLevelP6P7`` on P5 (RetinaNet/FCOS: P3-P7, strides 8..128 with the
            default ``returned_layers=(2, 3, 4)``); ``"pool"``: ``LastLevelMaxPool`` (Faster R-CNN:
            P2-P6, strides 4..64 with the default ``returned_layers=(1, 2, 3, 4)``).
        returned_layers: ResNet stages (1..4, increasing) fed to the FPN; default depends on ``extra``.
        frozen_bn: use ``FrozenBatchNorm2d`` instead of ``BatchNorm2d`` in the ResNet.

    Returns:
        ``BackboneWithFPN`` with ``out_channels == fpn_channels``.
    """
    if extra not in DEFAULT_RETURNED_LAYERS:
        raise ValueError(f"extra must be 'p6p7' or 'pool', got {extra!r}")
    if fpn_channels < 1:
        raise ValueError(f"fpn_channels must be positive, got {fpn_channels!r}")
    layers = tuple(DEFAULT_RETURNED_LAYERS[extra] if returned_layers is None else returned_layers)
    if not layers or any(k not in (1, 2, 3, 4) for k in layers) or list(layers) != sorted(set(layers)):
        raise ValueError(f"returned_layers must be increasing stages in 1..4, got {layers}")
    body = ScaledResNet(depth, width_mult, FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d)
    extra_block = LastLevelP6P7(fpn_channels, fpn_channels) if extra == "p6p7" else LastLevelMaxPool()
    return BackboneWithFPN(
        body,
        return_layers={f"layer{k}": str(i) for i, k in enumerate(layers)},
        in_channels_list=[body.stage_channels[k - 1] for k in layers],
        out_channels=fpn_channels,
        extra_blocks=extra_block,
    )


def _stride_of(module: nn.Module) -> int:
    """Downsampling factor of one child of a torchvision ResNet (stem conv/pool or a stage)."""
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
        stride = module.stride
        return int(stride[0] if isinstance(stride, tuple) else stride)
    if isinstance(module, nn.Sequential):  # a stage: blocks carry their stride
        return math.prod(int(getattr(block, "stride", 1)) for block in module)
    return 1


def backbone_strides(backbone: nn.Module) -> OrderedDict[str, float]:
    """Level name -> input pixels per cell for a ResNet ``BackboneWithFPN``.

    These are the nominal strides (4, 8, ..., 128): cell ``(h, w)`` of a level with stride ``s``
    starts at input pixel ``(h * s, w * s)``. When the input side is not a multiple of ``s`` the
    level gets ``ceil(side / s)`` cells and the last one covers padding; the stride is unchanged.
    Works for ``resnet_fpn`` and torchvision's ``resnet_fpn_backbone``.
    """
    if not isinstance(backbone, BackboneWithFPN) or not hasattr(backbone.body, "layer1"):
        raise TypeError(
            f"expected a ResNet BackboneWithFPN (see resnet_fpn), got {type(backbone).__name__}"
            + (f" over {type(backbone.body).__name__}" if isinstance(backbone, BackboneWithFPN) else "")
        )
    strides: OrderedDict[str, float] = OrderedDict()
    stride = 1
    for name, child in backbone.body.named_children():
        stride *= _stride_of(child)
        if name in backbone.body.return_layers:
            strides[backbone.body.return_layers[name]] = float(stride)
    extra = backbone.fpn.extra_blocks
    if isinstance(extra, LastLevelP6P7):
        strides["p6"], strides["p7"] = 2.0 * stride, 4.0 * stride
    elif isinstance(extra, LastLevelMaxPool):
        strides["pool"] = 2.0 * stride
    elif extra is not None:
        raise TypeError(f"unsupported FPN extra block {type(extra).__name__}; "
                        "expected LastLevelP6P7 or LastLevelMaxPool")
    return strides
