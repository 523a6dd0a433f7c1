"""IMA: Instance Mask Alignment for object detection KD (Guo, Zhang & Liang, Sci. Rep. 15, 32813, 2025).

No public code exists and the paper's displayed equations are lost (``docs/method-notes.md``), so the
loss is rebuilt from the text; each piece names the sentence it comes from. Per FPN level, with
``F^T`` the teacher's and ``F^S`` the student's features ``[N, C, H, W]``:

1. Alignment. ``a = f_align(F^S)``: "The adaptation layer f_align is used to align the student's
   features" (the paper's revisit of conventional KD, which follows MGD's Eq. 1). As in MGD's code,
   a 1x1 conv only where the channels differ, unless ``projector=True``.
2. Instance mask distillation. "a binary mask M ... generated randomly with a mask ratio zeta",
   "R_{i,j} ... sampled from a uniform distribution ... for each spatial location (i, j)": one draw
   per image and cell from ``KDInputs.generator``, shared over channels (``ops.random_keep_mask``:
   dropped where ``R > 1 - zeta``, a fraction ``zeta`` on average; the paper's ``M`` is
   ``H x W x 1``, drawn per image here as in MGD's code). "element-wise multiplication, applied to the
   function F(F^S)": ``F`` is read as ``f_align``; the phrase "masks out certain frequency
   components" is taken loosely, as "each spatial location" makes the mask spatial.
3. Instance standardisation. "we compute the mean mu_n in R^C and standard deviation sigma_n in R^C
   of the instance-level features across the spatial dimensions for each instance n" and "normalize
   ... by subtracting the mean and dividing by the standard deviation": ``(x - mu_n) / sigma_n`` with
   the population variance and ``sigma = sqrt(var + 1e-5)`` (InstanceNorm's epsilon; assumption).
   Applied after the mask (Algorithm 1: mask, then "the Cascade Alignment Module is applied"), so the
   statistics are those of the masked student. Which side: the subsection standardises only the
   student ("the standardized features, denoted by F_hat^S"), but the theory section aligns
   ``p_T(g(F))`` with ``p_S(g(F))``, "g(.) corresponds to the cascade of instance standardization and
   adaptive scale deflation", i.e. ``g`` on both; ``standardize="both"`` (default) standardises the
   teacher with its own statistics too, ``"student"`` is the subsection's literal reading, ``"none"``
   the ablation row without it (Table 5).
4. Adaptive scale deflation. "an importance score alpha_n in [0, 1] for each instance n based on ...
   the cosine similarity between the flattened student and teacher feature maps for each instance",
   then "a scaling factor gamma_n to the standardized instance-level features ... in accordance with
   the importance score": ``gamma_n = alpha_n = sigmoid(alpha * cos(a_n, F^T_n))`` multiplies the
   standardised student. The cosine reads the aligned student before the mask ("F^S_n", no hat) and
   carries no gradient (a weight, not a target). ``alpha`` is the text's "The hyperparameters are set
   to alpha = 10": the loss weight cannot be meant, since the "loss weight of L_FMask" is ablated
   separately (Table 8, best 1.0), so it is read as the gain mapping a cosine in [-1, 1] into
   [0, 1] (at 10 the sigmoid spans 4.5e-5 .. 0.99995; at 1 only 0.27 .. 0.73). The other reading, alpha
   as a factor on the loss, is ``loss_weight=10``.
5. Loss. "L_FMask, is computed as the mean squared error between the masked student features, F_hat^S,
   and the teacher features, F^T, across all instances, spatial locations, and channels":
   ``mean_{n,c,h,w} (gamma * S_hat - T_hat)^2`` per level (the teacher is not masked, as written;
   without a generator the dropped cells add a term the student barely moves), summed over levels,
   times ``loss_weight`` (Table 8: "the best mAP result is achieved when using the hyperparameter value
   of 1.0").

"Instance". The paper defines ``F in R^{N x C x H x W}`` "where N is the number of instances" and
places the scale deflation "along the instance dimension", so an instance is an image of the batch:
``instance="image"`` (default). ``instance="box"`` reads it as an object: each ground-truth box covers
the cells ``(h, w)`` with ``y1 <= h * stride < y2`` and ``x1 <= w * stride < x2`` (``ops.box_cells``'s
``"corner"`` rule, that of LIAF-KD's ``instance_mask``); its statistics and cosine are taken over those cells. A cell
inside several boxes is standardised and scaled by the box with the fewest cells (the smaller box
wins, FGD's rule; ties: the earlier box); a cell inside no box (and every cell of an image without
boxes) falls back to its image's statistics and importance, so the loss still covers the whole map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils.options import NonNegative, Range, Weight
from .base import FeatureDistiller, KDInputs
from .ops import box_cells, concat_boxes, random_keep_mask
from .registry import register_distiller

Instance = Literal["image", "box"]
Standardize = Literal["both", "student", "none"]
STD_EPS = 1e-5  # added to the variance before the square root (InstanceNorm's default)
COS_EPS = 1e-8  # floor of the norms' product in the cosine


class BoxGeometry:
    """Which cells of one level each box covers and which box each cell takes its statistics from.

    Attributes:
        inside: ``[I, H*W]`` 1 where box ``i`` covers the cell (``ops.box_cells``, ``"corner"`` rule).
        owner: ``[I, H*W]`` 1 where box ``i`` is the smallest box covering the cell (ties: lowest ``i``).
        image_of: ``[N, I]`` 1 where box ``i`` belongs to image ``n``.
        rest: ``[N, H*W]`` 1 where no box covers the cell (the image's statistics apply).
        count: ``[I]`` the number of cells each box covers.
    """

    def __init__(self, boxes: Sequence[Tensor], stride: float, size: tuple[int, int], like: Tensor) -> None:
        """``boxes``: N tensors ``[n_i, 4]`` in input pixels; ``size``: ``(H, W)``; ``like``: device and dtype."""
        height, width = size
        n = len(boxes)
        rois, batch_index = concat_boxes([b.to(like.device) for b in boxes])
        batch_index = batch_index.to(like.device)
        num = rois.shape[0]
        inside = box_cells(rois, stride, size).flatten(1)  # [I, HW]
        count = inside.sum(dim=1)  # [I]
        index = batch_index[:, None].expand_as(inside)
        big = torch.iinfo(torch.long).max
        # the fewest cells among the boxes covering each cell of each image, then the first such box
        size_key = torch.where(inside, count[:, None], big)
        fewest = torch.full((n, height * width), big, dtype=torch.long, device=like.device).scatter_reduce(
            0, index, size_key, reduce="amin", include_self=True)
        smallest = inside & (size_key == fewest.gather(0, index))
        order_key = torch.where(smallest, torch.arange(num, device=like.device)[:, None], big)
        first = torch.full_like(fewest, big).scatter_reduce(0, index, order_key, reduce="amin", include_self=True)
        owner = smallest & (order_key == first.gather(0, index))
        self.image_of = (batch_index[None, :] == torch.arange(n, device=like.device)[:, None]).to(like.dtype)
        self.inside = inside.to(like.dtype)
        self.owner = owner.to(like.dtype)
        self.count = count.to(like.dtype)
        self.rest = 1 - self.image_of @ self.owner

    def box_sums(self, values: Tensor) -> Tensor:
        """``sum`` over each box's cells of its own image's ``values`` ``[N, C, H*W]``: ``[I, C]``."""
        per_image = torch.einsum("nch,ih->nic", values, self.inside)  # box i's cells on every image
        return torch.einsum("ni,nic->ic", self.image_of, per_image)

    def per_cell(self, image_value: Tensor, box_value: Tensor) -> Tensor:
        """Spread per-instance values to the cells: ``[N, C, H*W]`` from ``image_value [N, C]`` (cells in no
        box) and ``box_value [I, C]`` (cells the box owns)."""
        from_boxes = torch.einsum("ni,ic,ih->nch", self.image_of, box_value, self.owner)
        return image_value[:, :, None] * self.rest[:, None, :] + from_boxes


def instance_standardize(feats: Tensor, geometry: BoxGeometry | None) -> Tensor:
    """Instance standardisation (paper, "Instance standardization": ``(F_n - mu_n) / sigma_n``): ``[N, C, HW]``.

    ``mu_n, sigma_n in R^C`` over the instance's cells: the whole image (``geometry=None``), or per
    cell the owning box's cells and, in no box, the image's. Population variance, ``sigma =
    sqrt(var + STD_EPS)``. The box moments are taken about the image mean (exact, and steadier).
    """
    image_mean = feats.mean(dim=2, keepdim=True)
    centred = feats - image_mean  # [N, C, HW]
    image_var = centred.square().mean(dim=2)  # [N, C]
    if geometry is None:
        return centred / (image_var[:, :, None] + STD_EPS).sqrt()
    count = geometry.count.clamp_min(1)[:, None]  # a box covering no cell owns none; avoid 0 / 0
    box_mean = geometry.box_sums(centred) / count  # [I, C], about the image mean
    box_var = (geometry.box_sums(centred.square()) / count - box_mean.square()).clamp_min(0)
    mean = geometry.per_cell(torch.zeros_like(image_var), box_mean)
    var = geometry.per_cell(image_var, box_var)
    return (centred - mean) / (var + STD_EPS).sqrt()


@torch.no_grad()
def scale_deflation(student: Tensor, teacher: Tensor, geometry: BoxGeometry | None, alpha: float) -> Tensor:
    """Adaptive scale deflation (paper, "Adaptive scale deflation"): ``gamma = sigmoid(alpha * cos(F^S_n, F^T_n))``.

    The cosine of the flattened ``[N, C, HW]`` student and teacher over each instance's cells (per cell:
    the owning box's, in no box the image's). Returns ``[N, 1, HW]``, without gradient.
    """
    dot, s_sq, t_sq = ((student * teacher).sum(dim=1), student.square().sum(dim=1), teacher.square().sum(dim=1))
    per_image = [v.sum(dim=1) for v in (dot, s_sq, t_sq)]  # [N] each

    def cosine(d: Tensor, s: Tensor, t: Tensor) -> Tensor:
        return d / (s.sqrt() * t.sqrt()).clamp_min(COS_EPS)

    gamma_image = torch.sigmoid(alpha * cosine(*per_image))  # [N]
    if geometry is None:
        return gamma_image[:, None, None].expand(-1, 1, student.shape[2])
    per_box = [geometry.box_sums(v[:, None, :])[:, 0] for v in (dot, s_sq, t_sq)]  # [I] each
    gamma_box = torch.sigmoid(alpha * cosine(*per_box))
    return geometry.per_cell(gamma_image[:, None], gamma_box[:, None])


@register_distiller("ima", label="IMA")
class IMADistiller(FeatureDistiller):
    """IMA on every FPN level; one term ``ima`` (see the module docstring for where each part comes from).

    Per level: ``mean_{n,c,h,w} (gamma * IS(M * f_align(F^S)) - IS(F^T))^2``, summed over levels, times
    ``loss_weight``; ``M`` a random cell mask (ratio ``mask_ratio``), ``IS`` instance standardisation,
    ``gamma = sigmoid(alpha * cos)`` the scale deflation. One stage; only the ``f_align`` convs learn.

    Args (beyond ``FeatureDistiller``'s):
        loss_weight: factor on the loss summed over levels (the paper's Table 8 "loss weight of L_FMask",
            best at 1.0).
        mask_ratio: zeta, the fraction of cells masked, in ``[0, 1)`` as the paper states. The paper gives
            no value; 0.65 is MGD's one-stage setting (assumption; MGD uses 0.45 for two-stage detectors).
        alpha: gain of the importance score ``sigmoid(alpha * cos)`` (the text's "alpha = 10").
        instance: what an instance is: ``"image"`` (the paper's "N is the number of instances"), or
            ``"box"`` (each ground-truth box's cells; cells in no box use their image's statistics).
        standardize: which side instance standardisation applies to: ``"both"`` (the theory section's
            ``g`` on both distributions), ``"student"`` (the subsection literally), ``"none"``.
        scale_deflation: multiply the standardised student by ``gamma`` (``False``: ``gamma = 1``, the
            ablation row without it).
        projector: learn a 1x1 ``f_align`` on every level; ``False``: only where the channels differ.
    """

    needs = frozenset({"generator"})

    @dataclass(frozen=True)
    class Options(FeatureDistiller.Options):
        loss_weight: Weight = 1.0
        mask_ratio: Annotated[float, Range(ge=0, lt=1)] = 0.65
        alpha: NonNegative = 10.0  # the sigmoid's scale, not a loss weight
        instance: Instance = "image"
        standardize: Standardize = "both"
        scale_deflation: bool = True
        projector: bool = False

    def build(self) -> None:
        self.projectors = self.make_projectors(True if self.projector else "auto")

    def level_parts(self, level: str, student: Tensor, teacher: Tensor, boxes: Sequence[Tensor],
                    generator: torch.Generator | None) -> tuple[Tensor, Tensor, BoxGeometry | None, Tensor | None]:
        """What L_FMask weights on one level: ``f_align(F^S)`` ``[N, C_t, H, W]``, the random keep mask ``M``
        ``[N, 1, H, W]`` (drawn from ``generator``), the instances' ``BoxGeometry`` (``None`` for
        ``instance="image"``) and the scale deflation ``gamma`` ``[N, 1, HW]`` (``None`` without ``scale_deflation``).

        ``student`` ``[N, C_s, H, W]``, ``teacher`` ``[N, C_t, H, W]`` (detached), ``boxes`` N tensors ``[n_i, 4]``.
        """
        aligned = self.projectors[level](student)
        mask = random_keep_mask(aligned, self.mask_ratio, generator)
        geometry = (BoxGeometry(boxes, self.strides[level], tuple(teacher.shape[2:]), teacher)
                    if self.instance == "box" else None)
        gamma = (scale_deflation(aligned.flatten(2), teacher.flatten(2), geometry, self.alpha)
                 if self.scale_deflation else None)
        return aligned, mask, geometry, gamma

    def level_loss(self, level: str, student: Tensor, teacher: Tensor, boxes: Sequence[Tensor],
                   generator: torch.Generator | None) -> Tensor:
        """L_FMask on one level, without ``loss_weight``: a scalar.

        ``student`` ``[N, C_s, H, W]``, ``teacher`` ``[N, C_t, H, W]`` (detached), ``boxes`` N tensors ``[n_i, 4]``.
        """
        aligned, mask, geometry, gamma = self.level_parts(level, student, teacher, boxes, generator)
        s, t = (aligned * mask).flatten(2), teacher.flatten(2)
        s_hat = s if self.standardize == "none" else instance_standardize(s, geometry)
        t_hat = instance_standardize(t, geometry) if self.standardize == "both" else t
        if gamma is not None:
            s_hat = gamma * s_hat
        return F.mse_loss(s_hat, t_hat, reduction="mean")

    def compute_terms(self, inputs: KDInputs) -> dict[str, Tensor]:
        """``ima`` = ``loss_weight`` times L_FMask summed over levels."""
        s, t = inputs.student_feats, inputs.teacher_feats
        total = sum(self.level_loss(lvl, s[lvl], t[lvl], inputs.boxes, inputs.generator) for lvl in self.levels)
        return {self.method_name: self.loss_weight * total}

    def compute_weight_maps(self, inputs: KDInputs) -> dict[str, dict[str, Tensor]]:
        """The spatial weighting of L_FMask (``level_parts``), each level ``[N, H, W]``:

        * ``keep mask``: the random mask ``M`` on the student (1 kept, 0 dropped), drawn from
          ``inputs.generator`` level by level as ``compute_terms`` draws it, so a generator in the same
          state gives the loss's mask (this call advances it);
        * ``scale deflation``: ``gamma`` per cell, the factor on the standardised student (constant over
          each image with ``instance="image"``; per owning box with ``"box"``, which is where the boxes
          enter); absent with ``scale_deflation=False`` (``gamma = 1``).

        Instance standardisation shifts and scales per channel; it weights no cell, so it is not a map.
        """
        maps: dict[str, dict[str, Tensor]] = {"keep mask": {}}
        for lvl in self.levels:
            teacher = inputs.teacher_feats[lvl]
            _, mask, _, gamma = self.level_parts(lvl, inputs.student_feats[lvl], teacher, inputs.boxes,
                                                 inputs.generator)
            maps["keep mask"][lvl] = mask[:, 0]
            if gamma is not None:
                maps.setdefault("scale deflation", {})[lvl] = gamma.reshape(mask.shape[0], *teacher.shape[2:])
        return maps
