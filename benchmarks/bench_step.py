"""Training-step time of the student with no KD and with each registered distiller, measured side by side.

    python benchmarks/bench_step.py                      # tiny preset on the CPU, bundled sample
    python benchmarks/bench_step.py --config paper --device cuda --synthetic 2   # paper size on a GPU

Each step is forward + backward + SGD update of the student (and projector); the variants run
round-robin (``liaf_lab.analysis.kd_step_overhead``), ``--repeats`` times after ``--warmup`` rounds,
and the median is reported with its ratio to no KD and to FitNet (target: LIAF-KD at most 1.10x FitNet).
``benchmarks/gpu_suite.py`` reuses the functions below.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import Tensor, nn

from liaf_lab.analysis.efficiency import kd_step_overhead
from liaf_lab.experiments.builders import build_datasets, build_detector, build_distiller
from liaf_lab.experiments.config import load_config
from liaf_lab.data import collate_fn
from liaf_lab.distillers import list_distillers
from liaf_lab.engine.distributed import resolve_device
from liaf_lab.engine.steps import DetectorStep, DistillStep, check_detectors_serve

Batch = tuple[list[Tensor], list[dict[str, Tensor]]]


def synthetic_batch(n: int, size: int | tuple[int, int], num_classes: int, device: torch.device) -> Batch:
    """``n`` random images of ``size`` px (side, or (H, W)) with 20 random boxes each (COCO-like density)."""
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=g) for _ in range(n)]
    targets = []
    scale = torch.tensor([w, h], dtype=torch.float32)
    for _ in range(n):
        xy = torch.rand(20, 2, generator=g) * scale * 0.8
        wh = 8 + torch.rand(20, 2, generator=g) * scale * 0.3
        targets.append({"boxes": torch.cat([xy, torch.minimum(xy + wh, scale)], 1),
                        "labels": torch.randint(1, num_classes, (20,), generator=g)})
    return [i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


def dataset_batch(cfg: dict[str, Any], n: int, device: torch.device) -> tuple[Batch, int]:
    """The first ``n`` training samples of the config's data, and its ``num_classes`` (background included)."""
    train, _ = build_datasets(cfg)
    images, targets = collate_fn([train[i] for i in range(n)])
    images = [i.to(device) for i in images]
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return (images, targets), len(train.class_names) + 1


def served_methods(cfg: dict[str, Any], num_classes: int = 2) -> list[str]:
    """The registered methods the config's detectors can serve (``check_detectors_serve``; e.g. not LD on FCOS)."""
    teacher, student = (build_detector(cfg, role, num_classes) for role in ("teacher", "student"))
    served = []
    for method in list_distillers():
        try:
            check_detectors_serve(build_distiller(method, cfg, student), student, teacher)
        except ValueError:
            continue
        served.append(method)
    return served


def build_steps(
    cfg: dict[str, Any],
    num_classes: int,
    device: torch.device,
    methods: list[str] | None = None,
    lr: float = 1e-4,
) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
    """``{method: (step, SGD optimizer)}`` sharing one frozen teacher; every student starts from the same seed.

    ``methods``: ``"none"`` (no KD) and registered distiller names; default ``["none", *served_methods(cfg)]``.
    """
    teacher = build_detector(cfg, "teacher", num_classes).to(device)
    steps = {}
    for method in methods or ["none", *served_methods(cfg, num_classes)]:
        student = build_detector(cfg, "student", num_classes)
        distiller = build_distiller(method, cfg, student)
        step = (DetectorStep(student) if distiller is None else DistillStep(student, teacher, distiller)).to(device)
        params = [q for q in step.parameters() if q.requires_grad]
        steps[method] = (step.train(), torch.optim.SGD(params, lr=lr, momentum=0.9))
    return steps


def train_step(
    step: nn.Module,
    opt: torch.optim.Optimizer,
    batch: Batch,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> Tensor:
    """One forward + backward + update; returns the total loss (a detached scalar, not read back).

    ``amp_dtype``: run the forward under ``torch.autocast`` with this dtype; ``scaler``: scale the
    loss with this ``GradScaler`` (AMP training).
    """
    images, targets = batch
    with torch.autocast(images[0].device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = sum(step(images, targets).values())
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return loss.detach()


def step_times(
    steps: dict[str, tuple[nn.Module, torch.optim.Optimizer]],
    batch: Batch,
    warmup: int,
    repeats: int,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, dict[str, float]]:
    """Median step time of each method (round-robin), with its ratio to no KD and to FitNet where present."""
    rows = kd_step_overhead({m: lambda s=s, o=o: train_step(s, o, batch, amp_dtype) for m, (s, o) in steps.items()},
                            repeats=repeats, warmup=warmup)
    med = {r["name"]: r["median_ms"] for r in rows}
    out = {}
    for m, t in med.items():
        out[m] = {"median_ms": t}
        for base in ("none", "fitnet"):
            if base in med:
                out[m][f"ratio_vs_{base}"] = t / med[base]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--synthetic", type=int, default=0, help="use N random images of min_size px instead of the data")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--amp", action="store_true", help="autocast (CUDA fp16)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="none and registered methods or combinations (default: none, every registered one the "
                        "config's detectors serve, liaf+maskd)")
    args = p.parse_args()
    device = resolve_device(args.device)
    cfg = load_config(args.config)
    if args.synthetic:
        num_classes = 81
        batch = synthetic_batch(args.synthetic, cfg["input"]["min_size"], num_classes, device)
    else:
        batch, num_classes = dataset_batch(cfg, args.batch, device)
    steps = build_steps(cfg, num_classes, device, args.methods or ["none", *served_methods(cfg, num_classes), "liaf+maskd"])
    amp_dtype = torch.float16 if args.amp and device.type == "cuda" else None
    res = step_times(steps, batch, args.warmup, args.repeats, amp_dtype)
    print(f"config={args.config} device={device} batch={len(batch[0])} threads={torch.get_num_threads()} "
          f"amp={amp_dtype is not None} repeats={args.repeats}")
    for m, r in res.items():
        print(f"  {m:11s} median step {r['median_ms']:8.1f} ms   x{r['ratio_vs_none']:.3f} vs no KD   "
              f"x{r['ratio_vs_fitnet']:.3f} vs FitNet")
    if "liaf" in res and "fitnet" in res:
        print(f"LIAF-KD / FitNet step ratio: {res['liaf']['ratio_vs_fitnet']:.3f} (target <= 1.10)")
    if device.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
