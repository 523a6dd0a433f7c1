"""FGD: Focal and Global Knowledge Distillation for Detectors (Yang et al., CVPR 2022).

Follows the public code (yzd-v/FGD, ``mmdet/distillation/losses/fgd.py``, class ``FeatureLoss``): one
loss per FPN level, summed over levels. Per level, with ``F^T`` the teacher's and ``F^S`` the aligned
student's features (``[N, C, H, W]``):

* focal, feature part: ``alpha * L_fg + beta * L_bg`` (public ``get_fea_loss``), both sides weighted by
  the teacher's spatial and channel attention and the fore-/background masks;
* focal, attention part: ``gamma * L_at`` (public ``get_mask_loss``), L1 between the attentions;
* global: ``lambda * L_global`` (public ``get_rela_loss``), sum-MSE after a GcBlock per side.

Equations are named by the public code's functions (the paper's numbering is not relied on).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.options import Positive, Weight
from .base import FeatureDistiller, KDInputs
from .ops import box_cells, concat_boxes, fgd_cell_span
from .registry import register_distiller


def fgd_attention(feats: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Public ``get_attention``: the spatial ``[N, H, W]`` and channel ``[N, C]`` attention.

    ``S = H*W * softmax_HW(mean_C |F| / T)`` and ``C_att = C * softmax_C(mean_HW |F| / T)`` of
    ``feats`` ``[N, C, H, W]``.
    """
    n, c, h, w = feats.shape
    value = feats.abs()
    spatial = h * w * F.softmax(value.mean(dim=1).flatten(1) / temperature, dim=1)
    channel = c * F.softmax(value.mean(dim=(2, 3)) / temperature, dim=1)
    return spatial.view(n, h, w), channel


def fgd_masks(boxes: Sequence[Tensor], stride: float, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Public ``forward``'s ``Mask_fg``/``Mask_bg`` (paper: binary and scale masks): fore- and background masks ``[N, H, W]``.

    Each box is scaled to the grid by ``1 / stride`` and covers the cells ``floor(y1)..ceil(y2)`` and
    ``floor(x1)..ceil(x2)`` inclusive (clipped to the grid; ``ops.box_cells``'s ``"fgd"`` rule), each of
    which takes the larger of its value and ``1 / ((ceil(y2) + 1 - floor(y1)) * (ceil(x2) + 1 - floor(x1)))``
    (the smaller box wins). The background is 1 where the foreground is 0, divided by its count when that is positive.

    Args:
        boxes: N tensors ``[n_i, 4]`` (x1, y1, x2, y2) in input pixels of the padded batch.
        stride: input pixels per cell.
        size: ``(H, W)`` of the grid.
    Returns:
        ``(fg, bg)``, both ``[N, H, W]`` in the boxes' float dtype (at least float32).
    """
    height, width = size
    rois, batch_index = concat_boxes(boxes)
    rois = rois.to(torch.promote_types(rois.dtype, torch.float32))
    device, dtype = rois.device, rois.dtype
    first, last = fgd_cell_span(rois / stride)  # [I, 2] each, (x, y), before clipping
    area = 1.0 / ((last[:, 1] + 1 - first[:, 1]) * (last[:, 0] + 1 - first[:, 0]))  # [I]
    inside = box_cells(rois, stride, size, "fgd")  # [I, H, W]
    values = torch.where(inside, area[:, None, None], torch.zeros((), device=device, dtype=dtype)).flatten(1)
    fg = torch.zeros(len(boxes), height * width, device=device, dtype=dtype).scatter_reduce(
        0, batch_index[:, None].expand_as(values), values, reduce="amax", include_self=True
    ).view(-1, height, width)
    bg = (fg == 0).to(dtype)
    bg = bg / bg.sum(dim=(1, 2), keepdim=True).clamp_min(1)
    return fg, bg


class GcBlock(nn.Module):
    """FGD's global relation module (public ``spatial_pool`` + ``channel_add_conv_s``/``_t``; paper: GcBlock).

    ``out = F + W_v2(ReLU(LN(W_v1(sum_j softmax_j(W_k F_j) F_j))))`` for ``F`` ``[N, C, H, W]``.
    Init as the public ``reset_parameters``: ``W_k`` Kaiming normal (fan_in, ReLU) with bias 0, the
    last conv ``W_v2`` zero, so the block starts as the identity.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.channel_add = nn.Sequential(
            nn.Conv2d(channels, channels // 2, kernel_size=1),
            nn.LayerNorm([channels // 2, 1, 1]),
            nn.ReLU(),
            nn.Conv2d(channels // 2, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.channel_add[-1].weight)
        nn.init.zeros_(self.channel_add[-1].bias)

    def forward(self, feats: Tensor) -> Tensor:
        """``[N, C, H, W]`` -> ``[N, C, H, W]``: the features plus their channel-transformed context."""
        weights = F.softmax(self.conv_mask(feats).flatten(1), dim=1)  # [N, HW]
        context = torch.einsum("nch,nh->nc", feats.flatten(2), weights)[:, :, None, None]  # [N, C, 1, 1]
        return feats + self.channel_add(context)


def _sum_mse(a: Tensor, b: Tensor) -> Tensor:
    """The public ``nn.MSELoss(reduction='sum')(a, b) / N`` over ``[N, ...]``."""
    return F.mse_loss(a, b, reduction="sum") / a.shape[0]


@register_distiller("fgd", label="FGD")
class FGDDistiller(FeatureDistiller):
    """FGD on every FPN level: the terms ``fg``, ``bg``, ``attention`` and ``global`` (weighted, summed over levels).

    Per level (``N`` images, teacher attentions ``S^T, C^T``, masks ``M`` fg and ``B`` bg):
    ``fg = alpha * sum(M S^T C^T (F^T - F^S)^2) / N``, ``bg`` likewise with ``beta`` and ``B``,
    ``attention = gamma * (sum|C^S - C^T| + sum|S^S - S^T|) / N``,
    ``global = lambda * sum(GcBlock_S(F^S) - GcBlock_T(F^T))^2 / N``.
    The student is aligned by a 1x1 conv where the channels differ. Both GcBlocks (one per side and
    level) learn in stage 2; the teacher does not. One stage.

    Boxes are scaled to a level's grid by its stride (the padded batch); the public code divides by
    each image's unpadded ``img_shape`` and multiplies by the padded grid size instead.

    Args (beyond ``FeatureDistiller``'s); defaults are the public RetinaNet config's:
        temperature: T of the attentions (public ``temp``).
        alpha_fg: weight of the foreground loss (``alpha_fgd``).
        beta_bg: weight of the background loss (``beta_fgd``).
        gamma_attention: weight of the attention loss (``gamma_fgd``).
        lambda_global: weight of the global loss (``lambda_fgd``).
    """

    @dataclass(frozen=True)
    class Options(FeatureDistiller.Options):
        temperature: Positive = 0.5
        alpha_fg: Weight = 1e-3
        beta_bg: Weight = 5e-4
        gamma_attention: Weight = 5e-4
        lambda_global: Weight = 5e-6

    def build(self) -> None:
        small = {lvl: c for lvl, c in self.teacher_channels.items() if c < 2}
        if small:
            raise ValueError(f"FGD's GcBlock needs at least 2 teacher channels (C/2 >= 1), got {small}")
        self.projectors = self.make_projectors("auto")
        self.gc_student = nn.ModuleDict({lvl: GcBlock(self.teacher_channels[lvl]) for lvl in self.levels})
        self.gc_teacher = nn.ModuleDict({lvl: GcBlock(self.teacher_channels[lvl]) for lvl in self.levels})

    def level_weights(self, level: str, aligned: Tensor, teacher: Tensor, boxes: Sequence[Tensor]) -> dict[str, Tensor]:
        """Public ``FeatureLoss.forward``'s attentions and masks on one level (``fgd_attention``, ``fgd_masks``).

        ``aligned`` is the aligned student ``[N, C_t, H, W]``, ``teacher`` ``[N, C_t, H, W]``. Returns
        ``foreground mask`` (``Mask_fg``) and ``background mask`` (``Mask_bg``) ``[N, H, W]``,
        ``spatial attention (teacher)`` / ``(student)`` ``[N, H, W]`` and ``channel attention (teacher)``
        / ``(student)`` ``[N, C_t]``.
        """
        s_spatial, s_channel = fgd_attention(aligned, self.temperature)
        t_spatial, t_channel = fgd_attention(teacher, self.temperature)
        fg, bg = fgd_masks([b.to(teacher.device) for b in boxes], self.strides[level], tuple(teacher.shape[2:]))
        return {"foreground mask": fg, "background mask": bg,
                "spatial attention (teacher)": t_spatial, "spatial attention (student)": s_spatial,
                "channel attention (teacher)": t_channel, "channel attention (student)": s_channel}

    def level_losses(self, level: str, student: Tensor, teacher: Tensor, boxes: Sequence[Tensor]) -> dict[str, Tensor]:
        """Public ``FeatureLoss.forward`` on one level, unweighted: ``fg``, ``bg``, ``attention``, ``global``.

        ``student`` ``[N, C_s, H, W]``, ``teacher`` ``[N, C_t, H, W]`` (detached); each result is a scalar.
        """
        student = self.projectors[level](student)
        w = self.level_weights(level, student, teacher, boxes)
        s_spatial, s_channel = w["spatial attention (student)"], w["channel attention (student)"]
        t_spatial, t_channel = w["spatial attention (teacher)"], w["channel attention (teacher)"]
        # get_fea_loss: (sqrt(S^T C^T M) (F^S - F^T))^2 = M S^T C^T (F^S - F^T)^2
        weighted = (student - teacher).square() * t_spatial[:, None] * t_channel[:, :, None, None]
        n = teacher.shape[0]
        return {
            "fg": (weighted * w["foreground mask"].to(teacher.dtype)[:, None]).sum() / n,
            "bg": (weighted * w["background mask"].to(teacher.dtype)[:, None]).sum() / n,
            "attention": ((s_channel - t_channel).abs().sum() + (s_spatial - t_spatial).abs().sum()) / n,
            "global": _sum_mse(self.gc_student[level](student), self.gc_teacher[level](teacher)),
        }

    def compute_terms(self, inputs: KDInputs) -> dict[str, Tensor]:
        """The four weighted terms summed over levels (public: one ``FeatureLoss`` per level)."""
        weights = {"fg": self.alpha_fg, "bg": self.beta_bg, "attention": self.gamma_attention,
                   "global": self.lambda_global}
        per_level = [self.level_losses(lvl, inputs.student_feats[lvl], inputs.teacher_feats[lvl], inputs.boxes)
                     for lvl in self.levels]
        return {name: weight * torch.stack([losses[name] for losses in per_level]).sum()
                for name, weight in weights.items()}

    def compute_weight_maps(self, inputs: KDInputs) -> dict[str, dict[str, Tensor]]:
        """The spatial maps of ``level_weights``, each level ``[N, H, W]``: ``foreground mask``
        (``Mask_fg``, the scale mask: ``1 / box cells`` inside boxes), ``background mask`` (``Mask_bg``),
        and the pair ``spatial attention (teacher)`` / ``(student)`` (``fg`` and ``bg`` weight by the
        teacher's; ``attention`` compares the two). The channel attentions weight channels, not cells:
        they are not maps.
        """
        maps: dict[str, dict[str, Tensor]] = {}
        for lvl in self.levels:
            weights = self.level_weights(lvl, self.projectors[lvl](inputs.student_feats[lvl]),
                                         inputs.teacher_feats[lvl], inputs.boxes)
            for name, value in weights.items():
                if value.dim() == 3:  # [N, H, W]; the channel attentions are [N, C]
                    maps.setdefault(name, {})[lvl] = value
        return maps
