"""The main job: a teacher, then students without KD and with each method (by default FitNet and LIAF-KD),
evaluated and reported."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from .analysis.viz import plot_run_curves
from .atomic import write_json
from .builders import build_datasets, build_detector, build_distiller, train_config
from .config import PROJECT_ROOT, ResolvedConfig, resolve_config
from .data import collate_fn
from .engine import evaluate_coco, load_checkpoint, save_checkpoint, train_student
from .engine.distributed import resolve_device
from .models import save_detector
from .report import write_report
from .study import train_teacher

SHIPPED_DIR = PROJECT_ROOT / "data_samples" / "checkpoints"
SHIPPED_TEACHER = SHIPPED_DIR / "teacher_tiny.pt"
METHODS = ("none", "fitnet", "liaf")
QUICK = ["train_teacher.iterations=4", "stage1.iterations=2", "distill.iterations=4",
         "train_teacher.batch_size=4", "stage1.batch_size=4", "distill.batch_size=4"]


def get_teacher(cfg: dict[str, Any], train, val, out: Path, device, teacher_weights: str | Path | None):
    """The teacher and where it comes from: loaded from ``teacher_weights`` (or the shipped tiny one), or trained
    in ``out/teacher`` (``study.train_teacher``, evaluated on ``val``)."""
    if teacher_weights is not None:
        teacher = build_detector(cfg, "teacher", len(train.class_names) + 1, weights_path=teacher_weights,
                                 class_names=train.class_names)
        return teacher, str(teacher_weights)
    return train_teacher(cfg, train, out / "teacher", device, val_dataset=val), "trained in this run"


def run_demo(out_dir: str | Path = "runs/demo", config: str | Path | ResolvedConfig = "tiny",
             seeds: tuple[int, ...] = (0,), overrides: list[str] | None = None, device: str | None = None,
             teacher_weights: str | Path | None = "auto", quick: bool = False,
             methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """Run the whole recipe on the config's data and write ``report.md``, ``summary.json`` and figures.

    ``config`` (a preset name or file, or a config already resolved) is resolved once, with the quick settings and
    then ``overrides``. ``teacher_weights="auto"`` uses ``data_samples/checkpoints/teacher_tiny.pt`` with the tiny
    preset when it exists, else trains the teacher; ``None`` always trains it.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    cfg = resolve_config(config, (QUICK if quick else []) + list(overrides or []))
    device = resolve_device(device)
    train, val = build_datasets(cfg)
    num_classes = len(train.class_names) + 1
    if teacher_weights == "auto":
        teacher_weights = SHIPPED_TEACHER if (cfg.source == "tiny" and SHIPPED_TEACHER.exists()) else None
    teacher, teacher_source = get_teacher(cfg, train, val, out, device, teacher_weights)
    teacher_metrics = evaluate_coco(teacher, val, collate_fn, device=device, out_json=out / "teacher" / "eval.json",
                                    desc="evaluate teacher")
    results: dict[str, Any] = {"teacher": teacher_metrics, "teacher_source": teacher_source,
                               "students": {m: [] for m in methods}}
    for seed in seeds:
        run = out / f"seed{seed}"
        # Every module is initialised from (seed, its name): each method's student starts from the
        # same weights and sees the same batches, so the methods are compared in pairs.
        for method in methods:
            student = build_detector(cfg, "student", num_classes, seed=seed)
            tcfg = train_config(cfg, "distill", seed=seed)
            run_config = {"config": cfg, "method": method, "teacher": teacher_source}
            kd = build_distiller(method, cfg, student, seed=seed)
            train_student(student, teacher, kd, train, tcfg, run / method, device,
                          stage1_cfg=train_config(cfg, "stage1", seed=seed), inherit=cfg["kd"].get("inherit", False),
                          val_dataset=val, run_config=run_config)
            plot_run_curves(run / method)
            if kd is not None:
                save_checkpoint(run / method / "distiller.pt", kd.state_dict())
            save_detector(run / method / "student.pt", student, train.class_names)
            metrics = evaluate_coco(student, val, collate_fn, device=device, out_json=run / method / "eval.json",
                                    desc=f"evaluate {method}")
            results["students"][method].append({"seed": seed, **metrics})
    results["seconds"] = time.perf_counter() - start
    results["summary"] = {m: _mean_std([r["AP"] for r in rows]) for m, rows in results["students"].items()}
    write_json(out / "summary.json", results)
    write_report(out, results, cfg, str(cfg.source), changed=bool(cfg.overrides))
    return results


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def export_checkpoints(run_dir: str | Path, dest: str | Path = SHIPPED_DIR, seed: int = 0) -> list[Path]:
    """Copy a demo run's teacher, students and LIAF-KD distiller (one seed) to ``dest`` in float16."""
    run_dir, dest = Path(run_dir), Path(dest)
    sources = {"student_none.pt": run_dir / f"seed{seed}" / "none" / "student.pt",
               "student_fitnet.pt": run_dir / f"seed{seed}" / "fitnet" / "student.pt",
               "student_liaf.pt": run_dir / f"seed{seed}" / "liaf" / "student.pt",
               "liaf_distiller.pt": run_dir / f"seed{seed}" / "liaf" / "distiller.pt"}
    if (run_dir / "teacher" / "teacher.pt").exists():
        sources["teacher_tiny.pt"] = run_dir / "teacher" / "teacher.pt"
    written = []
    for name, src in sources.items():
        state = load_checkpoint(src)
        weights = state["model"] if "meta" in state else state  # save_detector files carry their classes
        half = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
        written.append(save_checkpoint(dest / name, {**state, "model": half} if "meta" in state else half))
    return written


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
