"""One forward pass of a torchvision detector that also hands out its FPN features and head logits.

``run_detector`` re-assembles the forward of any registered detector family (torchvision's ``RetinaNet``,
``FCOS`` and ``FasterRCNN``, liaf_lab's ``GFL``) from its public pieces: ``transform`` and ``backbone`` here,
the heads by the family's adapter (``DetectorAdapter.run_heads``, ``models/adapter.py``: ``head`` / ``rpn`` +
``roi_heads``, ``compute_loss``, ``postprocess_detections``, ``transform.postprocess``), so that the backbone runs
once and the caller
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
from torchvision.models.detection.image_list import ImageList

from ..utils.validation import check_positive_boxes
from .adapter import HeadRun, Target
from .backbones import fpn_levels
from .detectors import detector_adapter, families_with, fpn_strides

FeaturesFn = Callable[[OrderedDict[str, Tensor], list[Target] | None], Mapping[str, Tensor]]


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
            distance-bin logits, also under the detector-independent name ``box_bins``: the adapter's
            ``shared_outputs``); the adapter's ``head_outputs`` lists them;
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


def _heads(
    model: nn.Module,
    image_list: ImageList,
    features: OrderedDict[str, Tensor],
    targets: list[Target] | None,
    original_sizes: list[tuple[int, int]] | None,
) -> HeadRun:
    """The model's heads on ``features``, run by its family's adapter (``DetectorAdapter.run_heads``)."""
    return detector_adapter(model).run_heads(model, image_list, features, targets, original_sizes)


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
    detector_adapter(model)
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
        check_positive_boxes(targets)
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
    detector_adapter(model)
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
    detector_adapter(model)
    ordered = _ordered_features(features, list(fpn_strides(model)), len(image_list.image_sizes))
    _, _, outputs, priors = _heads(model, image_list, ordered, None, None)
    return outputs, priors


@torch.no_grad()
def prior_assignment(model: nn.Module, priors: Mapping[str, Tensor], targets: list[Target]) -> dict[str, Tensor]:
    """The detector's own assignment of its priors to the ground-truth boxes (no gradient).

    Args:
        model: a detector whose adapter ``gives_assignment`` (GFL: ATSS, ``atss_assign``).
        priors: ``DetectorOutput.priors``, every level in the model's order (ATSS compares levels).
        targets: ``DetectorOutput.targets`` (boxes in resized-input pixels).

    Returns:
        level -> ``[N, P_l]`` int64 in the priors' order: the index of the prior's box in its image's
        targets, or -1 (negative). The positives are the cells the detector's box losses train.
    """
    adapter = detector_adapter(model)
    if not adapter.gives_assignment:
        raise ValueError(f"{type(model).__name__} does not give its assignment of priors "
                         f"(given by: {families_with('gives_assignment')})")
    counts = [p.shape[0] for p in priors.values()]
    matched = adapter.assign(model, torch.cat(list(priors.values())), counts, targets)
    return dict(zip(priors, matched.split(counts, dim=1), strict=True))


# -- the head split at a tower conv (CrossKD: the student's tower features through the teacher's head) ------
# A split ``k`` holds the output of the k-th conv and its norm, before its activation (k = 0: the FPN features).

def head_split_depth(model: nn.Module) -> int:
    """The convs per tower of a detector whose adapter ``splits_head`` (the largest split); ``ValueError`` for others."""
    adapter = detector_adapter(model)
    if not adapter.splits_head:
        raise ValueError(f"{type(model).__name__}'s head cannot be split (given by: {families_with('splits_head')})")
    return min(len(tower) // 3 for tower in adapter.towers(model).values())


def tower_features(model: nn.Module, features: Mapping[str, Tensor], split: int) -> dict[str, dict[str, Tensor]]:
    """Each tower's output at the split, per level: level -> branch -> ``[N, C, H_l, W_l]`` (the k-th conv and
    its norm, before the activation; the features themselves for ``split`` 0), with the gradient of the
    model's parameters."""
    head_split_depth(model)
    towers = detector_adapter(model).towers(model)
    return {lvl: {b: tower[:max(3 * split - 1, 0)](f) for b, tower in towers.items()} for lvl, f in features.items()}


def head_from_split(model: nn.Module, held: Mapping[str, Mapping[str, Tensor]], split: int,
                    levels: Mapping[str, str] | None = None) -> dict[str, dict[str, Tensor]]:
    """The model's head from the split on, run on ``held`` (level -> branch -> ``[N, C, H_l, W_l]``, e.g. another
    detector's tower features): level -> ``{"cls_logits", "box_bins"}`` (the shared names). ``levels`` maps a
    key of ``held`` to the model's level of the same stride (default: the same name)."""
    head_split_depth(model)
    order = list(fpn_strides(model))
    adapter = detector_adapter(model)
    return {lvl: adapter.head_from(model, order.index((levels or {}).get(lvl, lvl)), h, split)
            for lvl, h in held.items()}
