"""The main job, a small study preset: one paired study (``run_study``, in ``out/study``) of no KD and each method
(by default FitNet and LIAF-KD) over the demo's seeds, from the shipped tiny teacher (or one the study trains),
then the demo's report (``report.write_report``): the students beside the teacher, their losses, and the shipped
study of the preset, the measured answer one seed cannot give."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..data import collate_fn
from ..engine import evaluate_coco, load_checkpoint, save_checkpoint
from ..engine.distributed import resolve_device
from ..utils.atomic import write_json
from ..utils.paths import PROJECT_ROOT
from .builders import build_datasets, build_detector, build_distiller
from .config import ResolvedConfig, resolve_config
from .report import write_report
from .study import Run, load_study_run, ready_teacher, run_study

SHIPPED_DIR = PROJECT_ROOT / "data_samples" / "checkpoints"
SHIPPED_TEACHER = SHIPPED_DIR / "teacher_tiny.pt"
METHODS = ("none", "fitnet", "liaf")
QUICK = ["train_teacher.iterations=4", "stage1.iterations=2", "distill.iterations=4",
         "train_teacher.batch_size=4", "stage1.batch_size=4", "distill.batch_size=4"]
#: The demo's study folder, inside its own folder.
STUDY = "study"


def run_demo(out_dir: str | Path = "runs/demo", config: str | Path | ResolvedConfig = "tiny",
             seeds: tuple[int, ...] = (0,), overrides: list[str] | None = None, device: str | None = None,
             teacher_weights: str | Path | None = "auto", quick: bool = False,
             methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """Run the demo's study in ``out_dir/study`` and write ``report.md``, ``summary.json`` and figures in ``out_dir``.

    ``config`` (a preset name or file, or a config already resolved) is resolved once, with the quick settings and
    then ``overrides``. ``teacher_weights="auto"`` uses ``data_samples/checkpoints/teacher_tiny.pt`` with the tiny
    preset when it exists, else the study trains the teacher (in ``out_dir/study/teacher``); ``None`` always
    trains it. The runs use this process's torch threads (one run at a time); a stopped demo resumes where it
    stopped, as a study does.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    cfg = resolve_config(config, (QUICK if quick else []) + list(overrides or []))
    if teacher_weights == "auto":
        teacher_weights = SHIPPED_TEACHER if (cfg.source == "tiny" and SHIPPED_TEACHER.exists()) else None
    study = run_study(out / STUDY, cfg, methods, seeds, device=device, threads=torch.get_num_threads(),
                      teacher_weights=None if teacher_weights is None else str(teacher_weights))
    teacher_path = ready_teacher(out / STUDY, None if teacher_weights is None else str(teacher_weights))
    results: dict[str, Any] = {"teacher": None, "teacher_source": str(teacher_weights or "trained in this run"),
                               "students": {}}
    if teacher_path is not None:  # a demo of no KD alone has none
        train, val = build_datasets(cfg)
        teacher = build_detector(cfg, "teacher", len(train.class_names) + 1, weights_path=teacher_path,
                                 class_names=train.class_names)
        results["teacher"] = evaluate_coco(teacher, val, collate_fn, device=resolve_device(device),
                                           out_json=out / "teacher_eval.json", desc="evaluate teacher")
    for row in study.rows:  # the val split's metrics, as the teacher's
        metrics = {k.removeprefix("val_"): v for k, v in row.items() if k.startswith("val_")}
        results["students"].setdefault(row["method"], []).append({"seed": row["seed"], "folder": row["folder"],
                                                                  **metrics})
    results["seconds"] = time.perf_counter() - start
    results["summary"] = {m: _mean_std([r["AP"] for r in rows]) for m, rows in results["students"].items()}
    write_json(out / "summary.json", results)
    write_report(out, results, cfg, out / STUDY, str(cfg.source), changed=bool(cfg.overrides))
    return results


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def export_checkpoints(run_dir: str | Path, dest: str | Path = SHIPPED_DIR, seed: int = 0) -> list[Path]:
    """Copy a demo run's teacher (when the demo trained it), students and LIAF-KD distiller (one seed, read with
    ``load_study_run``) to ``dest`` in float16."""
    run_dir, dest = Path(run_dir), Path(dest)
    study = run_dir / STUDY
    files = {f"student_{m}.pt": study / Run((), seed, m).folder / "student.pt"
             for m in METHODS}
    if (study / "teacher" / "teacher.pt").exists():
        files["teacher_tiny.pt"] = study / "teacher" / "teacher.pt"
    written = []
    for name, src in files.items():
        state = load_checkpoint(src)
        written.append(save_checkpoint(dest / name, {**state, "model": _half(state["model"])}))
    distiller = load_study_run(study, "liaf", seed).distiller
    written.append(save_checkpoint(dest / "liaf_distiller.pt", _half(distiller.state_dict())))
    return written


def _half(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}


def load_demo_models(config: str | Path | ResolvedConfig = "tiny",
                     checkpoint_dir: str | Path = SHIPPED_DIR) -> dict[str, Any]:
    """The shipped tiny models: ``teacher``, students ``none``/``fitnet``/``liaf``, the LIAF-KD ``distiller``
    (stage-1 selectors, stage-2 projectors), the ``train``/``val`` datasets and the ``config``.

    Notebooks start from these so that they run in seconds on a CPU.
    """
    d = Path(checkpoint_dir)
    cfg = resolve_config(config)
    train, val = build_datasets(cfg)
    num_classes = len(train.class_names) + 1
    models: dict[str, Any] = {"config": cfg, "train": train, "val": val}
    models["teacher"] = build_detector(cfg, "teacher", num_classes, weights_path=d / "teacher_tiny.pt").eval()
    for method in METHODS:
        models[method] = build_detector(cfg, "student", num_classes, weights_path=d / f"student_{method}.pt").eval()
    distiller = build_distiller("liaf", cfg, models["liaf"])
    distiller.load_state_dict({k: v.float() for k, v in load_checkpoint(d / "liaf_distiller.pt").items()})
    models["distiller"] = distiller.eval()
    return models
