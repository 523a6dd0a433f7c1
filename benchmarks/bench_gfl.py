"""GFL against torchvision's FCOS of the same backbone and size: training-step time and inference latency.

    python benchmarks/bench_gfl.py                                   # tiny student size on the CPU
    python benchmarks/bench_gfl.py --preset r50-512 --repeats 5      # ResNet-50, 512 px, batch 2
    python benchmarks/bench_gfl.py --preset r50-512 --device cuda

Both detectors come from ``create_detector`` with the same ResNet-FPN (P3-P7), input size and seed, on
one synthetic batch (``bench_step.synthetic_batch``: random images with 20 boxes each). A training
step is forward + backward + SGD update through ``run_detector`` (as the engine's ``DetectorStep``);
inference is ``model.eval()`` then ``model(images)`` under ``no_grad``, post-processing included. The
two detectors run round-robin (``liaf_lab.analysis.kd_step_overhead``), ``--repeats`` times after
``--warmup`` rounds; medians and the GFL / FCOS ratios are printed. Figures: docs/gfl.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import Batch, synthetic_batch, train_step  # noqa: E402

from liaf_lab.analysis.efficiency import kd_step_overhead  # noqa: E402
from liaf_lab.engine.distributed import resolve_device  # noqa: E402
from liaf_lab.engine.steps import DetectorStep  # noqa: E402
from liaf_lab.models import count_parameters, create_detector  # noqa: E402

ARCHS = ("fcos", "gfl")
# --preset: the gfl_tiny student (tiny.toml's student size) and a paper-like ResNet-50 at 512 px.
PRESETS = {
    "tiny": dict(depth=18, width_mult=0.25, fpn_channels=32, image_size=160, batch=8),
    "r50-512": dict(depth=50, width_mult=1.0, fpn_channels=256, image_size=512, batch=2),
}


def build(arch: str, args: argparse.Namespace, device: torch.device) -> nn.Module:
    """``create_detector(arch, ...)`` of the benchmark's size, seeded alike for both archs."""
    torch.manual_seed(0)
    model = create_detector(arch, args.num_classes, depth=args.depth, width_mult=args.width_mult,
                            fpn_channels=args.fpn_channels, min_size=args.image_size, max_size=args.image_size)
    return model.to(device)


def train_times(models: dict[str, nn.Module], batch: Batch, warmup: int, repeats: int) -> dict[str, float]:
    """Median training-step time (ms) per arch, measured round-robin."""
    steps = {}
    for arch, model in models.items():
        step = DetectorStep(model).train()
        steps[arch] = (step, torch.optim.SGD(step.parameters(), lr=1e-4, momentum=0.9))
    rows = kd_step_overhead({a: lambda s=s, o=o: train_step(s, o, batch) for a, (s, o) in steps.items()},
                            repeats=repeats, warmup=warmup)
    return {r["name"]: r["median_ms"] for r in rows}


def eval_times(models: dict[str, nn.Module], batch: Batch, warmup: int, repeats: int) -> dict[str, float]:
    """Median inference time (ms) per arch, post-processing included, measured round-robin."""
    images = batch[0]

    def infer(model: nn.Module) -> None:
        with torch.no_grad():
            model(images)

    for model in models.values():
        model.eval()
    rows = kd_step_overhead({a: lambda m=m: infer(m) for a, m in models.items()}, repeats=repeats, warmup=warmup)
    return {r["name"]: r["median_ms"] for r in rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="size (default: tiny)")
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--width-mult", type=float, default=None)
    p.add_argument("--fpn-channels", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None, help="square input side (min_size = max_size)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--num-classes", type=int, default=81, help="background included (default: COCO's 81)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = resolve_device(args.device)
    models = {arch: build(arch, args, device) for arch in ARCHS}
    batch = synthetic_batch(args.batch, args.image_size, args.num_classes, device)
    train = train_times(models, batch, args.warmup, args.repeats)
    infer = eval_times(models, batch, args.warmup, args.repeats)
    print(f"device={device} threads={torch.get_num_threads()} depth={args.depth} width_mult={args.width_mult} "
          f"fpn_channels={args.fpn_channels} image={args.image_size}px batch={args.batch} "
          f"num_classes={args.num_classes} warmup={args.warmup} repeats={args.repeats}")
    for arch in ARCHS:
        print(f"  {arch:5s} params {count_parameters(models[arch]) / 1e6:7.2f} M   train step {train[arch]:9.1f} ms   "
              f"inference {infer[arch]:9.1f} ms")
    print(f"GFL / FCOS: params x{count_parameters(models['gfl']) / count_parameters(models['fcos']):.3f}   "
          f"train step x{train['gfl'] / train['fcos']:.3f}   inference x{infer['gfl'] / infer['fcos']:.3f}")
    if device.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
