"""Training-step time of the student with no KD, FitNet and LIAF-KD, measured side by side.

    python benchmarks/bench_step.py                      # tiny preset on the CPU, bundled sample
    python benchmarks/bench_step.py --config paper --device cuda --synthetic 2   # paper size on a GPU

Each step is forward + backward + SGD update of the student (and projector); the three variants run
round-robin, ``--repeats`` times after ``--warmup`` rounds, and the median is reported with its ratio
to FitNet (target: LIAF-KD at most 1.10x FitNet).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from liaf_lab.builders import build_datasets, build_detector, build_distiller
from liaf_lab.config import load_config
from liaf_lab.data import collate_fn
from liaf_lab.engine.distributed import resolve_device
from liaf_lab.engine.steps import DetectorStep, DistillStep


def synthetic_batch(n: int, size: int, num_classes: int, device: torch.device):
    """``n`` random images of ``size`` px with 20 random boxes each (COCO-like density)."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    targets = []
    for _ in range(n):
        xy = torch.rand(20, 2, generator=g) * size * 0.8
        wh = 8 + torch.rand(20, 2, generator=g) * size * 0.3
        targets.append({"boxes": torch.cat([xy, (xy + wh).clamp(max=size)], 1),
                        "labels": torch.randint(1, num_classes, (20,), generator=g)})
    return [i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--synthetic", type=int, default=0, help="use N random images of min_size px instead of the data")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--amp", action="store_true", help="autocast (CUDA fp16)")
    args = p.parse_args()
    device = resolve_device(args.device)
    cfg = load_config(args.config)
    if args.synthetic:
        num_classes = 81
        images, targets = synthetic_batch(args.synthetic, cfg["student"]["min_size"], num_classes, device)
    else:
        train, _ = build_datasets(cfg)
        num_classes = len(train.class_names) + 1
        images, targets = collate_fn([train[i] for i in range(args.batch)])
        images = [i.to(device) for i in images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]

    torch.manual_seed(0)
    teacher = build_detector(cfg, "teacher", num_classes).to(device)
    steps = {}
    for method in ("none", "fitnet", "liaf"):
        torch.manual_seed(0)
        student = build_detector(cfg, "student", num_classes)
        distiller = build_distiller(method, cfg, student)
        step = (DetectorStep(student) if distiller is None else DistillStep(student, teacher, distiller)).to(device)
        params = [q for q in step.parameters() if q.requires_grad]
        steps[method] = (step.train(), torch.optim.SGD(params, lr=1e-4, momentum=0.9))

    def run(method: str) -> float:
        step, opt = steps[method]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, enabled=args.amp and device.type == "cuda"):
            loss = sum(step(images, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    times = {m: [] for m in steps}
    for r in range(args.warmup + args.repeats):
        for m in steps:
            t = run(m)
            if r >= args.warmup:
                times[m].append(t)
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"config={args.config} device={device} batch={len(images)} threads={torch.get_num_threads()} "
          f"amp={args.amp} repeats={args.repeats}")
    for m, t in med.items():
        print(f"  {m:7s} median step {1000 * t:8.1f} ms   x{t / med['none']:.3f} vs no KD   "
              f"x{t / med['fitnet']:.3f} vs FitNet")
    print(f"LIAF-KD / FitNet step ratio: {med['liaf'] / med['fitnet']:.3f} (target <= 1.10)")
    if device.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
