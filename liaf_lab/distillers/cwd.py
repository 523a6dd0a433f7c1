"""CWD: Channel-wise Knowledge Distillation for Dense Prediction (Shu et al., ICCV 2021).

One loss per FPN level, summed over levels, as mmrazor's ``ChannelWiseDivergence`` (the detection
configs of the authors' code base distil the FPN levels with it):

* Eq. 2: each channel's map becomes a distribution over its ``H x W`` locations,
  ``phi(y_c) = softmax_HW(y_c / T)``, on both sides;
* Eq. 3-4: ``L = T^2 / (N C) * sum_{n, c} KL(phi(y^T_{n,c}) || phi(y^S_{n,c}))``, the teacher's
  distribution the target (KL summed over the locations, averaged over images and channels).

The student is aligned by a 1x1 conv where the channels differ (the paper's channel alignment; the
public detection configs distil 256-channel FPNs on both sides and need none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ..utils.options import Positive, Weight
from .base import FeatureDistiller, KDInputs
from .registry import register_distiller


def spatial_log_softmax(feats: Tensor, temperature: float) -> Tensor:
    """Eq. 2 in log space: ``log softmax_HW(F / T)`` of ``feats`` ``[N, C, H, W]`` -> ``[N, C, H*W]``."""
    return F.log_softmax(feats.flatten(2) / temperature, dim=2)


def cwd_level_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Eq. 3-4 on one level (both ``[N, C, H, W]``, the student aligned): ``T^2 / (N C)`` times the summed
    KL from each teacher channel's spatial distribution to the student's, a scalar."""
    n, c = teacher.shape[:2]
    log_t = spatial_log_softmax(teacher, temperature)
    log_s = spatial_log_softmax(student, temperature)
    kl = F.kl_div(log_s, log_t, reduction="sum", log_target=True)
    return kl * temperature**2 / (n * c)


@register_distiller("cwd", label="CWD")
class CWDDistiller(FeatureDistiller):
    """``L = loss_weight * sum_levels T^2 / (N C) sum_{n,c} KL(phi(T_nc) || phi(S_nc))`` (Eq. 2-4).

    Args (beyond ``FeatureDistiller``'s):
        loss_weight: factor on each level's loss (mmrazor's FPN configs for Faster R-CNN, RetinaNet
            and GFL: 10).
        temperature: ``T`` of the spatial softmax (those configs: 1).

    A 1x1 conv aligns the student where the channels differ (else the identity).
    """

    @dataclass(frozen=True)
    class Options(FeatureDistiller.Options):
        loss_weight: Weight = 10.0
        temperature: Positive = 1.0

    def build(self) -> None:
        self.projectors = self.make_projectors("auto")

    def compute_terms(self, inputs: KDInputs) -> dict[str, Tensor]:
        s, t = inputs.student_feats, inputs.teacher_feats
        total = sum(cwd_level_loss(self.projectors[lvl](s[lvl]), t[lvl], self.temperature) for lvl in self.levels)
        return {self.method_name: self.loss_weight * total}
