"""What each method weights or masks, on real images: the distiller protocol's ``weight_maps`` computed
from a student and a teacher detector, as in a training step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..distillers import FeatureDistiller, KDInputs
from ..engine.steps import DistillStep
from ..models.backbones import eval_mode

__all__ = ["kd_inputs_for", "method_weight_maps"]


@torch.no_grad()
def kd_inputs_for(student: nn.Module, teacher: nn.Module, distiller: FeatureDistiller, images: Sequence[Tensor],
                  targets: Sequence[Mapping[str, Tensor]], seed: int = 0) -> KDInputs:
    """What ``distiller`` reads in a training step on ``images`` (``[3, H, W]`` each) and ``targets``
    (``{"boxes", "labels"}`` in the images' pixels), with both detectors in eval mode.

    Built by ``DistillStep.kd_inputs``, so features, boxes (in the resized input's pixels), head
    outputs and priors are exactly what training gives; a method's random draws come from a
    generator seeded with ``seed``.
    """
    step = DistillStep(student, teacher, distiller)
    with eval_mode(student), eval_mode(distiller):
        _, inputs = step.kd_inputs(list(images), [dict(t) for t in targets])
    if inputs.generator is not None:
        inputs.generator = torch.Generator(inputs.generator.device).manual_seed(seed)
    return inputs


def method_weight_maps(student: nn.Module, teacher: nn.Module, distiller: FeatureDistiller,
                       images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]],
                       seed: int = 0) -> tuple[KDInputs, dict[str, dict[str, Tensor]]]:
    """``(inputs, maps)``: the step's ``KDInputs`` and ``distiller.weight_maps(inputs)`` (map name ->
    level -> ``[N, H_l, W_l]``, on the CPU). Empty maps: the method weights every cell alike."""
    inputs = kd_inputs_for(student, teacher, distiller, images, targets, seed)
    with eval_mode(distiller):
        maps = distiller.weight_maps(inputs)
    return inputs, {name: {lvl: m.detach().float().cpu() for lvl, m in levels.items()} for name, levels in maps.items()}
