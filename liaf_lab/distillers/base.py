"""The base of every feature distiller: FPN levels, strides and the 1x1 projector ``f_phi``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..validation import check_boxes, check_feature_dict, check_image_size, check_level_size, check_values

Channels = int | Mapping[str, int]


def _per_level(name: str, value: Channels, levels: Sequence[str]) -> dict[str, int]:
    if isinstance(value, Mapping):
        missing = [lvl for lvl in levels if lvl not in value]
        if missing:
            raise ValueError(f"{name} lacks the levels {missing}")
        return {lvl: int(value[lvl]) for lvl in levels}
    return {lvl: int(value) for lvl in levels}


def feature_mse(teacher: Tensor, student: Tensor) -> Tensor:
    """Eq. 9 (and Eq. 1 with ``M = 1``): ``(1/CHW) ||F^T - f_phi(F^S)||^2`` averaged over the batch.

    Both arguments are ``[N, C, H, W]`` and already masked and projected.
    """
    return F.mse_loss(student, teacher, reduction="mean")


class FeatureDistiller(nn.Module):
    """Per-level 1x1 projectors and input checks shared by all FPN feature distillers.

    Args:
        student_channels: C of the student's levels (one int for all levels, or per level).
        teacher_channels: C of the teacher's levels.
        strides: level name -> input pixels per cell; the levels that are distilled.
        loss_weight: factor on the loss summed over levels.
        projector: learn a 1x1 conv ``f_phi`` per level (FitNet's adaptation layer). Without it
            the channels of student and teacher must agree.
    """

    method_name = "base"

    def __init__(
        self,
        student_channels: Channels,
        teacher_channels: Channels,
        strides: Mapping[str, float],
        loss_weight: float = 1.0,
        projector: bool = True,
    ) -> None:
        super().__init__()
        if not strides:
            raise ValueError("strides must name at least one level, e.g. {'0': 8, '1': 16}")
        self.strides = {str(k): float(v) for k, v in strides.items()}
        self.levels = list(self.strides)
        self.student_channels = _per_level("student_channels", student_channels, self.levels)
        self.teacher_channels = _per_level("teacher_channels", teacher_channels, self.levels)
        self.loss_weight = loss_weight
        if not projector:
            bad = {l: (self.student_channels[l], self.teacher_channels[l]) for l in self.levels
                   if self.student_channels[l] != self.teacher_channels[l]}
            if bad:
                raise ValueError(f"student and teacher channels differ at levels {bad} (student, teacher); "
                                 "use projector=True to learn a 1x1 projection")
        self.projectors = nn.ModuleDict({
            lvl: nn.Conv2d(self.student_channels[lvl], self.teacher_channels[lvl], 1) if projector else nn.Identity()
            for lvl in self.levels
        })

    def at_levels(self, feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The levels of ``feats`` this distiller handles."""
        return {lvl: feats[lvl] for lvl in self.levels}

    def check_strides(self, name: str, feats: Mapping[str, Tensor], image_size: tuple[int, int] | None) -> None:
        """With ``image_size`` (the padded batch input H, W), check each level's grid against its stride."""
        if image_size is None:
            return
        image_size = check_image_size(image_size)
        for lvl in self.levels:
            check_level_size(f"{name}[{lvl!r}]", feats[lvl], self.strides[lvl], image_size)

    def check_inputs(
        self,
        student_feats: Mapping[str, Tensor],
        teacher_feats: Mapping[str, Tensor],
        boxes: Sequence[Tensor],
        image_size: tuple[int, int] | None = None,
    ) -> None:
        """Validate levels, ranks, channels, batch and grid sizes, strides, finiteness and boxes.

        Everything but finiteness and box validity is read from shapes; those two take one device
        read for all features and boxes together (``check_values``).
        """
        check_feature_dict("student_feats", student_feats, self.levels, values=False)
        check_feature_dict("teacher_feats", teacher_feats, self.levels, values=False)
        for lvl in self.levels:
            s, t = student_feats[lvl], teacher_feats[lvl]
            if s.shape[1] != self.student_channels[lvl]:
                raise ValueError(f"student_feats[{lvl!r}] has {s.shape[1]} channels, expected {self.student_channels[lvl]}")
            if t.shape[1] != self.teacher_channels[lvl]:
                raise ValueError(f"teacher_feats[{lvl!r}] has {t.shape[1]} channels, expected {self.teacher_channels[lvl]}")
            if s.shape[0] != t.shape[0]:
                raise ValueError(f"student_feats[{lvl!r}] {tuple(s.shape)} and teacher_feats[{lvl!r}] "
                                 f"{tuple(t.shape)} differ in batch size")
            if s.shape[2:] != t.shape[2:]:
                raise ValueError(f"student_feats[{lvl!r}] {tuple(s.shape)} and teacher_feats[{lvl!r}] "
                                 f"{tuple(t.shape)} differ in spatial size: teacher and student must see the same "
                                 "batched input (min_size and max_size of teacher and student must match)")
        self.check_strides("student_feats", student_feats, image_size)
        boxes = check_boxes("boxes", boxes, num_images=teacher_feats[self.levels[0]].shape[0], values=False)
        check_values({"student_feats": self.at_levels(student_feats), "teacher_feats": self.at_levels(teacher_feats)},
                     {"boxes": boxes})

    def forward(
        self,
        student_feats: Mapping[str, Tensor],
        teacher_feats: Mapping[str, Tensor],
        boxes: Sequence[Tensor],
        *,
        image_size: tuple[int, int] | None = None,
    ) -> Tensor:
        """Return the distillation loss (a scalar), summed over levels and times ``loss_weight``.

        Args:
            student_feats, teacher_feats: level name -> ``[N, C, H_l, W_l]``.
            boxes: N tensors ``[n_b, 4]`` in input pixels.
            image_size: the padded batch input ``(H, W)``; if given, every level must have the grid
                its stride gives (``ceil`` or ``floor`` of ``H / stride``), else a ``ValueError``.
        """
        self.check_inputs(student_feats, teacher_feats, boxes, image_size)
        total = sum(self.level_loss(lvl, student_feats[lvl], teacher_feats[lvl].detach(), boxes) for lvl in self.levels)
        return self.loss_weight * total

    def level_loss(self, level: str, student: Tensor, teacher: Tensor, boxes: Sequence[Tensor]) -> Tensor:
        raise NotImplementedError
