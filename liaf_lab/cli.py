"""The ``liaf-lab`` command: teacher training, selector learning, distillation, evaluation, demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DESCRIPTION = """\
LIAF-KD for torchvision detectors. The recipe, step by step (tiny preset, bundled sample data):

  liaf-lab train-teacher   --config tiny --out runs/teacher
  liaf-lab learn-selectors --config tiny --teacher runs/teacher/teacher.pt --out runs/stage1
  liaf-lab distill --method liaf --config tiny --teacher runs/teacher/teacher.pt \\
                   --selectors runs/stage1/selectors.pt --out runs/liaf
  liaf-lab evaluate --config tiny --role student --weights runs/liaf/student.pt

or all of it at once, with baseline and FitNet students for comparison:

  liaf-lab demo --out runs/demo

Presets: tiny (CPU, minutes) and paper (ResNet-101 teacher, ResNet-50 student, 800 px; GPU).
Change any setting with --set section.key=value (e.g. --set kd.mask_scale=count).
Interrupted runs resume from OUT/last.pt when started again with the same --out.
Several GPUs: torchrun --nproc_per_node=N -m liaf_lab.cli distill ...
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="preset name (tiny, paper) or a TOML file (default: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")


def _out(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--out", default=default, help=f"run folder: checkpoints, metrics.csv, results (default: {default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liaf-lab", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="teacher, stage 1, baseline/FitNet/LIAF-KD students, COCO eval, report")
    _common(p)
    _out(p, "runs/demo")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="student seeds (default: 0)")
    p.add_argument("--train-teacher", action="store_true",
                   help="train the teacher instead of loading data_samples/checkpoints/teacher_tiny.pt")
    p.add_argument("--quick", action="store_true", help="a few iterations per stage (smoke test)")
    p.add_argument("--methods", nargs="+", choices=["none", "fitnet", "liaf"], default=["none", "fitnet", "liaf"],
                   help="which students to train (default: all three)")

    p = sub.add_parser("train-teacher", help="train the teacher detector on its task loss")
    _common(p)
    _out(p, "runs/teacher")

    p = sub.add_parser("learn-selectors", help="stage 1: learn the instance selectors on the frozen teacher (Eq. 5)")
    _common(p)
    _out(p, "runs/stage1")
    p.add_argument("--teacher", required=True, help="teacher weights (teacher.pt)")

    p = sub.add_parser("distill", help="stage 2: train a student with LIAF-KD, FitNet or no KD")
    _common(p)
    _out(p, "runs/distill")
    p.add_argument("--method", choices=["liaf", "fitnet", "none"], default="liaf")
    p.add_argument("--teacher", help="teacher weights (needed for liaf and fitnet)")
    p.add_argument("--selectors", help="stage-1 selectors (selectors.pt); for liaf, learned first when omitted")

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
    if args.command == "toy":
        from .toy import run_toy

        print(json.dumps(run_toy(out_dir=args.out), indent=2))
        return 0
    if args.command == "demo":
        from .demo import run_demo

        results = run_demo(args.out, args.config, tuple(args.seeds), args.overrides, args.device,
                           teacher_weights=None if args.train_teacher else "auto", quick=args.quick,
                           methods=tuple(args.methods))
        print((Path(args.out) / "report.md").read_text())
        return 0 if results else 1

    from .builders import build_datasets, build_detector, build_distiller, train_config
    from .config import load_config
    from .data import collate_fn
    from .engine import distill, evaluate_coco, learn_selectors, load_checkpoint, save_checkpoint, train_detector
    from .engine.distributed import is_main, resolve_device

    cfg = load_config(args.config, args.overrides)
    train, val = build_datasets(cfg)
    num_classes = len(train.class_names) + 1
    if args.command == "evaluate":
        model = build_detector(cfg, args.role, num_classes, weights_path=args.weights)
        print(json.dumps(evaluate_coco(model, val, collate_fn, device=resolve_device(args.device), out_json=args.out), indent=2))
        return 0

    out = Path(args.out)
    if args.command == "train-teacher":
        model = build_detector(cfg, "teacher", num_classes)
        train_detector(model, train, train_config(cfg, "train_teacher"), out, args.device, desc="teacher",
                       val_dataset=val)
        name = "teacher.pt"
    else:
        if not args.teacher and (args.command == "learn-selectors" or args.method != "none"):
            raise SystemExit("error: --teacher is required (train one with `liaf-lab train-teacher`)")
        teacher = build_detector(cfg, "teacher", num_classes, weights_path=args.teacher) if args.teacher else None
        model = build_detector(cfg, "student", num_classes)
        method = "liaf" if args.command == "learn-selectors" else args.method
        distiller = build_distiller(method, cfg, model)
        if method == "liaf" and args.command == "distill" and args.selectors:
            distiller.load_state_dict(load_checkpoint(args.selectors))
        elif method == "liaf":
            stage1_out = out if args.command == "learn-selectors" else out / "stage1"
            learn_selectors(teacher, distiller, train, train_config(cfg, "stage1"), stage1_out, args.device)
            if is_main():
                save_checkpoint(stage1_out / "selectors.pt", distiller.state_dict())
        if args.command == "learn-selectors":
            return 0
        if distiller is None:
            train_detector(model, train, train_config(cfg, "distill"), out, args.device, desc="student (no KD)",
                           val_dataset=val)
        else:
            distill(model, teacher, distiller, train, train_config(cfg, "distill"), out, args.device,
                    val_dataset=val, inherit=cfg["kd"].get("inherit", False))
        name = "student.pt"
    if is_main():
        save_checkpoint(out / name, model.state_dict())
        metrics = evaluate_coco(model, val, collate_fn, device=resolve_device(args.device), out_json=out / "eval.json")
        print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
