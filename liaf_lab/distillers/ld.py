"""LD: Localization Distillation for Dense Object Detection (Zheng et al., CVPR 2022).

The student's box-bin distributions (GFL's distribution head) learn the teacher's at the student's
positive locations. Facts follow mmdetection's ``LDHead.loss_single`` and
``KnowledgeDistillationKLDivLoss`` with its ``ld_r18_gflv1_r101_fpn_coco_1x`` settings (``T`` 10, weight
0.25): the main-region term of the authors' code (HikariTJU/LD), whose full configs add an LD term on the
"valuable localization region", classification KD (``T`` 2, weight 10) and feature imitation; those
are not part of this distiller.

* Eq. (LD), per side ``e`` of a box (left, top, right, bottom) at a prior ``p``:
  ``L_e = T^2 * KL(softmax(z^T_e / T) || softmax(z^S_e / T)) / (R + 1)`` over the ``R + 1`` bins (the
  public loss averages the elementwise KL over the bins, ``.mean(1)``);
* the public weighting: each positive ``p`` of the student's assignment weighs ``w_p``, the
  student's largest class score (sigmoid, no gradient), and
  ``L = loss_weight * sum_levels sum_{p positive} w_p * sum_e L_e / 4`` (``avg_factor=4.0``: the sum
  over the positives is not normalised by their number or weight; ``loss_ld`` is summed over levels).

It reads the head outputs ``box_bins`` (both sides) and ``cls_logits`` (the student's), and the
student's ``assignment``; detectors that give them are listed in docs/distillers.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..utils.options import Positive, Weight
from .base import FeatureDistiller, KDInputs, flat_logits
from .ops import bin_kl
from .registry import register_distiller


@register_distiller("ld", label="LD")
class LDDistiller(FeatureDistiller):
    """``L = loss_weight * sum_levels sum_{p pos} w_p * sum_e L_e / 4`` (see the module docstring).

    Args (beyond ``FeatureDistiller``'s; the features are not read):
        loss_weight: factor on the loss (public 0.25).
        temperature: ``T`` of the softened bin distributions (public 10).
    """

    needs = frozenset({"head_outputs", "assignment"})
    head_keys = ("cls_logits", "box_bins")

    @dataclass(frozen=True)
    class Options(FeatureDistiller.Options):
        loss_weight: Weight = 0.25
        temperature: Positive = 10.0

    def positive_weights(self, inputs: KDInputs, level: str) -> Tensor:
        """``w_p`` at the student's positives of ``level``, 0 elsewhere: ``[N, P]`` without gradient."""
        matched = inputs.assignment[level]
        scores = flat_logits(inputs.student_head[level]["cls_logits"].detach(), matched.shape[1]).sigmoid()
        return scores.amax(dim=-1) * (matched >= 0).to(scores.dtype)

    def compute_terms(self, inputs: KDInputs) -> dict[str, Tensor]:
        total = 0
        for lvl in self.levels:
            num_priors = inputs.assignment[lvl].shape[1]
            student = flat_logits(inputs.student_head[lvl]["box_bins"], num_priors)  # [N, P, 4 (R + 1)]
            teacher = flat_logits(inputs.teacher_head[lvl]["box_bins"].detach(), num_priors).to(student.dtype)
            n, p, d = student.shape
            kl = bin_kl(student.view(n, p, 4, d // 4), teacher.view(n, p, 4, d // 4), self.temperature)  # [N, P, 4]
            total = total + (self.positive_weights(inputs, lvl)[..., None] * kl).sum() / 4
        return {self.method_name: self.loss_weight * total}

    def compute_weight_maps(self, inputs: KDInputs) -> dict[str, dict[str, Tensor]]:
        """``positive weight``: ``w_p`` summed over each cell's priors (0 off the student's positives), ``[N, H, W]``."""
        out = {}
        for lvl in self.levels:
            n, _, h, w = inputs.student_feats[lvl].shape
            out[lvl] = self.positive_weights(inputs, lvl).view(n, h, w, -1).sum(dim=-1)
        return {"positive weight": out}
