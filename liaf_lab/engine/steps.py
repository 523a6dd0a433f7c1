"""Training steps, each an ``nn.Module``: ``step(images, targets) -> dict of named losses``.

No step knows a method: ``Stage1Step`` and ``DistillStep`` follow the distiller protocol
(``liaf_lab.distillers.base``).

Being modules, they can be wrapped in ``DistributedDataParallel`` as a whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn

from ..distillers import FeatureDistiller, KDInputs
from ..models.backbones import fpn_levels
from ..models.detectors import detector_adapter, families_with, fpn_strides, match_levels, pair_levels, shared_strides
from ..models.taps import (
    head_from_split, head_outputs, head_split_depth, loss_on_features, prior_assignment, run_detector, tower_features,
)
from .teacher_cache import TeacherCache


def freeze(model: nn.Module) -> nn.Module:
    """No gradients and BatchNorm in eval mode (the frozen teacher of stages 1 and 2)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def check_detectors_serve(distiller: FeatureDistiller, student: nn.Module, teacher: nn.Module) -> None:
    """A one-line ``ValueError`` naming the method, the detector and what it lacks, unless the detectors give
    what the distiller ``needs`` (as their adapters say): its ``head_keys`` on both sides, the student's
    assignment of priors, a head split on both sides."""
    if "head_outputs" in distiller.needs:
        for role, model in (("student", student), ("teacher", teacher)):
            gives = detector_adapter(model).head_outputs
            missing = [k for k in distiller.head_keys if k not in gives]
            if missing:
                raise ValueError(f"distiller {distiller.method_name!r} reads the head outputs {missing}, which the "
                                 f"{role} ({type(model).__name__}) does not give (it gives {list(gives)})")
    if "assignment" in distiller.needs and not detector_adapter(student).gives_assignment:
        raise ValueError(f"distiller {distiller.method_name!r} reads the student's assignment of priors to boxes, which "
                         f"the student ({type(student).__name__}) does not give "
                         f"(given by: {families_with('gives_assignment')})")
    if "head_split" in distiller.needs:
        for role, model in (("student", student), ("teacher", teacher)):
            if not detector_adapter(model).splits_head:
                raise ValueError(f"distiller {distiller.method_name!r} splits the heads after a tower conv, which the "
                                 f"{role} ({type(model).__name__}) does not allow "
                                 f"(given by: {families_with('splits_head')})")
            depth = head_split_depth(model)
            if not 0 <= distiller.split_index <= depth:
                raise ValueError(f"distiller {distiller.method_name!r} splits the heads after conv "
                                 f"{distiller.split_index}, but the {role}'s towers have {depth} convs")


class DetectorStep(nn.Module):
    """Plain detector training (the teacher, or the student without KD): the task loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Sequence[Tensor], targets: Sequence[dict]) -> dict[str, Tensor]:
        return run_detector(self.model, list(images), list(targets)).losses


class FrozenTeacherStep(nn.Module):
    """A step that holds a frozen teacher: no gradients, and BatchNorm kept in eval mode by ``train()``.

    With a ``teacher_cache`` the teacher's FPN levels are read from it when a run computed them for the same
    input before (``TeacherCache``: exact, the student trains bit for bit as without it).
    """

    def __init__(self, teacher: nn.Module, teacher_cache: TeacherCache | None = None) -> None:
        super().__init__()
        self.teacher = freeze(teacher)
        self.teacher_cache = teacher_cache

    def train(self, mode: bool = True) -> FrozenTeacherStep:
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_levels(self, images: Tensor) -> dict[str, Tensor]:
        """The teacher's FPN levels ``{level: [N, C, H_l, W_l]}`` for the batched input ``images`` ``[N, 3, H, W]``."""
        if self.teacher_cache is not None:
            return self.teacher_cache.fpn_levels(self.teacher.backbone, images)
        return fpn_levels(self.teacher.backbone, images)


class Stage1Step(FrozenTeacherStep):
    """Stage 1 of a two-stage method (LIAF-KD Eq. 5, MasKD's mask learning), with the teacher frozen.

    The distiller turns the teacher's FPN features into one or more views (``Stage1Output.views``);
    each view runs through the teacher's own head, and its task loss, named ``<view>_<loss>``, flows
    back into the distiller's stage-1 modules, with the distiller's own terms (e.g. ``diversity``).
    The distiller's levels (the student's) are matched to the teacher's by stride (``match_levels``).
    """

    def __init__(self, teacher: nn.Module, distiller: FeatureDistiller, teacher_cache: TeacherCache | None = None) -> None:
        if not distiller.two_stage:
            raise ValueError(f"distiller {distiller.method_name!r} has no stage 1 to learn")
        super().__init__(teacher, teacher_cache)
        self.distiller = distiller
        self.levels = match_levels(distiller.strides, teacher)  # distiller level -> teacher level

    def forward(self, images: Sequence[Tensor], targets: Sequence[dict]) -> dict[str, Tensor]:
        with torch.no_grad():
            image_list, targets_t = self.teacher.transform(list(images), [dict(t) for t in targets])
        feats = self.teacher_levels(image_list.tensors)
        out = self.distiller.stage1(pair_levels(feats, self.levels),
                                    [t["boxes"] for t in targets_t], labels=[t["labels"] for t in targets_t],
                                    image_size=tuple(image_list.tensors.shape[-2:]))
        losses: dict[str, Tensor] = {}
        for view, masked in out.views.items():
            replaced = {**feats, **{src: masked[lvl] for lvl, src in self.levels.items()}}
            task = loss_on_features(self.teacher, image_list, targets_t, replaced)
            losses.update({f"{view}_{k}": v for k, v in task.items()})
        return {**losses, **out.terms}


class DistillStep(FrozenTeacherStep):
    """Stage 2: the student's task loss plus the feature distiller's loss against the frozen teacher.

    The teacher's backbone runs on the student's batched, resized input (one transform for both),
    so features and the transformed boxes line up cell for cell. The distiller's levels must be
    student levels; each is paired with the teacher level of the same stride (``match_levels``),
    so teacher and student may be different detectors (e.g. a Faster R-CNN teacher, levels "0" to
    "pool" at strides 4..64, and a RetinaNet student, "0" to "p7" at 8..128).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, distiller: FeatureDistiller,
                 teacher_cache: TeacherCache | None = None) -> None:
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
        check_detectors_serve(distiller, student, teacher)
        super().__init__(teacher, teacher_cache)
        self.student = student
        self.distiller = distiller
        self.levels = match_levels(distiller.strides, teacher)  # distiller level -> teacher level

    def forward(self, images: Sequence[Tensor], targets: Sequence[dict]) -> dict[str, Tensor]:
        """The student's task losses and the distiller's terms, each named ``kd_<term>``."""
        losses, inputs = self.kd_inputs(images, targets)
        terms = self.distiller.loss_terms(inputs)
        return {**losses, **{f"kd_{k}": v for k, v in terms.items()}}

    def kd_inputs(self, images: Sequence[Tensor], targets: Sequence[dict]) -> tuple[dict[str, Tensor], KDInputs]:
        """The student's task losses and what the distiller reads for this batch (``KDInputs``).

        Head outputs, priors and a generator are computed only for a distiller that ``needs`` them;
        the generator is seeded from torch's default generator, which the engine seeds from the run's
        seed and iteration, so random draws replay exactly on resume.
        """
        out = run_detector(self.student, list(images), list(targets))
        needs, split = self.distiller.needs, self.distiller.split_index
        feats = self.teacher_levels(out.image_list.tensors)
        t_feats = pair_levels(feats, self.levels)
        with torch.no_grad():
            t_head = head_outputs(self.teacher, out.image_list, feats)[0] if "head_outputs" in needs else None
            t_tower = tower_features(self.teacher, t_feats, split) if "head_split" in needs else None
        generator = None
        if "generator" in needs:
            device = out.image_list.tensors.device
            generator = torch.Generator(device).manual_seed(int(torch.randint(2**62, ())))
        inputs = KDInputs(
            dict(out.features), t_feats,
            [t["boxes"] for t in out.targets], [t["labels"] for t in out.targets],
            tuple(out.image_list.tensors.shape[-2:]), list(out.image_list.image_sizes),
            student_head={lvl: out.head_outputs[lvl] for lvl in self.levels} if t_head is not None else None,
            teacher_head=pair_levels(t_head, self.levels) if t_head is not None else None,
            priors={lvl: out.priors[lvl] for lvl in self.levels} if "priors" in needs else None,
            generator=generator,
            assignment=({lvl: m for lvl, m in prior_assignment(self.student, out.priors, out.targets).items()
                         if lvl in self.levels} if "assignment" in needs else None),
            student_tower=(tower_features(self.student, {lvl: out.features[lvl] for lvl in self.levels}, split)
                           if "head_split" in needs else None),
            teacher_tower=t_tower,
            teacher_head_from=(partial(head_from_split, self.teacher, split=split, levels=self.levels)
                               if "head_split" in needs else None),
        )
        return out.losses, inputs
