"""Training steps of the LIAF-KD recipe, each an ``nn.Module``: ``step(images, targets) -> dict of losses``.

Being modules, they can be wrapped in ``DistributedDataParallel`` as a whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..distillers import FeatureDistiller, LIAFDistiller
from ..models.taps import loss_on_features, run_detector


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
    teacher's own head; the task loss flows back through the head into the selectors.
    """

    def __init__(self, teacher: nn.Module, distiller: LIAFDistiller) -> None:
        super().__init__(teacher)
        self.distiller = distiller

    def forward(self, images: Sequence[Tensor], targets: Sequence[dict]) -> dict[str, Tensor]:
        image_list, targets_t = self.teacher.transform(list(images), [dict(t) for t in targets])
        with torch.no_grad():
            feats = self.teacher.backbone(image_list.tensors)
        masked, div = self.distiller.stage1(feats, [t["boxes"] for t in targets_t])
        losses = loss_on_features(self.teacher, image_list, targets_t, masked)
        return {**losses, "diversity": div}


class DistillStep(FrozenTeacherStep):
    """Stage 2: the student's task loss plus the feature distiller's loss against the frozen teacher.

    The teacher's backbone runs on the student's batched, resized input (one transform for both),
    so features and the transformed boxes line up cell for cell.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, distiller: FeatureDistiller) -> None:
        for attr in ("image_mean", "image_std"):
            if list(getattr(student.transform, attr)) != list(getattr(teacher.transform, attr)):
                raise ValueError(f"student and teacher normalise images differently ({attr}); "
                                 "build both with the same transform settings")
        super().__init__(teacher)
        self.student = student
        self.distiller = distiller

    def forward(self, images: Sequence[Tensor], targets: Sequence[dict]) -> dict[str, Tensor]:
        out = run_detector(self.student, list(images), list(targets))
        with torch.no_grad():
            t_feats = self.teacher.backbone(out.image_list.tensors)
        boxes = [t["boxes"] for t in out.targets]
        kd = self.distiller(dict(out.features), dict(t_feats), boxes)
        return {**out.losses, f"kd_{self.distiller.method_name}": kd}
