"""Training steps of the LIAF-KD recipe, each an ``nn.Module``: ``step(images, targets) -> dict of losses``.

Being modules, they can be wrapped in ``DistributedDataParallel`` as a whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..distillers import FeatureDistiller, LIAFDistiller
from ..models.backbones import fpn_levels
from ..models.detectors import fpn_strides, match_levels, shared_strides
from ..models.taps import detector_features, loss_on_features, run_detector


def freeze(model: nn.Module) -> nn.Module:
    """No gradients and BatchNorm in eval mode (the frozen teacher of stages 1 and 2)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class DetectorStep(nn.Module):
    """Plain detector training (the teacher, or the student without KD): the task loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Sequence[Tensor], targets: Sequence[dict]) -> dict[str, Tensor]:
        return run_detector(self.model, list(images), list(targets)).losses


class FrozenTeacherStep(nn.Module):
    """A step that holds a frozen teacher: no gradients, and BatchNorm kept in eval mode by ``train()``."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = freeze(teacher)

    def train(self, mode: bool = True) -> FrozenTeacherStep:
        super().train(mode)
        self.teacher.eval()
        return self


class SelectorStep(FrozenTeacherStep):
    """Stage 1, Eq. 5: ``L_task^T(A) + mu * L_div(E)`` with the teacher frozen and only the selectors learning.

    The teacher's FPN features are masked by the teacher's own instance scores and fed to the
    teacher's own head; the task loss flows back through the head into the selectors. The
    distiller's levels (the student's) are matched to the teacher's by stride (``match_levels``).
    """

    def __init__(self, teacher: nn.Module, distiller: LIAFDistiller) -> None:
        super().__init__(teacher)
        self.distiller = distiller
        self.levels = match_levels(distiller.strides, teacher)  # distiller level -> teacher level

    def forward(self, images: Sequence[Tensor], targets: Sequence[dict]) -> dict[str, Tensor]:
        with torch.no_grad():
            image_list, targets_t, feats = detector_features(self.teacher, list(images), [dict(t) for t in targets])
        masked, div = self.distiller.stage1({lvl: feats[src] for lvl, src in self.levels.items()},
                                            [t["boxes"] for t in targets_t],
                                            image_size=tuple(image_list.tensors.shape[-2:]))
        masked = {**feats, **{src: masked[lvl] for lvl, src in self.levels.items()}}
        losses = loss_on_features(self.teacher, image_list, targets_t, masked)
        return {**losses, "diversity": div}


class DistillStep(FrozenTeacherStep):
    """Stage 2: the student's task loss plus the feature distiller's loss against the frozen teacher.

    The teacher's backbone runs on the student's batched, resized input (one transform for both),
    so features and the transformed boxes line up cell for cell. The distiller's levels must be
    student levels; each is paired with the teacher level of the same stride (``match_levels``),
    so teacher and student may be different detectors (e.g. a Faster R-CNN teacher, levels "0" to
    "pool" at strides 4..64, and a RetinaNet student, "0" to "p7" at 8..128).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, distiller: FeatureDistiller) -> None:
        for attr in ("image_mean", "image_std", "min_size", "max_size"):
            s_value, t_value = (tuple(v) if isinstance(v, (list, tuple)) else v
                                for v in (getattr(student.transform, attr), getattr(teacher.transform, attr)))
            if s_value != t_value:
                raise ValueError(f"student and teacher transforms differ in {attr} (student {s_value}, teacher "
                                 f"{t_value}); the teacher runs on the student's resized input, so build both "
                                 "with the same input size and normalisation (config: [input])")
        student_strides = fpn_strides(student)
        foreign = [lvl for lvl, s in distiller.strides.items() if student_strides.get(lvl) != s]
        if foreign:
            raise ValueError(
                f"distiller levels {foreign} are not student levels of the same stride: distiller levels "
                f"{distiller.strides}, student ({type(student).__name__}) levels {student_strides}; build the "
                f"distiller with strides={shared_strides(student, teacher)} (shared_strides(student, teacher))"
            )
        super().__init__(teacher)
        self.student = student
        self.distiller = distiller
        self.levels = match_levels(distiller.strides, teacher)  # distiller level -> teacher level

    def forward(self, images: Sequence[Tensor], targets: Sequence[dict]) -> dict[str, Tensor]:
        out = run_detector(self.student, list(images), list(targets))
        with torch.no_grad():
            feats = fpn_levels(self.teacher.backbone, out.image_list.tensors)
        t_feats = {lvl: feats[src] for lvl, src in self.levels.items()}
        boxes = [t["boxes"] for t in out.targets]
        kd = self.distiller(dict(out.features), dict(t_feats), boxes, image_size=tuple(out.image_list.tensors.shape[-2:]))
        return {**out.losses, f"kd_{self.distiller.method_name}": kd}
