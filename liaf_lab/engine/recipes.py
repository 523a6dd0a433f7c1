"""The recipe as four calls: train a detector, learn a two-stage method's stage 1, distill, evaluate."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..utils.atomic import write_json
from ..data import collate_fn as default_collate
from ..distillers import FeatureDistiller
from ..models import detector_features
from ..models.detectors import check_image_sizes, check_num_classes, match_levels, pair_levels
from .distributed import is_main, resolve_device
from .evaluate import evaluate_coco
from .loop import FitResult, TrainConfig, fit, to_device
from .steps import DetectorStep, DistillStep, Stage1Step
from .teacher_cache import TeacherCache


def periodic_eval(model: nn.Module, val_dataset: Dataset | None, collate_fn: Callable,
                  device: torch.device | str | None) -> Callable[[int], dict[str, float]] | None:
    """The ``evaluate`` callback of ``fit``: COCO AP and AP50 of ``model`` on ``val_dataset``."""
    if val_dataset is None:
        return None

    def evaluate(iteration: int) -> dict[str, float]:
        metrics = evaluate_coco(model, val_dataset, collate_fn, device=resolve_device(device),
                                desc=f"evaluate @ {iteration}")
        return {"AP": metrics["AP"], "AP50": metrics["AP50"]}

    return evaluate


def train_detector(model: nn.Module, dataset: Dataset, cfg: TrainConfig, out_dir: str | Path | None = None,
                   device: torch.device | str | None = None, collate_fn: Callable = default_collate,
                   desc: str = "detector", val_dataset: Dataset | None = None,
                   run_config: dict[str, Any] | None = None, new_schedule: bool = False,
                   inherit_from: nn.Module | None = None) -> FitResult:
    """Train a detector on its task loss (the teacher, or the student without KD).

    With ``val_dataset`` and ``cfg.eval_every``, COCO AP is measured every ``eval_every`` iterations.
    ``run_config`` and ``new_schedule``: what binds ``out_dir`` to this run (see ``fit``).
    ``inherit_from``: first copy this detector's neck and head into ``model`` where shapes match, as
    ``distill(inherit=True)`` does: the no-KD control of students that inherit from their teacher.
    """
    check_num_classes(model, dataset)
    check_image_sizes(model, dataset)
    if inherit_from is not None and not _resuming(out_dir):
        inherit_neck_and_head(model, inherit_from)
    return fit(DetectorStep(model), {"model": model}, dataset, collate_fn, cfg, out_dir, device, desc,
               periodic_eval(model, val_dataset, collate_fn, device), run_config, new_schedule)


def learn_stage1(teacher: nn.Module, distiller: FeatureDistiller, dataset: Dataset, cfg: TrainConfig,
                 out_dir: str | Path | None = None, device: torch.device | str | None = None,
                 collate_fn: Callable = default_collate, run_config: dict[str, Any] | None = None,
                 new_schedule: bool = False, teacher_cache: TeacherCache | None = None) -> FitResult:
    """Stage 1 of a two-stage method (e.g. LIAF-KD Eq. 5): only ``distiller.stage1_modules()`` learn, on the
    frozen teacher's task loss plus the method's terms; those modules are what the run checkpoints.

    Afterwards ``distiller.stage1_ready`` is true; save ``distiller.state_dict()`` to reuse the result.
    ``teacher_cache``: the teacher's FPN levels shared with other runs (``TeacherCache``; exact).
    """
    check_num_classes({"teacher": teacher}, dataset)
    check_image_sizes({"teacher": teacher}, dataset)
    step = Stage1Step(teacher, distiller, teacher_cache)
    result = fit(step, distiller.train_stage(1), dataset, collate_fn, cfg, out_dir, device, f"stage 1 ({distiller.method_name})",
                 run_config=run_config, new_schedule=new_schedule)
    distiller.mark_stage1(result.iterations)
    if out_dir is not None and is_main():
        stats = stage1_stats(teacher, distiller, dataset, collate_fn, device, batch_size=cfg.batch_size)
        if stats:
            write_json(Path(out_dir) / "stage1_stats.json", stats)
    return result


def stage1_stats(teacher: nn.Module, distiller: FeatureDistiller, dataset: Dataset,
                 collate_fn: Callable = default_collate, device: torch.device | str | None = None,
                 batch_size: int = 8, max_images: int = 512) -> dict[str, dict[str, Any]]:
    """The distiller's ``stage1_stats`` over the first ``max_images`` images of ``dataset``, averaged.

    Returns name -> ``{"mean": [..] (the per-image values' mean over the images where they are
    defined, one entry per trailing index, e.g. per selector), "images": [..] (how many)}``; empty
    for a method without statistics. ``learn_stage1`` writes it to ``stage1_stats.json``.
    """
    device = resolve_device(device)
    teacher = teacher.to(device).eval()
    distiller = distiller.to(device)
    levels = match_levels(distiller.strides, teacher)
    subset = Subset(dataset, range(min(len(dataset), max_images)))
    values: dict[str, list[Tensor]] = {}
    with torch.no_grad():
        for images, targets in DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn):
            images, targets = to_device(images, targets, device)
            _, targets_t, feats = detector_features(teacher, images, targets)
            stats = distiller.stage1_stats(pair_levels(feats, levels),
                                           [t["boxes"] for t in targets_t])
            for name, v in stats.items():
                values.setdefault(name, []).append(v.double().cpu())
    out = {}
    for name, parts in values.items():
        v = torch.cat(parts)
        defined = ~v.isnan()
        out[name] = {"mean": v.nan_to_num(0.0).sum(0).div(defined.sum(0).clamp_min(1)).tolist(),
                     "images": defined.sum(0).tolist()}
    return out


def distill(student: nn.Module, teacher: nn.Module, distiller: FeatureDistiller, dataset: Dataset,
            cfg: TrainConfig, out_dir: str | Path | None = None, device: torch.device | str | None = None,
            collate_fn: Callable = default_collate, val_dataset: Dataset | None = None,
            inherit: bool = False, run_config: dict[str, Any] | None = None, new_schedule: bool = False,
            on_iteration: Callable[[int], None] | None = None, teacher_cache: TeacherCache | None = None) -> FitResult:
    """Stage 2: train ``student`` on its task loss plus ``distiller``'s loss against the frozen teacher.

    ``inherit`` first copies the teacher's neck and head into the student where shapes match.
    ``on_iteration(it)`` runs after every step (see ``fit``), e.g. ``ScoreHistory.tracker``.
    ``teacher_cache``: the teacher's FPN levels shared with other runs (``TeacherCache``; exact).
    """
    check_num_classes({"student": student, "teacher": teacher}, dataset)
    check_image_sizes({"student": student, "teacher": teacher}, dataset)
    if not distiller.stage1_ready:
        raise ValueError(f"distiller {distiller.method_name!r} has a learned stage 1 ({list(distiller.stage1_modules())}) "
                         "that was neither run nor loaded: call learn_stage1(teacher, distiller, ...) first, or load "
                         "its stage-1 state (CLI: --stage1 stage1.pt)")
    if inherit and not _resuming(out_dir):
        inherit_neck_and_head(student, teacher)
    return fit(DistillStep(student, teacher, distiller, teacher_cache), {"student": student, **distiller.train_stage(2)},
               dataset,
               collate_fn, cfg, out_dir, device, f"distill ({distiller.method_name})",
               periodic_eval(student, val_dataset, collate_fn, device), run_config, new_schedule, on_iteration)


def train_student(student: nn.Module, teacher: nn.Module | None, distiller: FeatureDistiller | None,
                  dataset: Dataset, cfg: TrainConfig, out_dir: str | Path, device: torch.device | str | None = None,
                  *, stage1_cfg: TrainConfig | None = None, inherit: bool = False, val_dataset: Dataset | None = None,
                  run_config: dict[str, Any] | None = None, new_schedule: bool = False,
                  desc: str = "student (no KD)", teacher_cache: TeacherCache | None = None) -> FitResult:
    """One student of a comparison: trained on its task loss alone when ``distiller`` is ``None``, else
    distilled, after learning a stage 1 not yet learned in ``out_dir/stage1`` with ``stage1_cfg``.

    With ``inherit`` every student, the no-KD one too, first takes the teacher's neck and head, so the
    students of a seed start from the same weights and their difference is the KD loss's.
    ``teacher_cache``: the teacher's FPN levels shared with the study's other runs (``TeacherCache``; exact).
    """
    if distiller is None:
        return train_detector(student, dataset, cfg, out_dir, device, desc=desc, val_dataset=val_dataset,
                              run_config=run_config, new_schedule=new_schedule,
                              inherit_from=teacher if inherit else None)
    if not distiller.stage1_ready and stage1_cfg is not None:
        learn_stage1(teacher, distiller, dataset, stage1_cfg, Path(out_dir) / "stage1", device, run_config=run_config,
                     new_schedule=new_schedule, teacher_cache=teacher_cache)
    return distill(student, teacher, distiller, dataset, cfg, out_dir, device, val_dataset=val_dataset,
                   inherit=inherit, run_config=run_config, new_schedule=new_schedule, teacher_cache=teacher_cache)


def _resuming(out_dir: str | Path | None) -> bool:
    """Whether ``fit`` will resume from ``out_dir/last.pt`` (whose weights replace any initialisation)."""
    return out_dir is not None and (Path(out_dir) / "last.pt").exists()


def inherit_neck_and_head(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Copy the teacher's FPN and head weights into the student where names and shapes match.

    Returns the copied parameter names (FGD, MasKD and ACAM-KD initialise students this way).
    """
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    copied = [k for k, v in s_state.items()
              if (k.startswith("backbone.fpn.") or k.startswith("head.")) and k in t_state
              and t_state[k].shape == v.shape]
    student.load_state_dict({**s_state, **{k: t_state[k] for k in copied}})
    return copied
