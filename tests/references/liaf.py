"""Literal, slow references for LIAF-KD (paper Eq. 2-9), written as Python loops.

Nothing here is vectorised on purpose: each function follows the paper's formula term by term so the
library's vectorised code can be checked against it. All functions are differentiable (they build
their results from 0-d tensors and ``torch.stack``), so gradients can be compared as well.

Shapes: ``N`` images, ``I`` instances (per-image boxes concatenated in order), ``K`` selectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import roi_align


def ref_diversity_loss(E: Tensor) -> Tensor:
    """Eq. 4 literally: ``2 * sum_{i != j} E_i . E_j / (sum_i |E_i|^2 + sum_j |E_j|^2)``."""
    K = E.shape[0]
    numerator = E.new_zeros(())
    for i in range(K):
        for j in range(K):
            if i != j:
                numerator = numerator + torch.dot(E[i], E[j])
    sum_i = E.new_zeros(())
    for i in range(K):
        sum_i = sum_i + torch.dot(E[i], E[i])
    sum_j = E.new_zeros(())
    for j in range(K):
        sum_j = sum_j + torch.dot(E[j], E[j])
    return 2 * numerator / (sum_i + sum_j)


def ref_roi_features(
    features: Tensor,
    boxes: Sequence[Tensor],
    stride: float,
    roi_size: tuple[int, int] = (7, 7),
    sampling_ratio: int = 2,
) -> tuple[Tensor, Tensor]:
    """Eq. 2, one box at a time: ``roi_align`` of each single box on its own image.

    Returns ``roi_feats [I, C, h, w]`` and ``batch_index [I]``.
    """
    feats, index = [], []
    for b, image_boxes in enumerate(boxes):
        for box in image_boxes:
            out = roi_align(
                features[b : b + 1], [box[None].to(features)], output_size=roi_size,
                spatial_scale=1.0 / stride, sampling_ratio=sampling_ratio, aligned=True,
            )
            feats.append(out[0])
            index.append(b)
    if not feats:
        return features.new_zeros(0, features.shape[1], *roi_size), torch.zeros(0, dtype=torch.long)
    return torch.stack(feats), torch.tensor(index, dtype=torch.long)


def ref_scores(roi_feats: Tensor, batch_index: Tensor, weight: Tensor, per_image: bool = True,
               factor: float | Tensor = 1.0) -> Tensor:
    """Eq. 3: for each selector k, ``softmax(factor * F_ROI . E_k)`` over each image's instances (or the batch).

    Returns ``[K, I]``.
    """
    K, I = weight.shape[0], roi_feats.shape[0]  # noqa: E741 - the paper's I instances
    flat = roi_feats.reshape(I, -1).to(weight.dtype)
    index = [int(b) for b in batch_index]
    groups = sorted(set(index)) if per_image else [None]
    rows = []
    for k in range(K):
        row: list[Tensor | None] = [None] * I
        for g in groups:
            members = [i for i in range(I) if g is None or index[i] == g]
            logits = torch.stack([factor * torch.dot(flat[i], weight[k]) for i in members])
            probs = torch.softmax(logits, dim=0)
            for position, i in enumerate(members):
                row[i] = probs[position]
        rows.append(torch.stack(row) if I else weight.new_zeros(0))
    return torch.stack(rows)


def ref_instance_mask(boxes: Sequence[Tensor], scores: Tensor, size: tuple[int, int], stride: float) -> Tensor:
    """Eq. 7: start at ones; for every instance and every cell (h, w), multiply by the instance's
    score when ``y1/stride <= h < y2/stride`` and ``x1/stride <= w < x2/stride`` (Python floats).

    Returns ``[N, 1, H, W]``.
    """
    height, width = size
    cells: list[list[list[Tensor | float]]] = [
        [[1.0 for _ in range(width)] for _ in range(height)] for _ in boxes
    ]
    i = 0
    for b, image_boxes in enumerate(boxes):
        for box in image_boxes:
            x1, y1, x2, y2 = (float(v) for v in box.tolist())
            for h in range(height):
                for w in range(width):
                    if y1 / stride <= h < y2 / stride and x1 / stride <= w < x2 / stride:
                        cells[b][h][w] = cells[b][h][w] * scores[i]
            i += 1
    assert i == scores.shape[0], "one score per box"
    one = scores.new_ones(())

    def as_tensor(v: Tensor | float) -> Tensor:
        return v if isinstance(v, Tensor) else one * v

    images = [
        torch.stack([torch.stack([as_tensor(v) for v in row]) for row in image]) for image in cells
    ]
    if not images:
        return scores.new_ones(0, 1, height, width)
    return torch.stack(images)[:, None]


def ref_count_scale(scores: Tensor, boxes: Sequence[Tensor], per_image: bool = True) -> Tensor:
    """``mask_scale='count'``: each score times the number of instances in its softmax group."""
    out, i = [], 0
    total = sum(len(b) for b in boxes)
    for image_boxes in boxes:
        for _ in range(len(image_boxes)):
            out.append(scores[i] * (len(image_boxes) if per_image else total))
            i += 1
    return torch.stack(out) if out else scores


def _mean_over_selectors(scores: Tensor) -> Tensor:
    """Eq. 6: ``(1/K) sum_k A_k`` written as a loop."""
    total = scores[0]
    for k in range(1, scores.shape[0]):
        total = total + scores[k]
    return total / scores.shape[0]


def ref_level_scores(
    feats: Tensor,
    boxes: Sequence[Tensor],
    stride: float,
    weight: Tensor,
    per_image: bool = True,
    roi_size: tuple[int, int] = (7, 7),
    sampling_ratio: int = 2,
    factor: float | Tensor = 1.0,
) -> Tensor:
    """Eq. 2, 3, 6 on one level: the mean score ``A [I]`` of every instance (logits times ``factor``)."""
    roi_feats, index = ref_roi_features(feats, boxes, stride, roi_size, sampling_ratio)
    if roi_feats.shape[0] == 0:
        return weight.new_zeros(0)
    return _mean_over_selectors(ref_scores(roi_feats, index, weight, per_image, factor))


def ref_level_mse(teacher_hat: Tensor, student_hat: Tensor) -> Tensor:
    """Eq. 9 on one level: ``(1/CHW) ||F^T_hat - f(F^S_hat)||^2`` per image, averaged over the batch."""
    N, C, H, W = teacher_hat.shape
    total = teacher_hat.new_zeros(())
    for n in range(N):
        total = total + ((teacher_hat[n] - student_hat[n]) ** 2).sum() / (C * H * W)
    return total / N


def ref_liaf_sides(
    student_feats: Mapping[str, Tensor],
    teacher_feats: Mapping[str, Tensor],
    boxes: Sequence[Tensor],
    strides: Mapping[str, float],
    selector_weights: Mapping[str, Tensor],
    projectors: Mapping[str, Callable[[Tensor], Tensor]],
    mask_scale: str = "literal",
    mask_side: str = "separate",
    per_image: bool = True,
    detach_scores: bool = True,
    freeze_selectors: bool = True,
    roi_size: tuple[int, int] = (7, 7),
    sampling_ratio: int = 2,
    logit_factors: Mapping[str, float | Tensor] | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Eq. 8 literally, per level: the two sides ``(M^T * F^T, f_phi(M^S * F^S))`` that Eq. 9 compares.

    ``f_phi`` is applied to the masked student feature itself. The student scores read the projected
    student feature when the channels differ and the raw one when they agree. ``detach_scores`` cuts
    the gradient from the scores into the features, ``freeze_selectors`` the gradient into ``E``.
    ``logit_factors``: per level the factor on Eq. 3's logits (frozen with the selectors); default 1.
    """
    sides = {}
    for level, stride in strides.items():
        s, t = student_feats[level], teacher_feats[level].detach()
        project = projectors[level]
        weight = selector_weights[level]
        weight = weight.detach() if freeze_selectors else weight
        factor = 1.0 if logit_factors is None else logit_factors[level]
        if freeze_selectors and isinstance(factor, Tensor):
            factor = factor.detach()
        s_scores_in = s if s.shape[1] == t.shape[1] else project(s)
        t_scores_in = t
        if detach_scores:
            s_scores_in, t_scores_in = s_scores_in.detach(), t_scores_in.detach()
        a_t = ref_level_scores(t_scores_in, boxes, stride, weight, per_image, roi_size, sampling_ratio, factor)
        a_s = ref_level_scores(s_scores_in, boxes, stride, weight, per_image, roi_size, sampling_ratio, factor)
        if mask_side == "shared":
            a_t = a_s = (a_t + a_s) / 2
        if mask_scale == "count":
            a_t, a_s = ref_count_scale(a_t, boxes, per_image), ref_count_scale(a_s, boxes, per_image)
        size = tuple(t.shape[-2:])
        m_t = ref_instance_mask(boxes, a_t, size, stride)
        m_s = ref_instance_mask(boxes, a_s, size, stride)
        sides[level] = (m_t * t, project(m_s * s))
    return sides


def ref_liaf_loss(
    student_feats: Mapping[str, Tensor],
    teacher_feats: Mapping[str, Tensor],
    boxes: Sequence[Tensor],
    strides: Mapping[str, float],
    selector_weights: Mapping[str, Tensor],
    projectors: Mapping[str, Callable[[Tensor], Tensor]],
    loss_weight: float = 1.0,
    diversity_weight: float | None = None,
    **options: Any,
) -> Tensor:
    """Eq. 9 literally, per level: ``(1/CHW) ||M^T * F^T - f_phi(M^S * F^S)||^2`` (the sides of
    ``ref_liaf_sides``, with its ``options``), averaged over the batch, summed over levels, times
    ``loss_weight``. With ``diversity_weight`` set, ``diversity_weight * mean_levels(Eq. 4)`` is added.
    """
    sides = ref_liaf_sides(student_feats, teacher_feats, boxes, strides, selector_weights, projectors, **options)
    total = None
    for teacher_hat, student_hat in sides.values():
        level_loss = ref_level_mse(teacher_hat, student_hat)
        total = level_loss if total is None else total + level_loss
    loss = loss_weight * total
    if diversity_weight is not None:
        divs = [ref_diversity_loss(selector_weights[level]) for level in strides]
        loss = loss + diversity_weight * sum(divs) / len(divs)
    return loss


def ref_entropy(scores, index, num_images):
    """Each selector's entropy per image, of the scores renormalised within the image, over log(n)."""
    out = torch.full((scores.shape[0], num_images), float("nan"), dtype=torch.float64)
    for k in range(scores.shape[0]):
        for n in range(num_images):
            p = [float(scores[k, i]) for i in range(len(index)) if int(index[i]) == n]
            if len(p) >= 2:
                total = sum(p)
                out[k, n] = -sum(x / total * math.log(x / total) for x in p if x > 0) / math.log(len(p))
    return out
