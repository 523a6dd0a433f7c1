"""Where a bench run's time goes, and what the kernels that remain can still give, measured side by side.

    OMP_NUM_THREADS=1 python benchmarks/profile_bench.py phases --method liaf      # one whole run, by phase
    OMP_NUM_THREADS=1 python benchmarks/profile_bench.py ops                       # a step's operators
    OMP_NUM_THREADS=1 python benchmarks/profile_bench.py kernels                   # layouts and backends
    OMP_NUM_THREADS=1 python benchmarks/profile_bench.py kernels --compile         # ... and torch.compile

``phases`` runs one study run (``study.run_one``: stage 1, distillation, evaluation on val and test) and prints the
process CPU seconds spent in each phase (data loading, the teacher's features, the training steps, prediction,
COCOeval). ``ops`` profiles five training steps of the student with ``torch.profiler`` and gives the operators' shares,
with the step's FLOPs (``torch.utils.flop_counter``) and the rate reached. ``kernels`` times training steps and the
teacher's forward with torch's default layout against ``channels_last``, oneDNN against torch's own convolutions,
bfloat16 autocast (fast only on CPUs with bfloat16 instructions, e.g. ``avx512_bf16``; other numerics),
and (``--compile``) the student's backbone compiled with ``torch.compile``, round-robin, medians of process CPU time;
and COCOeval from pycocotools against faster-coco-eval when that is installed (same AP checked).
Run it with ``PYTHONPATH`` set to another checkout to profile that code.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from liaf_lab.experiments.builders import build_datasets, build_detector, build_distiller
from liaf_lab.experiments.config import load_config
from liaf_lab.data import collate_fn
from liaf_lab.engine.steps import DetectorStep, DistillStep
from liaf_lab.models.backbones import fpn_levels

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "data_samples" / "checkpoints" / "teacher_tiny.pt"
STUDENT = ROOT / "data_samples" / "checkpoints" / "student_none.pt"


def _timed(owner: object, name: str, bucket: str, spent: dict[str, float]) -> None:
    """Wrap ``owner.name`` so that its process CPU time is added to ``spent[bucket]``."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            spent[bucket] += time.process_time() - start

    setattr(owner, name, wrapper)


def phases(args: argparse.Namespace) -> None:
    import liaf_lab.engine.evaluate as evaluate
    import liaf_lab.engine.loop as loop
    import liaf_lab.engine.steps as steps
    from liaf_lab.engine.seeding import SeededSamples
    from liaf_lab.experiments.study import Run, run_one

    spent: dict[str, float] = defaultdict(float)
    _timed(SeededSamples, "__getitem__", "data (load, augment)", spent)
    _timed(evaluate, "predict_coco", "evaluation: prediction", spent)
    _timed(evaluate, "coco_metrics", "evaluation: COCOeval", spent)
    if hasattr(steps.FrozenTeacherStep, "teacher_levels"):
        _timed(steps.FrozenTeacherStep, "teacher_levels", "teacher features (stage 1 and 2)", spent)
    _timed(loop, "fit", "training (stage 1 and 2, data and teacher included)", spent)
    out = Path(tempfile.mkdtemp(prefix="profile_bench_"))
    overrides = [f"distill.iterations={args.iterations}"] if args.iterations else []
    start = time.process_time()
    row = run_one(str(out), args.config, overrides, Run((), 0, args.method), str(TEACHER), "cpu",
                  torch.get_num_threads())
    total = time.process_time() - start
    print(f"{args.method}, {args.config}, {torch.get_num_threads()} thread(s): {total:.1f} s CPU in all "
          f"(test AP {row.get('test_AP', float('nan')):.4f})")
    for bucket, seconds in spent.items():
        print(f"  {bucket:<58}{seconds:8.1f} s {100 * seconds / total:5.1f}%")


def _setup(config: str):
    cfg = load_config(config, [])
    train, val = build_datasets(cfg)
    images, targets = collate_fn([train[i] for i in range(cfg["distill"]["batch_size"])])
    return cfg, train, val, images, targets, len(train.class_names) + 1


def _step(cfg, nc: int, method: str, channels_last: bool = False, compiled: bool = False):
    student = build_detector(cfg, "student", nc, seed=0)
    if method == "none":
        step = DetectorStep(student)
    else:
        teacher = build_detector(cfg, "teacher", nc, weights_path=TEACHER)
        step = DistillStep(student, teacher, build_distiller(method, cfg, student, seed=0))
    if channels_last:
        step = step.to(memory_format=torch.channels_last)
    if compiled:
        student.backbone = torch.compile(student.backbone)
    step.train()
    optimizer = torch.optim.SGD([p for p in step.parameters() if p.requires_grad], lr=1e-3)
    return step, optimizer


def _one(step, optimizer, images, targets) -> None:
    loss = sum(step(images, targets).values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _round_robin(variants: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median process CPU seconds of each variant, run in turn ``repeats`` times after one warm-up round."""
    times: dict[str, list[float]] = defaultdict(list)
    for r in range(repeats + 1):
        for name, fn in variants.items():
            start = time.process_time()
            fn()
            if r:
                times[name].append(time.process_time() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def ops(args: argparse.Namespace) -> None:
    from torch.profiler import ProfilerActivity, profile

    cfg, _, _, images, targets, nc = _setup(args.config)
    step, optimizer = _step(cfg, nc, args.method)
    for _ in range(2):
        _one(step, optimizer, images, targets)
    with FlopCounterMode(display=False) as counter:
        _one(step, optimizer, images, targets)
    start = time.process_time()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            _one(step, optimizer, images, targets)
    seconds = (time.process_time() - start) / 5
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    print(f"{args.method} step ({args.config}, batch {len(images)}): {counter.get_total_flops() / 1e9:.2f} GFLOP "
          f"forward + backward, {seconds * 1000:.0f} ms under the profiler: {counter.get_total_flops() / seconds / 1e9:.0f} "
          "GFLOP/s")
    for e in rows[:args.top]:
        print(f"  {e.key:<45}{100 * e.self_cpu_time_total / total:6.1f}%")


def kernels(args: argparse.Namespace) -> None:
    cfg, train, val, images, targets, nc = _setup(args.config)
    variants: dict[str, Callable[[], None]] = {}
    for method in args.methods:
        for layout in ("default", "channels_last"):
            step, optimizer = _step(cfg, nc, method, channels_last=layout == "channels_last")
            variants[f"{method} step, {layout}"] = (lambda s=step, o=optimizer: _one(s, o, images, targets))
    step, optimizer = _step(cfg, nc, "none")

    def native() -> None:
        with torch.backends.mkldnn.flags(enabled=False):
            _one(step, optimizer, images, targets)

    variants["none step, torch's own convolutions (oneDNN off)"] = native

    def bfloat16() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _one(step, optimizer, images, targets)

    variants["none step, bfloat16 autocast"] = bfloat16
    teacher = build_detector(cfg, "teacher", nc, weights_path=TEACHER).eval()
    teacher_cl = copy.deepcopy(teacher).to(memory_format=torch.channels_last)
    x = teacher.transform(images)[0].tensors
    variants["teacher forward, default"] = torch.no_grad()(lambda: fpn_levels(teacher.backbone, x))
    variants["teacher forward, channels_last"] = torch.no_grad()(lambda: fpn_levels(teacher_cl.backbone, x))
    with torch.no_grad():
        same = all(torch.equal(a, b) for a, b in zip(fpn_levels(teacher.backbone, x).values(),
                                                     fpn_levels(teacher_cl.backbone, x).values(), strict=True))
    if args.compile:
        step_c, optimizer_c = _step(cfg, nc, "none", compiled=True)
        start = time.perf_counter()
        _one(step_c, optimizer_c, images, targets)
        print(f"torch.compile of the student's backbone: first step {time.perf_counter() - start:.0f} s (compilation)")
        variants["none step, backbone compiled"] = lambda: _one(step_c, optimizer_c, images, targets)
    times = _round_robin(variants, args.repeats)
    base = {name: t for name, t in times.items() if name.endswith(", default")}
    for name, t in times.items():
        ref = base.get(name.split(",")[0] + ", default", times.get("none step, default"))
        print(f"  {name:<52}{t * 1000:8.1f} ms  x{ref / t:.2f}")
    print(f"  channels_last teacher features bit-identical to the default layout's: {same}")
    _cocoeval(cfg, val, nc)


def _cocoeval(cfg, val, nc: int) -> None:
    from liaf_lab.engine.evaluate import coco_metrics, predict_coco

    student = build_detector(cfg, "student", nc, weights_path=STUDENT)  # trained: detections to match
    with contextlib.redirect_stderr(io.StringIO()):
        results = predict_coco(student, val)
    start = time.process_time()
    reference = coco_metrics(val.coco_gt(), results)
    ours = time.process_time() - start
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError:
        print(f"  COCOeval (pycocotools), {len(results)} detections on val: {ours:.2f} s; faster-coco-eval not "
              "installed")
        return
    start = time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(copy.deepcopy(val.coco_gt().dataset))
        ev = COCOeval_faster(gt, gt.loadRes(copy.deepcopy(results)), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    theirs = time.process_time() - start
    gap = max(abs(a - b) for a, b in zip(ev.stats, reference.values(), strict=False))
    print(f"  COCOeval, {len(results)} detections on val: pycocotools {ours:.2f} s, faster-coco-eval {theirs:.2f} s "
          f"(x{ours / theirs:.2f}); largest difference of the 12 metrics {gap:.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("phases")
    a.add_argument("--method", default="liaf")
    a.add_argument("--iterations", type=int, help="distillation iterations (default: the preset's)")
    b = sub.add_parser("ops")
    b.add_argument("--method", default="none")
    b.add_argument("--top", type=int, default=12)
    c = sub.add_parser("kernels")
    c.add_argument("--methods", nargs="+", default=["none", "fitnet"])
    c.add_argument("--repeats", type=int, default=5)
    c.add_argument("--compile", action="store_true", help="also torch.compile the student's backbone (minutes)")
    for q in (a, b, c):
        q.add_argument("--config", default="bench")
    args = p.parse_args()
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    {"phases": phases, "ops": ops, "kernels": kernels}[args.what](args)


if __name__ == "__main__":
    main()
