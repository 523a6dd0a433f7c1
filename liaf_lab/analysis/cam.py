"""Class activation maps over all FPN levels of torchvision detectors (LIAF-KD Fig. 3).

Built on the ``grad-cam`` package (``pytorch_grad_cam``). The detector is wrapped in a module that
runs ``model.transform`` and ``model.backbone``, packs the FPN levels ``{level: [N, C, H_l, W_l]}``
into one tensor ``[N, C, sum_l H_l W_l, 1]`` that passes through an identity *tap* (the CAM's
target layer), unpacks them and returns a differentiable score per image:

* a dense detector (RetinaNet, FCOS, GFL): for every target box the mean classification logit of its
  class over the priors (anchors) whose centres lie in the box (the nearest prior for tiny boxes),
  summed over targets;
* a detector that classifies boxes (Faster R-CNN): the box head's class logit for the target box used
  as a proposal, plus the mean class-agnostic prior score (the RPN's objectness logit) of the priors
  centred in the box.

The head outputs and priors are ``taps.head_outputs``'s; which output scores the priors, from which
logit the foreground classes start and the class logits of boxes are the detector's adapter's
(``DetectorAdapter.prior_scores``, ``foreground_from``, ``box_class_logits``).

This is a differentiable analogue of ``pytorch_grad_cam``'s ``FasterRCNNBoxScoreTarget``, which
needs detections that survive the score threshold (an untrained student has none). Label ``-1``
means "any class" (the maximum over classes). The package's ``reshape_transform`` hook turns the
packed tap back into levels, crops the padding the transform added, resizes every level to one grid
(the finest level, capped at ``max_cells`` cells) and concatenates them along channels, taking
``abs`` for EigenCAM (method notes section 4). Grad-CAM then weights those ``L*C`` channels by their
mean gradient; EigenCAM projects them on their first principal component.

The CAM objects are used as context managers: hooks live on the tap only and are released on exit,
also after an error; the detector's parameter flags, gradients and train/eval mode are restored.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from pytorch_grad_cam import EigenCAM, GradCAM
from pytorch_grad_cam.utils.model_targets import RawScoresOutputTarget
from torch import Tensor, nn

from ..models.adapter import flat_outputs
from ..models.backbones import eval_mode
from ..models.detectors import detector_adapter, detector_num_classes
from ..models.taps import detector_features, head_outputs
from ..utils.validation import check_boxes
from ..experiments.verdicts import paired_interval
from .viz import check_image, draw_boxes, new_figure

__all__ = [
    "DetectorCAM", "cam_box_share", "cam_shares", "compare_cams", "detector_cam", "fpn_features", "plot_cam_shares",
    "resize_for_detector", "summarise_cam_shares",
]

CamMethod = Literal["gradcam", "eigencam"]
EmptyMaps = Literal["exclude", "zero"]


def _check_fpn_detector(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected a torchvision detector (nn.Module), got {type(model).__name__}")
    missing = [a for a in ("transform", "backbone") if not isinstance(getattr(model, a, None), nn.Module)]
    if missing:
        raise ValueError(
            f"{type(model).__name__} has no {' or '.join(missing)}: expected a torchvision-style detector "
            "with .transform and an FPN .backbone"
        )


@torch.no_grad()
def resize_for_detector(
    model: nn.Module, image: Tensor, target: Mapping[str, Tensor] | None = None
) -> tuple[Tensor, dict[str, Tensor] | None]:
    """Resize ``image [3, H, W]`` (and ``target['boxes']``) as ``model.transform`` does in eval mode.

    Returns the un-normalised image ``[3, h, w]`` and a copy of the target with boxes in its
    pixels: the frame of the detector's FPN features.
    """
    _check_fpn_detector(model)
    img = check_image(image)
    tgt = dict(target) if target is not None else None
    with eval_mode(model.transform):
        img, tgt = model.transform.resize(img.to(_device(model)), tgt)
    return img.cpu(), tgt


@torch.no_grad()
def fpn_features(model: nn.Module, image: Tensor) -> OrderedDict[str, Tensor]:
    """FPN features ``{level: [1, C, H_l, W_l]}`` of ``image [3, H, W]`` in eval mode (mode restored)."""
    _check_fpn_detector(model)
    img = check_image(image).to(_device(model))
    with eval_mode(model):
        return detector_features(model, [img])[2]


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class _Tap(nn.Module):
    """Identity on the packed levels ``[N, C, S, 1]``; a leaf that requires grad when nothing upstream does."""

    def forward(self, x: Tensor) -> Tensor:
        return x if x.requires_grad else x.detach().requires_grad_()


def _inside_weights(anchors: Tensor, boxes: Tensor) -> Tensor:
    """``[T, A]`` weights averaging over the anchors centred in each box (nearest anchor if none)."""
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    inside = ((centres[None, :, 0] >= boxes[:, None, 0]) & (centres[None, :, 0] <= boxes[:, None, 2])
              & (centres[None, :, 1] >= boxes[:, None, 1]) & (centres[None, :, 1] <= boxes[:, None, 3]))
    box_centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    nearest = torch.cdist(box_centres, centres).argmin(dim=1)
    empty = ~inside.any(dim=1)
    inside[empty.nonzero().flatten(), nearest[empty]] = True
    inside = inside.to(anchors.dtype)
    return inside / inside.sum(dim=1, keepdim=True)


def _pick(logits: Tensor, labels: Tensor, foreground_from: int) -> Tensor:
    """``logits [A, K]`` at ``labels [T]`` -> ``[A, T]``; label -1 takes the max over foreground classes."""
    any_class = logits[:, foreground_from:].max(dim=1).values
    picked = logits[:, labels.clamp(min=0)]
    return torch.where(labels[None, :] < 0, any_class[:, None], picked)


def _pick_rows(logits: Tensor, labels: Tensor, foreground_from: int) -> Tensor:
    """``logits [T, K]`` (one row per box) at each row's label ``labels [T]`` -> ``[T]``; label -1 takes the max
    over foreground classes."""
    return torch.where(labels < 0, logits[:, foreground_from:].max(dim=1).values,
                       logits.gather(1, labels.clamp(min=0)[:, None])[:, 0])


class _ScoredDetector(nn.Module):
    """Detector wrapper: image batch ``[N, 3, H, W]`` -> score ``[N]`` differentiable in the FPN tap."""

    def __init__(self, model: nn.Module, score: bool, max_cells: int, take_abs: bool) -> None:
        super().__init__()
        self.model = model
        self.score = score
        self.max_cells = max_cells
        self.take_abs = take_abs
        self.tap = _Tap()
        self.targets: list[dict[str, Tensor]] | None = None
        self._layout: tuple[list[str], list[torch.Size], tuple[int, int], tuple[int, int]] | None = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: the detector's parameters are frozen while the CAM runs, so no gradients exist."""

    def forward(self, x: Tensor) -> Tensor:
        targets = [dict(t) for t in self.targets] if self.targets is not None else None
        images, targets, feats = detector_features(self.model, list(x), targets)
        names, shapes = list(feats), [f.shape for f in feats.values()]
        if len({s[1] for s in shapes}) != 1:
            raise ValueError(f"FPN levels have different channel counts {[s[1] for s in shapes]}; cannot stack them")
        self._layout = (names, shapes, tuple(images.tensors.shape[-2:]), tuple(images.image_sizes[0]))
        packed = self.tap(torch.cat([f.flatten(2) for f in feats.values()], dim=2)[..., None])
        parts = packed[..., 0].split([s[2] * s[3] for s in shapes], dim=2)
        feats = OrderedDict((n, p.reshape(s)) for n, p, s in zip(names, parts, shapes, strict=True))
        if not self.score:
            return packed.new_zeros(x.shape[0])
        return self._score(feats, images, targets)

    def _score(self, feats: OrderedDict[str, Tensor], images: Any, targets: list[dict[str, Tensor]]) -> Tensor:
        """Per image the score of the module docstring: the mean prior score of each target's class (per-class prior
        scores), or its box's class logit plus the mean class-agnostic prior score, summed over targets -> ``[N]``."""
        adapter = detector_adapter(self.model)
        outputs, priors = head_outputs(self.model, images, feats)
        prior_scores = flat_outputs({lvl: out[adapter.prior_scores] for lvl, out in outputs.items()}, priors)  # [N, P, D]
        anchors = torch.cat(list(priors.values()))  # [P, 4]
        box_logits = adapter.box_class_logits(self.model, feats, images.image_sizes, [t["boxes"] for t in targets])
        scores = []
        for i, t in enumerate(targets):
            weights = _inside_weights(anchors, t["boxes"])  # [T, P]
            if box_logits is None:  # D = K classes
                scores.append((weights * _pick(prior_scores[i], t["labels"], adapter.foreground_from).t()).sum())
            else:  # D = 1, class-agnostic
                box_score = _pick_rows(box_logits[i], t["labels"], adapter.foreground_from).sum()
                scores.append(box_score + (weights * prior_scores[i, :, 0][None, :]).sum())
        return torch.stack(scores)

    def reshape(self, packed: Tensor) -> Tensor:
        """``[N, C, S, 1]`` tap tensor (activation or gradient) -> ``[N, L*C, h, w]`` on one grid."""
        names, shapes, padded, valid = self._layout
        parts = packed[..., 0].split([s[2] * s[3] for s in shapes], dim=2)
        crops = []
        for part, shape in zip(parts, shapes, strict=True):
            level = part.reshape(shape)
            rows = min(shape[2], math.ceil(valid[0] * shape[2] / padded[0]))
            cols = min(shape[3], math.ceil(valid[1] * shape[3] / padded[1]))
            crops.append(level[..., :rows, :cols])
        rows, cols = crops[0].shape[-2:]
        scale = min(1.0, math.sqrt(self.max_cells / (rows * cols)))
        size = (max(1, round(rows * scale)), max(1, round(cols * scale)))
        out = torch.cat([F.interpolate(c.float(), size=size, mode="bilinear", align_corners=False) for c in crops],
                        dim=1)
        return out.abs() if self.take_abs else out


class DetectorCAM:
    """Grad-CAM or EigenCAM over all FPN levels of a torchvision detector; a context manager.

    ``with DetectorCAM(model, "gradcam") as cam: heat = cam(image, boxes, labels)`` gives a
    ``[H, W]`` map in [0, 1] for ``image [3, H, W]``. Inside the block the detector is in eval mode
    with ``requires_grad`` off for its parameters (so its ``.grad`` are untouched); both are restored
    on exit, and the package's hooks (on the wrapper's tap, never on ``model``) are released.

    Args:
        model: a detector of a registered family (``models.detectors.ADAPTERS``); for EigenCAM any module with
            ``.transform`` and an FPN ``.backbone``.
        method: ``"gradcam"`` (gradient of the box score, see the module docstring) or
            ``"eigencam"`` (gradient-free first principal component of ``|F|``).
        max_targets: without ``target_boxes``, Grad-CAM explains the model's top detections (at
            most this many); with none it explains the whole image for any class.
        max_cells: cap on the cells of the common grid the levels are resized to (EigenCAM's SVD
            builds a ``cells x cells`` matrix).
    """

    def __init__(
        self, model: nn.Module, method: CamMethod = "gradcam", max_targets: int = 5, max_cells: int = 2304
    ) -> None:
        _check_fpn_detector(model)
        if method not in ("gradcam", "eigencam"):
            raise ValueError(f"method must be 'gradcam' or 'eigencam', got {method!r}")
        if max_targets < 1 or max_cells < 1:
            raise ValueError(f"max_targets and max_cells must be positive, got {max_targets}, {max_cells}")
        if method == "gradcam":
            try:
                detector_adapter(model)  # a registered family: the score of the module docstring exists
            except TypeError as err:
                raise ValueError(f"{err}: no differentiable score for Grad-CAM; use method='eigencam'") from None
        self.model = model
        self.method = method
        self.max_targets = max_targets
        self.wrapper = _ScoredDetector(model, method == "gradcam", max_cells, take_abs=method == "eigencam")
        self._cam: GradCAM | EigenCAM | None = None
        self._restore: list[tuple[nn.Parameter, bool]] = []
        self._mode: AbstractContextManager | None = None

    def __enter__(self) -> DetectorCAM:
        self._mode = eval_mode(self.model)
        self._mode.__enter__()
        self._restore = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._restore:
            p.requires_grad_(False)
        try:
            cls = GradCAM if self.method == "gradcam" else EigenCAM
            self._cam = cls(self.wrapper, [self.wrapper.tap], reshape_transform=self.wrapper.reshape)
        except BaseException:
            self._release(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self._release(exc_type, exc, tb)

    def _release(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if self._cam is not None:
            # Releases the hooks. Its return value is ignored: the package swallows IndexError.
            self._cam.__exit__(exc_type, exc, tb)
            self._cam = None
        for p, flag in self._restore:
            p.requires_grad_(flag)
        self._restore = []
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        self.wrapper.targets = None

    def _targets(self, image: Tensor, boxes: Tensor | None, labels: Tensor | Sequence[int] | None) -> dict[str, Tensor]:
        device = image.device
        if boxes is None:
            if labels is not None:
                raise ValueError("target_labels given without target_boxes")
            with torch.no_grad():
                det = self.model([image])[0]
            order = det["scores"].argsort(descending=True)[: self.max_targets]
            if len(order) == 0:
                h, w = image.shape[-2:]
                return {"boxes": torch.tensor([[0.0, 0.0, w, h]], device=device),
                        "labels": torch.tensor([-1], device=device)}
            return {"boxes": det["boxes"][order].detach(), "labels": det["labels"][order].detach()}
        (boxes,) = check_boxes("target_boxes", [torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)])
        if boxes.shape[0] == 0:
            raise ValueError("target_boxes is empty: pass at least one box, or None to explain the detections")
        if labels is None:
            labels = torch.full((boxes.shape[0],), -1)
        labels = torch.as_tensor(labels).long().flatten()
        if labels.numel() != boxes.shape[0]:
            raise ValueError(f"target_labels has {labels.numel()} entries but target_boxes has {boxes.shape[0]}")
        num_classes = detector_num_classes(self.model)
        bad = labels[(labels < -1) | (labels >= num_classes)]
        if len(bad):
            raise ValueError(f"target_labels {bad.tolist()} outside -1..{num_classes - 1} "
                             f"(the model has {num_classes} classes)")
        return {"boxes": boxes.to(device), "labels": labels.to(device)}

    def __call__(
        self,
        image: Tensor,
        target_boxes: Tensor | None = None,
        target_labels: Tensor | Sequence[int] | None = None,
    ) -> np.ndarray:
        """CAM of ``image [3, H, W]`` as ``[H, W]`` float32 in [0, 1].

        ``target_boxes [T, 4]`` (image pixels) and ``target_labels [T]`` choose what Grad-CAM
        explains (label -1 or no labels: any class); EigenCAM ignores them.
        """
        if self._cam is None:
            raise RuntimeError("use DetectorCAM as a context manager: `with DetectorCAM(model) as cam: ...`")
        img = check_image(image).to(_device(self.model))
        if self.method == "gradcam":
            self.wrapper.targets = [self._targets(img, target_boxes, target_labels)]
        with torch.set_grad_enabled(self.method == "gradcam"):
            heat = self._cam(img[None], targets=[RawScoresOutputTarget()])[0]
        self._cam.outputs = None  # drop the retained autograd graph
        heat = np.nan_to_num(heat.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        return np.clip(heat, 0.0, 1.0)


def detector_cam(
    model: nn.Module,
    image: Tensor,
    method: CamMethod = "gradcam",
    target_boxes: Tensor | None = None,
    target_labels: Tensor | Sequence[int] | None = None,
    max_targets: int = 5,
    max_cells: int = 2304,
) -> np.ndarray:
    """One CAM of ``image [3, H, W]``: ``[H, W]`` float32 in [0, 1]. See ``DetectorCAM``."""
    with DetectorCAM(model, method, max_targets, max_cells) as cam:
        return cam(image, target_boxes, target_labels)


def cam_box_share(heat: np.ndarray | Tensor, boxes: Tensor) -> tuple[float, float]:
    """``(share, area)``: the share of a CAM's mass inside the union of ``boxes`` ``[n, 4]`` (image
    pixels, rounded to whole pixels), and the union's share of the image area (what a uniform map
    would give). ``share`` is NaN for an empty map (all zero), which has no mass to place."""
    heat = torch.as_tensor(heat, dtype=torch.float32)
    if heat.dim() != 2:
        raise ValueError(f"heat must be a [H, W] map, got {tuple(heat.shape)}")
    (boxes,) = check_boxes("boxes", [torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).cpu()])
    inside = torch.zeros_like(heat, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes.round().int().tolist():
        inside[max(y1, 0):y2, max(x1, 0):x2] = True
    total = float(heat.sum())
    return (float(heat[inside].sum()) / total if total > 0 else math.nan), float(inside.float().mean())


def cam_shares(models: Mapping[str, Sequence[nn.Module]], samples: Sequence[tuple[Tensor, Mapping[str, Tensor]]],
               method: CamMethod = "gradcam") -> list[dict[str, Any]]:
    """``cam_box_share`` of every model on every sample: one row per (model, seed, image).

    Args:
        models: name -> one detector per seed (e.g. ``{"no KD": [s0, s1, ...], "LIAF-KD": [...]}``; the
            i-th detectors of all names are paired by seed ``i``).
        samples: ``(image [3, H, W], {"boxes": [n, 4], "labels": [n]})``; every model explains the same
            ground-truth instances.
    Returns rows ``{"model", "seed", "image", "share", "area", "empty"}`` (``empty``: an all-zero map).
    """
    if not models or not samples:
        raise ValueError("cam_shares needs at least one model and one sample")
    rows = []
    for name, seeds in models.items():
        for seed, model in enumerate(seeds):
            with DetectorCAM(model, method) as cam:
                for index, (image, target) in enumerate(samples):
                    if len(target["boxes"]) == 0:
                        raise ValueError(f"sample {index} has no boxes: the share inside boxes is undefined")
                    share, area = cam_box_share(cam(image, target["boxes"], target["labels"]), target["boxes"])
                    rows.append({"model": name, "seed": seed, "image": index, "share": share, "area": area,
                                 "empty": math.isnan(share)})
    return rows


def _counted(row: Mapping[str, Any], empty: EmptyMaps) -> float | None:
    """A row's share as a summary counts it: an empty map is left out (``None``) or counted as 0."""
    if row["empty"]:
        return 0.0 if empty == "zero" else None
    return float(row["share"])


def summarise_cam_shares(rows: Sequence[Mapping[str, Any]], baseline: str | None = None,
                         empty: EmptyMaps = "exclude") -> list[dict[str, Any]]:
    """Per model: the mean share inside boxes (per seed over its maps, then over seeds), the spread across
    images (std of the per-image shares, averaged over seeds) and across seeds (std of the per-seed means),
    the number of empty maps, and with ``baseline`` the difference of per-seed means to the baseline's,
    paired by seed, with its Student's t 95% interval (``liaf_lab.experiments.verdicts.paired_interval``).

    ``empty``: ``"exclude"`` leaves all-zero maps out of the means (they have no mass to place), ``"zero"``
    counts them as a share of 0 (the map puts nothing inside the boxes). Models differ in how many maps are
    empty, so the two can order them differently: show both. A model with one seed (e.g. the teacher) is set
    against the mean of the baseline's seeds, without an interval.
    """
    if empty not in ("exclude", "zero"):
        raise ValueError(f"empty must be 'exclude' or 'zero', got {empty!r}")

    def seed_means(name: str) -> dict[int, float]:
        out = {}
        for seed in sorted({r["seed"] for r in rows if r["model"] == name}):
            values = [v for r in rows if r["model"] == name and r["seed"] == seed
                      if (v := _counted(r, empty)) is not None]
            if values:
                out[seed] = float(np.mean(values))
        return out

    base = seed_means(baseline) if baseline is not None else {}
    summary = []
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        per_seed = seed_means(name)
        per_image = {s: [v for r in mine if r["seed"] == s if (v := _counted(r, empty)) is not None] for s in per_seed}
        image_std = [float(np.std(values, ddof=1)) for values in per_image.values() if len(values) > 1]
        entry: dict[str, Any] = {
            "model": name, "seeds": len(per_seed), "maps": len(mine), "empty maps": sum(r["empty"] for r in mine),
            "share inside boxes": float(np.mean(list(per_seed.values()))) if per_seed else math.nan,
            "std over images": float(np.mean(image_std)) if image_std else math.nan,
            "std over seeds": float(np.std(list(per_seed.values()), ddof=1)) if len(per_seed) > 1 else math.nan,
            "box area share": float(np.mean([r["area"] for r in mine])),
        }
        if baseline is not None and name != baseline and per_seed:
            entry[f"- {baseline} [95% CI]"] = _difference(per_seed, base, baseline)
        summary.append(entry)
    return summary


def _difference(per_seed: Mapping[int, float], base: Mapping[int, float], baseline: str) -> str:
    """The paired difference of per-seed means with its interval, or a one-seed model against the baseline's mean."""
    if len(per_seed) == 1 and len(base) > 1:
        diff = next(iter(per_seed.values())) - float(np.mean(list(base.values())))
        return f"{diff:+.3f} (one seed, against the mean of {baseline}'s {len(base)} seeds: no interval)"
    paired = [per_seed[s] - base[s] for s in per_seed if s in base]
    if not paired:
        return "no seed in common"
    mean, low, high = paired_interval(paired)
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]" if len(paired) > 1 else f"{mean:+.3f} (one seed: no interval)"


def plot_cam_shares(rows: Sequence[Mapping[str, Any]], title: str | None = None) -> Figure:
    """The shares of ``cam_shares`` rows: per model, every non-empty map (grey, per image and seed), each
    seed's mean (coloured) and the mean of those (black bar); the dashed line is the mean box area share
    (a uniform map's value). The legend says which is which; the title (default: a description of the
    rows) says how many maps were empty and left out."""
    if not rows:
        raise ValueError("no rows: compute them with cam_shares")
    names = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = new_figure(1, panel=(2.6 + 1.1 * len(names), 3.6))
    ax = axes[0, 0]
    rng = np.random.default_rng(0)  # horizontal jitter only
    for i, name in enumerate(names):
        mine = [r for r in rows if r["model"] == name and not r["empty"]]
        ax.scatter(i - 0.2 + 0.15 * rng.random(len(mine)), [r["share"] for r in mine], s=6, color="0.6",
                   label="one map (image, seed)" if i == 0 else None)
        seeds = sorted({r["seed"] for r in mine})
        means = [float(np.mean([r["share"] for r in mine if r["seed"] == s])) for s in seeds]
        ax.scatter([i + 0.15] * len(means), means, s=18, color=f"C{i}", label="one seed's mean" if i == 0 else None)
        if means:
            ax.hlines(float(np.mean(means)), i + 0.05, i + 0.3, color="black", lw=2,
                      label="mean over seeds" if i == 0 else None)
    ax.axhline(float(np.mean([r["area"] for r in rows])), color="grey", ls="--", lw=1,
               label="box area share (a uniform map)")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("share of CAM inside GT boxes")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    empty = sum(bool(r["empty"]) for r in rows)
    ax.set_title(title or f"Grad-CAM share inside the boxes ({len(rows) - empty} non-empty maps; "
                          f"{empty} empty maps left out)", fontsize=9)
    return fig


CAM_SHARES_KEYS = ("model", "seed", "image", "share", "area", "empty")


def write_cam_shares(path: str | Path, rows: Sequence[Mapping[str, Any]], source: Mapping[str, Any]) -> Path:
    """Write ``cam_shares`` rows and their ``source`` (the study, images, command that made them) as JSON,
    atomically (NaN shares of empty maps are written as null)."""
    from ..utils.atomic import write_json

    clean = [{k: (None if k == "share" and r["empty"] else r[k]) for k in CAM_SHARES_KEYS} for r in rows]
    return write_json(Path(path), {"source": dict(source), "rows": clean})


def read_cam_shares(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(rows, source)`` of a file written by ``write_cam_shares``. A missing or malformed file is a
    ``FileNotFoundError`` / ``ValueError`` that says how to make it (``tools/cam_shares.py``)."""
    from ..utils.atomic import read_json

    regenerate = "make it with `python tools/cam_shares.py STUDY_DIR --out FILE` (docs/analysis.md)"
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no CAM-share file at {file}: {regenerate}")
    data = read_json(file, "CAM shares")
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not all(
            isinstance(r, dict) and set(CAM_SHARES_KEYS) <= set(r) for r in data["rows"]):
        raise ValueError(f"{file} is not a CAM-share file (rows with {', '.join(CAM_SHARES_KEYS)}): {regenerate}")
    rows = [{**r, "share": math.nan if r["share"] is None else float(r["share"])} for r in data["rows"]]
    return rows, dict(data.get("source", {}))


def compare_cams(
    models: Mapping[str, nn.Module],
    image: Tensor,
    method: CamMethod = "gradcam",
    target_boxes: Tensor | None = None,
    target_labels: Tensor | Sequence[int] | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    max_cells: int = 2304,
    class_names: Sequence[str] | None = None,
) -> Figure:
    """The image, then each model's CAM overlaid on it side by side (LIAF-KD Fig. 3).

    E.g. ``{"teacher": t, "baseline": s0, "LIAF-KD": s1}``. Pass the ground-truth boxes as
    ``target_boxes``/``target_labels`` so every model explains the same instances (without them
    each Grad-CAM explains that model's own detections); they are drawn on every panel, named by
    ``class_names``. Each CAM is scaled to [0, 1] (one colour bar); a panel whose map is all zero
    says so in its title (Grad-CAM keeps only the positive part of its weighted sum, so a map can
    be empty when that sum is negative everywhere).
    """
    if not models:
        raise ValueError("models is empty: pass a dict of name -> detector")
    img = check_image(image)
    heats = {name: detector_cam(m, img, method, target_boxes, target_labels, max_cells=max_cells)
             for name, m in models.items()}
    height, width = img.shape[-2:]
    fig, axes = new_figure(1 + len(heats), panel=(3.5, 3.5 * height / width + 0.4))
    boxes = torch.as_tensor(target_boxes).reshape(-1, 4) if target_boxes is not None else torch.zeros(0, 4)
    draw_boxes(axes[0, 0], img, boxes, target_labels, class_names=class_names)
    axes[0, 0].set_title("image")
    cm = colormaps[cmap]
    for ax, (name, heat) in zip(axes[0, 1:], heats.items(), strict=True):
        overlay = (1 - alpha) * img.permute(1, 2, 0).numpy() + alpha * cm(heat)[..., :3]
        ax.imshow(np.clip(overlay, 0, 1))
        draw_boxes(ax, None, boxes, target_labels, class_names=class_names, linewidth=1.0)
        if target_boxes is not None and len(boxes):
            share, _ = cam_box_share(heat, boxes)
            note = "EMPTY map" if math.isnan(share) else f"{share:.2f} inside boxes"
        else:
            note = "EMPTY map" if not heat.any() else ""
        ax.set_title(f"{name} ({method})\n{note}".rstrip(), fontsize=9)
    fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cm), ax=list(axes[0, 1:]), fraction=0.02, pad=0.01,
                 label=f"{method} (each map scaled to [0, 1])")
    return fig
