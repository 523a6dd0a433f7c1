"""FGFI: Distilling Object Detectors with Fine-grained Feature Imitation (Wang et al., CVPR 2019).

The student imitates the teacher only at the "near object" locations of each feature level: those
with a prior (anchor) whose IoU with some ground-truth box exceeds ``psi`` times that box's best IoU
(paper Sec. 3.1, "Imitation region estimation"). A learned adaptation conv maps the student to the
teacher's channels (paper Sec. 3.2). Facts follow the public code (twangnh/Distilling-Object-Detectors):
the mask from ``_AnchorTargetLayer.forward`` (``lib/model/rpn/anchor_target_layer.py``), the adaptation
layer ``stu_feature_adap`` (``lib/model/faster_rcnn/vgg11.py``) with its init, and the loss ``sup_loss``
with its weight ``--ilw 0.01`` (``trainval_net_sup.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torchvision.ops import box_iou

from ..utils.options import Fraction, Positive, Weight
from .base import FeatureDistiller, KDInputs, prior_boxes
from .ops import adaptation_layers, concat_boxes
from .registry import register_distiller

IoUMax = Literal["level", "all"]


def imitation_masks(
    priors: Mapping[str, Tensor],
    boxes: Sequence[Tensor],
    sizes: Mapping[str, tuple[int, int]],
    strides: Mapping[str, float],
    psi: float = 0.5,
    point_prior_scale: float = 8.0,
    iou_max: IoUMax = "level",
) -> dict[str, Tensor]:
    """Paper Sec. 3.1 / public ``_AnchorTargetLayer.forward`` (``mask_batch``): the imitation mask ``I`` per level.

    For every box ``b`` the IoU map ``m`` with the level's priors ``[H, W, A]`` is thresholded at
    ``F = psi * max(m)`` (strictly above); a cell is in the mask where any of its ``A`` priors passes
    for any box of its image (OR over anchors and boxes). ``iou_max="level"`` takes ``max(m)`` over
    the level's priors (the public code's single feature map); ``"all"`` over the priors of every
    level in ``sizes``. Point priors (``base.prior_boxes``) become squares of side ``point_prior_scale * stride``.

    Args:
        priors: level -> ``[H*W*A, 4]`` in input pixels, cells row-major then anchors (shared by the images).
        boxes: N tensors ``[n_i, 4]`` (x1, y1, x2, y2) in input pixels.
        sizes: level -> ``(H, W)``; strides: level -> input pixels per cell.
    Returns:
        level -> ``[N, H, W]`` 0/1 masks in the priors' and boxes' common float dtype (at least float32).
    """
    first = next(iter(priors.values()))
    dtype = torch.promote_types(torch.promote_types(first.dtype, torch.float32),
                                boxes[0].dtype if len(boxes) else torch.float32)
    rois, batch_index = concat_boxes([b.to(first.device, dtype) for b in boxes])
    ious = {lvl: box_iou(prior_boxes(priors[lvl].to(dtype), strides[lvl], point_prior_scale), rois)
            for lvl in sizes}  # [P, I]
    best = {lvl: iou.amax(dim=0) for lvl, iou in ious.items()}  # [I]
    if iou_max == "all":
        overall = torch.stack(list(best.values())).amax(dim=0)
        best = {lvl: overall for lvl in best}
    masks = {}
    for lvl, (height, width) in sizes.items():
        above = ious[lvl] > psi * best[lvl]  # [P, I]
        per_cell = above.view(height * width, above.shape[0] // (height * width), above.shape[1])  # [H*W, A, I]
        cells = per_cell.any(dim=1).t().to(dtype)  # [I, H*W]
        masks[lvl] = torch.zeros(len(boxes), height * width, device=first.device, dtype=dtype).scatter_reduce(
            0, batch_index[:, None].expand_as(cells), cells, reduce="amax", include_self=True
        ).view(-1, height, width)
    return masks


@register_distiller("fgfi", label="FGFI")
class FGFIDistiller(FeatureDistiller):
    """FGFI: ``imitation = loss_weight * mean_levels sum_{n,c,h,w} I (f_adap(F^S) - F^T)^2 / (2 N_p)``.

    Per level, ``I [N, H, W]`` is the imitation mask (``imitation_masks``), ``N_p = sum_{n,h,w} I``
    over the batch (paper: "N_p = sum I_ij"; public ``norms = mask_batch.sum() * 2``) and
    ``f_adap`` the adaptation conv (paper: "full convolution adaptation layer"). One stage; the
    adaptation layers learn in stage 2.

    What had to be chosen (the public code distils one VGG feature map of a Faster R-CNN):
        * FPN levels: each level's loss is normalised by its own ``N_p`` and the levels are averaged,
          as the DeFeat authors' FPN port of FGFI does (ggjy/DeFeat.pytorch ``batch_processor_kd``),
          so ``loss_weight`` keeps the single-map meaning. That port instead gives each box to one
          level by its size; here every box makes a mask on every level (see ``iou_max``).
        * The max IoU: ``iou_max`` (see ``imitation_masks``); ``"level"`` is the literal IoU map of
          the imitated feature map.
        * The adaptation layer is the public 3x3 conv; its ReLU (``adapter_relu``) suits the public
          code's post-ReLU VGG features, not signed FPN outputs, so it is off by default (the
          DeFeat port also drops it for FPN levels).
        * IoU is torchvision's ``box_iou`` (continuous coordinates; the public code adds 1 pixel).
        * An empty mask gives 0 (``N_p`` clamped to at least 1; the public code divides by 0).
        * Anchor-free detectors give point priors (FCOS: one cell, or zero size): each becomes a
          square of side ``point_prior_scale * stride`` (8, the octave base scale of ATSS/GFL
          anchors; the paper treats anchor-based detectors only), as GID does (``base.prior_boxes``).

    Args (beyond ``FeatureDistiller``'s):
        loss_weight: the imitation loss weight lambda (public ``--ilw`` default 0.01).
        psi: the threshold factor in ``[0, 1]`` (paper: 0.5).
        point_prior_scale: side of a point prior's square in strides (positive).
        iou_max: ``"level"`` or ``"all"``: over which priors a box's best IoU is taken.
        adapter_relu: put the public code's ReLU after the adaptation conv.
    """

    needs = frozenset({"priors"})

    @dataclass(frozen=True)
    class Options(FeatureDistiller.Options):
        loss_weight: Weight = 0.01
        psi: Fraction = 0.5
        point_prior_scale: Positive = 8.0
        iou_max: IoUMax = "level"
        adapter_relu: bool = False

    def build(self) -> None:
        self.adapters = adaptation_layers(self.student_channels, self.teacher_channels, self.adapter_relu)

    def masks(self, inputs: KDInputs) -> dict[str, Tensor]:
        """The imitation mask ``[N, H, W]`` of every level (``imitation_masks`` with this distiller's options)."""
        sizes = {lvl: tuple(inputs.teacher_feats[lvl].shape[-2:]) for lvl in self.levels}
        return imitation_masks({lvl: inputs.priors[lvl] for lvl in self.levels}, inputs.boxes, sizes, self.strides,
                               self.psi, self.point_prior_scale, self.iou_max)

    def compute_terms(self, inputs: KDInputs) -> dict[str, Tensor]:
        """Public ``sup_loss`` per level, ``sum((t - f_adap(s))^2 * I) / (2 sum I)``, averaged over levels, weighted."""
        masks = self.masks(inputs)
        losses = []
        for lvl in self.levels:
            teacher = inputs.teacher_feats[lvl]
            mask = masks[lvl].to(teacher.dtype)[:, None]
            error = (self.adapters[lvl](inputs.student_feats[lvl]) - teacher).square() * mask
            losses.append(error.sum() / (2 * mask.sum()).clamp_min(1))
        return {"imitation": self.loss_weight * torch.stack(losses).mean()}

    def compute_weight_maps(self, inputs: KDInputs) -> dict[str, dict[str, Tensor]]:
        """``imitation mask``: the mask ``I`` of ``masks`` (1 at the near-object cells the student imitates,
        else 0), each level ``[N, H, W]``."""
        return {"imitation mask": self.masks(inputs)}
