"""Literal reference of ACAM-KD: the paper's Eq. 2-9 with explicit matrices, an explicit softmax over the keys and
Python loops over images, masks, channels and cells."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from liaf_lab.distillers.acam import ACAMDistiller
from liaf_lab.distillers.ops import DICE_EPS

from .common import ref_align, ref_sigmoid


def ref_dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum()


def ref_eq8(masks: list[Tensor]) -> Tensor:
    """Eq. 8 literally: ``2 sum_i sum_{j != i} M_i . M_j / (sum_i M_i^2 + sum_j M_j^2)``."""
    count = len(masks)
    numerator = sum(ref_dot(masks[i], masks[j]) for i in range(count) for j in range(count) if j != i)
    return 2 * numerator / (sum(ref_dot(m, m) for m in masks) + sum(ref_dot(m, m) for m in masks))


def ref_pairwise_dice(masks: list[Tensor]) -> Tensor:
    """MasKD's public ``dice_coeff`` for one image: mean over ordered pairs of ``2 a.b / (a.a + eps + b.b + eps)``."""
    count = len(masks)
    norm = [ref_dot(m, m) for m in masks]
    values = [2 * ref_dot(masks[i], masks[j]) / (norm[i] + DICE_EPS + norm[j] + DICE_EPS)
              for i in range(count) for j in range(count) if j != i]
    return sum(values) / len(values)


def ref_image(s: Tensor, t: Tensor, masking: nn.Module, channel_units: str, detach: str, scale: float | None = None):
    """Eq. 2-7 for one image: ``s`` the aligned student and ``t`` the teacher, both ``[C, H, W]``.

    Returns the channel and spatial masks (lists of M tensors ``[C]`` and ``[HW]``) and, per mask, the
    numerators and normalisers of Eq. 6 and Eq. 7.
    """
    c = t.shape[0]
    S, T = s.reshape(c, -1), t.reshape(c, -1)  # [C, HW]
    cells = S.shape[1]
    kv = S.detach() if detach == "student" else S
    Q = masking.query.weight @ T + masking.query.bias[:, None]  # Eq. 2: [C_q, HW]
    K = masking.key.weight @ kv + masking.key.bias[:, None]
    V = masking.value.weight @ kv + masking.value.bias[:, None]  # [C, HW]
    scale = 1 / math.sqrt(Q.shape[0]) if scale is None else scale
    logits = (Q.T @ K) * scale  # Eq. 3 before the softmax: [HW queries, HW keys]
    rows = []
    for p in range(cells):  # the softmax over the keys, one query at a time
        e = torch.exp(logits[p] - logits[p].max())
        rows.append(e / e.sum())
    A = torch.stack(rows)  # [HW, HW], each row sums to 1
    fused = V @ A.T  # Eq. 4: F_fused[:, p] = sum_q A[p, q] V[:, q], [C, HW]
    v = sum(fused[:, p] for p in range(cells)) / cells  # spatial average pooling: [C]
    num_masks = masking.spatial_units.shape[0]
    channel, spatial = [], []
    for m in range(num_masks):  # Eq. 5
        unit = masking.channel_units[m]
        channel.append(torch.stack([ref_sigmoid((unit if channel_units == "scalar" else unit[k]) * v[k])
                                    for k in range(c)]))
        spatial.append(torch.stack([ref_sigmoid(ref_dot(masking.spatial_units[m], fused[:, p])) for p in range(cells)]))
    D = T - S
    num_c, den_c, num_s, den_s = [], [], [], []
    for m in range(num_masks):
        num_c.append(sum(((channel[m][k] * D[k]) ** 2).sum() for k in range(c)))  # Eq. 6 numerator
        den_c.append(cells * sum(channel[m][k] for k in range(c)))
        num_s.append(sum(((spatial[m][p] * D[:, p]) ** 2).sum() for p in range(cells)))  # Eq. 7 numerator
        den_s.append(c * sum(spatial[m][p] for p in range(cells)))
    return channel, spatial, (num_c, den_c, num_s, den_s)


def ref_acam_terms(student, teacher, d: ACAMDistiller, scale: float | None = None, detach_teacher: bool = True,
                   **override) -> dict[str, Tensor]:
    """Eq. 9 without the task loss, literally: per level, per image Eq. 2-8, then the reductions.

    ``override`` replaces options of ``d``; ``scale`` the factor of Eq. 3 (default ``1 / sqrt(C_q)``).
    """
    o = {"channel_units": d.channel_units, "detach": d.detach, "dice_masks": d.dice_masks, "dice_form": d.dice_form,
         "batch_reduction": d.batch_reduction, "level_reduction": d.level_reduction, "alpha": d.alpha,
         "lambda_div": d.lambda_div, **override}
    per_level = []
    for lvl in d.levels:
        s = ref_align(student[lvl], d.projectors[lvl])
        t = teacher[lvl].detach() if detach_teacher else teacher[lvl]
        images = [ref_image(s[n], t[n], d.masking[lvl], o["channel_units"], o["detach"], scale)
                  for n in range(t.shape[0])]
        num_masks = len(images[0][0])
        losses = []
        for which in (0, 2):  # (numerator, normaliser) of Eq. 6, then of Eq. 7
            if o["batch_reduction"] == "image":
                per_image = [sum(parts[which][m] / parts[which + 1][m] for m in range(num_masks)) / num_masks
                             for _, _, parts in images]
                losses.append(sum(per_image) / len(per_image))
            else:
                losses.append(sum(sum(parts[which][m] for _, _, parts in images)
                                  / sum(parts[which + 1][m] for _, _, parts in images)
                                  for m in range(num_masks)) / num_masks)
        dice = ref_eq8 if o["dice_form"] == "ratio" else ref_pairwise_dice
        sets = {"both": (0, 1), "channel": (0,), "spatial": (1,)}[o["dice_masks"]]
        div = sum(sum(dice(image[k]) for image in images) / len(images) for k in sets)
        per_level.append((losses[0], losses[1], div))
    reduce = (lambda xs: sum(xs)) if o["level_reduction"] == "sum" else (lambda xs: sum(xs) / len(xs))
    return {"channel": o["alpha"] * reduce([x[0] for x in per_level]),
            "spatial": o["alpha"] * reduce([x[1] for x in per_level]),
            "div": o["lambda_div"] * reduce([x[2] for x in per_level])}
