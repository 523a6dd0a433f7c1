"""GFL (Generalized Focal Loss; Li et al., NeurIPS 2020) as a torchvision-style dense detector.

``GFL`` has the public pieces of torchvision's ``FCOS`` / ``RetinaNet`` (``transform``, ``backbone``,
``anchor_generator``, ``head``, ``compute_loss``, ``postprocess_detections``, ``forward``), so
``liaf_lab.models.run_detector`` runs it as it runs those. The formulas follow mmdetection's GFL
(``gfl_head.py``, ``gfocal_loss.py``, ``atss_assigner.py``, config ``gfl_r50_fpn_1x_coco.py``):

* head: per branch 4 x (conv3x3 + GroupNorm + ReLU); a sigmoid classifier (prior 0.01) whose score is
  the joint class-and-IoU quality; a regression conv of 4 x (reg_max + 1) bin logits per location,
  times a learnable per-level scale;
* boxes: the distances from the anchor centre to the four sides are the expectation of the softmax
  over the bins ``0..reg_max`` (``integral_distances``), in units of the level's stride;
* assignment: ATSS (``atss_assign``), one square anchor per location (8 x stride in mmdetection);
* losses: Quality Focal Loss (beta 2) on every location, normalised by the number of positives;
  GIoU (weight 2) and Distribution Focal Loss (weight 0.25) on the positives, each weighted by the
  detached best class score and normalised by the sum of those weights.

Class convention: as the other liaf_lab detectors (``detectors.py``): ``num_classes`` counts the
background, the sigmoid head has ``num_classes`` logits, labels ``1..num_classes-1`` index them directly
and the logit of label 0 only ever learns "no object".

Differences from mmdetection, all documented where they occur: candidates of equal centre distance
are taken in anchor order (``atss_assign``); every location of the padded batch takes part in the
loss, as in torchvision's dense detectors (mmdetection gives zero weight to locations in another
image's padding); ground-truth boxes are used as given, also where they cross the image border.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import (
    batched_nms,
    box_iou,
    clip_boxes_to_image,
    generalized_box_iou_loss,
)

from ..utils.validation import check_positive_boxes
from .adapter import DenseAdapter, Target
from .dense import anchor_centres, distance2box, integral_distances, mean_over_ranks

# mmdetection's GFL settings (configs/gfl/gfl_r50_fpn_1x_coco.py).
OCTAVE_BASE_SCALE = 8  # anchor side = 8 x stride
DFL_TARGET_EPS = 0.1  # bbox2distance: targets are clamped to [0, reg_max - 0.1]
INSIDE_EPS = 0.01  # ATSS: a candidate's centre must lie more than 0.01 px inside the box


# -- box coding ------------------------------------------------------------------------------------------

def box2distance(centres: Tensor, boxes: Tensor, reg_max: int) -> Tensor:
    """Side distances ``[..., 4]`` from centres ``[..., 2]`` to boxes ``[..., 4]``, clamped to ``[0, reg_max - 0.1]``.

    mmdetection ``bbox2distance(points, bbox, max_dis=reg_max)`` (eps 0.1): the DFL targets, so that the
    right neighbour bin ``floor(y) + 1`` is at most ``reg_max``.
    """
    x, y = centres.unbind(-1)
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x - x1, y - y1, x2 - x, y2 - y], dim=-1).clamp(0, reg_max - DFL_TARGET_EPS)


def aligned_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of each box of ``boxes1 [P, 4]`` with the box of the same row of ``boxes2 [P, 4]`` -> ``[P]``.

    mmdetection ``bbox_overlaps(..., is_aligned=True)`` (union clamped at ``eps``).
    """
    lt = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    rb = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).prod(dim=1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).prod(dim=1)
    return inter / (area1 + area2 - inter).clamp(min=eps)


# -- losses ----------------------------------------------------------------------------------------------

def quality_focal_loss(logits: Tensor, quality: Tensor, beta: float = 2.0) -> Tensor:
    """Quality Focal Loss, elementwise: ``BCE(sigmoid(x), y) * |y - sigmoid(x)|^beta``.

    mmdetection ``quality_focal_loss`` written as one expression: at a negative, and at the other
    classes of a positive, ``y = 0`` gives ``BCE(x, 0) * sigmoid(x)^beta``.

    Args:
        logits: ``[..., K]`` classification logits.
        quality: ``[..., K]`` soft targets: the IoU of the predicted box at the assigned class of a
            positive location, 0 everywhere else (negatives and the other classes).
        beta: the modulating exponent (2 in the paper).

    Returns:
        ``[..., K]`` losses (unreduced).
    """
    scale = (quality - logits.sigmoid()).abs().pow(beta)
    return F.binary_cross_entropy_with_logits(logits, quality, reduction="none") * scale


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Distribution Focal Loss (mmdetection ``distribution_focal_loss``).

    ``-((y_r - y) log S_l + (y - y_l) log S_r)`` with ``y_l = floor(y)``, ``y_r = y_l + 1`` and ``S``
    the softmax over the bins: cross-entropy towards the two bins around the target, weighted by
    the target's distance to the other one.

    Args:
        logits: ``[M, reg_max + 1]`` bin logits of one side each.
        target: ``[M]`` distances in ``[0, reg_max)`` (bins).

    Returns:
        ``[M]`` losses.
    """
    left = target.long()
    right = left + 1
    log_probs = logits.log_softmax(dim=-1)
    nll_left = -log_probs.gather(-1, left[:, None]).squeeze(-1)
    nll_right = -log_probs.gather(-1, right[:, None]).squeeze(-1)
    return nll_left * (right.to(target.dtype) - target) + nll_right * (target - left.to(target.dtype))


# -- assignment ------------------------------------------------------------------------------------------

@torch.no_grad()
def atss_assign(anchors: Tensor, num_anchors_per_level: Sequence[int], gt_boxes: Tensor, topk: int = 9) -> Tensor:
    """ATSS assignment of one image (mmdetection ``ATSSAssigner.assign``; Zhang et al., CVPR 2020).

    1. per level and box, the ``topk`` anchors whose centres are closest to the box centre are the
       candidates (equal distances: the anchor of lower index first, a stable sort);
    2. the box's IoU threshold is the mean plus the (unbiased) standard deviation of its candidates'
       IoUs (the deviation of a single candidate is taken as 0);
    3. a candidate is positive if its IoU is at least the threshold and its centre lies more than
       0.01 px inside the box;
    4. an anchor positive for several boxes goes to the one of highest IoU (equal IoUs: lowest box index).

    Args:
        anchors: ``[A, 4]`` anchors of all levels (x1, y1, x2, y2).
        num_anchors_per_level: anchors per level, summing to ``A``.
        gt_boxes: ``[G, 4]`` boxes; ``G`` may be 0.
        topk: candidates per level and box (9).

    Returns:
        ``[A]`` int64: the assigned box index, or -1 (negative).
    """
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    matched = torch.full((num_anchors,), -1, dtype=torch.int64, device=anchors.device)
    if num_gt == 0 or num_anchors == 0:
        return matched
    ious = box_iou(anchors, gt_boxes)  # [A, G]
    centres = anchor_centres(anchors)  # [A, 2]
    offsets = centres[:, None, :] - anchor_centres(gt_boxes)[None, :, :]  # [A, G, 2]
    sq_dist = offsets.pow(2).sum(dim=-1)  # [A, G]; the order of distances, without the square root

    candidates = []
    start = 0
    for count in num_anchors_per_level:
        k = min(topk, count)
        order = torch.sort(sq_dist[start:start + count], dim=0, stable=True).indices[:k]
        candidates.append(order + start)
        start += count
    cand = torch.cat(candidates, dim=0)  # [C, G] anchor indices, distinct within a column
    cand_ious = ious.gather(0, cand)
    std = cand_ious.std(dim=0) if cand.shape[0] > 1 else torch.zeros_like(cand_ious[0])
    threshold = cand_ious.mean(dim=0) + std  # [G]

    x, y = centres[cand].unbind(-1)  # [C, G] each
    x1, y1, x2, y2 = gt_boxes.unbind(-1)  # [G] each
    inside = torch.stack([x - x1, y - y1, x2 - x, y2 - y], dim=-1).amin(dim=-1) > INSIDE_EPS
    is_pos = (cand_ious >= threshold) & inside  # [C, G]

    positive = torch.zeros_like(ious, dtype=torch.bool).scatter_(0, cand, is_pos)  # [A, G]
    masked = torch.where(positive, ious, torch.full_like(ious, -math.inf))
    best = masked.argmax(dim=1)  # the first of equal maxima
    return torch.where(positive.any(dim=1), best, matched)


# -- anchors and head --------------------------------------------------------------------------------------

class GFLAnchorGenerator(AnchorGenerator):
    """One square anchor per location, on the grid of each level's nominal stride.

    torchvision's ``AnchorGenerator`` spaces the anchors by ``padded size // grid size``, which on P6/P7
    differs from the stride unless the input is a multiple of 128 (e.g. 61 instead of 64 px at 800 px).
    GFL decodes its distances in units of the stride, so its anchors lie at ``(x * stride, y * stride)``
    as mmdetection's do (its ``center_offset = 0``). Anchors are float32 (float64 for float64 features),
    also under autocast.

    Args:
        sizes: one anchor side per level (mmdetection: 8 x stride).
        strides: one stride per level (input pixels per cell).
    """

    def __init__(self, sizes: Sequence[float], strides: Sequence[float]) -> None:
        if len(sizes) != len(strides):
            raise ValueError(f"need one anchor size per stride, got sizes {list(sizes)} and strides {list(strides)}")
        super().__init__(tuple((s,) for s in sizes), ((1.0,),) * len(sizes))
        self.strides = tuple(float(s) for s in strides)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        """Per image ``[sum_l H_l * W_l, 4]`` anchors (row-major over each level's grid, levels in order)."""
        dtype = torch.promote_types(feature_maps[0].dtype, torch.float32)
        device = feature_maps[0].device
        grid_sizes = [list(f.shape[-2:]) for f in feature_maps]
        strides = [[torch.tensor(s, dtype=dtype, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(dtype, device)
        per_level = self.grid_anchors(grid_sizes, strides)
        return [torch.cat(per_level) for _ in image_list.image_sizes]


def _tower(channels: int, num_convs: int, num_groups: int) -> nn.Sequential:
    """``num_convs`` x (conv3x3 without bias + GroupNorm + ReLU), convs N(0, 0.01) (mmdetection ``ConvModule``)."""
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        nn.init.normal_(conv.weight, std=0.01)
        layers += [conv, nn.GroupNorm(num_groups, channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _flatten(out: Tensor) -> Tensor:
    """``[N, D, H, W]`` -> ``[N, H*W, D]`` (row-major cells, as torchvision's heads)."""
    n, d, h, w = out.shape
    return out.permute(0, 2, 3, 1).reshape(n, h * w, d)


class GFLClassificationHead(nn.Module):
    """Classification branch: tower, then a conv to ``num_classes`` joint class-quality logits per location.

    ``forward(list of [N, C, H_l, W_l])`` -> ``[N, sum_l H_l W_l, num_classes]``.
    """

    def __init__(self, in_channels: int, num_classes: int, num_convs: int = 4, num_groups: int = 32,
                 prior_probability: float = 0.01) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv = _tower(in_channels, num_convs, num_groups)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=1)
        nn.init.normal_(self.cls_logits.weight, std=0.01)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_probability) / prior_probability))

    def forward(self, x: list[Tensor]) -> Tensor:
        return torch.cat([_flatten(self.cls_logits(self.conv(f))) for f in x], dim=1)


class GFLRegressionHead(nn.Module):
    """Regression branch: tower, a conv to ``4 * (reg_max + 1)`` bin logits, times a learnable per-level scale.

    ``forward(list of [N, C, H_l, W_l])`` -> ``[N, sum_l H_l W_l, 4 * (reg_max + 1)]`` (side-major:
    left, top, right, bottom, each ``reg_max + 1`` bins). The scales (``scales[l]``, init 1) multiply
    the logits, as mmdetection's ``Scale`` does.
    """

    def __init__(self, in_channels: int, num_levels: int, reg_max: int = 16, num_convs: int = 4,
                 num_groups: int = 32) -> None:
        super().__init__()
        self.reg_max = reg_max
        self.conv = _tower(in_channels, num_convs, num_groups)
        self.bbox_reg = nn.Conv2d(in_channels, 4 * (reg_max + 1), kernel_size=3, padding=1)
        nn.init.normal_(self.bbox_reg.weight, std=0.01)
        nn.init.zeros_(self.bbox_reg.bias)
        self.scales = nn.Parameter(torch.ones(num_levels))

    def forward(self, x: list[Tensor]) -> Tensor:
        if len(x) != self.scales.numel():
            raise ValueError(f"the regression head has {self.scales.numel()} level scales, got {len(x)} levels")
        return torch.cat([_flatten(self.bbox_reg(self.conv(f)) * self.scales[i]) for i, f in enumerate(x)], dim=1)


class GFLHead(nn.Module):
    """GFL's head: classification and regression branches on every FPN level, and its losses.

    ``forward(levels)`` -> ``{"cls_logits": [N, sum HW, K], "bbox_regression": [N, sum HW, 4 * (reg_max + 1)]}``.
    As torchvision's ``RetinaNetHead`` / ``FCOSHead``, the head owns its loss: ``compute_loss`` on the locations
    that ``assign`` (ATSS) made positive, as the sum of ``classification_loss`` (QFL), ``box_loss`` (GIoU) and
    ``distribution_loss`` (DFL), the terms of the GFL paper's training loss (Li et al., NeurIPS 2020, Sec. 3,
    "Training Dense Detectors with GFL"): ``L = 1/N_pos sum_z L_Q + 1/N_pos sum_z 1{c*_z > 0} (l0 L_B + l1 L_D)``,
    where mmdetection (and this head) normalise ``L_B`` and ``L_D`` by the sum of their weights (the detached best
    class score of each positive) instead of ``N_pos``.

    Args:
        in_channels: FPN channels.
        num_classes: logits per location (background included, see the module docstring).
        num_levels: FPN levels (one regression scale each).
        reg_max: the largest bin (16); at least 1.
        num_groups: GroupNorm groups (32 in GFL; default ``gcd(32, in_channels)`` so any width works).
        num_convs: convs per branch (4).
        atss_topk: ATSS candidates per level and box (9).
        qfl_beta: QFL's exponent beta (2).
        giou_weight, dfl_weight: the weights ``l0`` (2.0) of ``L_B`` and ``l1`` (0.25) of ``L_D``.
    """

    def __init__(self, in_channels: int, num_classes: int, num_levels: int = 5, reg_max: int = 16,
                 num_groups: int | None = None, num_convs: int = 4, atss_topk: int = 9, qfl_beta: float = 2.0,
                 giou_weight: float = 2.0, dfl_weight: float = 0.25) -> None:
        super().__init__()
        _check_reg_max(reg_max)
        if atss_topk < 1:
            raise ValueError(f"atss_topk must be >= 1, got {atss_topk!r}")
        groups = math.gcd(32, in_channels) if num_groups is None else num_groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or in_channels % groups:
            raise ValueError(f"num_groups must be an int >= 1 that divides the head's {in_channels} channels (GroupNorm), "
                             f"got {num_groups!r}")
        self.reg_max = reg_max
        self.atss_topk = atss_topk
        self.qfl_beta = qfl_beta
        self.giou_weight = giou_weight
        self.dfl_weight = dfl_weight
        self.classification_head = GFLClassificationHead(in_channels, num_classes, num_convs, groups)
        self.regression_head = GFLRegressionHead(in_channels, num_levels, reg_max, num_convs, groups)

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        return {"cls_logits": self.classification_head(x), "bbox_regression": self.regression_head(x)}

    def assign(self, anchors: list[Tensor], num_anchors_per_level: Sequence[int], targets: list[Target]) -> Tensor:
        """ATSS (Zhang et al., CVPR 2020, Algorithm 1; ``atss_assign``) of each image's anchors ``[A, 4]`` to its
        boxes, ``atss_topk`` candidates per level and box -> ``[N, A]`` box index, or -1 (negative). In float32
        (float64 for float64 anchors)."""
        return torch.stack([atss_assign(_at_least_float32(a), num_anchors_per_level,
                                        t["boxes"].to(_at_least_float32(a).dtype), self.atss_topk)
                            for a, t in zip(anchors, targets, strict=True)])

    def compute_loss(
        self,
        targets: list[Target],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: Tensor,
        anchor_strides: Tensor,
    ) -> dict[str, Tensor]:
        """GFL's losses (mmdetection ``GFLHead.loss``) on the assigned locations.

        Boxes are decoded in units of the level's stride (``distance2box`` of the anchor centre and
        ``integral_distances``). Every location is computed and the negatives are masked out (weight 0), so
        that no count is read back from the device. Computed in float32 (float64 for float64 inputs), also
        under autocast.

        Args:
            targets: per image ``{"boxes": [G_i, 4], "labels": [G_i]}`` in resized-input pixels.
            head_outputs: ``forward``'s outputs, ``[N, A, K]`` and ``[N, A, 4 * (reg_max + 1)]``.
            anchors: per image ``[A, 4]``.
            matched_idxs: ``[N, A]`` the assigned box of each location, or -1 (``assign``).
            anchor_strides: ``[A]`` the stride of each anchor's level.

        Returns:
            ``{"classification": classification_loss, "bbox_regression": box_loss, "bbox_dfl": distribution_loss}``.
        """
        cls_logits = _at_least_float32(head_outputs["cls_logits"])  # [N, A, K]
        dtype = cls_logits.dtype
        bbox_logits = head_outputs["bbox_regression"].to(dtype)  # [N, A, 4(R+1)]
        anchors_t = torch.stack(anchors).to(dtype)  # [N, A, 4]
        pos = (matched_idxs >= 0).to(dtype)
        gt_boxes = torch.stack([t["boxes"].to(dtype)[m.clamp(min=0)] if len(t["boxes"]) else
                                anchors_t.new_zeros(len(m), 4) for t, m in zip(targets, matched_idxs, strict=True)])
        gt_labels = torch.stack([t["labels"][m.clamp(min=0)] if len(t["labels"]) else torch.zeros_like(m)
                                 for t, m in zip(targets, matched_idxs, strict=True)])  # [N, A]
        strides = anchor_strides.to(dtype)[:, None]  # [A, 1]
        centres = anchor_centres(anchors_t) / strides  # [N, A, 2], in strides
        pred_boxes = distance2box(centres, integral_distances(bbox_logits, self.reg_max))  # [N, A, 4], in strides
        target_boxes = gt_boxes / strides

        loss_cls = self.classification_loss(cls_logits, pred_boxes, target_boxes, gt_labels, pos)
        weight = cls_logits.detach().sigmoid().amax(dim=-1) * pos  # [N, A]
        weight_sum = mean_over_ranks(weight.sum()).clamp(min=1)
        return {
            "classification": loss_cls,
            "bbox_regression": self.box_loss(pred_boxes, target_boxes, weight, weight_sum),
            "bbox_dfl": self.distribution_loss(bbox_logits, centres, target_boxes, weight, weight_sum),
        }

    def classification_loss(self, cls_logits: Tensor, pred_boxes: Tensor, target_boxes: Tensor, gt_labels: Tensor,
                            pos: Tensor) -> Tensor:
        """``1/N_pos sum_z L_Q``: the GFL paper's Quality Focal Loss (Sec. 3, "Quality Focal Loss";
        ``quality_focal_loss``) summed over locations and classes, over
        ``N_pos = max(1, mean over ranks of sum_i max(1, positives of image i))``.

        The soft target ``y`` of a positive location is the IoU of its detached decoded box with its box, at
        its label's logit; 0 everywhere else.

        Args:
            cls_logits: ``[N, A, K]``; ``pred_boxes``, ``target_boxes``: ``[N, A, 4]`` in strides;
            gt_labels: ``[N, A]`` the assigned box's label; pos: ``[N, A]`` 1 at a positive, else 0.
        """
        iou = aligned_iou(pred_boxes.detach().flatten(0, 1), target_boxes.flatten(0, 1)).view_as(pos) * pos
        quality = F.one_hot(gt_labels, cls_logits.shape[-1]).to(iou.dtype) * iou[..., None]  # [N, A, K]
        num_pos = mean_over_ranks(pos.sum(dim=1).clamp(min=1).sum()).clamp(min=1)
        return quality_focal_loss(cls_logits, quality, self.qfl_beta).sum() / num_pos

    def box_loss(self, pred_boxes: Tensor, target_boxes: Tensor, weight: Tensor, weight_sum: Tensor) -> Tensor:
        """``l0 L_B``: ``giou_weight`` x the GIoU loss (Rezatofighi et al., CVPR 2019, ``1 - GIoU``) of each positive,
        weighted by ``weight`` (``[N, A]``: its detached best class score, 0 at negatives), over ``weight_sum``."""
        giou = generalized_box_iou_loss(pred_boxes, target_boxes, reduction="none")  # [N, A]
        return self.giou_weight * (weight * giou).sum() / weight_sum

    def distribution_loss(self, bbox_logits: Tensor, centres: Tensor, target_boxes: Tensor, weight: Tensor,
                          weight_sum: Tensor) -> Tensor:
        """``l1 L_D``: ``dfl_weight`` x the GFL paper's Distribution Focal Loss (Sec. 3, "Distribution Focal Loss";
        ``distribution_focal_loss``) averaged over the four sides of each positive, weighted by ``weight`` as
        ``box_loss``, over ``weight_sum``. The targets are the distances from the anchor centre to the box's sides
        in strides, clamped to ``[0, reg_max - 0.1]`` (``box2distance``)."""
        dfl_target = box2distance(centres, target_boxes, self.reg_max).flatten()
        dfl = distribution_focal_loss(bbox_logits.reshape(-1, self.reg_max + 1), dfl_target).view(*weight.shape, 4)
        return self.dfl_weight * (weight * dfl.mean(dim=-1)).sum() / weight_sum


def _at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32, or float64 if it is float64 (low-precision outputs of autocast go up to float32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_reg_max(reg_max: object) -> None:
    if isinstance(reg_max, bool) or not isinstance(reg_max, int) or reg_max < 1:
        raise ValueError(f"reg_max must be an int >= 1 (the largest distance bin; GFL uses 16), got {reg_max!r}")


# -- the detector ----------------------------------------------------------------------------------------

class GFL(nn.Module):
    """GFL detector with torchvision's dense-detector interface (see ``torchvision.models.detection.FCOS``).

    Train mode: ``model(images, targets)`` returns ``{"classification": QFL, "bbox_regression": GIoU,
    "bbox_dfl": DFL}``; eval mode: ``model(images)`` returns per image ``{"boxes", "scores", "labels"}``
    in original image pixels.

    Args:
        backbone: FPN backbone with ``out_channels`` (e.g. ``resnet_fpn(..., "p6p7")``: P3-P7).
        num_classes: foreground classes + 1 (labels ``1..num_classes-1``; see the module docstring).
        min_size, max_size, image_mean, image_std: ``GeneralizedRCNNTransform``'s resize and normalisation.
        anchor_generator: a ``GFLAnchorGenerator``; default sides 8 x stride on strides 8, 16, 32, 64, 128.
        head: default ``GFLHead(backbone.out_channels, num_classes, levels, reg_max, ...)`` with the loss settings
            below; a given head must have the same ``reg_max`` and loss settings.
        reg_max: the largest distance bin (16): a side reaches at most ``reg_max`` strides from the centre.
        atss_topk: ATSS candidates per level and box (9).
        qfl_beta, giou_weight, dfl_weight: loss settings (2.0, 2.0, 0.25), held by the head (``GFLHead``).
        num_groups: GroupNorm groups of the default head's towers; default ``gcd(32, channels)`` (mmdetection's 32
            at 256 channels; at 32 channels every group is one channel).
        score_thresh, nms_thresh, detections_per_img, topk_candidates: test settings (0.05, 0.6, 100,
            1000 per level before NMS), as mmdetection's GFL ``test_cfg``.
        **kwargs: passed to ``GeneralizedRCNNTransform`` (e.g. ``size_divisible``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        min_size: int = 800,
        max_size: int = 1333,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        anchor_generator: GFLAnchorGenerator | None = None,
        head: nn.Module | None = None,
        reg_max: int = 16,
        atss_topk: int = 9,
        qfl_beta: float = 2.0,
        giou_weight: float = 2.0,
        dfl_weight: float = 0.25,
        num_groups: int | None = None,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
        **kwargs,
    ) -> None:
        super().__init__()
        _check_reg_max(reg_max)
        if not hasattr(backbone, "out_channels"):
            raise ValueError("backbone must have an out_channels attribute (the FPN channels)")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (foreground classes + 1), got {num_classes!r}")
        if anchor_generator is None:
            strides = (8, 16, 32, 64, 128)
            anchor_generator = GFLAnchorGenerator([OCTAVE_BASE_SCALE * s for s in strides], strides)
        if not isinstance(anchor_generator, GFLAnchorGenerator):
            raise TypeError(f"anchor_generator must be a GFLAnchorGenerator (one anchor per location on the "
                            f"strides' grid), got {type(anchor_generator).__name__}")
        self.backbone = backbone
        self.anchor_generator = anchor_generator
        num_levels = len(anchor_generator.strides)
        settings = dict(reg_max=reg_max, atss_topk=atss_topk, qfl_beta=qfl_beta, giou_weight=giou_weight,
                        dfl_weight=dfl_weight)
        self.head = head if head is not None else GFLHead(backbone.out_channels, num_classes, num_levels,
                                                          num_groups=num_groups, **settings)
        for name, value in settings.items():
            if getattr(self.head, name, value) != value:
                raise ValueError(f"the head has {name}={getattr(self.head, name)}, the detector {name}={value}")
        self.transform = GeneralizedRCNNTransform(min_size, max_size, image_mean or [0.485, 0.456, 0.406],
                                                  image_std or [0.229, 0.224, 0.225], **kwargs)
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates

    def _anchor_strides(self, num_anchors_per_level: Sequence[int], device: torch.device) -> Tensor:
        """``[A]``: the stride of each anchor's level (built on the host, so no device read)."""
        strides = self.anchor_generator.strides
        if len(num_anchors_per_level) != len(strides):
            raise ValueError(f"{len(num_anchors_per_level)} levels of anchors, but the anchor generator has "
                             f"{len(strides)} strides {list(strides)}")
        return torch.cat([torch.full((n,), s) for n, s in zip(num_anchors_per_level, strides, strict=True)]).to(device)

    def _check_labels(self, targets: list[Target]) -> None:
        """``ValueError`` naming a label outside ``0..num_classes-1`` (one device read per batch)."""
        labels = torch.cat([t["labels"] for t in targets])
        bad = (labels < 0) | (labels >= self.num_classes)
        if labels.numel() and bool(bad.any()):
            raise ValueError(f"targets hold class id {int(labels[bad][0])}, outside 0..{self.num_classes - 1}: "
                             f"num_classes={self.num_classes} counts the background, so labels must be "
                             f"1..{self.num_classes - 1}")

    def compute_loss(
        self,
        targets: list[Target],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        num_anchors_per_level: list[int],
    ) -> dict[str, Tensor]:
        """The head's losses on its ATSS assignment, as torchvision's ``FCOS.compute_loss`` (``GFLHead.assign``, then
        ``GFLHead.compute_loss``): ``{"classification": QFL, "bbox_regression": GIoU, "bbox_dfl": DFL}``.

        Args:
            targets: per image ``{"boxes": [G_i, 4], "labels": [G_i]}`` in resized-input pixels.
            head_outputs: ``GFLHead`` outputs, ``[N, A, K]`` and ``[N, A, 4 * (reg_max + 1)]``.
            anchors: per image ``[A, 4]``.
            num_anchors_per_level: locations per level (summing to ``A``).

        Raises:
            ValueError: a label outside ``0..num_classes-1``.
        """
        self._check_labels(targets)
        dtype = torch.promote_types(head_outputs["cls_logits"].dtype, torch.float32)  # the losses' precision
        anchors = [a.to(dtype) for a in anchors]
        matched = self.head.assign(anchors, num_anchors_per_level, targets)  # [N, A], -1: negative
        strides = self._anchor_strides(num_anchors_per_level, head_outputs["cls_logits"].device)
        return self.head.compute_loss(targets, head_outputs, anchors, matched, strides)

    def postprocess_detections(
        self,
        head_outputs: dict[str, list[Tensor]],
        anchors: list[list[Tensor]],
        image_sizes: list[tuple[int, int]],
    ) -> list[Target]:
        """Detections per image in resized-input pixels (torchvision ``RetinaNet.postprocess_detections``'s steps).

        Per level: sigmoid scores above ``score_thresh``, the best ``topk_candidates`` (location, class)
        pairs, boxes decoded as anchor centre +/- ``integral_distances * stride`` and clipped to the
        image; then class-wise NMS (``batched_nms``, IoU ``nms_thresh``) and the best ``detections_per_img``.

        Args:
            head_outputs: per output name a list over levels of ``[N, HW_l, D]``.
            anchors: per image a list over levels of ``[HW_l, 4]``.
            image_sizes: per image its resized (H, W).
        """
        detections = []
        for index, image_size in enumerate(image_sizes):
            boxes_all, scores_all, labels_all = [], [], []
            for logits, bbox, level_anchors, stride in zip(head_outputs["cls_logits"], head_outputs["bbox_regression"],
                                                           anchors[index], self.anchor_generator.strides, strict=True):
                num_classes = logits.shape[-1]
                scores = _at_least_float32(logits[index]).sigmoid().flatten()
                keep = scores > self.score_thresh
                scores, idxs = scores[keep], torch.where(keep)[0]
                scores, order = scores.topk(det_utils._topk_min(idxs, self.topk_candidates, 0))
                idxs = idxs[order]
                anchor_idxs = torch.div(idxs, num_classes, rounding_mode="floor")
                distances = integral_distances(_at_least_float32(bbox[index][anchor_idxs]), self.reg_max) * stride
                centres = anchor_centres(_at_least_float32(level_anchors[anchor_idxs]))
                boxes_all.append(clip_boxes_to_image(distance2box(centres, distances), image_size))
                scores_all.append(scores)
                labels_all.append(idxs % num_classes)
            boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections

    def forward(
        self, images: list[Tensor], targets: list[Target] | None = None
    ) -> dict[str, Tensor] | list[Target]:
        """Losses (train mode; ``targets`` required) or detections in original image pixels (eval mode).

        As torchvision's ``FCOS.forward``, with ``ValueError`` where torchvision asserts.
        """
        if self.training and targets is None:
            raise ValueError("targets are required in train mode")
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, targets = self.transform(images, targets)
        if targets is not None:
            check_positive_boxes(targets)
        features = self.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        feats = list(features.values())
        head_outputs = self.head(feats)
        anchors = self.anchor_generator(image_list, feats)
        num_anchors_per_level = [f.shape[-2] * f.shape[-1] for f in feats]
        if self.training:
            return self.compute_loss(targets, head_outputs, anchors, num_anchors_per_level)
        split_outputs = {k: list(v.split(num_anchors_per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(num_anchors_per_level)) for a in anchors]
        detections = self.postprocess_detections(split_outputs, split_anchors, image_list.image_sizes)
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)


# -- the adapter -----------------------------------------------------------------------------------------

class GFLAdapter(DenseAdapter):
    """GFL: one square anchor per location (8 x stride at 800 px: mmdetection's), its ATSS assignment and its head
    split at a tower conv; its box-bin logits are also the shared ``box_bins``. torchvision has no GFL weights."""

    arch = "gfl"
    model_class = GFL
    shared_outputs = {"box_bins": "bbox_regression"}
    head_outputs = ("cls_logits", "bbox_regression", *shared_outputs)
    anchor_stride_factor = float(OCTAVE_BASE_SCALE)
    weights_keys = ("head.classification_head.cls_logits", "head.regression_head.bbox_reg",
                    "head.regression_head.scales")
    gives_assignment = True
    splits_head = True

    def anchor_generator(self, sizes: Sequence[float], strides: Sequence[float]) -> AnchorGenerator:
        return GFLAnchorGenerator(sizes, strides)

    def build(self, backbone: nn.Module, num_classes: int, anchor_generator: AnchorGenerator,
              levels: Sequence[str], min_size: int, max_size: int, **kwargs: Any) -> nn.Module:
        return GFL(backbone, num_classes, min_size=min_size, max_size=max_size, anchor_generator=anchor_generator,
                   **kwargs)

    def assign(self, model: nn.Module, priors: Tensor, counts: list[int], targets: list[Target]) -> Tensor:
        """ATSS on all levels' anchors, as ``GFL.compute_loss`` assigns them (``GFLHead.assign``)."""
        return model.head.assign([priors] * len(targets), counts, targets)

    def towers(self, model: nn.Module) -> dict[str, nn.Sequential]:
        """GFL's two towers, each ``num_convs`` x (conv, GroupNorm, ReLU), by branch."""
        return {"cls": model.head.classification_head.conv, "reg": model.head.regression_head.conv}

    def head_from(self, model: nn.Module, level_index: int, held: Mapping[str, Tensor],
                  split: int) -> dict[str, Tensor]:
        """The towers' remaining layers (the split conv's ReLU first), then the output convs, the regression times
        its level scale -> ``{"cls_logits", "box_bins"}``."""
        head, start = model.head, max(3 * split - 1, 0)
        cls = head.classification_head.conv[start:](held["cls"])
        reg = head.regression_head.conv[start:](held["reg"])
        return {"cls_logits": head.classification_head.cls_logits(cls),
                "box_bins": head.regression_head.bbox_reg(reg) * head.regression_head.scales[level_index]}
