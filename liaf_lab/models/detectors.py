"""The registry of detector families (``ADAPTERS``, ``detector_adapter``) and the factory that builds any of them
(torchvision's RetinaNet / FCOS / Faster R-CNN, liaf_lab's GFL) on a width-scaled ResNet-FPN.

What a family is, how it is built and run, lives in its adapter (``adapter.py``, one module per family); this
module only lists them.

Class convention (the same for all four archs): ``num_classes`` counts the background, i.e. it is
the number of foreground classes + 1, and target labels are ``1..num_classes-1`` with 0 meaning
background. For Faster R-CNN this is torchvision's softmax convention (logit 0 = background). For
RetinaNet, FCOS and GFL the sigmoid head has one logit per label value and is indexed by the label
directly (``gt_classes_target[anchor, label] = 1``), so labels must be ``< num_classes``; the logit
for label 0 is never a positive and only learns "no object" (this is how torchvision's COCO
RetinaNet/FCOS use 91 outputs). An untrained RetinaNet/FCOS/GFL may therefore still emit label 0.

Anchors: one base size per FPN level (see ``default_anchor_sizes``), scaled with ``min_size`` so
that small inputs get small anchors; pass ``anchor_sizes`` to choose them.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from torch import Tensor, nn
from torch.utils.data import Subset
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ..utils.checkpoint import load_checkpoint, load_module_state, save_checkpoint
from .adapter import DetectorAdapter
from .backbones import backbone_strides, resnet_fpn
from .fasterrcnn import FasterRCNNAdapter
from .fcos import FCOSAdapter
from .gfl import GFLAdapter
from .pretrained import LOG, load_pretrained, load_pretrained_backbone
from .retinanet import RetinaNetAdapter

T = TypeVar("T")

# The detector families, by ``create_detector``'s arch name: the one registry. A family is its adapter's module
# (``models/adapter.py`` says what an adapter gives) and its line here.
ADAPTERS: dict[str, DetectorAdapter] = {
    adapter.arch: adapter
    for adapter in (RetinaNetAdapter(), FCOSAdapter(), FasterRCNNAdapter(), GFLAdapter())
}
Arch = Literal[tuple(ADAPTERS)]
# What create_detector passes to the torchvision constructors itself (not a keyword a caller may give).
_SET_BY_FACTORY = {"self", "backbone", "num_classes", "min_size", "max_size", "anchor_generator", "head",
                   "rpn_anchor_generator", "box_roi_pool", "kwargs"}


def detector_adapter(model: nn.Module | str) -> DetectorAdapter:
    """The adapter of a detector (by its class: also a torchvision-built one, or a subclass such as Mask R-CNN) or
    of an ``arch`` name; ``TypeError`` / ``ValueError`` naming the families otherwise."""
    if isinstance(model, str):
        if model not in ADAPTERS:
            raise ValueError(f"arch must be one of {sorted(ADAPTERS)}, got {model!r}")
        return ADAPTERS[model]
    for adapter in ADAPTERS.values():
        if isinstance(model, adapter.model_class):
            return adapter
    served = ", ".join(a.model_class.__name__ for a in ADAPTERS.values())
    raise TypeError(f"expected a detector of a registered family ({served}, or a subclass), "
                    f"got {type(model).__name__}")


def families_with(part: str) -> list[str]:
    """The registered families (``arch`` names, sorted) whose adapter has the optional ``part``
    (``"gives_assignment"`` or ``"splits_head"``), for messages."""
    return sorted(arch for arch, adapter in ADAPTERS.items() if getattr(adapter, part))


def weights_families() -> dict[str, tuple[str, ...]]:
    """Model class name -> the key fragments its state dicts hold (``DetectorAdapter.weights_keys``), which
    ``pretrained.describe_state`` names a weights file by."""
    return {a.model_class.__name__: a.weights_keys for a in ADAPTERS.values()}


def detector_options(arch: str) -> list[str]:
    """The keyword arguments ``create_detector(arch, ...)`` passes on: the constructor's own (``score_thresh``,
    ``rpn_*``, ...) and those of torchvision's ``GeneralizedRCNNTransform`` (``size_divisible``, ``fixed_size``)."""
    own = inspect.signature(detector_adapter(arch).model_class.__init__).parameters
    transform = inspect.signature(GeneralizedRCNNTransform.__init__).parameters
    return sorted({*own, *transform} - _SET_BY_FACTORY)


def detector_option_types(arch: str) -> dict[str, Any]:
    """``detector_options(arch)`` that a config may set, with their types: the constructor's type hint, else the
    type of its default (torchvision's RetinaNet and Faster R-CNN have no hints). Options whose default is
    ``None`` without a hint (modules such as ``rpn_head``) are left out: they are built, not configured."""
    import typing

    own = inspect.signature(detector_adapter(arch).model_class.__init__).parameters
    hints = {**typing.get_type_hints(GeneralizedRCNNTransform.__init__),
             **typing.get_type_hints(detector_adapter(arch).model_class.__init__)}
    transform = inspect.signature(GeneralizedRCNNTransform.__init__).parameters
    types = {}
    for name in detector_options(arch):
        param = own.get(name, transform.get(name))
        if name in hints:
            types[name] = hints[name]
        elif param is not None and param.default is not inspect.Parameter.empty and param.default is not None:
            types[name] = type(param.default)
    return types


def default_anchor_sizes(arch: Arch, strides: Sequence[float], min_size: int) -> tuple[int, ...]:
    """One base anchor size (pixels of the resized input) per FPN level (the family's ``default_anchor_sizes``).

    RetinaNet: ``4 * stride``, Faster R-CNN and GFL: ``8 * stride``, all times ``min_size / 800`` and never
    below the stride, which gives torchvision's defaults (32..512) at ``min_size=800`` and 8..128
    on P3-P7 for 128-200 px inputs (GFL: mmdetection's 8 x stride at 800; its anchors only serve the
    ATSS assignment). FCOS: the stride itself (FCOS's anchor is the location's cell;
    its scale ranges and box coder are defined relative to it).
    """
    return detector_adapter(arch).default_anchor_sizes(strides, min_size)


def create_detector(
    arch: Arch,
    num_classes: int,
    depth: int = 50,
    width_mult: float = 1.0,
    fpn_channels: int = 256,
    min_size: int = 800,
    max_size: int = 1333,
    weights_path: str | Path | None = None,
    anchor_sizes: Sequence[float] | None = None,
    frozen_bn: bool = False,
    class_names: Sequence[str] | None = None,
    weights: str | Path | None = None,
    weights_backbone: str | Path | None = None,
    category_ids: Sequence[int] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build torchvision's RetinaNet, FCOS or FasterRCNN on ``resnet_fpn(depth, width_mult, fpn_channels)``.

    Args:
        arch: ``"retinanet"`` / ``"fcos"`` / ``"gfl"`` (P3-P7, strides 8..128) or ``"fasterrcnn"`` (P2-P6, 4..64).
        num_classes: foreground classes + 1 (background included; see the module docstring).
        depth, width_mult, fpn_channels: backbone size (see ``resnet_fpn``).
        min_size, max_size: torchvision's resize of the shorter / longer image side.
        weights_path: a file written by ``save_detector`` or a plain ``torch.save(model.state_dict(), path)``;
            loaded on the CPU with ``weights_only=True`` and strict key checking (see ``load_detector_weights``).
        anchor_sizes: one base size per FPN level; default ``default_anchor_sizes(arch, ...)``.
        frozen_bn: ``FrozenBatchNorm2d`` in the ResNet (for pretrained weights); default BatchNorm.
        class_names: the foreground classes the weights must have been trained on (checked against
            a ``save_detector`` file; ignored for plain state dicts).
        weights: torchvision detector weights to start from (RetinaNet, FCOS, Faster R-CNN): a local file or a
            weights enum name (``"RetinaNet_ResNet50_FPN_Weights.COCO_V1"``) read from torch's cache, never
            downloaded (``liaf_lab.models.pretrained``). Class layers are re-initialised for ``num_classes``, or
            remapped from torchvision's 91 COCO outputs with ``category_ids``.
        weights_backbone: torchvision ImageNet ResNet weights for the backbone (file or enum name, e.g.
            ``"ResNet50_Weights.IMAGENET1K_V1"``); not with ``weights``, which hold the backbone too.
        category_ids: the dataset's category id of each label ``1..num_classes - 1`` (``dataset.label_to_cat_id``),
            for the COCO remap.
        **kwargs: passed to the torchvision constructor (``detector_options(arch)`` lists them: e.g.
            ``score_thresh``, ``nms_thresh``, ``detections_per_img`` for RetinaNet/FCOS/GFL, ``reg_max`` for GFL;
            ``box_score_thresh``, ``rpn_*`` for Faster R-CNN; ``image_mean``, ``image_std``, ``size_divisible`` for
            all); any other is a ``TypeError`` listing them.

    Returns:
        The model (torchvision's, or ``GFL``), with ``model.liaf_arch`` (the ``arch`` string), ``model.liaf_config``
        (the arguments that rebuild it, anchor sizes included) and ``model.liaf_weights`` (a ``WeightsReport`` per
        pretrained source loaded: kept, remapped, re-initialised keys; also logged to the ``liaf_lab`` logger).
    """
    adapter = detector_adapter(arch)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (foreground classes + 1 for background), "
                         f"got {num_classes!r}")
    unknown = sorted(set(kwargs) - set(detector_options(arch)))
    if unknown:
        named = [p for p in inspect.signature(create_detector).parameters if p not in ("arch", "kwargs")]
        raise TypeError(f"create_detector({arch!r}) got unknown keyword arguments {unknown}; it takes {named} and "
                        f"the {adapter.model_class.__name__} options {detector_options(arch)}")
    if weights is not None and weights_backbone is not None:
        raise ValueError("give weights or weights_backbone, not both: a detector's weights hold its backbone too")
    if weights is not None and not adapter.pretrained_class_keys:
        given = sorted(a.arch for a in ADAPTERS.values() if a.pretrained_class_keys)
        raise ValueError(f"torchvision has no {arch!r} detector weights; weights= takes the weights of {given}; "
                         "use weights_backbone for an ImageNet backbone")
    backbone = resnet_fpn(depth, width_mult, fpn_channels, adapter.fpn_extra, frozen_bn=frozen_bn)
    strides = backbone_strides(backbone)
    if anchor_sizes is None:
        anchor_sizes = default_anchor_sizes(arch, list(strides.values()), min_size)
    sizes = tuple(anchor_sizes)
    if len(sizes) != len(strides) or not all(s > 0 for s in sizes):
        raise ValueError(f"anchor_sizes needs one positive size per FPN level {list(strides)}, got {sizes}")
    anchors = adapter.anchor_generator(sizes, list(strides.values()))
    model = adapter.build(backbone, num_classes, anchors, list(strides), min_size=min_size, max_size=max_size,
                          **kwargs)
    model.liaf_arch = arch
    model.liaf_config = dict(arch=arch, num_classes=num_classes, depth=depth, width_mult=width_mult,
                             fpn_channels=fpn_channels, min_size=min_size, max_size=max_size,
                             anchor_sizes=list(sizes), frozen_bn=frozen_bn, **kwargs)
    model.liaf_weights = []
    if weights_backbone is not None:
        model.liaf_weights.append(load_pretrained_backbone(model, weights_backbone, weights_families()))
    if weights is not None:
        model.liaf_weights.append(load_pretrained(model, weights, adapter.pretrained_class_keys, num_classes,
                                                  category_ids, class_names, weights_families()))
    for report in model.liaf_weights:
        LOG.info(report.summary())
    if weights_path is not None:
        load_detector_weights(model, weights_path, class_names)
    return model


def fpn_strides(model: nn.Module, image_size: tuple[int, int] | None = None) -> dict[str, float]:
    """FPN level name -> input pixels per cell of the batched, resized input (e.g. ``{"0": 8.0, ..., "p7": 128.0}``).

    Measured from the shapes of ``model.backbone``'s output (see ``backbone_strides``), so any
    torchvision detector works. These are the nominal strides, the same for every input size: a
    side that is not a multiple of the stride only adds a last, partly padded cell. ``image_size``
    (H, W), if given, is only checked to be positive.
    """
    if image_size is not None and (len(image_size) != 2 or min(image_size) <= 0):
        raise ValueError(f"image_size must be a positive (H, W), got {image_size!r}")
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"expected a torchvision detector with a .backbone, got {type(model).__name__}")
    return dict(backbone_strides(backbone))


def shared_strides(student: nn.Module, teacher: nn.Module) -> dict[str, float]:
    """The student's levels whose stride the teacher also has: the ``strides`` of a distiller between them.

    E.g. a RetinaNet student (P3-P7, strides 8..128) of a Faster R-CNN teacher (P2-P6, 4..64) gets
    ``{"0": 8.0, "1": 16.0, "2": 32.0, "p6": 64.0}``; the teacher's levels are matched by stride
    (``match_levels``), never by name.
    """
    teacher_strides = set(fpn_strides(teacher).values())
    return {lvl: s for lvl, s in fpn_strides(student).items() if s in teacher_strides}


def match_levels(strides: Mapping[str, float], teacher: nn.Module) -> dict[str, str]:
    """Distiller level -> the ``teacher`` level of the same stride (``{"0": "1", ...}`` for a Faster R-CNN teacher).

    ``strides`` are a distiller's (the student's levels). Features line up cell for cell only at equal
    strides, so this is the only level map that works: the teacher level of the same name if its
    stride agrees, else the teacher's one level of that stride. It is the identity for two detectors
    of one kind (also when two levels share a stride, as in torchvision's MobileNetV3-FPN).

    Raises:
        ValueError: a level of ``strides`` has no such teacher level; names both level lists and the
            ``strides`` to build the distiller with.
    """
    teacher_strides = fpn_strides(teacher)

    def partner(level: str, stride: float) -> str | None:
        if teacher_strides.get(level) == stride:
            return level
        same = [lvl for lvl, s in teacher_strides.items() if s == stride]
        return same[0] if len(same) == 1 else None

    pairs = {lvl: partner(lvl, float(s)) for lvl, s in strides.items()}
    missing = [lvl for lvl, src in pairs.items() if src is None]
    if missing:
        shared = {lvl: float(s) for lvl, s in strides.items() if float(s) in teacher_strides.values()}
        raise ValueError(
            f"the teacher ({type(teacher).__name__}) has no single FPN level with the stride of distiller level(s) "
            f"{missing}: distiller (student) levels {dict(strides)}, teacher levels {teacher_strides}; "
            f"build the distiller with strides={shared} (shared_strides(student, teacher))"
        )
    return pairs



def pair_levels(by_teacher_level: Mapping[str, T], levels: Mapping[str, str]) -> dict[str, T]:
    """``by_teacher_level``'s values (e.g. the teacher's FPN maps) keyed by the distiller's levels, through the
    level map ``levels`` of ``match_levels`` (distiller level -> teacher level)."""
    return {lvl: by_teacher_level[src] for lvl, src in levels.items()}

def detector_num_classes(model: nn.Module) -> int:
    """Class count of a detector's classifier (background included), as its adapter reads it
    (``DetectorAdapter.num_classes``)."""
    return detector_adapter(model).num_classes(model)


def _check_class_count(what: str, model: nn.Module, class_names: Sequence[str]) -> None:
    num_classes = detector_num_classes(model)
    if num_classes < len(class_names) + 1:
        raise ValueError(
            f"{what} ({type(model).__name__}) has num_classes={num_classes} but {len(class_names)} classes "
            f"{list(class_names)} need labels 1..{len(class_names)}; build it with "
            f"num_classes = len(class_names) + 1 = {len(class_names) + 1}"
        )


def check_num_classes(models: nn.Module | Mapping[str, nn.Module], dataset: object) -> None:
    """Check that each detector has room for every label of ``dataset`` before training.

    Args:
        models: a detector, or role -> detector (``{"student": s, "teacher": t}``) for the messages.
        dataset: a liaf_lab dataset (its ``class_names``; labels are ``1..len(class_names)``), or a
            ``torch.utils.data.Subset`` of one. Datasets without ``class_names`` are not checked.

    Raises:
        ValueError: a detector's ``num_classes < len(class_names) + 1``; names both numbers and the fix.
    """
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    class_names = getattr(dataset, "class_names", None)
    if class_names is None:
        return
    named = dict(models) if isinstance(models, Mapping) else {"model": models}
    for role, model in named.items():
        _check_class_count(f"the {role}", model, class_names)


def check_image_sizes(models: nn.Module | Mapping[str, nn.Module], dataset: object) -> None:
    """Check that each detector can take every image of ``dataset``: an image of extreme aspect ratio, resized by
    the detector's transform (shorter side ``min_size``, longer side at most ``max_size``), must keep a shorter
    side of at least its finest FPN stride, or it vanishes in the resize (a crash inside torch).

    Args:
        models: a detector (its ``transform``, a ``GeneralizedRCNNTransform``), or role -> detector.
        dataset: a liaf_lab dataset (its ``records``: image sizes from the annotations, no pixels read), or a
            ``Subset`` of one. Datasets without ``records`` are not checked.

    Raises:
        ValueError: naming the first such image, its size and the side it would have.
    """
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    records = getattr(dataset, "records", None)
    if not records:
        return
    sizes = np.array([(r.width, r.height) for r in records], dtype=np.float64)  # [n, 2]
    short, long = sizes.min(axis=1), sizes.max(axis=1)
    named = dict(models) if isinstance(models, Mapping) else {"model": models}
    for role, model in named.items():
        transform = getattr(model, "transform", None)
        if transform is None:  # not a torchvision-style detector: it resizes nothing
            continue
        min_size, max_size = min(transform.min_size), transform.max_size
        stride = min(fpn_strides(model).values())
        side = np.floor(short * np.minimum(min_size / short, max_size / long))
        bad = np.flatnonzero(side < stride)
        if len(bad):
            r = records[bad[0]]
            raise ValueError(
                f"image {r.path} (image id {r.image_id}) is {r.width}x{r.height}: the {role} resizes it to a shorter "
                f"side of {side[bad[0]]:.0f} px (input min_size {min_size}, max_size {max_size}), less than its "
                f"finest feature stride {stride:g}; {len(bad)} images of the dataset have so extreme an aspect ratio. "
                "Crop or leave out such images"
            )


def detector_meta(model: nn.Module) -> dict[str, Any]:
    """What identifies a detector's architecture cheaply: class, class count, FPN channels, levels, size.

    Returns:
        ``{"detector": "RetinaNet", "num_classes": 4, "fpn_channels": 256,
        "strides": {"0": 8.0, ...}, "parameters": 36_000_000}`` (plain values, ``weights_only``-safe).
    """
    channels = getattr(model.backbone, "out_channels", None)
    return {"detector": type(model).__name__, "num_classes": detector_num_classes(model),
            "fpn_channels": int(channels) if channels is not None else None,
            "strides": fpn_strides(model), "parameters": count_parameters(model)}


def save_detector(path: str | Path, model: nn.Module, class_names: Sequence[str]) -> Path:
    """Write ``{"model": state_dict, "meta": {"class_names": [...], "arch": detector_meta(model)}}`` atomically.

    ``load_detector_weights`` (and ``create_detector(weights_path=...)``) refuse the file for a
    detector of another architecture or other class names.
    """
    names = list(class_names)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"class_names must be strings, got {names!r}")
    _check_class_count("the model", model, names)
    meta = {"class_names": names, "arch": detector_meta(model)}
    return save_checkpoint(path, {"model": model.state_dict(), "meta": meta})


def load_detector_weights(
    model: nn.Module, path: str | Path, class_names: Sequence[str] | None = None
) -> list[str] | None:
    """Load a ``save_detector`` file or a plain state dict file into ``model`` (strict keys).

    Args:
        model: the detector to fill.
        path: the weights file.
        class_names: if given, the class names a ``save_detector`` file must hold.

    Returns:
        The file's class names, or ``None`` for a plain state dict (which carries none).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not readable, not a state dict, its meta differs from ``model``
            (architecture) or ``class_names`` (naming both values and the file), or its keys or shapes do
            not match the model (``CheckpointError`` listing the missing, unexpected and mis-shaped keys).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    state = load_checkpoint(path)  # weights_only=True; CheckpointError (a ValueError) if unreadable
    saved_names = None
    if set(state) == {"model", "meta"}:
        meta, state = state["meta"], state["model"]
        if not isinstance(meta, Mapping) or not isinstance(meta.get("arch"), Mapping) or "class_names" not in meta:
            raise ValueError(f"weights file {str(path)!r} has a 'meta' without 'arch' and 'class_names' "
                             "(write it with save_detector)")
        diffs = [f"{key}: file {meta['arch'].get(key)!r}, model {value!r}"
                 for key, value in detector_meta(model).items() if meta["arch"].get(key) != value]
        if diffs:
            raise ValueError(f"weights file {str(path)!r} was saved from another architecture ({'; '.join(diffs)})")
        saved_names = list(meta["class_names"])
        if class_names is not None and list(class_names) != saved_names:
            raise ValueError(f"weights file {str(path)!r} was trained on classes {saved_names}, "
                             f"but class_names is {list(class_names)}")
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict (parameter name -> tensor)")
    load_module_state(model, dict(state), path, f"the weights of this {type(model).__name__}")
    return saved_names


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
