"""BCKD: Bridging Cross-task Protocol Inconsistency for Distillation in Dense Object Detection
(Yang et al., ICCV 2023).

Prediction distillation of a dense detector with sigmoid classifiers and box distributions. Facts
follow the public code (TinyTigerPan/BCKD: ``LDHead.loss_single``, ``NovelKDLoss`` in
``mmdet/models/losses/kd_loss.py``, config ``bckd_r50_gflv1_r101_fpn_coco_1x``):

* binary classification KD (public ``novel_kd_loss``): each class logit is a binary classifier whose
  target is the teacher's probability, ``BCE(sigmoid(s), sigmoid(t)) * |sigmoid(t) - sigmoid(s)|^beta``
  summed over classes and locations (the modulating factor keeps its gradient);
* IoU-based localisation KD (public ``loss_score_kd``, a GIoU loss): at every location,
  ``1 - GIoU(B^S, B^T)`` between the student's and the teacher's decoded boxes, weighted by
  ``max_k |sigmoid(t_k) - sigmoid(s_k)|`` (no gradient);
* both summed over the locations of a level and divided by the number of the student's positives
  (``num_total_samples``, at least 1); a level adds its terms only if it holds a positive in the batch
  (the public ``if len(pos_inds) > 0``); summed over levels, times ``cls_weight`` (1) and ``loc_weight`` (4).

Boxes are decoded from GFL's bins: ``anchor centre -/+ integral(bins) * stride``, in units of the
stride as the public code does (GIoU does not change with the unit).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from ..models.dense import mean_over_ranks
from ..utils.options import Positive, Weight
from .base import FeatureDistiller, KDInputs, flat_logits
from .ops import binary_kd, decode_bins
from .registry import register_distiller


def box_weights(student: Tensor, teacher: Tensor) -> Tensor:
    """The localisation KD's weight per prior, ``max_k |sigmoid(t_k) - sigmoid(s_k)|`` without gradient:
    ``[..., K]`` logits -> ``[...]``."""
    return (teacher.detach().sigmoid() - student.detach().sigmoid()).abs().amax(dim=-1)


@register_distiller("bckd", label="BCKD")
class BCKDDistiller(FeatureDistiller):
    """``cls = cls_weight * sum_l sum binary_kd / N_pos``, ``loc = loc_weight * sum_l sum w (1 - GIoU) / N_pos``.

    Args (beyond ``FeatureDistiller``'s; the features are not read):
        cls_weight: weight of the binary classification KD (public 1).
        loc_weight: weight of the IoU-based localisation KD (public 4).
        beta: exponent of the modulating factor (public 1).
    """

    needs = frozenset({"head_outputs", "priors", "assignment"})
    head_keys = ("cls_logits", "box_bins")

    @dataclass(frozen=True)
    class Options(FeatureDistiller.Options):
        cls_weight: Weight = 1.0
        loc_weight: Weight = 4.0
        beta: Positive = 1.0

    def compute_terms(self, inputs: KDInputs) -> dict[str, Tensor]:
        num_pos = mean_over_ranks(sum((inputs.assignment[lvl] >= 0).sum() for lvl in self.levels)).clamp(min=1)
        cls_total = loc_total = 0
        for lvl in self.levels:
            priors = inputs.priors[lvl]
            s_cls = flat_logits(inputs.student_head[lvl]["cls_logits"], priors.shape[0])  # [N, P, K]
            t_cls = flat_logits(inputs.teacher_head[lvl]["cls_logits"].detach(), priors.shape[0]).to(s_cls.dtype)
            s_bins = flat_logits(inputs.student_head[lvl]["box_bins"], priors.shape[0])  # [N, P, 4 (R + 1)]
            t_bins = flat_logits(inputs.teacher_head[lvl]["box_bins"].detach(), priors.shape[0]).to(s_bins.dtype)
            scaled = priors.to(s_bins.dtype) / self.strides[lvl]
            giou = generalized_box_iou_loss(decode_bins(s_bins, scaled), decode_bins(t_bins, scaled), reduction="none")
            weight = box_weights(s_cls, t_cls)  # [N, P]
            has_pos = (inputs.assignment[lvl] >= 0).any().to(s_cls.dtype)
            cls_total = cls_total + has_pos * binary_kd(s_cls, t_cls, self.beta).sum()
            loc_total = loc_total + has_pos * (weight * giou).sum()
        return {"cls": self.cls_weight * cls_total / num_pos, "loc": self.loc_weight * loc_total / num_pos}

    def compute_weight_maps(self, inputs: KDInputs) -> dict[str, dict[str, Tensor]]:
        """``box weight``: the localisation term's weight summed over each cell's priors, ``[N, H, W]`` (0 on a
        level without positives, which adds no term)."""
        out = {}
        for lvl in self.levels:
            n, _, h, w = inputs.student_feats[lvl].shape
            num_priors = inputs.priors[lvl].shape[0]
            weight = box_weights(flat_logits(inputs.student_head[lvl]["cls_logits"], num_priors),
                                 flat_logits(inputs.teacher_head[lvl]["cls_logits"], num_priors))
            has_pos = (inputs.assignment[lvl] >= 0).any().to(weight.dtype)
            out[lvl] = has_pos * weight.view(n, h, w, -1).sum(dim=-1)
        return {"box weight": out}
