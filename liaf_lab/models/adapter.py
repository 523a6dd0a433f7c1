"""The detector adapter: all that liaf_lab knows of one detector family, in one class.

A family (RetinaNet, FCOS, GFL, Faster R-CNN) is one module of ``liaf_lab/models`` that holds its
``DetectorAdapter`` (and the family's own modules where torchvision has none), registered by one line of
``detectors.py`` (``ADAPTERS``). Every other module asks ``detectors.detector_adapter(model or arch)`` and never
tests which kind of detector it has:

* building (``create_detector``): the backbone's extra FPN levels, the default anchor sizes, the anchor (prior)
  generator and the model (``fpn_extra``, ``default_anchor_sizes``, ``anchor_generator``, ``build``);
* running (``taps.run_detector``): the heads on given features give the task loss, the detections, the head
  outputs by name and the priors (``run_heads``);
* what it gives: the per-level head outputs (``head_outputs``; ``shared_outputs`` names some of them by a meaning
  that several families share), the head output that scores each prior and the index of its first foreground
  logit (``prior_scores``, ``foreground_from``), the class logits of given boxes (``box_class_logits``, a
  two-stage detector's box head; Grad-CAM scores with these);
* optional parts, each with its flag: the detector's own assignment of priors to boxes (``assign``,
  ``gives_assignment``: GFL's ATSS) and its head split at a tower conv (``towers``, ``head_from``,
  ``splits_head``: CrossKD);
* the class-dependent tensors of torchvision's pretrained weights (``pretrained_class_keys``).

``DenseAdapter`` runs the dense detectors built as torchvision's ``RetinaNet`` and ``FCOS`` are (``head``,
``anchor_generator``, ``compute_loss``, ``postprocess_detections``, ``transform``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

Target = dict[str, Tensor]
# What ``run_heads`` returns: the losses (empty without targets), the detections in original image pixels
# (``None`` without original sizes), level -> head output name -> ``[N, A*D, H_l, W_l]``, level -> priors.
HeadRun = tuple[dict[str, Tensor], list[Target] | None, dict[str, dict[str, Tensor]], dict[str, Tensor]]
_REFERENCE_MIN_SIZE = 800


class DetectorAdapter:
    """One detector family: how it is built and run, and what it gives (see the module docstring).

    Adapters hold no state: ``detectors.ADAPTERS`` keeps one instance per family, keyed by ``arch``.

    Attributes:
        arch: ``create_detector``'s name of the family (and the presets' ``arch``).
        model_class: the models it serves (their subclasses too, e.g. Mask R-CNN for Faster R-CNN).
        head_outputs: the per-level head outputs ``run_heads`` gives (``DetectorOutput.head_outputs``).
        shared_outputs: a name that means the same on every detector giving it -> the family's own output
            (``box_bins``: ``[N, A * 4 * (R + 1), H_l, W_l]`` distance-bin logits, side-major).
        prior_scores: the head output that scores each prior: per class (``[N, A*K, H_l, W_l]``) if
            ``box_class_logits`` gives nothing, else class-agnostic (``[N, A, H_l, W_l]``, e.g. objectness).
        foreground_from: the index of the first foreground class logit (0 for sigmoid heads, whose logit of
            label 0 is never a positive; 1 for softmax heads, whose logit 0 is the background).
        fpn_extra: the backbone's levels above P5 (``resnet_fpn``'s ``extra``: ``"p6p7"`` or ``"pool"``).
        anchor_stride_factor: the base anchor size in strides at ``min_size`` 800.
        pretrained_class_keys: the class-dependent tensors of torchvision's weights for the family and their row
            layout (``pretrained.load_pretrained``); empty if torchvision has none.
        weights_keys: key fragments every state dict of the family holds, more than any other family's it
            matches (``pretrained.describe_state`` names a weights file of another architecture by them).
        gives_assignment: ``assign`` gives the detector's own assignment of priors to boxes.
        splits_head: ``towers`` and ``head_from`` split the head at a tower conv.
    """

    arch: ClassVar[str] = ""
    model_class: ClassVar[type[nn.Module]] = nn.Module
    head_outputs: ClassVar[tuple[str, ...]] = ()
    shared_outputs: ClassVar[Mapping[str, str]] = {}
    prior_scores: ClassVar[str] = ""
    foreground_from: ClassVar[int] = 0
    fpn_extra: ClassVar[str] = "p6p7"
    anchor_stride_factor: ClassVar[float] = 1.0
    pretrained_class_keys: ClassVar[Mapping[str, str]] = {}
    weights_keys: ClassVar[tuple[str, ...]] = ()
    gives_assignment: ClassVar[bool] = False
    splits_head: ClassVar[bool] = False

    # -- building ------------------------------------------------------------------------------------------------
    def default_anchor_sizes(self, strides: Sequence[float], min_size: int) -> tuple[int, ...]:
        """One base anchor size per level: ``anchor_stride_factor * stride * min_size / 800``, at least the stride."""
        factor = self.anchor_stride_factor * min_size / _REFERENCE_MIN_SIZE
        return tuple(max(round(s), round(factor * s)) for s in strides)

    def anchor_generator(self, sizes: Sequence[float], strides: Sequence[float]) -> AnchorGenerator:
        """The prior generator for one base size per level."""
        raise NotImplementedError

    def build(self, backbone: nn.Module, num_classes: int, anchor_generator: AnchorGenerator,
              levels: Sequence[str], min_size: int, max_size: int, **kwargs: Any) -> nn.Module:
        """The detector on ``backbone`` (FPN levels ``levels``, in order); ``kwargs``: the options of
        ``model_class``'s constructor (``detectors.detector_options``)."""
        raise NotImplementedError

    def num_classes(self, model: nn.Module) -> int:
        """The class count of the model's classifier (background included)."""
        raise NotImplementedError

    # -- running ------------------------------------------------------------------------------------------------
    def run_heads(self, model: nn.Module, image_list: ImageList, features: OrderedDict[str, Tensor],
                  targets: list[Target] | None, original_sizes: list[tuple[int, int]] | None) -> HeadRun:
        """The heads on ``features``: losses (with ``targets``), detections (with ``original_sizes``), head outputs
        and priors (``HeadRun``), as the model's ``forward`` computes them."""
        raise NotImplementedError

    def box_class_logits(self, model: nn.Module, features: OrderedDict[str, Tensor],
                         image_sizes: list[tuple[int, int]], boxes: list[Tensor]) -> list[Tensor] | None:
        """Per image ``[T_i, K]`` class logits of ``boxes`` (resized-input pixels) taken as proposals, for a
        detector that classifies boxes (a two-stage box head); ``None`` for a dense detector."""
        return None

    # -- optional parts -----------------------------------------------------------------------------------------
    def assign(self, model: nn.Module, priors: Tensor, counts: list[int], targets: list[Target]) -> Tensor:
        """The detector's assignment of all levels' priors ``[P, 4]`` (``counts`` per level) to the targets'
        boxes -> ``[N, P]`` box index or -1; only where ``gives_assignment``."""
        raise NotImplementedError

    def towers(self, model: nn.Module) -> dict[str, nn.Sequential]:
        """The head's towers by branch, each ``k`` x (conv, norm, activation); only where ``splits_head``."""
        raise NotImplementedError

    def head_from(self, model: nn.Module, level_index: int, held: Mapping[str, Tensor],
                  split: int) -> dict[str, Tensor]:
        """The head of level ``level_index`` from the split on, run on ``held`` (branch -> the output of the
        ``split``-th conv and its norm) -> shared output name -> tensor; only where ``splits_head``."""
        raise NotImplementedError


def per_level_outputs(flat: Tensor, features: Mapping[str, Tensor], num_anchors: int) -> dict[str, Tensor]:
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


def flat_outputs(per_level: Mapping[str, Tensor], priors: Mapping[str, Tensor]) -> Tensor:
    """The inverse of ``per_level_outputs``: level -> ``[N, A*D, H_l, W_l]`` -> ``[N, sum_l H_l W_l A, D]``, with
    ``A`` per level read from its priors (``[H_l * W_l * A, 4]``)."""
    parts = []
    for lvl, out in per_level.items():
        n, channels, h, w = out.shape
        anchors = priors[lvl].shape[0] // (h * w)
        d = channels // anchors
        parts.append(out.reshape(n, anchors, d, h, w).permute(0, 3, 4, 1, 2).reshape(n, h * w * anchors, d))
    return torch.cat(parts, dim=1)


class DenseAdapter(DetectorAdapter):
    """A dense detector with torchvision's ``RetinaNet`` / ``FCOS`` pieces; ``prior_scores`` is ``cls_logits``."""

    prior_scores = "cls_logits"

    def num_classes(self, model: nn.Module) -> int:
        """``head.classification_head.num_classes``."""
        return int(model.head.classification_head.num_classes)

    def compute_loss(self, model: nn.Module, targets: list[Target], head_outputs: dict[str, Tensor],
                     anchors: list[Tensor], num_anchors_per_level: list[int]) -> dict[str, Tensor]:
        """The model's ``compute_loss`` (torchvision's FCOS signature; RetinaNet's takes no level counts)."""
        return model.compute_loss(targets, head_outputs, anchors, num_anchors_per_level)

    def run_heads(self, model: nn.Module, image_list: ImageList, features: OrderedDict[str, Tensor],
                  targets: list[Target] | None, original_sizes: list[tuple[int, int]] | None) -> HeadRun:
        """Head, anchors, loss (if targets), detections (if original sizes), per-level outputs and priors."""
        feats = list(features.values())
        head_outputs = model.head(feats)  # cls_logits [N, sum(H*W*A), K], bbox_regression [N, sum(H*W*A), 4], ...
        anchors = model.anchor_generator(image_list, feats)
        cells = [f.shape[-2] * f.shape[-1] for f in feats]
        num_anchors = head_outputs["cls_logits"].shape[1] // sum(cells)
        per_level = [c * num_anchors for c in cells]

        losses: dict[str, Tensor] = {}
        if targets is not None:
            losses = self.compute_loss(model, targets, head_outputs, anchors, per_level)

        detections = None
        if original_sizes is not None:
            split_outputs = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
            split_anchors = [list(a.split(per_level)) for a in anchors]
            detections = model.postprocess_detections(split_outputs, split_anchors, image_list.image_sizes)
            detections = model.transform.postprocess(detections, image_list.image_sizes, original_sizes)

        split = {k: per_level_outputs(v, features, num_anchors) for k, v in head_outputs.items()}
        shared = self.shared_outputs
        outputs = {lvl: {**{k: split[k][lvl] for k in head_outputs}, **{k: split[v][lvl] for k, v in shared.items()}}
                   for lvl in features}
        return losses, detections, outputs, dict(zip(features, anchors[0].split(per_level), strict=True))
