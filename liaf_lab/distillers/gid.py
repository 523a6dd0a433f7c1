"""GID: General Instance Distillation for Object Detection (Dai et al., CVPR 2021).

The general instance selection module (GISM) scores every prior (anchor or point) of every FPN
level by how much teacher and student disagree on its class probabilities, keeps the top ``K``
after NMS, and three losses distil on those instances: feature (RoIAlign features, MSE),
relation (pairwise distances of the instances' features, RKD style) and response (the
classification head outputs at the priors that match an instance). Ground-truth boxes are not read.

Facts from the paper: GI score ``max_c |P_t^c - P_s^c|`` per location, NMS with IoU 0.3, ``K = 10``
instances per image. Numbers the paper does not fix come from the public detectron2
re-implementation ``DistillGID`` (``add_distill_cfg``, ``loss.py``): pre-NMS pool 3000, RoIAlign 10 x 10
(``ROIAlignV2``, sampling ratio 2) with FPN's level rule (``ROIPooler``), loss weights feature 5e-3,
relation 40, response 0.1, feature loss summed over channels and averaged over instances and bins,
response BCE with the teacher's probabilities over the priors an instance matches.

Differences to paper and re-implementation (fixed shapes, no device reads):

* The GI box is the prior's box, not the decoded prediction of the more confident side (box decoding
  differs per detector). A point prior (no larger than one cell: FCOS's zero-size point, or
  torchvision FCOS's one-cell anchor) stands for a box of side ``point_prior_scale * stride``.
* Greedy NMS runs as ``K`` steps of argmax and suppression over a pool of the ``pre_nms`` highest
  scores (``torch.topk``, the same for every image); ties go to the lower prior index; an image whose
  pool runs out of boxes has fewer valid instances (a validity mask, no value-dependent shapes).
* Relation: per image over its valid instances, ``1/n^2`` of the smooth-L1 sum (the paper's ``1/K^2``),
  averaged over the images; the re-implementation pools all instances of the batch in one relation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from ..utils.options import Fraction, Positive, PositiveInt, Weight
from .base import FeatureDistiller, KDInputs, flat_logits, prior_boxes
from .ops import box_cells
from .registry import register_distiller

RoiLevel = Literal["size", "prior"]
CANONICAL_LEVEL = 4  # FPN's k0: a box of ``canonical_size`` pixels pools from stride 2**4
DIST_EPS = 1e-12  # RKD's ``pdist`` clamp of the squared distances


def pair_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes ``a [..., 4]`` and ``b [..., 4]`` (x1, y1, x2, y2), broadcast -> ``[...]``; 0 for two empty boxes."""
    inter = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp_min(0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp_min(0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp_min(0).prod(-1)
    union = area_a + area_b - inter
    return inter / union.clamp_min(torch.finfo(union.dtype).tiny)


def gi_scores(teacher: Tensor, student: Tensor) -> Tensor:
    """GISM's GI score: ``max_c |sigmoid(t_c) - sigmoid(s_c)|``; logits ``[N, P, K]`` -> ``[N, P]`` (at least float32)."""
    dtype = torch.promote_types(teacher.dtype, torch.float32)
    return (teacher.to(dtype).sigmoid() - student.to(dtype).sigmoid()).abs().amax(dim=-1)


def select_instances(scores: Tensor, boxes: Tensor, num_instances: int, nms_iou: float,
                     pre_nms: int) -> tuple[Tensor, Tensor]:
    """GISM's NMS and top-K with fixed shapes: greedy NMS (suppress IoU > ``nms_iou``) over the
    ``pre_nms`` highest scores, stopped after ``num_instances`` picks.

    Args:
        scores: ``[N, P]`` GI scores of all priors of all levels.
        boxes: ``[P, 4]`` their GI boxes (the same for every image).
    Returns:
        ``index [N, K]`` (into P) and ``valid [N, K]`` (bool; False once an image's pool is exhausted).
        Among equal scores the lower prior index comes first.
    """
    n, p = scores.shape
    pool = scores.topk(min(pre_nms, p), dim=1).indices.sort(dim=1).values  # [N, M] ascending: argmax breaks ties low
    pool_scores = scores.gather(1, pool)
    pool_boxes = boxes.index_select(0, pool.flatten()).view(n, -1, 4)  # [N, M, 4]
    alive = torch.ones_like(pool, dtype=torch.bool)
    dead = scores.new_tensor(float("-inf"))
    picks, valid = [], []
    for _ in range(num_instances):
        best = torch.where(alive, pool_scores, dead).argmax(dim=1, keepdim=True)  # [N, 1]
        valid.append(alive.gather(1, best))
        picks.append(pool.gather(1, best))
        box = pool_boxes.gather(1, best[:, :, None].expand(-1, -1, 4))  # [N, 1, 4]
        alive = (alive & (pair_iou(box, pool_boxes) <= nms_iou)).scatter(1, best, False)
    return torch.cat(picks, dim=1), torch.cat(valid, dim=1)


def fpn_level(boxes: Tensor, strides: list[float], canonical_size: float) -> Tensor:
    """FPN's RoI level rule (detectron2 ``assign_boxes_to_levels``): ``k = floor(4 + log2(sqrt(wh) / canonical_size))``
    clamped to the levels' ``log2(stride)`` range; ``[..., 4]`` -> the index of the level nearest to ``k``."""
    logs = [math.log2(s) for s in strides]
    size = (boxes[..., 2:] - boxes[..., :2]).clamp_min(0).prod(-1).sqrt()
    k = torch.floor(CANONICAL_LEVEL + torch.log2(size / canonical_size + 1e-8)).clamp(min(logs), max(logs))
    return (k[..., None] - torch.tensor(logs, dtype=k.dtype, device=k.device)).abs().argmin(dim=-1)


def instance_feature_loss(teacher: Tensor, student: Tensor, valid: Tensor) -> Tensor:
    """Feature-based loss (re-implementation ``distill_loss_feature``, L2): the squared error summed over
    channels and averaged over the valid instances and the RoI bins; ``[I, C, r, r]`` twice, ``valid [I]``."""
    per_instance = (teacher - student).square().sum(dim=1).mean(dim=(1, 2))
    return (per_instance * valid).sum() / valid.sum().clamp_min(1)


def pairwise_distances(x: Tensor) -> Tensor:
    """RKD ``pdist``: Euclidean distances ``sqrt(max(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, eps))``; ``[N, K, D]`` -> ``[N, K, K]``,
    in at least float32 (also under autocast, whose half-precision matmul would overflow the squared norms)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    with torch.autocast(x.device.type, enabled=False):
        sq = x.square().sum(dim=-1)
        return (sq[:, :, None] + sq[:, None, :] - 2 * x @ x.transpose(1, 2)).clamp_min(DIST_EPS).sqrt()


def relation_loss(teacher: Tensor, student: Tensor, valid: Tensor) -> Tensor:
    """Relation-based loss (RKD distance loss, re-implementation ``loss_RkdDistance``): per image
    ``(1/n^2) sum_{i != j} smooth_l1(d^S_ij / mu^S, d^T_ij / mu^T)`` over its ``n`` valid instances, ``mu``
    the mean distance of its valid pairs; averaged over the images (0 for an image with ``n < 2``).

    ``teacher [N, K, D_t]``, ``student [N, K, D_s]``, ``valid [N, K]`` (bool).
    """
    k = valid.shape[1]
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=valid.device)
    dtype = torch.promote_types(teacher.dtype, torch.float32)
    pairs = (valid[:, :, None] & valid[:, None, :] & off_diagonal).to(dtype)  # [N, K, K]
    count = pairs.sum(dim=(1, 2))

    def normalised(x: Tensor) -> Tensor:
        d = pairwise_distances(x) * pairs
        mu = d.sum(dim=(1, 2)) / count.clamp_min(1)
        return d / mu.clamp_min(DIST_EPS)[:, None, None]

    diff = F.smooth_l1_loss(normalised(student), normalised(teacher), beta=1.0, reduction="none") * pairs
    n = valid.sum(dim=1).to(dtype)
    return (diff.sum(dim=(1, 2)) / n.square().clamp_min(1)).mean()


@register_distiller("gid", label="GID")
class GIDDistiller(FeatureDistiller):
    """GID on the FPN levels: terms ``feature``, ``relation`` and ``response`` (weighted), one stage.

    Per image, the ``num_instances`` general instances (GIs) come from all levels together
    (``select_instances`` on ``gi_scores``, no gradient). Each GI is pooled by RoIAlign from one level
    (``roi_level``: ``"size"``, FPN's rule on the GI box as the re-implementation's ``ROIPooler``;
    ``"prior"``, the level of its prior). ``feature``: MSE between the teacher's RoI features and the
    student's, adapted by a 1x1 conv where the channels differ (applied to the RoI features).
    ``relation``: RKD distance loss between the instances' pooled features (the student's unadapted).
    ``response``: BCE of the student's class logits against the teacher's probabilities at every
    prior (any level) whose GI box has IoU ``>= response_iou`` with a GI of its image (the paper's GI
    mask; the re-implementation matches the priors to the GIs with the student's anchor matcher),
    summed over classes and averaged over those priors.

    Args (beyond ``FeatureDistiller``'s); defaults from the paper and the public re-implementation:
        feature_weight, relation_weight, response_weight: the loss weights (5e-3, 40, 0.1).
        num_instances: K GIs per image (paper: 10).
        nms_iou: NMS IoU threshold of the selection (paper: 0.3).
        pre_nms: the pool of highest scores per image NMS runs on (re-implementation: 3000).
        roi_size: RoIAlign output side (re-implementation: 10).
        sampling_ratio: RoIAlign samples per bin side (re-implementation: 2; ``aligned=True``).
        roi_level: ``"size"`` or ``"prior"`` (above).
        canonical_size: FPN's canonical box side (224 px: a box that size pools from stride 16);
            scale it with the input size (e.g. ``224 * min_size / 800``).
        point_prior_scale: the GI box side of a point prior in strides (8: FCOS's largest regression
            range on a level is 8 strides, and ATSS/GFL's one anchor per location is 8 strides).
        response_iou: IoU with a GI from which a prior's head outputs are distilled (RetinaNet's
            positive threshold 0.5).

    Needs the head outputs ``cls_logits`` and the priors (``KDInputs``); the levels must share their
    channels (FPN), as every instance is pooled from one of them.
    """

    needs = frozenset({"head_outputs", "priors"})
    head_keys = ("cls_logits",)

    @dataclass(frozen=True)
    class Options(FeatureDistiller.Options):
        feature_weight: Weight = 5e-3
        relation_weight: Weight = 40.0
        response_weight: Weight = 0.1
        num_instances: PositiveInt = 10
        nms_iou: Fraction = 0.3
        pre_nms: PositiveInt = 3000
        roi_size: PositiveInt = 10
        sampling_ratio: PositiveInt = 2
        roi_level: RoiLevel = "size"
        canonical_size: Positive = 224.0
        point_prior_scale: Positive = 8.0
        response_iou: Fraction = 0.5

    def build(self) -> None:
        for side, channels in (("student", self.student_channels), ("teacher", self.teacher_channels)):
            if len(set(channels.values())) > 1:
                raise ValueError(f"GID pools each instance from one of the levels, so the {side} levels must share "
                                 f"their channels, got {channels}")
        self.projectors = self.make_projectors("auto")

    # -- selection ------------------------------------------------------------------------------
    def gi_boxes_and_logits(self, inputs: KDInputs) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per level: the GI boxes of its priors ``[P_l, 4]``, and the teacher's and student's logits
        ``[N, P_l, K]`` in the priors' order (the teacher's detached)."""
        boxes, teacher, student = [], [], []
        for lvl in self.levels:
            feats = inputs.teacher_feats[lvl]
            priors = inputs.priors[lvl].to(feats.device, torch.promote_types(feats.dtype, torch.float32))
            boxes.append(prior_boxes(priors, self.strides[lvl], self.point_prior_scale))
            teacher.append(flat_logits(inputs.teacher_head[lvl]["cls_logits"].detach(), priors.shape[0]))
            student.append(flat_logits(inputs.student_head[lvl]["cls_logits"], priors.shape[0]))
        return boxes, teacher, student

    @staticmethod
    @torch.no_grad()
    def prior_scores(teacher: list[Tensor], student: list[Tensor]) -> Tensor:
        """GISM's GI scores ``[N, P]`` (``gi_scores``) of the priors of all levels, concatenated in level
        order, from the per-level logits ``[N, P_l, K]`` of ``gi_boxes_and_logits``."""
        return torch.cat([gi_scores(t, s.detach()) for t, s in zip(teacher, student, strict=True)], dim=1)

    @torch.no_grad()
    def select_scored(self, boxes: list[Tensor], scores: Tensor) -> tuple[Tensor, Tensor]:
        """GISM on all levels together (``select_instances``), for the levels' GI boxes ``[P_l, 4]`` and the
        scores ``[N, P]`` of ``prior_scores``: ``index [N, K]`` into the concatenated priors, ``valid [N, K]``."""
        return select_instances(scores, torch.cat(boxes), self.num_instances, self.nms_iou, self.pre_nms)

    @torch.no_grad()
    def select(self, inputs: KDInputs) -> tuple[Tensor, Tensor]:
        """GISM on all levels together: ``index [N, K]`` into the levels' concatenated priors, ``valid [N, K]``."""
        boxes, teacher, student = self.gi_boxes_and_logits(inputs)
        return self.select_scored(boxes, self.prior_scores(teacher, student))

    def instances(self, boxes: list[Tensor], index: Tensor) -> tuple[Tensor, Tensor]:
        """The selected instances' GI boxes ``[N, K, 4]`` and the index (into ``levels``) of the level each
        is pooled from ``[N, K]`` (``roi_level``), for the levels' GI boxes ``[P_l, 4]`` and ``index [N, K]``."""
        n, k = index.shape
        gi = torch.cat(boxes).index_select(0, index.flatten()).view(n, k, 4)  # [N, K, 4]
        if self.roi_level == "size":
            return gi, fpn_level(gi, [self.strides[lvl] for lvl in self.levels], self.canonical_size)
        level = torch.cat([torch.full((b.shape[0],), i, dtype=torch.long, device=b.device)
                           for i, b in enumerate(boxes)]).index_select(0, index.flatten()).view(n, k)
        return gi, level

    # -- losses ---------------------------------------------------------------------------------
    def pool(self, feats: Mapping[str, Tensor], rois: Tensor, level: Tensor) -> Tensor:
        """RoIAlign of each instance on its level: ``rois [I, 5]`` (batch index, box), ``level [I]`` -> ``[I, C, r, r]``."""
        out = None
        for i, lvl in enumerate(self.levels):
            dtype = torch.promote_types(feats[lvl].dtype, rois.dtype)  # boxes in at least float32 (also under autocast)
            x = roi_align(feats[lvl].to(dtype), rois.to(dtype), (self.roi_size, self.roi_size),
                          spatial_scale=1.0 / self.strides[lvl], sampling_ratio=self.sampling_ratio, aligned=True)
            out = x if out is None else torch.where((level == i)[:, None, None, None], x, out)
        return out

    def adapt(self, student: Tensor, level: Tensor) -> Tensor:
        """``f_adapt``: each level's projector on the student RoI features of that level's instances, ``[I, C_s, r, r]``."""
        out = None
        for i, lvl in enumerate(self.levels):
            x = self.projectors[lvl](student)
            out = x if out is None else torch.where((level == i)[:, None, None, None], x, out)
        return out

    def losses_at(self, inputs: KDInputs, index: Tensor, valid: Tensor) -> dict[str, Tensor]:
        """The three weighted terms for given instances (``select``'s ``index [N, K]`` and ``valid [N, K]``)."""
        boxes, teacher_logits, student_logits = self.gi_boxes_and_logits(inputs)
        n, k = index.shape
        gi, level = self.instances(boxes, index)
        batch = torch.arange(n, device=gi.device, dtype=gi.dtype)[:, None, None].expand(n, k, 1)
        rois, level = torch.cat([batch, gi], dim=2).view(n * k, 5), level.flatten()
        t = self.pool(inputs.teacher_feats, rois, level)
        s = self.pool(inputs.student_feats, rois, level)
        feature = instance_feature_loss(t, self.adapt(s, level), valid.flatten().to(t.dtype))
        relation = relation_loss(t.reshape(n, k, -1), s.reshape(n, k, -1), valid)
        return {"feature": self.feature_weight * feature, "relation": self.relation_weight * relation,
                "response": self.response_weight * self.response_loss(boxes, teacher_logits, student_logits, gi, valid)}

    def response_loss(self, boxes: list[Tensor], teacher: list[Tensor], student: list[Tensor], gi: Tensor,
                      valid: Tensor) -> Tensor:
        """Response-based loss on the GI mask (re-implementation ``distill_loss_response``, BCE): the BCE of the
        student's logits against ``sigmoid`` of the teacher's, summed over classes and over the priors whose
        GI box has IoU ``>= response_iou`` with a valid GI of the image, divided by the number of those priors.

        Per level ``boxes [P_l, 4]`` and logits ``[N, P_l, K]``; ``gi [N, K_gi, 4]``, ``valid [N, K_gi]``.
        """
        total, count = None, None
        for mask, t, s in zip(self.response_masks(boxes, gi, valid), teacher, student, strict=True):
            mask = mask.to(s.dtype)
            bce = F.binary_cross_entropy_with_logits(s, t.sigmoid(), reduction="none").sum(dim=2)
            level_total, level_count = (bce * mask).sum(), mask.sum()
            total = level_total if total is None else total + level_total
            count = level_count if count is None else count + level_count
        return total / count.clamp_min(1)

    @torch.no_grad()
    def response_masks(self, boxes: list[Tensor], gi: Tensor, valid: Tensor) -> list[Tensor]:
        """The GI mask of the response term: per level ``[N, P_l]`` bool, the priors whose GI box (``boxes``
        ``[P_l, 4]``) has IoU ``>= response_iou`` with a valid GI of the image (``gi [N, K, 4]``, ``valid [N, K]``)."""
        return [((pair_iou(b[None, :, None, :], gi[:, None, :, :]) >= self.response_iou)  # [N, P_l, K]
                 & valid[:, None, :]).any(dim=2) for b in boxes]

    def compute_terms(self, inputs: KDInputs) -> dict[str, Tensor]:
        """GISM, then ``feature``, ``relation`` and ``response`` on the selected instances (weighted)."""
        index, valid = self.select(inputs)
        return self.losses_at(inputs, index, valid)

    def compute_weight_maps(self, inputs: KDInputs) -> dict[str, dict[str, Tensor]]:
        """GISM's selection as the loss makes it, each level ``[N, H, W]``:

        * ``selected instances``: the GI score of each selected instance (``select``, ``prior_scores``)
          over its GI box on the level it is pooled from (``instances``; cells ``(h, w)`` with
          ``y1 <= h * stride < y2`` and ``x1 <= w * stride < x2``, ``ops.box_cells``'s ``"corner"`` rule),
          the larger score where two overlap, 0 elsewhere; what ``feature`` and ``relation`` read;
        * ``response mask``: the share of the cell's priors in the GI mask (``response_masks``), where
          ``response`` distils the class logits.
        """
        boxes, teacher, student = self.gi_boxes_and_logits(inputs)
        scores = self.prior_scores(teacher, student)
        index, valid = self.select_scored(boxes, scores)
        gi, level = self.instances(boxes, index)
        picked = scores.gather(1, index) * valid  # [N, K]
        response = self.response_masks(boxes, gi, valid)
        maps: dict[str, dict[str, Tensor]] = {"selected instances": {}, "response mask": {}}
        for i, lvl in enumerate(self.levels):
            n, _, height, width = inputs.teacher_feats[lvl].shape
            inside = box_cells(gi, self.strides[lvl], (height, width)) & (level == i)[..., None, None]  # [N, K, H, W]
            maps["selected instances"][lvl] = torch.where(inside, picked[..., None, None], 0.0).amax(dim=1)
            maps["response mask"][lvl] = response[i].view(n, height, width, -1).to(picked.dtype).mean(dim=3)
        return maps
