"""Each method's first-iteration KD term against FitNet's, on one batch: the presets' weight normalisation.

    python benchmarks/kd_scale.py --config bench --teacher data_samples/checkpoints/teacher_tiny.pt
    python benchmarks/kd_scale.py --config bench --teacher ... --methods acam --set kd.acam.alpha=1

The public weights of most methods are tuned for pretrained 256-channel COCO detectors. The ``tiny``
and ``bench`` presets scale each method's weights by one factor (its terms keep their ratios) so that
its first KD term equals FitNet's (docs/distillers.md, "Loss weights in the presets"). This script
prints, per method, the task loss, the KD term (sum of its weighted terms) on the first batch of the
config's training data for a fresh student (seed 0) and the trained teacher, its ratio to FitNet's,
and the factor ``FitNet / method`` that would equalise them. Two-stage methods use their stage-1
modules at initialisation, as their first stage-2 step would without stage 1.
"""

from __future__ import annotations

import argparse

import torch
from bench_step import dataset_batch, served_methods

from liaf_lab.experiments.builders import build_detector, build_distiller
from liaf_lab.experiments.config import load_config
from liaf_lab.engine.distributed import resolve_device
from liaf_lab.engine.steps import DistillStep


def first_terms(cfg: dict, methods: list[str], teacher_path: str | None, batch_size: int,
                device: torch.device) -> dict[str, dict[str, float]]:
    """``{method: {"task", "kd", <term>...}}`` of one training-mode forward on the first ``batch_size`` images."""
    batch, num_classes = dataset_batch(cfg, batch_size, device)
    teacher = build_detector(cfg, "teacher", num_classes, weights_path=teacher_path).to(device)
    out = {}
    for method in methods:
        student = build_detector(cfg, "student", num_classes)
        step = DistillStep(student, teacher, build_distiller(method, cfg, student)).to(device).train()
        torch.manual_seed(0)  # the draws of random-mask methods
        with torch.no_grad():
            losses = {k: float(v) for k, v in step(*batch).items()}
        kd = {k.removeprefix("kd_"): v for k, v in losses.items() if k.startswith("kd_")}
        out[method] = {"task": sum(v for k, v in losses.items() if not k.startswith("kd_")), "kd": sum(kd.values()),
                       **kd}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="bench")
    p.add_argument("--teacher", default=None, help="teacher weights (default: a random teacher)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="default: every registered method the config's detectors serve (on FCOS not LD, BCKD, CrossKD)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = load_config(args.config, args.overrides)
    methods = args.methods or served_methods(cfg)
    methods = methods if "fitnet" in methods else ["fitnet", *methods]
    rows = first_terms(cfg, methods, args.teacher, args.batch, resolve_device(args.device))
    ref = rows["fitnet"]["kd"]
    print(f"{'method':<12}{'task':>9}{'KD':>12}{'KD/FitNet':>11}{'factor':>10}  terms")
    for method, r in rows.items():
        terms = ", ".join(f"{k} {v:.3g}" for k, v in r.items() if k not in ("task", "kd"))
        factor = ref / r["kd"] if r["kd"] else float("nan")
        print(f"{method:<12}{r['task']:>9.3f}{r['kd']:>12.4g}{r['kd'] / ref:>11.3g}{factor:>10.3g}  {terms}")


if __name__ == "__main__":
    main()
