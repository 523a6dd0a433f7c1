"""torchvision's pretrained weights, offline: a detector's (``weights``) or an ImageNet ResNet's (``weights_backbone``).

A weights source is a local file (a plain state dict as torchvision publishes it, or a ``{"model": state_dict, ...}``
file) or the name of a torchvision weights enum (``"RetinaNet_ResNet50_FPN_Weights.COCO_V1"``), read from torch's
local cache (``$TORCH_HOME/hub/checkpoints``, see ``torch.hub.get_dir``) and never downloaded: when the file is not
there the error names the path to place it at and the URL it comes from.

Tensors whose names and shapes fit are kept. The class-dependent layers (a family's ``pretrained_class_keys``, see
``adapter.DetectorAdapter``; their rows laid out as ``"anchors"``: one block of K class rows per anchor, ``[A * K, ...]``,
``"classes"``: K rows, or ``"boxes"``: 4 rows per class) are re-initialised for the
model's class count, or remapped when the file has torchvision's 91 COCO outputs and the dataset is COCO: torchvision
indexes its logits by COCO category id, liaf_lab's ``CocoDetectionDataset`` numbers the categories 1..K, so row
``category_id`` of the file becomes row ``label`` of the model (checked by class name). Any other difference is
another architecture, and an error naming both and the first keys that differ. ``WeightsReport`` says which keys were
kept, remapped and re-initialised.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from ..utils.checkpoint import load_checkpoint

LOG = logging.getLogger("liaf_lab")

# File keys a backbone has no use for: the ImageNet classifier.
IGNORED_BACKBONE_KEYS = ("fc.weight", "fc.bias")
_ENUM_NAME = re.compile(r"^[A-Za-z0-9_]+_Weights\.[A-Za-z0-9_]+$")


@dataclass
class WeightsReport:
    """What loading pretrained weights did: which of the target's keys were kept, remapped or re-initialised.

    ``target`` is ``"detector"`` or ``"backbone"``; ``ignored`` lists the file's keys the model has no use for
    (an ImageNet file's ``fc``); ``note`` says why class layers were re-initialised rather than remapped.
    """

    source: str
    target: str
    kept: list[str] = field(default_factory=list)
    remapped: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    note: str = ""

    def summary(self) -> str:
        """One line: ``"weights X -> detector: kept 312 tensors, remapped [...], re-initialised [...]"``."""
        parts = [f"kept {len(self.kept)} tensors"]
        parts += [f"{what} {keys}" for what, keys in (("remapped", self.remapped),
                                                       ("re-initialised", self.reinitialised),
                                                       ("ignored", self.ignored)) if keys]
        return f"weights {self.source} -> {self.target}: {', '.join(parts)}{f' ({self.note})' if self.note else ''}"


def resolve_weights(source: str | Path) -> tuple[Path, list[str] | None]:
    """The local file of a weights source and, for a torchvision enum name, its class names (``meta["categories"]``).

    Raises:
        FileNotFoundError: no such file, or the enum's file is not in torch's cache (names the path to place it at).
        ValueError: an enum-like name torchvision does not know.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path, None
    name = str(source)
    if not _ENUM_NAME.match(name):
        raise FileNotFoundError(f"weights {name!r} is neither a file nor a torchvision weights name such as "
                                "'RetinaNet_ResNet50_FPN_Weights.COCO_V1'")
    from torchvision.models import get_weight

    try:
        weights = get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise ValueError(f"torchvision has no weights named {name!r} (e.g. 'RetinaNet_ResNet50_FPN_Weights.COCO_V1', "
                         "'ResNet50_Weights.IMAGENET1K_V1')") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if not cached.is_file():
        raise FileNotFoundError(f"weights {name} are not in torch's cache: place {weights.url} at {cached} "
                                "(liaf_lab never downloads; TORCH_HOME sets the cache folder)")
    return cached, list(weights.meta.get("categories", [])) or None


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The state dict in ``path`` (plain, or under ``"model"``), loaded on the CPU with ``weights_only=True``."""
    state = load_checkpoint(path)
    if isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (parameter name -> tensor)")
    return dict(state)


def describe_state(state: Mapping[str, Tensor], prefix: str = "",
                   families: Mapping[str, Sequence[str]] = MappingProxyType({})) -> str:
    """A guess at what a state dict is, from its keys: ``"a RetinaNet-style detector on a ResNet-50 ..."``.

    ``prefix`` is where the ResNet's keys start (``"backbone.body."`` in a detector, ``""`` in a backbone file).
    ``families``: a detector family's name -> the key fragments its state dicts hold (its adapter's
    ``weights_keys``); the family all of whose fragments the keys hold, the most of them, names the file.
    """
    matches = [(len(parts), name) for name, parts in families.items()
               if all(any(part in k for k in state) for part in parts)]
    head = (f"a {max(matches)[1]}-style detector" if matches else "a backbone" if not prefix else "a state dict")
    inner = [k[len(prefix):].split(".") for k in state if k.startswith(prefix)]
    blocks = tuple(len({parts[1] for parts in inner if parts[0] == f"layer{i}" and len(parts) > 2})
                   for i in range(1, 5))
    if not any(blocks):
        return f"{head} without ResNet layers (keys {list(state)[:2]} ...)"
    bottleneck = any(parts[:3] == ["layer1", "0", "conv3"] for parts in inner)
    depths = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 50 if bottleneck else 34, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
    resnet = f"ResNet-{depths[blocks]}" if blocks in depths else f"ResNet with blocks {list(blocks)}"
    return f"{head} on a {resnet}"


def _class_rows(layout: str, rows: int, file_classes: int, picked: Sequence[int]) -> Tensor:
    """Indices into a file's class-dependent tensor (``rows`` rows) giving the model's rows for classes ``picked``."""
    if layout == "boxes":
        return torch.tensor([4 * c + j for c in picked for j in range(4)])
    anchors = rows // file_classes if layout == "anchors" else 1
    return torch.tensor([a * file_classes + c for a in range(anchors) for c in picked])


def _file_classes(layout: str, file_rows: int, model_rows: int, model_classes: int) -> int:
    """The file's class count from a class-dependent tensor's rows (the model's anchor count is the file's)."""
    if layout == "boxes":
        return file_rows // 4
    anchors = model_rows // model_classes if layout == "anchors" else 1
    return file_rows // anchors


def load_pretrained(
    model: nn.Module,
    source: str | Path,
    class_keys: Mapping[str, str],
    num_classes: int,
    category_ids: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    families: Mapping[str, Sequence[str]] = MappingProxyType({}),
) -> WeightsReport:
    """Fill ``model`` (built by ``create_detector``) from torchvision detector weights of the same architecture.

    Args:
        model: the detector; ``num_classes`` its class count.
        class_keys: its class-dependent tensors -> row layout (its family's ``pretrained_class_keys``).
        families: what names a file of another architecture in the error (see ``describe_state``).
        source: a file or a torchvision weights enum name (see ``resolve_weights``).
        category_ids: the dataset's category id of each label ``1..num_classes - 1`` (``dataset.label_to_cat_id``);
            with a 91-class COCO file and COCO's class names (``class_names``) the class layers are remapped.

    Raises:
        ValueError: the file is of another architecture: names both and the first keys that differ.
    """
    path, file_names = resolve_weights(source)
    state = read_state_dict(path)
    report = WeightsReport(str(source), "detector")
    target = model.state_dict()
    _check_fit(model, state, target, str(source), skip=set(class_keys), families=families)
    loaded = {k: state[k] for k in target if k in state and k not in class_keys}
    report.kept = sorted(loaded)
    remap = _remap_rows(state, target, class_keys, num_classes, category_ids, class_names, file_names)
    if isinstance(remap, str):
        report.note = remap
        report.reinitialised = sorted(k for k in class_keys if state[k].shape != target[k].shape)
        report.kept += sorted(k for k in class_keys if state[k].shape == target[k].shape)
        loaded.update({k: state[k] for k in class_keys if state[k].shape == target[k].shape})
    else:
        report.remapped = sorted(class_keys)
        loaded.update(remap)
    model.load_state_dict(loaded, strict=False)
    return report


def _remap_rows(state: Mapping[str, Tensor], target: Mapping[str, Tensor], class_keys: Mapping[str, str],
                num_classes: int, category_ids: Sequence[int] | None, class_names: Sequence[str] | None,
                file_names: list[str] | None) -> dict[str, Tensor] | str:
    """The class layers remapped from a COCO file's category ids to the dataset's labels, or why they are not."""
    if all(state[k].shape == target[k].shape for k in class_keys):
        return "the file has the model's class count: class layers kept"
    first = next(iter(class_keys))
    file_classes = _file_classes(class_keys[first], state[first].shape[0], target[first].shape[0], num_classes)
    if file_classes != 91 or category_ids is None:
        return f"the file has {file_classes} classes, the model {num_classes}: class layers re-initialised"
    from torchvision.models._meta import _COCO_CATEGORIES

    coco = file_names or _COCO_CATEGORIES
    ids = list(category_ids)
    names = list(class_names) if class_names is not None else [coco[c] if 0 < c < 91 else "" for c in ids]
    if len(ids) != num_classes - 1 or any(not 0 < c < 91 or coco[c] != n for c, n in zip(ids, names, strict=True)):
        return "the dataset's categories are not COCO's (by id and name): class layers re-initialised"
    picked = [0, *ids]  # row 0: background / "no object"
    out = {}
    for key, layout in class_keys.items():
        rows = _class_rows(layout, state[key].shape[0], file_classes, picked)
        out[key] = state[key].index_select(0, rows).clone()
        if out[key].shape != target[key].shape:
            raise ValueError(f"cannot remap {key}: file {tuple(state[key].shape)}, model {tuple(target[key].shape)}")
    return out


def _check_fit(model: nn.Module, state: Mapping[str, Tensor], target: Mapping[str, Tensor], source: str,
               skip: set[str] = frozenset(), ignored: Sequence[str] = (), what: str | None = None,
               families: Mapping[str, Sequence[str]] = MappingProxyType({})) -> None:
    """``ValueError`` naming both models and the first keys that differ, unless ``state`` has ``target``'s keys and
    shapes (``skip``: keys whose shapes may differ; ``num_batches_tracked``, absent from FrozenBatchNorm files, and
    ``ignored`` file keys are not compared)."""
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target and k not in ignored and not k.endswith("num_batches_tracked")]
    wrong = [f"{k} {tuple(state[k].shape)} (model {tuple(v.shape)})" for k, v in target.items()
             if k in state and k not in skip and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{label} {items[:3]}" for label, items in
                 (("model keys not in the file", missing), ("file keys not in the model", unexpected),
                  ("shapes", wrong)) if items]
        config = getattr(model, "liaf_config", {})
        mine = what or (f"a {type(model).__name__} on a ResNet-{config.get('depth')} (width_mult "
                        f"{config.get('width_mult')}, fpn_channels {config.get('fpn_channels')})")
        raise ValueError(f"weights {source} are for another architecture: the file holds "
                         f"{describe_state(state, '' if what else 'backbone.body.', families)}, the model is {mine}; "
                         + "; ".join(parts))


def load_pretrained_backbone(model: nn.Module, source: str | Path,
                             families: Mapping[str, Sequence[str]] = MappingProxyType({})) -> WeightsReport:
    """Fill ``model.backbone.body`` (a ``ScaledResNet``) from torchvision ImageNet ResNet weights (``fc`` ignored).

    ``families``: what names a detector file given by mistake (see ``describe_state``).

    Raises:
        ValueError: the file is not a ResNet of this depth and width (names both and the first keys that differ).
    """
    body = model.backbone.body
    path, _ = resolve_weights(source)
    state = read_state_dict(path)
    target = body.state_dict()
    config = getattr(model, "liaf_config", {})
    _check_fit(body, state, target, str(source), ignored=IGNORED_BACKBONE_KEYS, families=families,
               what=f"the ResNet-{config.get('depth')} backbone (width_mult {config.get('width_mult')}) of a "
                    f"{type(model).__name__}")
    loaded = {k: state[k] for k in target if k in state}
    body.load_state_dict(loaded, strict=False)
    return WeightsReport(str(source), "backbone", kept=sorted(loaded),
                         ignored=sorted(k for k in state if k in IGNORED_BACKBONE_KEYS))
