"""The ``liaf-lab`` command: teacher training, stage 1, distillation, evaluation, studies, demo.

Methods come from the distiller registry (``liaf_lab.distillers``); nothing here names one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

DESCRIPTION = """\
LIAF-KD and the detector-distillation methods of its field, for torchvision detectors. The recipe, step by step (tiny preset, bundled sample data):

  liaf-lab train-teacher   --config tiny --out runs/teacher
  liaf-lab learn-stage1 --method liaf --config tiny --teacher runs/teacher/teacher.pt --out runs/stage1
  liaf-lab distill --method liaf --config tiny --teacher runs/teacher/teacher.pt \\
                   --stage1 runs/stage1/stage1.pt --out runs/liaf
  liaf-lab evaluate --config tiny --role student --weights runs/liaf/student.pt


or all of it at once, with baseline and FitNet students for comparison:

  liaf-lab demo --out runs/demo

Methods: none (no KD) and the registered distillers ({methods}); join them with + for their sum
(e.g. liaf+maskd). Two-stage methods (LIAF-KD, MasKD) learn their stage 1 first when --stage1 is omitted.

Presets: tiny (CPU, minutes) and paper (ResNet-101 teacher, ResNet-50 student, 800 px; GPU).
Change any setting with --set section.key=value, a method's option with --set kd.<method>.key=value
(e.g. --set kd.liaf.mask_scale=count). Sections: data, input, teacher, student, kd, train_teacher,
stage1, distill; an unknown section or key, or a value of the wrong type, is an error naming it. Input size of both detectors: --set input.min_size=320
(shorter side; input.max_size caps the longer one, default min_size * 1333 / 800).
Data keys (docs/data.md):
  data.kind = coco (default): data.train_images, data.train_ann, data.val_images, data.val_ann,
                              data.test_images, data.test_ann
  data.kind = kitti:          data.root (KITTI training/), data.classes, data.merge,
                              data.test_fraction or data.test_ids
  data.kind = voc:            data.root (VOC layout), data.train_set, data.val_set, data.test_set, data.classes
  any kind:                   data.skip_bad_images = true
Relative paths (data, --teacher, --weights, --stage1) are looked up from the current folder, then the project root.
Interrupted runs resume from OUT/last.pt when started again with the same --out (bit-identical to an
uninterrupted run with the same --seed and thread count); a folder refuses a run of another config.
Several GPUs: torchrun --nproc_per_node=N -m liaf_lab.cli distill ...
Every run folder holds TensorBoard events: tensorboard --logdir runs/. Pretrained weights: teacher.weights,
teacher.weights_backbone (and student.*), docs/pretrained.md. Studies on Slurm: study --executor slurm, docs/cluster.md.
"""


def _common(p: argparse.ArgumentParser, seed: bool = True) -> None:
    p.add_argument("--config", default="tiny", help="preset name (tiny, paper) or a TOML file (default: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. input.min_size=320 or data.root=/data/kitti/training; "
                        "repeatable")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    if seed:
        p.add_argument("--seed", type=int, default=0,
                       help="fixes every random draw: model and distiller initialisation, data order, augmentation "
                            "(default: 0)")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")


def _resumable(p: argparse.ArgumentParser) -> None:
    p.add_argument("--new-schedule", action="store_true",
                   help="resume OUT with a changed schedule (iterations, lr, warmup, schedule, ...); recorded in "
                        "OUT/run.json. Any other change of config is refused")


def _out(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--out", default=default, help=f"run folder: checkpoints, metrics.csv, results (default: {default})")


def build_parser() -> argparse.ArgumentParser:
    from .experiments.demo import METHODS as DEMO_METHODS
    from .distillers import list_distillers

    parser = argparse.ArgumentParser(prog="liaf-lab", description=DESCRIPTION.format(methods=", ".join(list_distillers())),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="teacher, then students without KD and with each method, COCO eval, report")
    _common(p, seed=False)
    _out(p, "runs/demo")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="student seeds (default: 0)")
    p.add_argument("--train-teacher", action="store_true",
                   help="train the teacher instead of loading data_samples/checkpoints/teacher_tiny.pt")
    p.add_argument("--quick", action="store_true", help="a few iterations per stage (smoke test)")
    p.add_argument("--methods", nargs="+", default=list(DEMO_METHODS),
                   help=f"which students to train: none and registered methods (default: {' '.join(DEMO_METHODS)})")

    p = sub.add_parser("study",
                       help="methods x seeds x a grid of config values: paired differences with 95%% intervals")
    _common(p, seed=False)
    _out(p, "runs/study")
    p.set_defaults(config="bench")
    p.add_argument("--methods", nargs="+", default=["none", "fitnet", "liaf"],
                   help="'none' (the baseline, always included) and registered distillers (default: none fitnet liaf)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="paired replicates (default: 0 1 2)")
    p.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                   help="a config key and the values to try; repeatable (every combination is run)")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="screen the --grid values one at a time (the config as it is, then each value alone) "
                        "instead of every combination")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, in separate processes (default: 1)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (default: 1); results depend on it, not on --jobs")
    p.add_argument("--teacher", help="teacher weights (default: trained once in OUT/teacher)")
    p.add_argument("--pairwise", action="store_true",
                   help="compare every pair of methods, not only each method with none (one Holm correction over "
                        "the whole family)")
    p.add_argument("--versus", nargs="+", default=[], metavar="METHOD",
                   help="also compare every other method with these (e.g. --versus liaf)")
    p.add_argument("--report-only", action="store_true",
                   help="write the report of the study in --out from its finished runs and run nothing (what a stopped "
                        "or running study says so far; seeds count only when all their runs have finished)")
    p.add_argument("--resume-from", metavar="DIR",
                   help="a shipped artefact of this same study (its study.json and results.json, e.g. "
                        "data_samples/studies/bench_all): its finished runs are adopted, not trained again")
    p.add_argument("--target-halfwidth", type=float, metavar="D",
                   help="fixed-width intervals (Stein's two-stage rule): --seeds is the pilot, then each comparison "
                        "gets the seeds a 95%% half-width of D AP needs, at most --max-seeds")
    p.add_argument("--max-seeds", type=int, metavar="N", help="the seed budget of --target-halfwidth")
    p.add_argument("--teacher-cache", choices=["auto", "on", "off"], default="auto",
                   help="share the frozen teacher's features between the runs of a seed, on disk in OUT/teacher_cache "
                        "(exact: the same students; auto, the default: on when training on the CPU)")
    p.add_argument("--teacher-cache-gb", type=float, default=20.0, metavar="GB",
                   help="the most disk the teacher cache may need (default: 20); a study that would need more is "
                        "refused before it starts")
    slurm = p.add_argument_group("cluster", "--executor slurm: the teacher and each run as a Slurm job (a job array) "
                                            "through submitit; OUT must be on a filesystem the nodes share")
    slurm.add_argument("--executor", choices=["local", "slurm"], default="local",
                       help="local processes (--jobs, the default) or Slurm jobs")
    slurm.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    slurm.add_argument("--time", type=int, default=24 * 60, metavar="MINUTES",
                       help="time limit per run; a run that reaches it is requeued and resumes (default: 1440)")
    slurm.add_argument("--gpus", type=int, default=1, help="GPUs per run (default: 1)")
    slurm.add_argument("--cpus", type=int, default=4, help="CPUs per run (default: 4)")
    slurm.add_argument("--mem-gb", type=int, help="memory per run in GB (default: the partition's)")
    slurm.add_argument("--array-parallelism", type=int, default=64,
                       help="runs of the job array running at once (default: 64)")
    slurm.add_argument("--no-wait", action="store_true",
                       help="submit and exit; run the same command again to collect the runs (and resubmit failed "
                            "ones) and write the report")

    p = sub.add_parser("train-teacher", help="train the teacher detector on its task loss")
    _common(p)
    _resumable(p)
    _out(p, "runs/teacher")

    p = sub.add_parser("learn-stage1", aliases=["learn-selectors"],
                       help="stage 1 of a two-stage method on the frozen teacher (LIAF-KD's selectors, MasKD's tokens)")
    _common(p)
    _resumable(p)
    _out(p, "runs/stage1")
    p.add_argument("--method", default="liaf", help="a two-stage method (default: liaf)")
    p.add_argument("--teacher", required=True, help="teacher weights (teacher.pt)")

    p = sub.add_parser("distill", help="stage 2: train a student with a method's KD, or without KD (--method none)")
    _common(p)
    _resumable(p)
    _out(p, "runs/distill")
    p.add_argument("--method", default="liaf", help="none or a registered method (default: liaf)")
    p.add_argument("--teacher", help="teacher weights (needed unless --method none)")
    p.add_argument("--stage1", "--selectors", dest="stage1",
                   help="stage-1 state of a two-stage method (stage1.pt); learned first when omitted")

    p = sub.add_parser("evaluate", help="COCO metrics (pycocotools) of a trained detector on the validation split")
    _common(p)
    p.add_argument("--role", choices=["teacher", "student"], default="student", help="which architecture of the config")
    p.add_argument("--weights", required=True, help="weights file (teacher.pt or student.pt)")
    p.add_argument("--out", help="write the metrics to this JSON file")

    p = sub.add_parser("toy", help="the random-feature toy problem (seconds)")
    _out(p, "runs/toy")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = logging.getLogger("liaf_lab")  # what pretrained weights kept, remapped and re-initialised
    if not log.handlers:
        log.addHandler(logging.StreamHandler(sys.stderr))
        log.setLevel(logging.INFO)
    try:
        return run(args)
    except USER_ERRORS as err:
        if getattr(args, "debug", False):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


# Errors that mean "the input is wrong" (each names what): printed as one line, no traceback. OSError covers
# missing, unreadable or undecodable files and a full disk (``DiskFullError``), each naming its file.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def run(args: argparse.Namespace) -> int:
    """Carry out a parsed ``liaf-lab`` command."""
    commands = {"toy": _toy, "study": _study, "demo": _demo}
    return commands.get(args.command, _train)(args)


def _toy(args: argparse.Namespace) -> int:
    from .experiments.toy import run_toy

    print(json.dumps(run_toy(out_dir=args.out), indent=2))
    return 0


def _study(args: argparse.Namespace) -> int:
    from .experiments.executors import JobsPending, SlurmOptions
    from .experiments.study import parse_grid, report_finished, run_study

    if args.report_only:
        print(report_finished(args.out).report.read_text())
        return 0
    options = SlurmOptions(partition=args.partition, time_min=args.time, gpus=args.gpus, cpus=args.cpus,
                           array_parallelism=args.array_parallelism, mem_gb=args.mem_gb, wait=not args.no_wait)
    try:
        result = run_study(args.out, args.config, args.methods, args.seeds, parse_grid(args.grid),
                           args.overrides, args.device, args.jobs, args.threads, args.teacher,
                           "one_at_a_time" if args.one_at_a_time else "product", pairwise=args.pairwise,
                           versus=args.versus, target_half_width=args.target_halfwidth,
                           max_seeds=args.max_seeds, executor=args.executor, executor_options=options,
                           teacher_cache={"auto": None, "on": True, "off": False}[args.teacher_cache],
                           teacher_cache_gb=args.teacher_cache_gb, resume_from=args.resume_from)
    except JobsPending as pending:
        print(pending)
        return 0
    print(result.report.read_text())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .experiments.demo import run_demo

    results = run_demo(args.out, args.config, tuple(args.seeds), args.overrides, args.device,
                       teacher_weights=None if args.train_teacher else "auto", quick=args.quick,
                       methods=tuple(args.methods))
    print((Path(args.out) / "report.md").read_text())
    return 0 if results else 1


def _train(args: argparse.Namespace) -> int:
    """``evaluate``, ``train-teacher``, ``learn-stage1`` and ``distill``: one run of a config, then (but for
    ``learn-stage1``) its detector saved and evaluated on val."""
    from .utils.figures import plot_run_curves
    from .experiments.builders import build_datasets, build_detector, dataset_category_ids, train_config
    from .experiments.config import load_config, method_config
    from .data import collate_fn
    from .engine import evaluate_coco, train_detector
    from .engine.distributed import is_main, resolve_device
    from .engine.tracking import log_run_summary
    from .models import save_detector

    cfg = load_config(args.config, args.overrides)
    train, val = build_datasets(cfg)
    num_classes, classes = len(train.class_names) + 1, train.class_names
    pretrained = {"class_names": classes, "category_ids": dataset_category_ids(train)}  # [teacher]/[student] weights
    seed = args.seed
    if args.command == "evaluate":
        model = build_detector(cfg, args.role, num_classes, weights_path=args.weights, class_names=classes)
        metrics = evaluate_coco(model, val, collate_fn, device=resolve_device(args.device), out_json=args.out)
        print(json.dumps(metrics, indent=2))
        return 0

    out = Path(args.out)
    stage1_command = args.command in ("learn-stage1", "learn-selectors")
    # What binds a run folder to this run: the whole resolved config, the command and its inputs.
    run_config = {"command": "learn-stage1" if stage1_command else args.command, "seed": seed,
                  "config": method_config(cfg, getattr(args, "method", None)),
                  "method": getattr(args, "method", None), "teacher": getattr(args, "teacher", None),
                  "stage1": getattr(args, "stage1", None)}
    resume = {"run_config": run_config, "new_schedule": args.new_schedule}
    if args.command == "train-teacher":
        model = build_detector(cfg, "teacher", num_classes, seed=seed, **pretrained)
        train_detector(model, train, train_config(cfg, "train_teacher", seed=seed), out, args.device, desc="teacher",
                       val_dataset=val, **resume)
        name = "teacher.pt"
    else:
        model = build_detector(cfg, "student", num_classes, seed=seed, **pretrained)
        name = "student.pt" if _train_student(args, cfg, model, train, val, out, stage1_command, resume) else None
    if not is_main():
        return 0
    plot_run_curves(out)
    if name is None:  # learn-stage1 trains no detector
        return 0
    save_detector(out / name, model, classes)
    first = not (out / "eval.json").exists()
    metrics = evaluate_coco(model, val, collate_fn, device=resolve_device(args.device), out_json=out / "eval.json")
    if first:  # the final evaluation in the run's TensorBoard events, once
        section = "train_teacher" if args.command == "train-teacher" else "distill"
        log_run_summary(out, train_config(cfg, section).iterations, metrics)
    print(json.dumps(metrics, indent=2))
    return 0


def _train_student(args: argparse.Namespace, cfg: dict, model: nn.Module, train: Any, val: Any, out: Path,
                   stage1_command: bool, resume: dict[str, Any]) -> bool:
    """``learn-stage1`` or ``distill`` of ``model`` (stage 1 learned, or loaded with ``--stage1``); whether a
    student was trained (``learn-stage1`` trains none)."""
    from .experiments.builders import build_detector, build_distiller, train_config
    from .utils.checkpoint import load_module_state
    from .utils.paths import resolve_path
    from .distillers import BASELINE
    from .engine import learn_stage1, load_checkpoint, save_checkpoint, train_student
    from .engine.distributed import is_main

    classes, seed = train.class_names, args.seed
    inherit = cfg["kd"].get("inherit", False)
    if not args.teacher and (stage1_command or args.method != BASELINE or inherit):
        raise ValueError("--teacher is required (train one with `liaf-lab train-teacher`)"
                         + ("; with kd.inherit = true the no-KD student starts from its neck and head too"
                            if args.method == BASELINE else ""))
    teacher = (build_detector(cfg, "teacher", len(classes) + 1, weights_path=args.teacher, class_names=classes)
               if args.teacher else None)
    distiller = build_distiller(args.method, cfg, model, seed=seed)
    two_stage = distiller is not None and distiller.two_stage
    if stage1_command and not two_stage:
        raise ValueError(f"method {args.method!r} has no stage 1 to learn")
    if not stage1_command and args.stage1:
        if not two_stage:
            raise ValueError(f"--stage1 is for two-stage methods; {args.method!r} has no stage 1")
        stage1 = resolve_path(args.stage1)
        load_module_state(distiller, load_checkpoint(stage1), stage1,
                          f"the stage-1 state of a {args.method!r} distiller of this config (stage1.pt)")
        if not distiller.stage1_ready:
            raise ValueError(f"{stage1} holds a {args.method!r} distiller whose stage 1 never ran")
    elif two_stage:
        stage1_out = out if stage1_command else out / "stage1"
        learn_stage1(teacher, distiller, train, train_config(cfg, "stage1", seed=seed), stage1_out, args.device,
                     **resume)
        if is_main():
            save_checkpoint(stage1_out / "stage1.pt", distiller.state_dict())
            stats = stage1_out / "stage1_stats.json"
            if stats.exists():
                print(f"stage-1 statistics ({stats}):\n{stats.read_text()}")
    if stage1_command:
        return False
    train_student(model, teacher, distiller, train, train_config(cfg, "distill", seed=seed), out, args.device,
                  inherit=inherit, val_dataset=val, **resume)  # stage 1 was learned or loaded above
    return True

if __name__ == "__main__":
    sys.exit(main())
