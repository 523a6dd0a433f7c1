"""DeFeat: Distilling Object Detectors via Decoupled Features (Guo et al., CVPR 2021).

Feature and classification distillation, each decoupled into the ground-truth object regions and the
rest, with separate weights and normalisers. Facts follow the public code (ggjy/DeFeat.pytorch):
the box masks from ``AnchorHead.get_gt_mask`` and ``_map_roi_levels``
(``mmdet/models/dense_heads/anchor_head.py``), the adaptation convs ``neck_adapt`` with their init
(``mmdet/models/detectors/single_stage_kd.py``), the losses and normalisers of ``batch_processor_kd``
and ``KLDivergenceLoss`` (``mmdet/apis/train.py``) and the weights of its DeFeat config
(``configs/kd_faster_rcnn/voc_stu_faster_rcnn_r50_decouple_neck.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils.options import Positive, Weight
from .base import FeatureDistiller, KDInputs
from .ops import adaptation_layers, box_cells, concat_boxes
from .registry import register_distiller

BoxLevels = Literal["scale", "all"]
HeadKL = Literal["softmax", "sigmoid"]


def box_level_index(boxes: Tensor, num_levels: int) -> Tensor:
    """Public ``_map_roi_levels``: ``floor(log2(sqrt((w + 1)(h + 1)) / 56 + 1e-6))`` clipped to ``[0, L-1]``.

    ``boxes [I, 4]`` in input pixels -> ``[I]`` long, the rank (by stride, finest first) of each box's level.
    """
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1))
    return torch.floor(torch.log2(scale / 56 + 1e-6)).clamp(0, num_levels - 1).long()


def gt_masks(
    boxes: Sequence[Tensor],
    sizes: Mapping[str, tuple[int, int]],
    strides: Mapping[str, float],
    box_levels: BoxLevels = "scale",
) -> dict[str, Tensor]:
    """Public ``get_gt_mask``: the object mask ``M [N, H, W]`` (1 inside a box, else 0) of every level.

    A box divided by the stride covers the columns ``floor(x1) <= w < floor(x2)`` and rows
    ``floor(y1) <= h < floor(y2)`` (first clipped to the grid); where either range is empty, only
    the cell ``(floor(y1), floor(x1))`` (``ops.box_cells``'s ``"defeat"`` rule). With
    ``box_levels="scale"`` a box marks only the level ``box_level_index`` gives it, the levels ranked by stride; with ``"all"`` every level.

    Args:
        boxes: N tensors ``[n_i, 4]`` (x1, y1, x2, y2) in input pixels.
        sizes: level -> ``(H, W)``; strides: level -> input pixels per cell (same keys).
    Returns:
        level -> ``[N, H, W]`` 0/1 masks in the boxes' float dtype (at least float32).
    """
    rois, batch_index = concat_boxes(boxes)
    dtype = torch.promote_types(rois.dtype, torch.float32)
    rois, device = rois.to(dtype), rois.device
    ranked = sorted(sizes, key=lambda lvl: strides[lvl])
    level_index = box_level_index(rois, len(ranked))
    masks = {}
    for lvl, (height, width) in sizes.items():
        inside = box_cells(rois, strides[lvl], (height, width), "defeat")  # [I, H, W]
        if box_levels == "scale":
            inside = inside & (level_index == ranked.index(lvl))[:, None, None]
        values = inside.flatten(1).to(dtype)
        masks[lvl] = torch.zeros(len(boxes), height * width, device=device, dtype=dtype).scatter_reduce(
            0, batch_index[:, None].expand_as(values), values, reduce="amax", include_self=True
        ).view(-1, height, width)
    return masks


def class_kl(student: Tensor, teacher: Tensor, anchors: int, temperature: float, form: HeadKL) -> Tensor:
    """Public ``KLDivergenceLoss`` per prior, unnormalised: ``KL(p_T || p_S)`` at temperature ``T``, ``[N, A, H, W]``.

    ``student``, ``teacher``: ``[N, A*K, H, W]`` class logits (channel ``a*K + k``). ``"softmax"``:
    ``p = softmax(z / T)`` over each prior's K classes, as the public function's ``dim=1``;
    ``"sigmoid"``: each class an independent Bernoulli ``sigmoid(z / T)``, the binary KLs summed over K.
    """
    n, _, height, width = student.shape
    s = (student / temperature).view(n, anchors, -1, height, width)
    t = (teacher / temperature).view(n, anchors, -1, height, width)
    if form == "softmax":
        return F.kl_div(F.log_softmax(s, dim=2), F.softmax(t, dim=2), reduction="none").sum(dim=2)
    p_t = torch.sigmoid(t)
    positive = p_t * (F.logsigmoid(t) - F.logsigmoid(s))
    negative = (1 - p_t) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return (positive + negative).sum(dim=2)


@register_distiller("defeat", label="DeFeat")
class DeFeatDistiller(FeatureDistiller):
    """DeFeat: the terms ``fg``, ``bg`` (features) and ``cls_pos``, ``cls_neg`` (classification head).

    Per level, with ``M [N, H, W]`` the object mask (``gt_masks``), ``phi`` the 3x3 adaptation conv
    and ``D = (phi(F^S) - F^T)^2`` (paper: decoupled features of the neck; public ``neck-decouple``):
    ``fg_l = sum(M D) / (2 C sum M)``, ``bg_l = sum((1 - M) D) / (2 C sum(1 - M))`` (sums over the
    batch; ``C`` as the public mask is repeated over channels; each normaliser at least 1), and
    ``fg = fg_weight * mean_l fg_l``, ``bg = bg_weight * mean_l bg_l`` (public: ``/ len(neck_feat)``).
    Classification (paper: decoupled proposals in the head; public ``KL-decouple``): ``cls_pos =
    cls_pos_weight * T^2 * sum_{pos} KL / N_pos`` over the priors of all levels whose cell has
    ``M = 1``, ``N_pos`` their number (the term is 0 without any), and ``cls_neg`` likewise over ``M = 0``. One
    stage; the adaptation convs learn in stage 2, and the student's head gets the KL gradient.

    What had to be chosen (the public repository ships Faster R-CNN configs only, whose head
    distillation runs on sampled RoIs; its single-stage path has no head distillation):
        * Positives and negatives of a dense head are the priors at cells inside / outside the
          object mask of their level (the public code: RoIs assigned to a box or to background),
          pooled over levels as the public KL pools all RoIs.
        * The KL form for sigmoid classifiers (``head_kl``): ``"softmax"`` applies the public
          ``KLDivergenceLoss`` (softmax over classes) to each prior's K logits; with no background
          logit it ignores the absolute score, which ``"sigmoid"`` (binary KL per class) keeps.
        * ``box_levels="scale"`` is the public mask (a box on one level by its size, so the other
          levels count its region as background); the levels are ranked among the distilled ones
          (public: all FPN levels of the detector, the same when all are distilled); ``"all"``:
          every box on every level.
        * Boxes are clipped to the grid before the public ``int(x / stride)`` cell rule, so a box
          outside the grid marks only border cells (the public slicing wraps around there).
        * ``A`` (priors per cell) comes from the priors' shapes, so the method also needs ``priors``.

    Args (beyond ``FeatureDistiller``'s); defaults are the values of the public DeFeat config (Faster R-CNN,
    VOC). That config's ``type`` has no ``head-cls``, so its released run used the feature terms only; the
    head KL is on here as in the paper's DeFeat (decoupled features and proposals), and
    ``cls_pos_weight = cls_neg_weight = 0`` is the released run:
        fg_weight: weight of the object-region feature loss (public ``hint_neck_w`` 3).
        bg_weight: weight of the background feature loss (``hint_neck_back_w`` 12).
        cls_pos_weight: weight of the positive-prior KL (``head_cls_w`` 2, unused by the released run).
        cls_neg_weight: weight of the negative-prior KL (``head_cls_back_w`` 2, unused by the released run).
        temperature: T of the softened KL (``head_cls_T`` 1), positive.
        box_levels: ``"scale"`` or ``"all"`` (see above).
        head_kl: ``"softmax"`` or ``"sigmoid"`` (see above).
    """

    needs = frozenset({"head_outputs", "priors"})
    head_keys = ("cls_logits",)

    @dataclass(frozen=True)
    class Options(FeatureDistiller.Options):
        fg_weight: Weight = 3.0
        bg_weight: Weight = 12.0
        cls_pos_weight: Weight = 2.0
        cls_neg_weight: Weight = 2.0
        temperature: Positive = 1.0
        box_levels: BoxLevels = "scale"
        head_kl: HeadKL = "softmax"

    def build(self) -> None:
        self.adapters = adaptation_layers(self.student_channels, self.teacher_channels, relu=False)

    def masks(self, inputs: KDInputs) -> dict[str, Tensor]:
        """The object mask ``[N, H, W]`` of every level (``gt_masks`` with this distiller's ``box_levels``)."""
        device = inputs.teacher_feats[self.levels[0]].device
        sizes = {lvl: tuple(inputs.teacher_feats[lvl].shape[-2:]) for lvl in self.levels}
        return gt_masks([b.to(device) for b in inputs.boxes], sizes, self.strides, self.box_levels)

    def compute_terms(self, inputs: KDInputs) -> dict[str, Tensor]:
        """Public ``batch_processor_kd`` with ``neck-decouple`` and ``KL-decouple``: the four weighted terms."""
        masks = self.masks(inputs)
        fg, bg = [], []
        kl_sums, kl_counts = [], []
        for lvl in self.levels:
            teacher = inputs.teacher_feats[lvl]
            mask = masks[lvl].to(teacher.dtype)[:, None]  # [N, 1, H, W]
            error = (self.adapters[lvl](inputs.student_feats[lvl]) - teacher).square()
            channels = teacher.shape[1]
            fg.append((error * mask).sum() / (2 * channels * mask.sum()).clamp_min(1))
            bg.append((error * (1 - mask)).sum() / (2 * channels * (1 - mask).sum()).clamp_min(1))
            anchors = self.priors_per_cell(inputs)[lvl]
            student_logits = inputs.student_head[lvl]["cls_logits"]
            kl = class_kl(student_logits, inputs.teacher_head[lvl]["cls_logits"].detach().to(student_logits.dtype),
                          anchors, self.temperature, self.head_kl)  # [N, A, H, W]
            pos = mask.to(kl.dtype)
            kl_sums.append(torch.stack([(kl * pos).sum(), (kl * (1 - pos)).sum()]))
            kl_counts.append(anchors * torch.stack([pos.sum(), (1 - pos).sum()]))
        kl = torch.stack(kl_sums).sum(dim=0) / torch.stack(kl_counts).sum(dim=0).clamp_min(1) * self.temperature ** 2
        return {
            "fg": self.fg_weight * torch.stack(fg).mean(),
            "bg": self.bg_weight * torch.stack(bg).mean(),
            "cls_pos": self.cls_pos_weight * kl[0],
            "cls_neg": self.cls_neg_weight * kl[1],
        }

    def compute_weight_maps(self, inputs: KDInputs) -> dict[str, dict[str, Tensor]]:
        """The two regions the terms are decoupled into, each level ``[N, H, W]``: ``object mask`` ``M``
        (``masks``; ``fg`` and ``cls_pos`` sum over it) and ``background mask`` ``1 - M`` (``bg`` and ``cls_neg``)."""
        masks = self.masks(inputs)
        return {"object mask": masks, "background mask": {lvl: 1 - m for lvl, m in masks.items()}}
