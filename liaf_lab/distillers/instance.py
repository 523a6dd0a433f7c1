"""LIAF-KD's instance machinery: RoI features (Eq. 2), selectors (Eq. 3, 6), diversity (Eq. 4), mask (Eq. 7).

Shapes: ``N`` images, ``I`` instances in the batch (the per-image boxes concatenated in order),
``K`` selectors, ``C, H, W`` one feature level, ``h, w`` the RoIAlign output size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from ..utils.validation import check_boxes, check_grid_size, check_stride, check_tensor, check_values, should_validate
from .ops import box_cell_axes, concat_boxes

Normalize = Literal["image", "batch"]
# The factor on Eq. 3's logits ``F_ROI . E_k``: none (the paper), ``1/sqrt(C h w)`` (attention's
# scaling), or learned per level (``exp(s)``, ``s`` starting at ``log(1/sqrt(C h w))``).
LogitScale = Literal["none", "sqrt_dim", "learned"]


def roi_instance_features(
    features: Tensor,
    boxes: Sequence[Tensor],
    stride: float,
    roi_size: tuple[int, int] = (7, 7),
    sampling_ratio: int = 2,
    *,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Eq. 2: ``F_ins = roi_align(F, B_ins)`` for every box of every image.

    Args:
        features: ``[N, C, H, W]`` one feature level.
        boxes: N tensors ``[n_b, 4]``, (x1, y1, x2, y2) in input-image pixels.
        stride: input pixels per feature cell of this level.
        validate: check the tensors (one device read); ``False`` when the caller has checked them. The
            stride is checked always.
    Returns:
        ``roi_feats [I, C, h, w]`` and ``batch_index [I]`` (the image of each instance).
    """
    check_stride(stride)
    if should_validate(validate):
        check_tensor("features", features, ndim=4, finite=False)
        boxes = check_boxes("boxes", boxes, num_images=features.shape[0], values=False)
        check_values({"features": features}, {"boxes": boxes})
    rois, batch_index = concat_boxes([b.to(features) for b in boxes])
    if rois.shape[0] == 0:
        return features.new_zeros(0, features.shape[1], *roi_size), batch_index.to(features.device)
    rois = torch.cat([batch_index.to(rois)[:, None], rois], dim=1)
    feats = roi_align(
        features, rois, output_size=roi_size, spatial_scale=1.0 / stride,
        sampling_ratio=sampling_ratio, aligned=True,
    )
    return feats, batch_index


def segment_softmax(logits: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Softmax of ``logits [K, I]`` along I, separately within each group of equal ``index [I]``."""
    k = logits.shape[0]
    idx = index[None, :].expand(k, -1)
    peak = logits.new_full((k, num_segments), float("-inf"))
    peak = peak.scatter_reduce(1, idx, logits.detach(), reduce="amax", include_self=True)
    z = (logits - peak.gather(1, idx)).exp()
    total = z.new_zeros(k, num_segments).index_add(1, index, z)
    return z / total.gather(1, idx)


def score_entropy(scores: Tensor, batch_index: Tensor, num_images: int) -> Tensor:
    """How selective Eq. 3's scores are: each selector's normalised entropy per image, ``[K, N]``.

    With ``p_i = A_ki / sum_{j in image} A_kj`` (the scores renormalised within each image, so this
    also reads ``normalize="batch"`` scores), ``H_kn = -sum_i p_i log p_i / log n_n`` over the
    ``n_n`` instances of image ``n``: 1 for uniform scores (no selection), 0 for all weight on one
    instance. NaN for images with fewer than two instances, where no choice is made.

    Args:
        scores: ``[K, I]`` per-selector scores (``InstanceSelectors.scores``).
        batch_index: ``[I]`` image of each instance, ``< num_images``.
        num_images: N.
    """
    k = scores.shape[0]
    counts = torch.zeros(num_images, dtype=scores.dtype, device=scores.device).index_add(
        0, batch_index, torch.ones_like(batch_index, dtype=scores.dtype))
    totals = scores.new_zeros(k, num_images).index_add(1, batch_index, scores)
    p = scores / totals[:, batch_index]
    plogp = torch.where(p > 0, p * p.clamp_min(torch.finfo(p.dtype).tiny).log(), torch.zeros_like(p))
    entropy = scores.new_zeros(k, num_images).index_add(1, batch_index, -plogp)
    norm = counts.clamp_min(2).log()
    return torch.where(counts >= 2, entropy / norm, torch.full_like(entropy, float("nan")))


def diversity_loss(E: Tensor, *, validate: bool = True) -> Tensor:
    """Eq. 4: ``2 * sum_{i != j} E_i . E_j / (sum_i |E_i|^2 + sum_j |E_j|^2)``.

    Args:
        E: ``[K, D]``, the K selectors as rows.
        validate: check ``E`` (one device read); ``False`` for a module's own parameters.
    Returns:
        A scalar in ``[-1, K - 1]``, invariant to the scale of ``E`` (0 when ``E`` is all zero).
    """
    if should_validate(validate):
        check_tensor("E", E, ndim=2)
        if E.shape[0] == 0:
            raise ValueError("E holds no selectors (shape [0, D]); expected at least one row")
    gram = E @ E.t()
    norms = gram.diagonal().sum()
    cross = gram.sum() - norms
    return 2 * cross / (2 * norms).clamp_min(torch.finfo(E.dtype).tiny)


class InstanceSelectors(nn.Module):
    """K learnable instance selectors ``E_k`` (Eq. 3) for one feature level.

    ``weight`` is ``[K, C*h*w]``; row k is ``E_k`` and matches ``roi_feats.flatten(1)``.

    Args:
        num_selectors: K (the paper uses 6).
        channels: C of the (teacher) feature level.
        roi_size: (h, w) of the RoIAlign output.
        normalize: ``"image"`` (default) takes the softmax over the instances of each image;
            ``"batch"`` over all instances of the batch, as the paper's batched ``F_ROI`` reads.
        init_std: std of the normal initialisation.
        logit_scale: the temperature of Eq. 3, which the paper leaves out: ``"none"`` (the paper's
            ``softmax(F_ROI . E_k)``), ``"sqrt_dim"`` (logits times ``1/sqrt(C h w)``) or ``"learned"``
            (times ``exp(log_scale)``, a parameter of this module starting at ``log(1/sqrt(C h w))``).
    """

    def __init__(
        self,
        num_selectors: int,
        channels: int,
        roi_size: tuple[int, int] = (7, 7),
        normalize: Normalize = "image",
        init_std: float = 0.01,
        logit_scale: LogitScale = "none",
    ) -> None:
        super().__init__()
        if num_selectors < 1:
            raise ValueError(f"num_selectors must be at least 1, got {num_selectors}")
        if channels < 1:
            raise ValueError(f"channels must be at least 1, got {channels}")
        if normalize not in ("image", "batch"):
            raise ValueError(f"normalize must be 'image' or 'batch', got {normalize!r}")
        if logit_scale not in ("none", "sqrt_dim", "learned"):
            raise ValueError(f"logit_scale must be 'none', 'sqrt_dim' or 'learned', got {logit_scale!r}")
        self.channels = channels
        self.roi_size = tuple(roi_size)
        self.normalize = normalize
        self.logit_scale = logit_scale
        dim = channels * roi_size[0] * roi_size[1]
        self.weight = nn.Parameter(torch.randn(num_selectors, dim) * init_std)
        if logit_scale == "learned":
            self.log_scale = nn.Parameter(torch.tensor(-0.5 * math.log(dim)))

    def logit_factor(self, detach: bool = False) -> Tensor | float:
        """The factor on Eq. 3's logits (``logit_scale``): 1, ``1/sqrt(C h w)`` or ``exp(log_scale)``."""
        if self.logit_scale == "learned":
            return (self.log_scale.detach() if detach else self.log_scale).exp()
        return 1.0 if self.logit_scale == "none" else self.weight.shape[1] ** -0.5

    @property
    def num_selectors(self) -> int:
        return self.weight.shape[0]

    def scores(
        self,
        roi_feats: Tensor,
        batch_index: Tensor,
        weight: Tensor | None = None,
        *,
        factor: Tensor | float | None = None,
        num_images: int | None = None,
        validate: bool = True,
    ) -> Tensor:
        """Eq. 3: ``A_k = softmax(t * F_ROI @ E_k)`` for every selector, ``t`` the ``logit_scale`` factor.

        Args:
            roi_feats: ``[I, C, h, w]`` from ``roi_instance_features``.
            batch_index: ``[I]`` image of each instance.
            weight: use these selector rows instead of ``self.weight`` (e.g. a detached copy).
            factor: use this logit factor instead of ``self.logit_factor()`` (e.g. a detached copy).
            num_images: the number of images N (``batch_index < N``); if ``None`` it is read from
                ``batch_index`` on the device (one device read).
            validate: check the inputs (one device read); ``False`` when the caller has checked them.
        Returns:
            ``[K, I]``; each row sums to 1 over the instances of each image (or of the batch).
        """
        if should_validate(validate):
            check_tensor("roi_feats", roi_feats, ndim=4)
            expected = (self.channels, *self.roi_size)
            if tuple(roi_feats.shape[1:]) != expected:
                raise ValueError(
                    f"roi_feats must have shape [I, {', '.join(map(str, expected))}], got {tuple(roi_feats.shape)}"
                )
            if batch_index.shape != roi_feats.shape[:1]:
                raise ValueError(f"batch_index must have shape [{roi_feats.shape[0]}], got {tuple(batch_index.shape)}")
            if num_images is not None and batch_index.numel() and int(batch_index.max()) >= num_images:
                raise ValueError(f"batch_index holds image {int(batch_index.max())} but num_images is {num_images}")
        weight = self.weight if weight is None else weight
        factor = self.logit_factor() if factor is None else factor
        logits = factor * (weight @ roi_feats.flatten(1).t().to(weight.dtype))
        if roi_feats.shape[0] == 0:
            return logits
        if self.normalize == "batch":
            return logits.softmax(dim=1)
        num_segments = int(batch_index.max()) + 1 if num_images is None else num_images
        return segment_softmax(logits, batch_index, num_segments)

    def forward(self, roi_feats: Tensor, batch_index: Tensor) -> Tensor:
        """Eq. 6: ``A = (1/K) sum_k softmax(F_ROI @ E_k)``; returns ``[I]``."""
        return self.scores(roi_feats, batch_index).mean(dim=0)

    def diversity_loss(self) -> Tensor:
        """Eq. 4 on this level's selectors."""
        return diversity_loss(self.weight, validate=False)


def instance_mask(
    boxes: Sequence[Tensor],
    scores: Tensor,
    size: tuple[int, int],
    stride: float,
    *,
    validate: bool = True,
) -> Tensor:
    """Eq. 7: the soft instance mask ``M [N, 1, H, W]``.

    ``M`` starts at ones; every cell ``(h, w)`` with ``y1 <= h * stride < y2`` and
    ``x1 <= w * stride < x2`` (``ops.box_cell_axes``'s ``"corner"`` rule) is multiplied by that instance's
    score, overlaps multiplying.
    Vectorised over instances and cells; differentiable in ``scores``.

    Args:
        boxes: N tensors ``[n_b, 4]`` in input-image pixels.
        scores: ``[I]`` one score per box, in the order of the concatenated boxes.
        size: ``(H, W)`` of the feature map.
        stride: input pixels per feature cell.
        validate: check the tensors (one device read); ``False`` when the caller has checked them. ``size``
            and ``stride`` are checked always.
    """
    check_grid_size("size", size)
    check_stride(stride)
    if should_validate(validate):
        boxes = check_boxes("boxes", boxes, values=False)
        check_tensor("scores", scores, ndim=1, finite=False)
        total = sum(len(b) for b in boxes)
        if scores.shape[0] != total:
            raise ValueError(f"scores has {scores.shape[0]} entries but boxes hold {total} instances")
        check_values({"scores": scores}, {"boxes": boxes})
    rois, batch_index = concat_boxes(boxes)
    height, width = size
    n = len(boxes)
    if rois.shape[0] == 0:
        return scores.new_ones(n, 1, height, width)
    batch_index = batch_index.to(scores.device)
    in_y, in_x = box_cell_axes(rois.to(scores.device), stride, size)  # [I, H], [I, W]
    one = scores.new_ones(())
    row = torch.where(in_x, scores[:, None], one)  # [I, W]: the factor of each column inside the box rows
    factors = torch.where(in_y[:, :, None], row[:, None, :], one).flatten(1)  # [I, H*W]
    mask = scores.new_ones(n, height * width).scatter_reduce(
        0, batch_index[:, None].expand_as(factors), factors, reduce="prod", include_self=True
    )
    return mask.view(n, 1, height, width)
