"""Every GPU check of liaf_lab in one run (<= 10 minutes on one GPU), summarised in JSON and Markdown.

    benchmarks/gpu_suite.sh                               # on a GPU: writes runs/gpu_suite/summary.{json,md}
    benchmarks/gpu_suite.sh --device cpu --smoke          # CPU smoke run, tiny sizes, seconds (CI)

Sections (``--skip`` leaves some out):
  pytest   the test suite's CUDA tests (``pytest -k cuda``; they skip themselves without CUDA).
  syncs    device-to-host reads per forward of each registered distiller (``bench_syncs.py``).
  amp      AMP (``torch.autocast`` + ``GradScaler``) against fp32 on a few training steps of a tiny
           LIAF-KD distillation from the same initialisation: every step's total loss must agree
           within ``AMP_RTOL`` (relative).
  step     paper-size training step (RetinaNet, ResNet-101 teacher, ResNet-50 student, 800 x 1216,
           batch 2) with no KD and each registered distiller: median time after warm-up and its
           ratio to FitNet (``bench_step.py``).
  memory   peak memory of one such step per method, above what was allocated before it
           (``torch.cuda.max_memory_allocated``; on CPU the rise of the peak resident set).
  latency  Table-3-like inference table of teacher and student: parameters, GFLOPs, latency, FPS
           and peak memory on the device (``liaf_lab.analysis.efficiency_table``).

``--smoke`` swaps the paper-size models for the tiny preset at 64 px and runs one or two steps:
the figures then only show that the suite runs end to end. A section that fails is recorded with
its error, the others still run, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_step import build_steps, step_times, synthetic_batch, train_step  # noqa: E402
from bench_syncs import sync_table  # noqa: E402

from liaf_lab.analysis.efficiency import efficiency_table, format_table, peak_memory  # noqa: E402
from liaf_lab.experiments.config import load_config  # noqa: E402

SECTIONS = ("pytest", "syncs", "amp", "step", "latency")
AMP_DTYPE = {"cuda": torch.float16, "cpu": torch.bfloat16}
# Relative tolerance on each step's total loss, AMP against fp32 (fp16 keeps 11 significant bits,
# bf16 8; a few SGD steps of a tiny model move both runs alike).
AMP_RTOL = {"cuda": 0.02, "cpu": 0.05}
PAPER_IMAGE, PAPER_BATCH, PAPER_CLASSES = (800, 1216), 2, 81


def smoke_config(name: str, size: int = 64) -> dict[str, Any]:
    """Preset ``name`` with the input of teacher and student resized to ``size`` px."""
    return load_config(name, [f"input.min_size={size}", f"input.max_size={size}"])


def sizes(args: argparse.Namespace) -> dict[str, Any]:
    """What each section runs: paper sizes, or tiny ones with ``--smoke``."""
    # Smoke: latency at batch 2, as the tiny FCOS head's GroupNorm needs 2 values at the 1x1 P7 of
    # 64 px. AMP at 96 px: on the CPU, torch's bf16 backward of a stride-2 conv on a 1x1 map (P7 from
    # the 1x1 P6 of 64 px) sometimes gives NaN gradients (torch 2.13), at 96 px P6 is 2x2.
    if args.smoke:
        return dict(cfg=smoke_config("tiny"), image=(64, 64), batch=2, classes=4, warmup=0, repeats=1,
                    latency_batch=2, amp_cfg=smoke_config("tiny", 96), amp_image=(96, 96), amp_steps=2)
    return dict(cfg=load_config("paper"), image=PAPER_IMAGE, batch=PAPER_BATCH, classes=PAPER_CLASSES,
                warmup=args.warmup, repeats=args.repeats, latency_batch=1, amp_cfg=load_config("tiny"),
                amp_image=(160, 160), amp_steps=args.amp_steps)


# -- sections ----------------------------------------------------------------------------------------
def run_pytest(device: torch.device, timeout: float) -> dict[str, Any]:
    """``pytest -k cuda`` in a subprocess; its exit status and summary line."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider", str(ROOT / "tests")]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in res.stdout.strip().splitlines() if line.strip()]
    summary = lines[-1] if lines else res.stderr.strip()[-500:]
    if res.returncode not in (0, 5):  # 5: nothing selected
        raise RuntimeError(f"pytest -k cuda exited with {res.returncode}: {summary}")
    return {"command": " ".join(cmd[1:]), "returncode": res.returncode, "summary": summary}


def run_amp(device: torch.device, s: dict[str, Any]) -> dict[str, Any]:
    """AMP against fp32: the same tiny LIAF-KD distillation from the same weights, loss per step."""
    batch = synthetic_batch(s["batch"], s["amp_image"], s["classes"], device)
    dtype = AMP_DTYPE[device.type]
    (step, opt), = build_steps(s["amp_cfg"], s["classes"], device, ["liaf"], lr=0.01).values()
    fp32 = [float(train_step(step, opt, batch)) for _ in range(s["amp_steps"])]
    (step, opt), = build_steps(s["amp_cfg"], s["classes"], device, ["liaf"], lr=0.01).values()
    # A small initial scale: GradScaler's default (2^16) overflows fp16 gradients and skips the
    # first updates, after which the two runs would no longer take the same steps.
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**8)
    amp, skipped = [], 0
    for _ in range(s["amp_steps"]):
        scale = scaler.get_scale()
        amp.append(float(train_step(step, opt, batch, dtype, scaler)))
        skipped += scaler.get_scale() < scale  # the scale drops when a step had inf/NaN gradients
    rtol = AMP_RTOL[device.type]
    rel = max(abs(a - f) / max(abs(f), 1e-12) for a, f in zip(amp, fp32, strict=True))
    if not (all(math.isfinite(a) for a in amp) and rel <= rtol and skipped == 0):
        raise AssertionError(f"AMP ({dtype}) losses {amp} against fp32 {fp32}: up to {rel:.3g} relative "
                             f"(tolerance {rtol}), {skipped} skipped steps")
    return {"dtype": str(dtype).removeprefix("torch."), "steps": s["amp_steps"], "loss_fp32": fp32, "loss_amp": amp,
            "max_rel_diff": rel, "rtol": rtol, "skipped_steps": skipped}


def run_step(device: torch.device, s: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Step time per method (ratio to FitNet), peak memory per method; returns the models for ``latency``."""
    batch = synthetic_batch(s["batch"], s["image"], s["classes"], device)
    steps = build_steps(s["cfg"], s["classes"], device)
    times = step_times(steps, batch, s["warmup"], s["repeats"])
    memory = {}
    for method, (step, opt) in steps.items():
        # CUDA: max_memory_allocated during the step minus what was allocated before it (all models'
        # weights); CPU: the rise of the peak resident set (see peak_memory)
        before = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
        memory[method] = {"step_peak_MiB": peak_memory(lambda: train_step(step, opt, batch), device) - before}
    if "fitnet" in memory:
        for row in memory.values():
            row["ratio_vs_fitnet"] = row["step_peak_MiB"] / memory["fitnet"]["step_peak_MiB"]
    distill = next(step for step, _ in steps.values() if hasattr(step, "teacher"))
    models = {"teacher": distill.teacher, "student": distill.student}
    info = {"image": list(s["image"]), "batch": s["batch"], "warmup": s["warmup"], "repeats": s["repeats"]}
    return {**info, "methods": times}, {"methods": memory}, models


def run_latency(device: torch.device, s: dict[str, Any], models: dict[str, Any]) -> dict[str, Any]:
    """Table 3: parameters, GFLOPs, latency, FPS and peak memory of teacher and student on ``device``."""
    rows = efficiency_table(models, s["image"], device, batch_size=s["latency_batch"], warmup=s["warmup"],
                            repeats=s["repeats"])
    return {"image": list(s["image"]), "batch": s["latency_batch"], "rows": rows}


# -- summary -----------------------------------------------------------------------------------------
def markdown(summary: dict[str, Any]) -> str:
    """The summary as Markdown: one table per section."""
    info, sec = summary["info"], summary["sections"]
    dev = info["device"]
    lines = [f"# GPU suite: {dev}", "",
             f"{info['date']}, torch {info['torch']}, smoke={info['smoke']}, {info['seconds']:.0f} s, "
             f"status: **{summary['status']}**", ""]
    if info["smoke"]:
        lines += ["Smoke run (tiny models at 64 px, one step): the figures only show that the suite runs.", ""]
    lines += ["| section | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {r['status']} | {r.get('seconds', 0):.1f} |" for name, r in sec.items()]
    for name, r in sec.items():
        lines += ["", f"## {name}", ""]
        if r["status"] != "ok":
            lines.append(f"{r['status']}: {r.get('error') or r.get('reason', '')}")
            continue
        if name == "pytest":
            lines.append(f"`{r['command']}`: {r['summary']}")
        elif name == "syncs":
            lines.append(format_table([{"distiller": d, **row} for d, row in r["reads"].items()]))
        elif name == "amp":
            lines.append(format_table([{"step": i, "loss_fp32": f, f"loss_{r['dtype']}": a}
                                       for i, (f, a) in enumerate(zip(r["loss_fp32"], r["loss_amp"], strict=True))]))
            lines.append(f"\nmax relative difference {r['max_rel_diff']:.2e} (tolerance {r['rtol']})")
        elif name == "step":
            lines.append(f"input {r['image'][0]}x{r['image'][1]}, batch {r['batch']}, median of {r['repeats']} "
                         f"steps after {r['warmup']} warm-up rounds")
            lines.append("")
            lines.append(format_table([{"method": m, **v} for m, v in r["methods"].items()]))
        elif name == "memory":
            lines.append(format_table([{"method": m, **v} for m, v in r["methods"].items()]))
        elif name == "latency":
            lines.append(f"input {r['image'][0]}x{r['image'][1]}, batch {r['batch']}, eval mode, no_grad\n")
            rows = [{("latency_ms (" + dev + ")" if k == "latency_ms" else k): v for k, v in row.items()}
                    for row in r["rows"]]
            lines.append(format_table(rows))
    return "\n".join(lines) + "\n"


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run `benchmarks/gpu_suite.sh --device cpu --smoke` instead")
    s = sizes(args)
    start = time.perf_counter()
    sections: dict[str, dict[str, Any]] = {}
    models: dict[str, Any] = {}

    def record(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        try:
            sections[name] = {"status": "ok", **fn()}
        except Exception as err:  # noqa: BLE001  a failed section is reported, the others still run
            sections[name] = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                              "traceback": traceback.format_exc()}
        sections[name]["seconds"] = time.perf_counter() - t0

    def skip(name: str, reason: str) -> None:
        sections[name] = {"status": "skipped", "reason": reason}

    if "pytest" in args.skip:
        skip("pytest", "--skip")
    elif device.type != "cuda":
        skip("pytest", "no CUDA device: the CUDA tests would all skip")
    else:
        record("pytest", lambda: run_pytest(device, args.pytest_timeout))
    if "syncs" in args.skip:
        skip("syncs", "--skip")
    else:
        record("syncs", lambda: {"reads": sync_table(device)})
    if "amp" in args.skip:
        skip("amp", "--skip")
    else:
        record("amp", lambda: run_amp(device, s))
    if "step" in args.skip:
        skip("step", "--skip")
        skip("memory", "--skip step")
    else:
        memory: dict[str, Any] = {}

        def step() -> dict[str, Any]:
            timing, mem, built = run_step(device, s)
            memory.update(mem)
            models.update(built)
            return timing

        record("step", step)
        sections["memory"] = {"status": "ok", **memory} if memory else {"status": "failed", "error": "step failed"}
    if "latency" in args.skip:
        skip("latency", "--skip")
    elif not models:
        skip("latency", "needs the models of the step section")
    else:
        record("latency", lambda: run_latency(device, s, models))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    info = {"device": name, "device_type": device.type, "torch": torch.__version__, "smoke": args.smoke,
            "date": datetime.date.today().isoformat(), "seconds": time.perf_counter() - start}
    failed = [n for n, r in sections.items() if r["status"] == "failed"]
    return {"info": info, "status": "failed: " + ", ".join(failed) if failed else "ok", "sections": sections}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and one step per part (seconds, CI)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_suite")
    p.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--amp-steps", type=int, default=5)
    p.add_argument("--pytest-timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    summary = run_suite(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (args.out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    print(f"wrote {args.out / 'summary.json'} and {args.out / 'summary.md'}")
    return 0 if summary["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
