"""ResNet-FPN backbones with a width multiplier, and the FPN levels and strides of any backbone.

``resnet_fpn`` returns torchvision's ``BackboneWithFPN``: ``forward(x [N, 3, H, W])`` gives an
``OrderedDict`` of FPN levels, each ``[N, fpn_channels, H_l, W_l]``. Level names follow torchvision:
``"0", "1", ...`` for the returned ResNet stages, then ``"p6", "p7"`` (``extra="p6p7"``) or
``"pool"`` (``extra="pool"``).

``fpn_levels`` is the one place liaf_lab calls a detector's backbone; ``backbone_strides`` measures
the strides from the feature shapes, so any backbone works (ResNet, MobileNet, a user's own).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn
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


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the block; restore its own and its children's flags on exit."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


def fpn_levels(backbone: nn.Module, images: Tensor) -> OrderedDict[str, Tensor]:
    """``backbone(images [N, 3, H, W])`` as ``{level: [N, C, H_l, W_l]}`` in the backbone's order.

    A backbone returning one tensor (torchvision's convention without an FPN) gives level ``"0"``.
    """
    feats = backbone(images)
    if isinstance(feats, Tensor):
        feats = OrderedDict([("0", feats)])
    if not isinstance(feats, Mapping) or not feats:
        raise ValueError(f"model.backbone returned {type(feats).__name__}; expected a dict of FPN levels")
    for name, f in feats.items():
        if not isinstance(f, Tensor) or f.dim() != 4:
            raise ValueError(f"model.backbone level {name!r} is not an [N, C, H, W] tensor")
    return OrderedDict(feats)


_PROBE_SIDES = (256, 512, 1024)
_STRIDES: WeakKeyDictionary[nn.Module, OrderedDict[str, float]] = WeakKeyDictionary()


@torch.no_grad()
def backbone_strides(backbone: nn.Module) -> OrderedDict[str, float]:
    """Level name -> input pixels per cell (e.g. ``{"0": 8.0, "1": 16.0, "2": 32.0, "p6": 64.0, "p7": 128.0}``).

    Measured as torchvision's ``AnchorGenerator`` does, ``input side // level side``, on a zero
    image of 256 px (512 or 1024 px while the coarsest level has a single cell), with the backbone
    in eval mode (its modes are restored after). The sides are powers of two, so the usual
    power-of-two strides come out exact. These nominal strides hold for every input size: a side
    that is not a multiple of ``s`` only adds a last, partly padded cell. Measured once per
    backbone module and cached.
    """
    if backbone in _STRIDES:
        return OrderedDict(_STRIDES[backbone])
    like = next(iter(backbone.parameters()), None)
    dtype = like.dtype if like is not None and like.is_floating_point() else torch.float32
    device = like.device if like is not None else torch.device("cpu")
    with eval_mode(backbone):
        for side in _PROBE_SIDES:
            feats = fpn_levels(backbone, torch.zeros(1, 3, side, side, dtype=dtype, device=device))
            if min(min(f.shape[-2:]) for f in feats.values()) > 1:
                break
    strides: OrderedDict[str, float] = OrderedDict()
    for name, f in feats.items():
        h, w = f.shape[-2:]
        if side // h != side // w or min(h, w) == 1:
            raise ValueError(f"backbone level {name!r} is {h}x{w} cells for a {side}x{side} input: "
                             "expected a feature map with one stride in both directions")
        strides[name] = float(side // h)
    _STRIDES[backbone] = strides
    return OrderedDict(strides)
