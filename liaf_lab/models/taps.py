"""One forward pass of a torchvision detector that also hands out its FPN features and head logits.

``run_detector`` re-assembles the forward of torchvision's ``RetinaNet``, ``FCOS`` and
``FasterRCNN`` (and of liaf_lab's ``GFL``, built like them) from their public pieces
(``transform``, ``backbone``, ``head`` / ``rpn`` + ``roi_heads``, ``compute_loss``,
``postprocess_detections``, ``transform.postprocess``) so that the backbone runs once and the caller
gets the task loss, the FPN features, the targets in resized-input pixels and the per-level
classification logits together. With the same RNG state it gives the same losses (train mode) and
detections (eval mode) as ``model(images, targets)``.

Differences from ``model(images, targets)``, all additive:

* targets given in eval mode also give losses (BatchNorm then uses running statistics, as a
  frozen teacher needs). For Faster R-CNN the RPN keeps its eval-mode proposal counts
  (``rpn_*_nms_top_n_test``) and the RoI head samples its training proposals from those; the RPN
  loss itself does not depend on the mode.
* ``features_fn`` may replace the FPN features before the heads run (LIAF-KD stage 1).
* errors are ``TypeError`` / ``ValueError`` instead of ``torch._assert``.
* Mask R-CNN and Keypoint R-CNN (``FasterRCNN`` subclasses) run as their box part: box losses and
  box detections; the mask / keypoint head is not run, so it gets no loss and no output.

``detector_features`` (``model.transform``, then ``model.backbone`` through ``fpn_levels``) is the
one way liaf_lab gets FPN features: ``run_detector``, the training steps, Grad-CAM and the widgets
all use it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import concat_box_prediction_layers

from .backbones import fpn_levels
from .detectors import fpn_strides
from .gfl import GFL, atss_assign

Target = dict[str, Tensor]
FeaturesFn = Callable[[OrderedDict[str, Tensor], list[Target] | None], Mapping[str, Tensor]]
SUPPORTED = ("torchvision RetinaNet, FCOS or FasterRCNN (or MaskRCNN / KeypointRCNN, run as their box part), "
             "or liaf_lab's GFL")


@dataclass
class DetectorOutput:
    """Everything one ``run_detector`` call produces.

    Attributes:
        losses: torchvision's loss dict; empty in eval mode unless targets were given.
        detections: per image ``{"boxes" [D, 4], "scores" [D], "labels" [D]}`` in original image
            pixels (eval mode); ``None`` in train mode.
        features: the backbone's FPN levels ``[N, C, H_l, W_l]`` (before any ``features_fn``).
        strides: level -> input pixels per cell of the batched, resized input (``image_list.tensors``).
        targets: the targets after ``model.transform`` (boxes ``[n, 4]`` in resized-input pixels);
            ``None`` without targets. Distillers must use these boxes, not the original ones.
        head_outputs: level -> output name -> ``[N, A*D, H_l, W_l]`` (channel ``a*D + d``): RetinaNet
            ``cls_logits`` (D = K classes, A anchors) and ``bbox_regression`` (D = 4); FCOS the same with
            A = 1 plus ``bbox_ctrness``; GFL ``cls_logits`` and ``bbox_regression`` (A = 1, D = 4 x (reg_max + 1)
            distance-bin logits, also under the detector-independent name ``box_bins``, ``SHARED_OUTPUTS``);
            Faster R-CNN the RPN's ``objectness`` and ``bbox_deltas``.
            Computed on the features the heads saw (after ``features_fn``).
        priors: level -> ``[H_l * W_l * A, 4]`` anchors in resized-input pixels, in the order of the
            head outputs' cells (row-major over H_l, W_l, then anchors).
        image_list: the batched, normalised input ``[N, 3, H, W]`` and each image's resized size.
    """

    losses: dict[str, Tensor]
    detections: list[Target] | None
    features: OrderedDict[str, Tensor]
    strides: dict[str, float]
    targets: list[Target] | None
    head_outputs: dict[str, dict[str, Tensor]]
    priors: dict[str, Tensor]
    image_list: ImageList

    @property
    def head_logits(self) -> dict[str, Tensor]:
        """level -> classification logits ``[N, A*K, H_l, W_l]`` (Faster R-CNN: RPN objectness ``[N, A, H_l, W_l]``)."""
        return {lvl: next(iter(out.values())) for lvl, out in self.head_outputs.items()}


# Head outputs under a name that means the same on every detector giving it, for methods that need
# the meaning, not the detector's name (architecture -> shared name -> the detector's own output):
# ``box_bins``: ``[N, A * 4 * (R + 1), H_l, W_l]`` distance-bin logits (channel ``a*D + d``, ``D`` side-major:
# left, top, right, bottom, ``R + 1`` bins each), given by detectors whose boxes are distributions.
SHARED_OUTPUTS = {"gfl": {"box_bins": "bbox_regression"}}
# The per-level head outputs each architecture gives (``DetectorOutput.head_outputs``).
HEAD_OUTPUTS = {"retinanet": ("cls_logits", "bbox_regression"),
                "fcos": ("cls_logits", "bbox_regression", "bbox_ctrness"),
                "fasterrcnn": ("objectness", "bbox_deltas"),
                "gfl": ("cls_logits", "bbox_regression", *SHARED_OUTPUTS["gfl"])}


def detector_arch(model: nn.Module) -> str:
    """``"retinanet"``, ``"fcos"``, ``"gfl"`` or ``"fasterrcnn"`` (also Mask / Keypoint R-CNN); else ``TypeError``."""
    if isinstance(model, GFL):
        return "gfl"
    if isinstance(model, RetinaNet):
        return "retinanet"
    if isinstance(model, FCOS):
        return "fcos"
    if isinstance(model, FasterRCNN):
        return "fasterrcnn"
    raise TypeError(f"expected a {SUPPORTED}, got {type(model).__name__}")


def detector_features(
    model: nn.Module, images: list[Tensor], targets: list[Target] | None = None
) -> tuple[ImageList, list[Target] | None, OrderedDict[str, Tensor]]:
    """``model.transform`` then ``model.backbone``: the batched input, the resized targets, the FPN levels.

    Args:
        model: any torchvision detector (``.transform`` and ``.backbone``).
        images: per image a float ``[3, H_i, W_i]`` tensor in ``[0, 1]``.
        targets: per image ``{"boxes" [n_i, 4], "labels" [n_i]}`` in image pixels, or ``None``.

    Returns:
        ``image_list`` (``tensors [N, 3, H, W]`` normalised and padded, ``image_sizes``), the targets
        with boxes in resized-input pixels (``None`` without targets) and ``{level: [N, C, H_l, W_l]}``.
    """
    image_list, targets = model.transform(images, targets)
    return image_list, targets, fpn_levels(model.backbone, image_list.tensors)


def _describe(x: object) -> str:
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _check_targets(targets: object, num_images: int) -> list[Target]:
    """Targets: one dict per image with ``boxes`` float ``[n, 4]`` and ``labels`` int64 ``[n]``."""
    if not isinstance(targets, Sequence) or len(targets) != num_images:
        length = f" of length {len(targets)}" if isinstance(targets, Sequence) else ""
        raise ValueError(f"targets must be a list with one dict per image ({num_images}), "
                         f"got {type(targets).__name__}{length}")
    for i, t in enumerate(targets):
        if not isinstance(t, Mapping) or "boxes" not in t or "labels" not in t:
            raise ValueError(f"targets[{i}] must be a dict with 'boxes' and 'labels'")
        boxes, labels = t["boxes"], t["labels"]
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4 or not boxes.is_floating_point():
            raise ValueError(f"targets[{i}]['boxes'] must be a float tensor [n, 4] (x1, y1, x2, y2), "
                             f"got {_describe(boxes)}")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
            raise ValueError(f"targets[{i}]['labels'] must be an int64 tensor [{boxes.shape[0]}], got {_describe(labels)}")
    return list(targets)


def _check_positive_boxes(targets: list[Target]) -> None:
    """torchvision's degenerate-box check on the transformed targets, as a ValueError."""
    for i, t in enumerate(targets):
        bad = (t["boxes"][:, 2:] <= t["boxes"][:, :2]).any(dim=1)
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            raise ValueError(f"targets[{i}]['boxes'][{j}] = {t['boxes'][j].tolist()} (after resizing) has no "
                             "positive width and height")


def _ordered_features(
    features: Mapping[str, Tensor], levels: Sequence[str], num_images: int
) -> OrderedDict[str, Tensor]:
    """``features`` in the model's level order, checked to be ``[num_images, C, H, W]`` per level."""
    if not isinstance(features, Mapping) or set(features) != set(levels):
        got = list(features) if isinstance(features, Mapping) else type(features).__name__
        raise ValueError(f"features must hold exactly the FPN levels {list(levels)}, got {got}")
    for lvl in levels:
        f = features[lvl]
        if not isinstance(f, Tensor) or f.dim() != 4 or f.shape[0] != num_images:
            shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"features[{lvl!r}] must be [{num_images}, C, H, W], got {shape}")
    return OrderedDict((lvl, features[lvl]) for lvl in levels)


def _per_level_outputs(flat: Tensor, features: Mapping[str, Tensor], num_anchors: int) -> dict[str, Tensor]:
    """A flattened dense-head output ``[N, sum_l H_l W_l A, D]`` -> level -> ``[N, A*D, H_l, W_l]``.

    Undoes the head's ``(N, A*D, H, W) -> (N, H*W*A, D)`` permute; channel ``a*D + d``.
    """
    cells = [f.shape[-2] * f.shape[-1] * num_anchors for f in features.values()]
    out = {}
    for (lvl, f), part in zip(features.items(), flat.split(cells, dim=1), strict=True):
        n, _, h, w = f.shape
        d = part.shape[-1]
        out[lvl] = part.reshape(n, h, w, num_anchors, d).permute(0, 3, 4, 1, 2).reshape(n, num_anchors * d, h, w)
    return out


def _dense_heads(
    model: RetinaNet | FCOS | GFL,
    image_list: ImageList,
    features: OrderedDict[str, Tensor],
    targets: list[Target] | None,
    original_sizes: list[tuple[int, int]] | None,
) -> tuple[dict[str, Tensor], list[Target] | None, dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """RetinaNet / FCOS / GFL: head, anchors, loss (if targets), detections (if original sizes), per-level outputs."""
    feats = list(features.values())
    head_outputs = model.head(feats)  # cls_logits [N, sum(H*W*A), K], bbox_regression [N, sum(H*W*A), 4], ...
    anchors = model.anchor_generator(image_list, feats)
    cells = [f.shape[-2] * f.shape[-1] for f in feats]
    num_anchors = head_outputs["cls_logits"].shape[1] // sum(cells)
    per_level = [c * num_anchors for c in cells]

    losses: dict[str, Tensor] = {}
    if targets is not None:
        if isinstance(model, (FCOS, GFL)):
            losses = model.compute_loss(targets, head_outputs, anchors, per_level)
        else:
            losses = model.compute_loss(targets, head_outputs, anchors)

    detections = None
    if original_sizes is not None:
        split_outputs = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        detections = model.postprocess_detections(split_outputs, split_anchors, image_list.image_sizes)
        detections = model.transform.postprocess(detections, image_list.image_sizes, original_sizes)

    split = {k: _per_level_outputs(v, features, num_anchors) for k, v in head_outputs.items()}
    shared = SHARED_OUTPUTS.get(detector_arch(model), {})
    outputs = {lvl: {**{k: split[k][lvl] for k in head_outputs}, **{k: split[v][lvl] for k, v in shared.items()}}
               for lvl in features}
    return losses, detections, outputs, dict(zip(features, anchors[0].split(per_level), strict=True))


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


def _rcnn_heads(
    model: FasterRCNN,
    image_list: ImageList,
    features: OrderedDict[str, Tensor],
    targets: list[Target] | None,
    original_sizes: list[tuple[int, int]] | None,
) -> tuple[dict[str, Tensor], list[Target] | None, dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """Faster R-CNN: RPN then RoI heads, as ``RegionProposalNetwork.forward`` and ``RoIHeads.forward``."""
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
        loss_objectness, loss_rpn_box_reg = rpn.compute_loss(flat_objectness, flat_deltas, labels, regression_targets)
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


def _heads(
    model: nn.Module,
    image_list: ImageList,
    features: OrderedDict[str, Tensor],
    targets: list[Target] | None,
    original_sizes: list[tuple[int, int]] | None,
) -> tuple[dict[str, Tensor], list[Target] | None, dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    if detector_arch(model) == "fasterrcnn":
        return _rcnn_heads(model, image_list, features, targets, original_sizes)
    return _dense_heads(model, image_list, features, targets, original_sizes)


def run_detector(
    model: nn.Module,
    images: list[Tensor],
    targets: list[Target] | None = None,
    features_fn: FeaturesFn | None = None,
) -> DetectorOutput:
    """Run a torchvision detector once and return losses, detections, FPN features and head logits.

    Args:
        model: torchvision ``RetinaNet``, ``FCOS`` or ``FasterRCNN`` (``MaskRCNN``/``KeypointRCNN``:
            the box part), or liaf_lab's ``GFL``, with any FPN backbone (e.g. from ``create_detector``
            or torchvision's constructors). Its mode decides the outputs: train -> losses; eval -> detections, plus
            losses when ``targets`` are given.
        images: per image a float ``[3, H_i, W_i]`` tensor in ``[0, 1]``.
        targets: per image ``{"boxes": float [n_i, 4] (x1, y1, x2, y2, original pixels),
            "labels": int64 [n_i]}``; ``n_i`` may be 0. Required in train mode.
        features_fn: ``features_fn(features, transformed_targets) -> features`` replaces the FPN
            features (same levels and shapes) before the heads run, e.g. LIAF-KD stage 1:
            ``lambda f, t: liaf.stage1(f, [x["boxes"] for x in t])[0]``.

    Returns:
        ``DetectorOutput``.

    Raises:
        TypeError: ``model`` is not a supported detector, or ``images`` is not a list of tensors.
        ValueError: targets missing in train mode, malformed targets or features.
    """
    detector_arch(model)
    if isinstance(images, Tensor) or not isinstance(images, Sequence) or not images \
            or not all(isinstance(img, Tensor) and img.dim() == 3 for img in images):
        raise TypeError("images must be a non-empty list of [3, H, W] tensors (one per image)")
    if targets is None and model.training:
        raise ValueError(f"targets are required in train mode ({type(model).__name__}.training is True); "
                         "call model.eval() to get detections without targets")
    if targets is not None:
        targets = _check_targets(targets, len(images))
    original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    image_list, targets, features = detector_features(model, list(images), targets)
    if targets is not None:
        _check_positive_boxes(targets)
    head_features = features
    if features_fn is not None:
        head_features = _ordered_features(features_fn(features, targets), list(features), len(images))
        for lvl, f in features.items():
            if head_features[lvl].shape != f.shape:
                raise ValueError(f"features_fn changed the shape of level {lvl!r}: "
                                 f"{tuple(f.shape)} -> {tuple(head_features[lvl].shape)}")
    losses, detections, outputs, priors = _heads(
        model, image_list, head_features, targets, None if model.training else original_sizes
    )
    return DetectorOutput(losses, detections, features, fpn_strides(model), targets, outputs, priors, image_list)


def loss_on_features(
    model: nn.Module, image_list: ImageList, targets: list[Target], features: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The detector's task loss with its heads run on ``features`` instead of its own.

    LIAF-KD stage 1 runs the frozen teacher's head on masked teacher features:
    ``out = run_detector(teacher, images, targets)`` then
    ``loss_on_features(teacher, out.image_list, out.targets, masked)``.

    Args:
        model: a supported detector (either mode; see the module docstring for Faster R-CNN).
        image_list: ``DetectorOutput.image_list`` of the same batch.
        targets: ``DetectorOutput.targets`` (transformed targets, resized-input pixels).
        features: every FPN level ``[N, C, H_l, W_l]`` with the shapes ``run_detector`` produced.

    Returns:
        torchvision's loss dict (e.g. ``classification``, ``bbox_regression`` for RetinaNet).
    """
    detector_arch(model)
    num_images = len(image_list.image_sizes)
    if targets is None:
        raise ValueError("loss_on_features needs the transformed targets (DetectorOutput.targets)")
    targets = _check_targets(targets, num_images)
    ordered = _ordered_features(features, list(fpn_strides(model)), num_images)
    return _heads(model, image_list, ordered, targets, None)[0]


def head_outputs(
    model: nn.Module, image_list: ImageList, features: Mapping[str, Tensor]
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """The detector's per-level head outputs and priors on ``features`` (no loss, no detections).

    Distillers that read head outputs get the teacher's this way, on the student's batched input.
    Returns ``(DetectorOutput.head_outputs, DetectorOutput.priors)``.
    """
    detector_arch(model)
    ordered = _ordered_features(features, list(fpn_strides(model)), len(image_list.image_sizes))
    _, _, outputs, priors = _heads(model, image_list, ordered, None, None)
    return outputs, priors


def _atss_assignment(model: GFL, anchors: Tensor, counts: list[int], targets: list[Target]) -> Tensor:
    """GFL: ATSS on all levels' anchors ``[A, 4]``, as ``GFL.compute_loss`` assigns them -> ``[N, A]``."""
    anchors = anchors.to(torch.promote_types(anchors.dtype, torch.float32))
    return torch.stack([atss_assign(anchors, counts, t["boxes"].to(anchors.dtype), model.atss_topk) for t in targets])


# The detectors whose assignment of priors to boxes (the positives of their task loss) ``prior_assignment``
# computes; a method that ``needs`` ``"assignment"`` runs on these students only.
ASSIGNERS: dict[str, Callable[[nn.Module, Tensor, list[int], list[Target]], Tensor]] = {"gfl": _atss_assignment}


@torch.no_grad()
def prior_assignment(model: nn.Module, priors: Mapping[str, Tensor], targets: list[Target]) -> dict[str, Tensor]:
    """The detector's own assignment of its priors to the ground-truth boxes (no gradient).

    Args:
        model: a detector in ``ASSIGNERS`` (GFL: ATSS, ``atss_assign``).
        priors: ``DetectorOutput.priors``, every level in the model's order (ATSS compares levels).
        targets: ``DetectorOutput.targets`` (boxes in resized-input pixels).

    Returns:
        level -> ``[N, P_l]`` int64 in the priors' order: the index of the prior's box in its image's
        targets, or -1 (negative). The positives are the cells the detector's box losses train.
    """
    arch = detector_arch(model)
    if arch not in ASSIGNERS:
        raise ValueError(f"{type(model).__name__} does not give its assignment of priors (given by: {sorted(ASSIGNERS)})")
    counts = [p.shape[0] for p in priors.values()]
    matched = ASSIGNERS[arch](model, torch.cat(list(priors.values())), counts, targets)
    return dict(zip(priors, matched.split(counts, dim=1), strict=True))


# -- the head split at a tower conv (CrossKD: the student's tower features through the teacher's head) ------

def _gfl_towers(model: GFL) -> dict[str, nn.Sequential]:
    """GFL's two towers, each ``num_convs`` x (conv, GroupNorm, ReLU), by branch."""
    return {"cls": model.head.classification_head.conv, "reg": model.head.regression_head.conv}


def _gfl_head_from(model: GFL, level_index: int, held: Mapping[str, Tensor], split: int) -> dict[str, Tensor]:
    """GFL's head on one level from the split on: the towers' remaining layers (the split conv's ReLU first),
    then the output convs, the regression times its level scale -> ``{"cls_logits", "box_bins"}``."""
    head, start = model.head, max(3 * split - 1, 0)
    cls = head.classification_head.conv[start:](held["cls"])
    reg = head.regression_head.conv[start:](held["reg"])
    return {"cls_logits": head.classification_head.cls_logits(cls),
            "box_bins": head.regression_head.bbox_reg(reg) * head.regression_head.scales[level_index]}


# architecture -> (the towers by branch, the head from the split on); a split ``k`` holds the output of the
# k-th conv and its norm, before its activation (k = 0: the FPN features).
HEAD_SPLITS: dict[str, tuple[Callable[[nn.Module], dict[str, nn.Sequential]],
                             Callable[[nn.Module, int, Mapping[str, Tensor], int], dict[str, Tensor]]]] = {
    "gfl": (_gfl_towers, _gfl_head_from)}


def head_split_depth(model: nn.Module) -> int:
    """The convs per tower of a detector in ``HEAD_SPLITS`` (the largest split); ``ValueError`` for others."""
    arch = detector_arch(model)
    if arch not in HEAD_SPLITS:
        raise ValueError(f"{type(model).__name__}'s head cannot be split (given by: {sorted(HEAD_SPLITS)})")
    return min(len(tower) // 3 for tower in HEAD_SPLITS[arch][0](model).values())


def tower_features(model: nn.Module, features: Mapping[str, Tensor], split: int) -> dict[str, dict[str, Tensor]]:
    """Each tower's output at the split, per level: level -> branch -> ``[N, C, H_l, W_l]`` (the k-th conv and
    its norm, before the activation; the features themselves for ``split`` 0), with the gradient of the
    model's parameters."""
    head_split_depth(model)
    towers = HEAD_SPLITS[detector_arch(model)][0](model)
    return {lvl: {b: tower[:max(3 * split - 1, 0)](f) for b, tower in towers.items()} for lvl, f in features.items()}


def head_from_split(model: nn.Module, held: Mapping[str, Mapping[str, Tensor]], split: int,
                    levels: Mapping[str, str] | None = None) -> dict[str, dict[str, Tensor]]:
    """The model's head from the split on, run on ``held`` (level -> branch -> ``[N, C, H_l, W_l]``, e.g. another
    detector's tower features): level -> ``{"cls_logits", "box_bins"}`` (the shared names). ``levels`` maps a
    key of ``held`` to the model's level of the same stride (default: the same name)."""
    head_split_depth(model)
    order = list(fpn_strides(model))
    head_from = HEAD_SPLITS[detector_arch(model)][1]
    return {lvl: head_from(model, order.index((levels or {}).get(lvl, lvl)), h, split) for lvl, h in held.items()}
