"""Benchmark of the LIAF-KD loss at COCO-like sizes.

Sizes: batch 2, 256 channels (teacher and student), the five FPN levels of an 800 x 1216 input
(strides 8..128: 100x152, 50x76, 25x38, 13x19, 7x10), 20 random valid boxes of varied size per image.

Measures, in one run, and prints the ratios:
  (a) ``liaf_lab.instance_mask`` on all five levels against the literal loop reference of Eq. 7
      (``tests/references/liaf.py``); target >= 100x faster.
  (b) forward + backward of ``LIAFDistiller`` against ``FitNetDistiller`` with the same projector
      weights; target <= 1.3x.
  (c) peak memory of (b) for both: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the rise of
      the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) during one
      forward + backward, each method measured in a fresh subprocess.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_liaf_loss.py --device cpu --repeats 5``
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from helpers import random_boxes  # noqa: E402
from references.liaf import ref_instance_mask  # noqa: E402

from liaf_lab import FitNetDistiller, LIAFDistiller, instance_mask, roi_instance_features  # noqa: E402

IMAGE = (800, 1216)
STRIDES = {"p3": 8.0, "p4": 16.0, "p5": 32.0, "p6": 64.0, "p7": 128.0}
SIZES = {"p3": (100, 152), "p4": (50, 76), "p5": (25, 38), "p6": (13, 19), "p7": (7, 10)}
BATCH, CHANNELS, BOXES_PER_IMAGE = 2, 256, 20


def make_inputs(device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = {lvl: torch.randn(BATCH, CHANNELS, *s, generator=g).to(device) for lvl, s in SIZES.items()}
    teacher = {lvl: torch.randn(BATCH, CHANNELS, *s, generator=g).to(device) for lvl, s in SIZES.items()}
    # log-uniform sides from 8 to 600 px, up to 5% over the border
    boxes = [random_boxes(g, BOXES_PER_IMAGE, IMAGE, min_side=8.0, max_side=600.0, overhang=0.05).to(device)
             for _ in range(BATCH)]
    return student, teacher, boxes


def make_distillers(device: torch.device, **liaf_kw):
    torch.manual_seed(0)
    liaf = LIAFDistiller(CHANNELS, CHANNELS, STRIDES, **liaf_kw).to(device)
    fitnet = FitNetDistiller(CHANNELS, CHANNELS, STRIDES).to(device)
    fitnet.projectors.load_state_dict(liaf.projectors.state_dict())
    return liaf, fitnet


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, cpu_time: bool = False) -> float:
    """Wall-clock seconds of ``fn()``; with ``cpu_time``, the CPU seconds of this process instead
    (less sensitive to other jobs on a shared machine, and the cost that matters on a CPU)."""
    clock = time.process_time if cpu_time else time.perf_counter
    sync(device)
    start = clock()
    fn()
    sync(device)
    return clock() - start


def fwd_bwd(distiller, student, teacher, boxes):
    def run():
        for s in student.values():
            s.grad = None
        distiller.zero_grad(set_to_none=True)
        distiller(student, teacher, boxes).backward()

    return run


# -- (a) mask ------------------------------------------------------------------------------------
def bench_mask(device: torch.device, repeats: int, ref_repeats: int) -> dict:
    _, _, boxes = make_inputs(torch.device("cpu"))
    scores = torch.rand(BATCH * BOXES_PER_IMAGE, generator=torch.Generator().manual_seed(1))
    dev_boxes, dev_scores = [b.to(device) for b in boxes], scores.to(device)

    def lib():
        return {lvl: instance_mask(dev_boxes, dev_scores, SIZES[lvl], STRIDES[lvl]) for lvl in STRIDES}

    def ref():
        return {lvl: ref_instance_mask(boxes, scores, SIZES[lvl], STRIDES[lvl]) for lvl in STRIDES}

    lib()  # warm-up
    lib_times = [timed(lib, device) for _ in range(repeats)]
    ref_times = [timed(ref, torch.device("cpu")) for _ in range(ref_repeats)]
    got, want = lib(), ref()
    for lvl in STRIDES:  # the speed-up only counts if the results agree
        torch.testing.assert_close(got[lvl].cpu(), want[lvl])
    lib_s, ref_s = statistics.median(lib_times), statistics.median(ref_times)
    return {"lib_ms": 1e3 * lib_s, "ref_ms": 1e3 * ref_s, "speedup": ref_s / lib_s}


# -- (b) time ------------------------------------------------------------------------------------
def bench_time(device: torch.device, repeats: int, warmup: int) -> dict:
    student, teacher, boxes = make_inputs(device)
    for s in student.values():
        s.requires_grad_(True)
    variants = {}
    liaf, fitnet = make_distillers(device)
    variants["fitnet"] = fwd_bwd(fitnet, student, teacher, boxes)
    variants["liaf"] = fwd_bwd(liaf, student, teacher, boxes)
    liaf_live, _ = make_distillers(device, detach_scores=False, freeze_selectors=False)
    variants["liaf_all_grads"] = fwd_bwd(liaf_live, student, teacher, boxes)
    # where LIAF's extra time goes: RoIAlign of both sides on every level (Eq. 2) ...
    detached = {side: {lvl: f.detach() for lvl, f in feats.items()} for side, feats in (("s", student), ("t", teacher))}
    variants["part_roi_align"] = lambda: [
        roi_instance_features(feats[lvl], boxes, STRIDES[lvl], liaf.roi_size, liaf.sampling_ratio)
        for feats in detached.values() for lvl in STRIDES
    ]
    # ... and scores + masks (Eq. 2-7, RoIAlign included), without the loss itself
    variants["part_scores_masks"] = lambda: [
        liaf.level_masks(lvl, detached["s"][lvl], detached["t"][lvl], boxes, None) for lvl in STRIDES
    ]
    with torch.no_grad():
        l_val, f_val = float(liaf(student, teacher, boxes)), float(fitnet(student, teacher, boxes))
    for _ in range(warmup):
        for run in variants.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu_times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):  # interleaved, so drifts of a shared machine hit all variants alike
        for name, run in variants.items():
            times[name].append(timed(run, device))
            if device.type == "cpu":
                cpu_times[name].append(timed(run, device, cpu_time=True))
    out = {f"{name}_ms": 1e3 * statistics.median(t) for name, t in times.items()}
    out["ratio_liaf_fitnet"] = out["liaf_ms"] / out["fitnet_ms"]
    out["ratio_liaf_all_grads_fitnet"] = out["liaf_all_grads_ms"] / out["fitnet_ms"]
    if device.type == "cpu":
        out.update({f"{name}_cpu_ms": 1e3 * statistics.median(t) for name, t in cpu_times.items()})
        out["cpu_ratio_liaf_fitnet"] = out["liaf_cpu_ms"] / out["fitnet_cpu_ms"]
        out["cpu_ratio_liaf_all_grads_fitnet"] = out["liaf_all_grads_cpu_ms"] / out["fitnet_cpu_ms"]
    out["loss_liaf"], out["loss_fitnet"] = l_val, f_val
    return out


# -- (c) memory ----------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rise_mib(run, student: dict, device: torch.device) -> float:
    """MiB that one call of ``run`` adds at its peak, after a warm-up call (CUDA: allocator peak; CPU:
    VmHWM, meaningful in a fresh process)."""
    run()  # warm-up: lazy initialisation of kernels and thread pools
    for s in student.values():
        s.grad = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:  # hand freed heap memory back so the baseline is the live set
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    run()
    return (_status_kib("VmHWM") - base) / 1024


def child_memory(method: str, device: torch.device) -> dict:
    """One method's peak memory during forward + backward (run in a fresh process on CPU)."""
    student, teacher, boxes = make_inputs(device)
    for s in student.values():
        s.requires_grad_(True)
    liaf, fitnet = make_distillers(device)
    run = fwd_bwd(liaf if method == "liaf" else fitnet, student, teacher, boxes)
    how = "cuda max_memory_allocated" if device.type == "cuda" else "rise of peak RSS, VmHWM, in a fresh process"
    return {"peak_mib": peak_rise_mib(run, student, device), "how": how}


def bench_memory(device: torch.device) -> dict:
    out = {}
    for method in ("fitnet", "liaf"):
        if device.type == "cuda":
            r = child_memory(method, device)
        else:
            cmd = [sys.executable, __file__, "--device", "cpu", "--child-memory", method]
            # a fixed mmap threshold makes glibc map every large tensor on its own and unmap it on
            # free, so the resident set follows the live tensors instead of the allocator's caches
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            r = json.loads(res.stdout.strip().splitlines()[-1])
        out[f"{method}_peak_mib"] = r["peak_mib"]
        out["how"] = r["how"]
    out["ratio_liaf_fitnet"] = out["liaf_peak_mib"] / out["fitnet_peak_mib"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--ref-repeats", type=int, default=1, help="repeats of the slow loop reference")
    parser.add_argument("--skip", nargs="*", default=[], choices=["mask", "time", "memory"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child-memory", choices=["liaf", "fitnet"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.child_memory:
        print(json.dumps(child_memory(args.child_memory, device)))
        return

    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "repeats": args.repeats,
    }
    print(f"# LIAF-KD loss benchmark: batch {BATCH}, {CHANNELS} ch, levels {SIZES}, "
          f"{BOXES_PER_IMAGE} boxes/image\n# {info}")
    results: dict = {"info": info}
    if "mask" not in args.skip:
        r = results["mask"] = bench_mask(device, args.repeats, args.ref_repeats)
        print(f"(a) instance_mask, 5 levels: library {r['lib_ms']:.2f} ms, loop reference {r['ref_ms']:.0f} ms "
              f"-> {r['speedup']:.0f}x faster (target >= 100x)")
    if "time" not in args.skip:
        r = results["time"] = bench_time(device, args.repeats, args.warmup)
        print(f"(b) forward+backward: FitNet {r['fitnet_ms']:.1f} ms, LIAF {r['liaf_ms']:.1f} ms "
              f"-> LIAF/FitNet {r['ratio_liaf_fitnet']:.2f}x (target <= 1.3x); "
              f"LIAF with gradients through scores and selectors {r['liaf_all_grads_ms']:.1f} ms "
              f"({r['ratio_liaf_all_grads_fitnet']:.2f}x)")
        extra = r["liaf_ms"] - r["fitnet_ms"]
        print(f"    LIAF's parts: RoIAlign (2 sides x 5 levels) {r['part_roi_align_ms']:.1f} ms, scores + masks "
              f"(RoIAlign included) {r['part_scores_masks_ms']:.1f} ms, of the {extra:.1f} ms LIAF adds to FitNet")
        if "cpu_ratio_liaf_fitnet" in r:
            print(f"    process CPU time: FitNet {r['fitnet_cpu_ms']:.1f} ms, LIAF {r['liaf_cpu_ms']:.1f} ms "
                  f"-> {r['cpu_ratio_liaf_fitnet']:.2f}x; all gradients {r['liaf_all_grads_cpu_ms']:.1f} ms "
                  f"({r['cpu_ratio_liaf_all_grads_fitnet']:.2f}x)")
    if "memory" not in args.skip:
        r = results["memory"] = bench_memory(device)
        print(f"(c) peak memory of forward+backward ({r['how']}): FitNet {r['fitnet_peak_mib']:.0f} MiB, "
              f"LIAF {r['liaf_peak_mib']:.0f} MiB -> LIAF/FitNet {r['ratio_liaf_fitnet']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
