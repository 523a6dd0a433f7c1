"""Every distiller's loss at COCO size against FitNet's: forward + backward time and peak memory.

Inputs as ``bench_liaf_loss.py``: batch 2, 256 channels (teacher and student), the five FPN levels
of an 800 x 1216 input, 20 random boxes per image; for methods that read head outputs, random
RetinaNet-sized ``cls_logits`` (9 anchors x 80 classes per cell, the student's with gradient), GFL's
box bins (4 x 17 per anchor) where a method reads ``box_bins``, a random student assignment (a third of
the priors positive) where it needs one, and RetinaNet's 9 anchors per cell as priors; for a method
that splits the heads (CrossKD), GFL's one prior per cell (RetinaNet's square one), random tower
features of both sides and a randomly initialised 256-channel GFL head as the teacher's. Each registered method (and ``--methods`` extra, e.g.
``liaf+maskd``) is built with its defaults and its stage-1 modules as initialised; the timed call is
``sum(distiller.loss_terms(inputs).values()).backward()``.

Time: the methods run round-robin ``--repeats`` times after ``--warmup`` rounds; the median and its
ratio to FitNet's are printed (on the CPU also the process CPU time, less sensitive to other jobs).
Memory: on CUDA ``max_memory_allocated`` above the inputs; on the CPU the rise of the peak resident
set during one forward + backward, each method in a fresh process (see ``bench_liaf_loss.py``).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_kd_loss.py --device cpu --repeats 3``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_liaf_loss import BATCH, CHANNELS, IMAGE, SIZES, STRIDES, make_inputs, peak_rise_mib, timed  # noqa: E402
from bench_syncs import random_head  # noqa: E402
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402

from liaf_lab.distillers import KDInputs, create_distiller, list_distillers  # noqa: E402

ANCHORS, CLASSES = 9, 80  # RetinaNet on COCO
LEVELS = list(SIZES)  # --levels: the FPN levels distilled (ACAM-KD's memory target is stated at P3 alone)


def build(method: str, device: torch.device):
    torch.manual_seed(0)
    distiller = create_distiller(method, CHANNELS, CHANNELS, {lvl: STRIDES[lvl] for lvl in LEVELS}).to(device).train()
    distiller.mark_stage1(1)  # stage-1 modules as initialised: the cost does not depend on their values
    return distiller


def retinanet_priors(device: torch.device) -> dict[str, torch.Tensor]:
    """RetinaNet's anchors per level ``[H*W*9, 4]`` (sizes 4 x stride x 2^(0, 1/3, 2/3), ratios 0.5, 1, 2)."""
    out = {}
    for lvl in LEVELS:
        (h, w), s = SIZES[lvl], STRIDES[lvl]
        base = AnchorGenerator().generate_anchors([4 * s * 2 ** (i / 3) for i in range(3)], [0.5, 1.0, 2.0])
        ys, xs = torch.meshgrid(torch.arange(h) * s, torch.arange(w) * s, indexing="ij")
        shifts = torch.stack([xs, ys, xs, ys], -1).reshape(-1, 1, 4)
        out[lvl] = (shifts + base[None]).reshape(-1, 4).to(device)
    return out


def make_kd_inputs(distiller, device: torch.device) -> tuple[KDInputs, dict[str, torch.Tensor]]:
    """The inputs of one step of ``distiller`` and the tensors whose gradient it computes (by name)."""
    student, teacher, boxes = make_inputs(device)
    student, teacher = ({lvl: feats[lvl] for lvl in LEVELS} for feats in (student, teacher))
    inputs = KDInputs(student, teacher, boxes, [torch.ones(len(b), dtype=torch.long, device=device) for b in boxes],
                      IMAGE)
    grads = {f"feats[{k}]": v.requires_grad_(True) for k, v in student.items()}
    anchors = 1 if "head_split" in distiller.needs else ANCHORS  # a split head is GFL's: one prior per cell
    if "head_outputs" in distiller.needs:
        head = random_head(distiller.head_keys, distiller.needs, {lvl: SIZES[lvl] for lvl in LEVELS}, BATCH, anchors,
                           CLASSES, torch.Generator().manual_seed(1), device, (CHANNELS, CHANNELS),
                           distiller.split_index)
        for field, value in head.items():
            setattr(inputs, field, value)
        grads |= {f"head[{lvl}][{k}]": x.requires_grad_(True) for lvl, out in inputs.student_head.items()
                  for k, x in out.items()}
        if "head_split" in distiller.needs:
            grads |= {f"tower[{lvl}][{b}]": x.requires_grad_(True) for lvl, out in inputs.student_tower.items()
                      for b, x in out.items()}
    if "priors" in distiller.needs:
        priors = retinanet_priors(device)
        inputs.priors = {lvl: p[4::ANCHORS] if anchors == 1 else p for lvl, p in priors.items()}
    if "generator" in distiller.needs:
        inputs.generator = torch.Generator(device).manual_seed(0)
    return inputs, grads


def kd_fwd_bwd(distiller, inputs: KDInputs, grads: dict[str, torch.Tensor]):
    def run():
        for t in grads.values():
            t.grad = None
        distiller.zero_grad(set_to_none=True)
        sum(distiller.loss_terms(inputs).values()).backward()

    return run


def bench_time(methods: list[str], device: torch.device, repeats: int, warmup: int) -> dict:
    runs = {}
    for m in methods:
        distiller = build(m, device)
        runs[m] = kd_fwd_bwd(distiller, *make_kd_inputs(distiller, device))
    for _ in range(warmup):
        for run in runs.values():
            run()
    wall: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(repeats):  # interleaved: drifts of a shared machine hit every method alike
        for m, run in runs.items():
            wall[m].append(timed(run, device))
            if device.type == "cpu":
                cpu[m].append(timed(run, device, cpu_time=True))
    out = {}
    for m in methods:
        out[m] = {"ms": 1e3 * statistics.median(wall[m])}
        if device.type == "cpu":
            out[m]["cpu_ms"] = 1e3 * statistics.median(cpu[m])
    for m in methods:
        for key in list(out[m]):
            out[m][f"{key}_ratio"] = out[m][key] / out["fitnet"][key]
    return out


def child_memory(method: str, device: torch.device) -> float:
    """MiB one method's forward + backward adds at its peak (fresh process on the CPU)."""
    distiller = build(method, device)
    inputs, grads = make_kd_inputs(distiller, device)
    return peak_rise_mib(kd_fwd_bwd(distiller, inputs, grads), grads, device)


def bench_memory(methods: list[str], device: torch.device) -> dict:
    out = {}
    for m in methods:
        if device.type == "cuda":
            out[m] = {"peak_mib": child_memory(m, device)}
        else:
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
            res = subprocess.run([sys.executable, __file__, "--device", "cpu", "--child-memory", m, "--levels", *LEVELS],
                                 capture_output=True, text=True, check=True, env=env)
            out[m] = {"peak_mib": float(res.stdout.strip().splitlines()[-1])}
    for m in methods:
        out[m]["ratio"] = out[m]["peak_mib"] / out["fitnet"]["peak_mib"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--methods", nargs="*", default=["liaf+maskd"], help="combinations to add to the registered methods")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--skip", nargs="*", default=[], choices=["time", "memory"])
    p.add_argument("--json", type=Path)
    p.add_argument("--levels", nargs="+", default=list(SIZES), choices=list(SIZES),
                   help="FPN levels to distil (default: all five)")
    p.add_argument("--only", nargs="*", help="measure only these methods (FitNet is always measured)")
    p.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = p.parse_args()
    LEVELS[:] = args.levels
    device = torch.device(args.device)
    if args.child_memory:
        print(child_memory(args.child_memory, device))
        return
    methods = list(dict.fromkeys(["fitnet", *(args.only or [*list_distillers(), *args.methods])]))
    print(f"# KD losses at COCO size: batch {BATCH}, {CHANNELS} ch, levels {[SIZES[lvl] for lvl in LEVELS]}, device {device}, "
          f"threads {torch.get_num_threads()}, repeats {args.repeats}")
    results = {}
    if "time" not in args.skip:
        results["time"] = t = bench_time(methods, device, args.repeats, args.warmup)
        print("forward + backward, median (ratio to FitNet):")
        for m, r in t.items():
            cpu = f"   process CPU {r['cpu_ms']:8.0f} ms (x{r['cpu_ms_ratio']:.2f})" if "cpu_ms" in r else ""
            print(f"  {m:11s} {r['ms']:8.0f} ms (x{r['ms_ratio']:.2f}){cpu}")
    if "memory" not in args.skip:
        results["memory"] = mem = bench_memory(methods, device)
        print("peak memory of forward + backward (ratio to FitNet):")
        for m, r in mem.items():
            print(f"  {m:11s} {r['peak_mib']:8.0f} MiB (x{r['ratio']:.2f})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
