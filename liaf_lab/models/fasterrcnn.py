"""Faster R-CNN (torchvision's ``FasterRCNN``, and its subclasses Mask / Keypoint R-CNN run as their box part):
its adapter, which runs the RPN and the RoI heads as ``RegionProposalNetwork.forward`` and ``RoIHeads.forward``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import MultiScaleRoIAlign

from .adapter import DetectorAdapter, HeadRun, Target


def _box_branch(model: FasterRCNN, features: OrderedDict[str, Tensor], proposals: list[Tensor],
                image_sizes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """RoI head on ``proposals`` (per image ``[P_i, 4]``): class logits ``[P, K]``, box deltas ``[P, 4K]``."""
    roi = model.roi_heads
    return roi.box_predictor(roi.box_head(roi.box_roi_pool(features, proposals, image_sizes)))


def _box_training_samples(
    roi: RoIHeads, proposals: list[Tensor], targets: list[Target]
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """``RoIHeads.select_training_samples`` for the box branch: sampled proposals, their labels and box targets.

    The same steps and random sampling as torchvision's, without its check that Mask / Keypoint
    R-CNN targets carry masks / keypoints, which the box branch never reads.
    """
    dtype, device = proposals[0].dtype, proposals[0].device
    gt_boxes = [t["boxes"].to(dtype) for t in targets]
    proposals = roi.add_gt_proposals(proposals, gt_boxes)
    matched_idxs, labels = roi.assign_targets_to_proposals(proposals, gt_boxes, [t["labels"] for t in targets])
    sampled = roi.subsample(labels)
    no_box = torch.zeros((1, 4), dtype=dtype, device=device)  # torchvision's stand-in for an image without boxes
    matched_boxes = [(g if g.numel() else no_box)[m[i]] for g, m, i in zip(gt_boxes, matched_idxs, sampled, strict=True)]
    proposals = [p[i] for p, i in zip(proposals, sampled, strict=True)]
    return proposals, [lab[i] for lab, i in zip(labels, sampled, strict=True)], roi.box_coder.encode(matched_boxes, proposals)


class FasterRCNNAdapter(DetectorAdapter):
    """torchvision's Faster R-CNN on P2-P6 (``"pool"``): RPN anchors of 3 ratios (base size 8 x stride at 800 px),
    a softmax box head (logit 0: background); torchvision publishes COCO weights.

    Its head outputs are the RPN's (``objectness`` scores each anchor, class-agnostic); Grad-CAM adds the box
    head's class logits of the explained boxes (``box_class_logits``).
    """

    arch = "fasterrcnn"
    model_class = FasterRCNN
    head_outputs = ("objectness", "bbox_deltas")
    prior_scores = "objectness"
    foreground_from = 1
    fpn_extra = "pool"
    anchor_stride_factor = 8.0
    weights_keys = ("roi_heads.box_predictor",)
    # "classes": K rows; "boxes": 4 rows per class.
    pretrained_class_keys = {"roi_heads.box_predictor.cls_score.weight": "classes",
                             "roi_heads.box_predictor.cls_score.bias": "classes",
                             "roi_heads.box_predictor.bbox_pred.weight": "boxes",
                             "roi_heads.box_predictor.bbox_pred.bias": "boxes"}

    def num_classes(self, model: nn.Module) -> int:
        """``roi_heads.box_predictor.cls_score.out_features``."""
        return int(model.roi_heads.box_predictor.cls_score.out_features)

    def anchor_generator(self, sizes: Sequence[float], strides: Sequence[float]) -> AnchorGenerator:
        """One size x 3 ratios (0.5, 1, 2) per level."""
        return AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * len(sizes))

    def build(self, backbone: nn.Module, num_classes: int, anchor_generator: AnchorGenerator,
              levels: Sequence[str], min_size: int, max_size: int, **kwargs: Any) -> nn.Module:
        """RoIAlign (7 x 7, sampling ratio 2) on every level but ``"pool"``, as torchvision's."""
        roi_pool = MultiScaleRoIAlign([lvl for lvl in levels if lvl != "pool"], output_size=7, sampling_ratio=2)
        return FasterRCNN(backbone, num_classes, min_size=min_size, max_size=max_size,
                          rpn_anchor_generator=anchor_generator, box_roi_pool=roi_pool, **kwargs)

    def run_heads(self, model: nn.Module, image_list: ImageList, features: OrderedDict[str, Tensor],
                  targets: list[Target] | None, original_sizes: list[tuple[int, int]] | None) -> HeadRun:
        """RPN then RoI heads, as ``RegionProposalNetwork.forward`` and ``RoIHeads.forward``."""
        rpn, roi, sizes = model.rpn, model.roi_heads, image_list.image_sizes
        feats = list(features.values())
        objectness, deltas = rpn.head(feats)  # per level [N, A, H, W] and [N, 4A, H, W]
        anchors = rpn.anchor_generator(image_list, feats)
        anchors_per_level = [o[0].numel() for o in objectness]
        flat_objectness, flat_deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(flat_deltas.detach(), anchors).view(len(anchors), -1, 4)
        proposals, _ = rpn.filter_proposals(proposals, flat_objectness, sizes, anchors_per_level)

        losses: dict[str, Tensor] = {}
        if targets is not None:
            labels, matched_boxes = rpn.assign_targets_to_anchors(anchors, targets)
            regression_targets = rpn.box_coder.encode(matched_boxes, anchors)
            loss_objectness, loss_rpn_box_reg = rpn.compute_loss(flat_objectness, flat_deltas, labels,
                                                                  regression_targets)
            sampled, sampled_labels, box_targets = _box_training_samples(roi, proposals, targets)
            class_logits, box_regression = _box_branch(model, features, sampled, sizes)
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, sampled_labels, box_targets)
            losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg,
                      "loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}

        detections = None
        if original_sizes is not None:
            class_logits, box_regression = _box_branch(model, features, proposals, sizes)
            boxes, scores, labels = roi.postprocess_detections(class_logits, box_regression, proposals, sizes)
            detections = [{"boxes": b, "labels": lab, "scores": s} for b, s, lab in zip(boxes, scores, labels, strict=True)]
            detections = model.transform.postprocess(detections, sizes, original_sizes)
        outputs = {lvl: {"objectness": o, "bbox_deltas": d} for lvl, o, d in zip(features, objectness, deltas, strict=True)}
        return losses, detections, outputs, dict(zip(features, anchors[0].split(anchors_per_level), strict=True))

    def box_class_logits(self, model: nn.Module, features: OrderedDict[str, Tensor],
                         image_sizes: list[tuple[int, int]], boxes: list[Tensor]) -> list[Tensor] | None:
        """The box head's class logits ``[T_i, K]`` of each image's boxes taken as proposals (logit 0: background)."""
        heads = model.roi_heads
        pooled = heads.box_head(heads.box_roi_pool(features, boxes, image_sizes))
        class_logits, _ = heads.box_predictor(pooled)  # [T_total, K]
        return list(class_logits.split([len(b) for b in boxes]))
