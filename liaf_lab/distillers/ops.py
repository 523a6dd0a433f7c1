"""Operations the methods share, so that no method imports another: boxes to feature cells, mask overlap
(Dice), the random cell mask, adaptation convs, box-bin distributions, channel standardisation.

Boxes are ``(x1, y1, x2, y2)`` in input-image pixels; a feature level is a grid of ``(H, W)`` cells,
``stride`` input pixels each, cell ``(h, w)`` starting at pixel ``(h * stride, w * stride)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.dense import anchor_centres, distance2box, integral_distances

# Which cells a box covers (``box_cell_axes``): three rules, one per public code.
CellRule = Literal["corner", "fgd", "defeat"]
DICE_EPS = 1e-12  # MasKD's dice_coeff epsilon, added to each squared norm
PKD_EPS = 1e-6  # mmrazor PKDLoss.norm: std + 1e-6


def concat_boxes(boxes: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Concatenate per-image boxes: returns ``(boxes [I, 4], batch_index [I] long)``."""
    device = boxes[0].device if len(boxes) else torch.device("cpu")
    index = [torch.full((len(b),), i, dtype=torch.long, device=device) for i, b in enumerate(boxes)]
    if not index:
        return torch.zeros(0, 4, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(list(boxes)), torch.cat(index)


def fgd_cell_span(boxes: Tensor) -> tuple[Tensor, Tensor]:
    """The ``"fgd"`` rule's cells before clipping to the grid, for ``boxes [..., 4]`` already divided by the
    stride: the first ``floor(x1), floor(y1)`` and last ``ceil(x2), ceil(y2)`` columns and rows (inclusive),
    ``(first [..., 2], last [..., 2])``, ``(x, y)`` each."""
    return boxes[..., :2].floor(), boxes[..., 2:].ceil()


def box_cell_axes(boxes: Tensor, stride: float, size: tuple[int, int],
                  rule: CellRule = "corner") -> tuple[Tensor, Tensor]:
    """Which cells of an ``(H, W)`` grid each box covers, as its rows and columns: ``boxes [..., 4]`` ->
    ``(rows [..., H], cols [..., W])`` bool; the box covers cell ``(h, w)`` where ``rows[h] & cols[w]``.

    Boxes are computed in at least float32. The three rules are different conventions, kept apart as
    each method's public code draws its boxes:

    * ``"corner"`` (LIAF-KD's Eq. 7 ``instance_mask``, IMA's ``instance="box"``, GID's weight map): the cells
      whose top-left corner lies in the half-open box, ``y1 <= h * stride < y2`` and
      ``x1 <= w * stride < x2`` (compared in pixels, exact for integer cells); a box smaller than a cell
      may cover none.
    * ``"fgd"`` (FGD's ``Mask_fg``): with the box divided by the stride, the rows ``floor(y1) <= h <= ceil(y2)``
      and columns ``floor(x1) <= w <= ceil(x2)``, inclusive at both ends (``fgd_cell_span``), then clipped
      to the grid; every box covers at least one cell of its span.
    * ``"defeat"`` (DeFeat's ``get_gt_mask``): with the box divided by the stride and floored, then clipped
      to the grid, the columns ``floor(x1) <= w < floor(x2)`` and rows ``floor(y1) <= h < floor(y2)``; where
      either range is empty, only the cell ``(floor(y1), floor(x1))`` (clipped).
    """
    boxes = boxes.to(torch.promote_types(boxes.dtype, torch.float32))
    height, width = size
    rows = torch.arange(height, device=boxes.device, dtype=boxes.dtype)
    cols = torch.arange(width, device=boxes.device, dtype=boxes.dtype)
    if rule == "corner":
        # h >= y1 / stride  <=>  h * stride >= y1, which is exact for integer cells.
        rows, cols = rows * stride, cols * stride
        return ((rows >= boxes[..., 1:2]) & (rows < boxes[..., 3:4]),
                (cols >= boxes[..., 0:1]) & (cols < boxes[..., 2:3]))
    if rule == "fgd":
        first, last = fgd_cell_span(boxes / stride)
        return ((rows >= first[..., 1:2]) & (rows <= last[..., 1:2]),
                (cols >= first[..., 0:1]) & (cols <= last[..., 0:1]))
    if rule == "defeat":
        grid = torch.floor(boxes / stride)
        lx, ly = grid[..., 0:1].clamp(0, width - 1), grid[..., 1:2].clamp(0, height - 1)  # [..., 1]
        rx, ry = grid[..., 2:3].clamp(0, width), grid[..., 3:4].clamp(0, height)
        empty = (rx <= lx) | (ry <= ly)  # [..., 1]
        return (torch.where(empty, rows == ly, (rows >= ly) & (rows < ry)),
                torch.where(empty, cols == lx, (cols >= lx) & (cols < rx)))
    raise ValueError(f"rule must be 'corner', 'fgd' or 'defeat', got {rule!r}")


def box_cells(boxes: Tensor, stride: float, size: tuple[int, int], rule: CellRule = "corner") -> Tensor:
    """The cells each box covers (``box_cell_axes``'s ``rule``): ``boxes [..., 4]`` -> ``[..., H, W]`` bool."""
    rows, cols = box_cell_axes(boxes, stride, size, rule)
    return rows[..., :, None] & cols[..., None, :]


def dice_coeff(masks: Tensor) -> Tensor:
    """MasKD's public ``dice_coeff`` (the paper's mask diversity loss): for masks ``[N, T, HW]``, the mean
    over images and ordered token pairs ``i != j`` of ``2 <m_i, m_j> / (|m_i|^2 + eps + |m_j|^2 + eps)``.

    Returns a scalar; ``T >= 2``.
    """
    num_tokens = masks.shape[1]
    gram = masks @ masks.transpose(1, 2)  # [N, T, T]: <m_i, m_j>
    norms = torch.diagonal(gram, dim1=1, dim2=2)  # [N, T]: |m_i|^2
    dice = 2 * gram / ((norms[:, :, None] + DICE_EPS) + (norms[:, None, :] + DICE_EPS))
    off_diagonal = 1 - torch.eye(num_tokens, dtype=masks.dtype, device=masks.device)
    return (dice * off_diagonal).sum() / (masks.shape[0] * num_tokens * (num_tokens - 1))


def random_keep_mask(like: Tensor, lambda_mask: float, generator: torch.Generator | None) -> Tensor:
    """MGD's Eq. 2 as its public ``get_dis_loss`` draws it: ``[N, 1, H, W]``, 0 where ``r > 1 - lambda``, else 1.

    ``r ~ U[0, 1)`` has one value per image and cell (shared over channels), drawn from ``generator``
    on ``like``'s device in its dtype; a fraction ``lambda_mask`` of the cells is dropped on average.
    """
    n, _, h, w = like.shape
    r = torch.rand((n, 1, h, w), generator=generator, device=like.device, dtype=like.dtype)
    return (r <= 1 - lambda_mask).to(like.dtype)


def adaptation_layers(student_channels: Mapping[str, int], teacher_channels: Mapping[str, int],
                      relu: bool) -> nn.ModuleDict:
    """Per level FGFI's public ``stu_feature_adap``: a 3x3 conv (padding 1) ``C_s -> C_t``, optionally then ReLU.

    Init as the public code's ``normal_init(..., 0, 0.0001, truncated=True)``: weight
    ``fmod(N(0, 1), 2) * 1e-4``, bias left at PyTorch's default.
    """
    layers = {}
    for lvl, c_t in teacher_channels.items():
        conv = nn.Conv2d(student_channels[lvl], c_t, kernel_size=3, padding=1)
        with torch.no_grad():
            conv.weight.normal_().fmod_(2).mul_(1e-4)
        layers[lvl] = nn.Sequential(conv, nn.ReLU()) if relu else conv
    return nn.ModuleDict(layers)


def binary_kd(student: Tensor, teacher: Tensor, beta: float) -> Tensor:
    """BCKD's binary classification KD per logit: ``BCE(s, sigmoid(t)) * |sigmoid(t) - sigmoid(s)|^beta``.

    ``student``, ``teacher``: ``[..., K]`` logits (the teacher's without gradient) -> ``[..., K]``.
    """
    target = teacher.sigmoid()
    bce = F.binary_cross_entropy_with_logits(student, target, reduction="none")
    return bce * (target - student.sigmoid()).abs().pow(beta)


def decode_bins(bins: Tensor, priors: Tensor) -> Tensor:
    """Boxes in units of the stride from GFL's bin logits ``[N, P, 4 (R + 1)]`` and priors ``[P, 4]`` scaled
    to the stride: ``centre -/+ integral(bins)`` -> ``[N, P, 4]``."""
    return distance2box(anchor_centres(priors), integral_distances(bins, bins.shape[-1] // 4 - 1))


def bin_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """LD's Eq. (LD) per side: ``T^2 * mean_bins softmax(t/T) * (log softmax(t/T) - log softmax(s/T))``.

    ``student``, ``teacher``: ``[..., R + 1]`` bin logits of one side each -> ``[...]``.
    """
    log_s = F.log_softmax(student / temperature, dim=-1)
    log_t = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(log_s, log_t, reduction="none", log_target=True).mean(dim=-1) * temperature**2


def channel_standardise(feats: Tensor) -> Tensor:
    """PKD's standardisation: each channel of ``feats`` ``[N, C, H, W]`` to zero mean and unit (unbiased)
    deviation over ``N, H, W``: ``(F - mean) / (std + 1e-6)`` -> ``[N, C, H, W]``.

    A constant channel (deviation 0, e.g. a GroupNorm output over a single value) gives 0 with a finite
    gradient; ``torch.std``'s gradient there is NaN.
    """
    mean = feats.mean(dim=(0, 2, 3), keepdim=True)
    var = feats.var(dim=(0, 2, 3), keepdim=True)
    positive = var > 0
    std = torch.where(positive, torch.where(positive, var, 1).sqrt(), 0)
    return (feats - mean) / (std + PKD_EPS)
