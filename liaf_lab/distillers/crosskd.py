"""CrossKD: Cross-Head Knowledge Distillation for Object Detection (Wang et al., CVPR 2024).

The student's head-tower features at a split are passed through the rest of the frozen teacher's head,
and these cross-head predictions are distilled towards the teacher's own. Facts follow the public code
(jbwang1997/CrossKD, ``CrossKDGFL`` and ``mmdet/models/losses/kd_loss.py``, config
``crosskd_r50_gflv1_r101-2x-ms_fpn_1x_coco``; its licence is non-commercial, so this file is written
from those facts, not from the code):

* the split (public ``reused_teacher_head_idx`` 3): each tower's output after its 3rd conv and norm,
  before the activation; the rest is the teacher's (activation, remaining convs, output convs, scale);
* ``align_scale``: each student channel is standardised over batch and space (unbiased deviation, +1e-6)
  and given the teacher's channel mean and deviation at the split (no gradient into the teacher's);
* classification (``KDQualityFocalLoss``, beta 1, weight 1): ``BCE(c^X, sigmoid(c^T)) |sigmoid(c^X) -
  sigmoid(c^T)|^beta`` summed over classes and locations, over the number of the student's positives;
* bins (``KnowledgeDistillationKLDivLoss``, ``class_reduction="sum"``, T 1, weight 3): per side the KL
  from the teacher's bins to the cross-head's, summed over the bins, times ``T^2``, weighted by
  ``w = max_k sigmoid(c^T_k)`` at every location, summed and divided by 4;
* boxes (``GIoULoss``, weight 2): ``1 - GIoU`` of the two decoded boxes, weighted by ``w``;
* the bin and box terms are divided by the sum of ``w`` over all distilled locations (``kd_avg_factor``).

Where student and teacher heads differ in width, a 1x1 conv (trained in stage 2) maps the student's
tower features to the teacher's channels before ``align_scale``; the public configs have equal widths.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

from ..models.dense import mean_over_ranks
from ..utils.options import NonNegativeInt, Positive, Weight
from .base import FeatureDistiller, KDInputs, flat_logits
from .ops import bin_kl, binary_kd, channel_standardise, decode_bins
from .registry import register_distiller

BRANCHES = ("cls", "reg")


def align_scale(student: Tensor, teacher: Tensor) -> Tensor:
    """Public ``align_scale``: the student ``[N, C, H, W]`` standardised per channel over ``N, H, W`` and
    rescaled to the teacher's channel mean and (unbiased) deviation -> ``[N, C, H, W]``."""
    dims = (0, 2, 3)
    return channel_standardise(student) * teacher.std(dim=dims, keepdim=True) + teacher.mean(dim=dims, keepdim=True)


@register_distiller("crosskd", label="CrossKD")
class CrossKDDistiller(FeatureDistiller):
    """``cls + reg + box`` on the cross-head predictions (see the module docstring).

    Args (beyond ``FeatureDistiller``'s; the FPN features are not read):
        split: the tower conv after which the student's features enter the teacher's head (public 3;
            0: the FPN features, before the towers).
        cls_weight: weight of the classification term (public 1).
        reg_weight: weight of the bin KL term (public 3).
        box_weight: weight of the GIoU term (public 2).
        temperature: ``T`` of the bin KL (public 1).
        beta: exponent of the classification term's modulating factor (public 1).
    """

    needs = frozenset({"head_outputs", "priors", "assignment", "head_split"})
    head_keys = ("cls_logits", "box_bins")

    @dataclass(frozen=True)
    class Options(FeatureDistiller.Options):
        split: NonNegativeInt = 3  # the tower conv after which the heads are split
        cls_weight: Weight = 1.0
        reg_weight: Weight = 3.0
        box_weight: Weight = 2.0
        temperature: Positive = 1.0
        beta: Positive = 1.0

    def build(self) -> None:
        self.split_index = self.split
        self.projectors = nn.ModuleDict({branch: self.make_projectors("auto") for branch in BRANCHES})

    def cross_head(self, inputs: KDInputs) -> Mapping[str, Mapping[str, Tensor]]:
        """The student's tower features, projected and ``align_scale``-d, through the teacher's head from the
        split on: level -> ``{"cls_logits", "box_bins"}`` (gradient into the student and the projectors)."""
        aligned = {lvl: {b: align_scale(self.projectors[b][lvl](inputs.student_tower[lvl][b]),
                                        inputs.teacher_tower[lvl][b].detach()) for b in BRANCHES}
                   for lvl in self.levels}
        return inputs.teacher_head_from(aligned)

    def compute_terms(self, inputs: KDInputs) -> dict[str, Tensor]:
        cross = self.cross_head(inputs)
        num_pos = mean_over_ranks(sum((inputs.assignment[lvl] >= 0).sum() for lvl in self.levels)).clamp(min=1)
        cls_total = reg_total = box_total = weight_total = 0
        for lvl in self.levels:
            priors = inputs.priors[lvl]
            x_cls = flat_logits(cross[lvl]["cls_logits"], priors.shape[0])  # [N, P, K]
            t_cls = flat_logits(inputs.teacher_head[lvl]["cls_logits"].detach(), priors.shape[0]).to(x_cls.dtype)
            x_bins = flat_logits(cross[lvl]["box_bins"], priors.shape[0])  # [N, P, 4 (R + 1)]
            t_bins = flat_logits(inputs.teacher_head[lvl]["box_bins"].detach(), priors.shape[0]).to(x_bins.dtype)
            n, p, d = x_bins.shape
            weight = t_cls.sigmoid().amax(dim=-1)  # [N, P]
            kl = bin_kl(x_bins.view(n, p, 4, d // 4), t_bins.view(n, p, 4, d // 4), self.temperature) * (d // 4)
            scaled = priors.to(x_bins.dtype) / self.strides[lvl]
            giou = generalized_box_iou_loss(decode_bins(x_bins, scaled), decode_bins(t_bins, scaled), reduction="none")
            cls_total = cls_total + binary_kd(x_cls, t_cls, self.beta).sum()
            reg_total = reg_total + (weight[..., None] * kl).sum() / 4
            box_total = box_total + (weight * giou).sum()
            weight_total = weight_total + weight.sum()
        return {"cls": self.cls_weight * cls_total / num_pos, "reg": self.reg_weight * reg_total / weight_total,
                "box": self.box_weight * box_total / weight_total}

    def compute_weight_maps(self, inputs: KDInputs) -> dict[str, dict[str, Tensor]]:
        """``box weight``: ``w = max_k sigmoid(c^T_k)``, the bin and box terms' weight, summed over each cell's
        priors, ``[N, H, W]``."""
        out = {}
        for lvl in self.levels:
            n, _, h, w = inputs.student_feats[lvl].shape
            scores = flat_logits(inputs.teacher_head[lvl]["cls_logits"], inputs.priors[lvl].shape[0]).sigmoid()
            out[lvl] = scores.amax(dim=-1).view(n, h, w, -1).sum(dim=-1)
        return {"box weight": out}
