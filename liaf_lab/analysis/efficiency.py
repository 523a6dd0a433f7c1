"""Model efficiency: parameters, FLOPs, latency/FPS, peak memory and KD step overhead (LIAF-KD Table 3).

Inputs convention: ``inputs`` is passed to ``model(inputs)`` when it is a tensor or a list (torchvision
detectors take a list of ``[3, H, W]`` images) and unpacked as ``model(*inputs)`` when it is a tuple.

FLOPs follow PyTorch's ``FlopCounterMode``: one multiply-add counts as 2 FLOPs, and only matmul /
convolution-type ops are counted (no elementwise ops, no NMS). mmdetection-style tables that report
"FLOPs" usually count multiply-adds, i.e. half of this number.
"""

from __future__ import annotations

import ctypes
import json
import math
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..models import count_parameters

__all__ = [
    "count_flops", "count_parameters", "efficiency_table", "format_table", "kd_step_overhead", "latency_noise",
    "machine_description", "measure_latency", "peak_memory", "plot_efficiency", "size_table",
]

Inputs = Tensor | list | tuple


def _call(model: Callable[..., Any], inputs: Inputs) -> Any:
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def _move(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_move(x, device) for x in inputs)
    if isinstance(inputs, Mapping):
        return {k: _move(v, device) for k, v in inputs.items()}
    return inputs


def _num_images(inputs: Any) -> int:
    if isinstance(inputs, Tensor):
        return inputs.shape[0] if inputs.dim() == 4 else 1
    if isinstance(inputs, list):
        return len(inputs)
    if isinstance(inputs, tuple) and inputs:
        return _num_images(inputs[0])
    return 1


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Inference:
    """Eval mode and no_grad for the block; the train/eval flags of every submodule are restored."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flags = [(m, m.training) for m in model.modules()]
        self.no_grad = torch.no_grad()

    def __enter__(self) -> None:
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.no_grad.__exit__(*exc)
        for m, flag in self.flags:
            m.training = flag


def count_flops(model: nn.Module, inputs: Inputs) -> int:
    """FLOPs of one forward pass in eval mode (2 per multiply-add; see the module docstring)."""
    inputs = _move(inputs, _model_device(model))
    with _Inference(model), FlopCounterMode(display=False) as counter:
        _call(model, inputs)
    return int(counter.get_total_flops())


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


def measure_latency(
    model: nn.Module,
    inputs: Inputs,
    warmup: int = 3,
    repeats: int = 10,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Forward-pass latency in eval mode under no_grad.

    ``device`` (default: the model's) moves the model there (in place) and the inputs with it.
    On CUDA every timed call is bracketed by ``torch.cuda.synchronize``. Returns ``median_ms``,
    ``mean_ms``, ``min_ms``, ``std_ms``, ``iqr_ms`` (the interquartile range of the timings: the
    timing noise a difference between two models must exceed) and ``fps`` (images per second at the
    median).
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup}, {repeats}")
    dev = torch.device(device) if device is not None else _model_device(model)
    model.to(dev)
    inputs = _move(inputs, dev)
    times = []
    with _Inference(model):
        for i in range(warmup + repeats):
            _sync(dev)
            start = time.perf_counter()
            _call(model, inputs)
            _sync(dev)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    median = statistics.median(times)
    return {
        "median_ms": median,
        "mean_ms": statistics.fmean(times),
        "min_ms": min(times),
        "std_ms": statistics.pstdev(times),
        "iqr_ms": _iqr(times),
        "fps": _num_images(inputs) * 1000 / median,
    }


def _proc_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def _trim_heap() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def peak_memory(fn: Callable[[], Any], device: str | torch.device = "cpu") -> float:
    """Peak memory of running ``fn()`` in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` during ``fn`` (peak stats reset first), i.e. all
    tensors resident on the device at the peak, weights included (the "memory" of Table 3).
    CPU (Linux): the rise of the process's resident set high-water mark (``VmHWM``, reset through
    ``/proc/self/clear_refs``) above the resident size before ``fn``: extra host memory ``fn``
    needed at its peak, all allocators and threads included, weights already loaded excluded.
    Freed heap pages are first handed back with glibc's ``malloc_trim`` (skipped on other C
    libraries, where memory reused from earlier calls is not counted). The first call of a model
    also counts one-off allocations (thread pools, lazy init): warm up first. Raises
    ``RuntimeError`` where ``/proc`` is unavailable.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) / 2**20
    if dev.type != "cpu":
        raise ValueError(f"peak_memory supports 'cpu' and 'cuda' devices, got {dev}")
    _trim_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError as err:
        raise RuntimeError("CPU peak memory needs Linux /proc/self/clear_refs (writable)") from err
    before = _proc_kib("VmRSS")
    fn()
    return max(0, _proc_kib("VmHWM") - before) / 1024


def _detector_inputs(model: nn.Module, image_size: tuple[int, int], batch_size: int, device: torch.device) -> Inputs:
    gen = torch.Generator().manual_seed(0)
    if hasattr(model, "transform") and hasattr(model, "backbone"):
        return [torch.rand(3, *image_size, generator=gen).to(device) for _ in range(batch_size)]
    return torch.rand(batch_size, 3, *image_size, generator=gen).to(device)


def _size_row(name: str, model: nn.Module, inputs: Inputs) -> dict[str, Any]:
    return {"name": name, "params_M": count_parameters(model) / 1e6, "GFLOPs": count_flops(model, inputs) / 1e9}


def size_table(models: Mapping[str, nn.Module], image_size: int | tuple[int, int]) -> list[dict[str, Any]]:
    """One row per model: ``name, params_M, GFLOPs`` (one image of ``image_size``), without timing anything.

    The architecture columns of Table 3, cheap enough for paper-size detectors on a CPU (one forward pass
    each, under the FLOP counter). Inputs as in ``efficiency_table``.
    """
    size = _image_size(models, image_size)
    return [_size_row(name, model, _detector_inputs(model, size, 1, _model_device(model)))
            for name, model in models.items()]


def _image_size(models: Mapping[str, nn.Module], image_size: int | tuple[int, int]) -> tuple[int, int]:
    if not models:
        raise ValueError("models is empty: pass a dict of name -> model")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be an int or (H, W) with positive entries, got {image_size!r}")
    return size


def efficiency_table(
    models: Mapping[str, nn.Module],
    image_size: int | tuple[int, int],
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    warmup: int = 3,
    repeats: int = 10,
) -> list[dict[str, Any]]:
    """One row per model: ``name, params_M, GFLOPs, latency_ms, latency_iqr_ms, FPS, peak_mem_MiB`` (Table 3).

    ``latency_ms`` is the median of ``repeats`` timed forward passes and ``latency_iqr_ms`` their
    interquartile range: latencies of two models that differ by less than that are not told apart.

    Random images of ``image_size`` (H, W) are fed as a list for torchvision detectors (which then
    resize them to their ``min_size``/``max_size``) and as a ``[B, 3, H, W]`` batch otherwise.
    Models are moved to ``device``. See ``peak_memory`` for what memory means on each device (NaN
    on a CPU without Linux ``/proc``).
    """
    size = _image_size(models, image_size)
    dev = torch.device(device)
    rows = []
    for name, model in models.items():
        model.to(dev)
        inputs = _detector_inputs(model, size, batch_size, dev)
        latency = measure_latency(model, inputs, warmup=warmup, repeats=repeats, device=dev)

        def forward(model: nn.Module = model, inputs: Inputs = inputs) -> None:
            with _Inference(model):
                _call(model, inputs)

        try:
            memory = peak_memory(forward, dev)
        except RuntimeError:  # no /proc to read the CPU high-water mark from
            memory = math.nan
        rows.append({
            **_size_row(name, model, inputs),
            "latency_ms": latency["median_ms"],
            "latency_iqr_ms": latency["iqr_ms"],
            "FPS": latency["fps"],
            "peak_mem_MiB": memory,
        })
    return rows


def kd_step_overhead(
    step_fns: Mapping[str, Callable[[], Any]],
    repeats: int = 10,
    warmup: int = 2,
) -> list[dict[str, Any]]:
    """Time training steps side by side; ratios are relative to the first entry.

    The callables run round-robin (one of each per round) so drift of a shared machine hits all
    alike. CUDA is synchronised around each call when it has been initialised. Returns rows
    ``name, median_ms, iqr_ms, mean_ms, ratio`` (``ratio = median / median of the first entry``; ``iqr_ms`` the
    interquartile range of the step's timings).
    """
    if not step_fns:
        raise ValueError("step_fns is empty: pass a dict of name -> callable running one step")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup}, {repeats}")
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    times: dict[str, list[float]] = {name: [] for name in step_fns}
    for i in range(warmup + repeats):
        for name, fn in step_fns.items():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    base = statistics.median(next(iter(times.values())))
    return [
        {"name": name, "median_ms": statistics.median(t), "iqr_ms": _iqr(t), "mean_ms": statistics.fmean(t),
         "ratio": statistics.median(t) / base}
        for name, t in times.items()
    ]


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude == 0 or 0.01 <= magnitude < 1e5:
        return f"{value:.{2 if magnitude < 100 else 1}f}"
    return f"{value:.3g}"


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Markdown table of ``rows`` (columns: the union of their keys in order, or ``columns``)."""
    if not rows:
        raise ValueError("rows is empty: nothing to format")
    cols = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c]) if c in r else "" for c in cols) + " |")
    return "\n".join(lines)


def gpu_suite_latency(summary_path: str | Path) -> dict[str, dict[str, Any]]:
    """The latency rows of a GPU suite run (``benchmarks/gpu_suite.py``'s ``summary.json``) by model
    name, with the device they ran on under ``"device"``; empty when the file is missing or its
    latency section did not run (e.g. no CUDA device), so a table can say "not run". A relative path
    is looked up from the current folder, then from the project root."""
    from ..utils.paths import PROJECT_ROOT

    path = Path(summary_path)
    if not path.is_absolute() and not path.exists():
        path = PROJECT_ROOT / path
    if not path.is_file():
        return {}
    summary = json.loads(path.read_text())
    section = summary.get("sections", {}).get("latency", {})
    device = summary.get("info", {}).get("device", "?")
    return {row["name"]: {**row, "device": device} for row in section.get("rows", [])}


def latency_noise(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Whether the median latencies of models with the same architecture differ by more than timing noise.

    ``rows``: ``efficiency_table`` rows of models that do the same work (e.g. students that differ only in
    their weights). Returns ``span_ms`` (largest minus smallest median latency), ``iqr_ms`` (the smallest
    interquartile range among them), ``within_noise`` (``span_ms <= iqr_ms``) and ``text``, one sentence saying so.
    """
    if len(rows) < 2:
        raise ValueError(f"latency_noise needs at least 2 rows to compare, got {len(rows)}")
    medians = [float(r["latency_ms"]) for r in rows]
    span, iqr = max(medians) - min(medians), min(float(r["latency_iqr_ms"]) for r in rows)
    within = span <= iqr
    text = (f"the {len(rows)} median latencies span {span:.2f} ms; the smallest interquartile range of their timings "
            f"is {iqr:.2f} ms: " + ("within the timing noise." if within else
                                   "more than the timing noise of one model, so the machine's load changed during "
                                   "the measurement (same architecture, same work)."))
    return {"span_ms": span, "iqr_ms": iqr, "within_noise": within, "text": text}


def machine_description() -> str:
    """One line naming where timings were taken: the CPU model (Linux ``/proc/cpuinfo``), torch's intra-op threads,
    the CUDA device when one is available, and the torch version."""
    cpu = "unknown CPU"
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = match.group(1).strip() if match else cpu
    except OSError:
        pass
    gpu = f"; CUDA device: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"CPU: {cpu}, {torch.get_num_threads()} torch thread(s){gpu}; torch {torch.__version__}"


def plot_efficiency(rows: Sequence[Mapping[str, Any]], steps: Sequence[Mapping[str, Any]] | None = None,
                    batch_size: int | None = None) -> Figure:
    """Bar charts of ``efficiency_table`` rows (parameters, GFLOPs, latency with its interquartile range as error
    bars, inference memory) and, with ``steps`` (``kd_step_overhead`` rows), the training step time with its
    interquartile range and each step's ratio to the first.

    Colours follow names: a model named alike in ``rows`` and ``steps`` has one colour in every panel.
    """
    from .viz import new_figure

    if not rows:
        raise ValueError("rows is empty: nothing to plot")
    names = list(dict.fromkeys([r["name"] for r in rows] + [r["name"] for r in steps or []]))
    colour = {name: f"C{i % 10}" for i, name in enumerate(names)}
    panels = [("params_M", None, "parameters (M)"), ("GFLOPs", None, "GFLOPs / image"),
              ("latency_ms", "latency_iqr_ms", "latency (ms, batch 1)"), ("peak_mem_MiB", None, "inference memory (MiB)")]
    fig, axes = new_figure(len(panels) + (1 if steps else 0), panel=(2.8, 3.0))
    for ax, (key, spread, title) in zip(axes[0], panels, strict=False):
        _bars(ax, rows, key, spread, colour)
        ax.set_title(title, fontsize=10)
    if steps:
        ax = axes[0, -1]
        _bars(ax, steps, "median_ms", "iqr_ms", colour)
        for i, r in enumerate(steps):
            ax.text(i, r["median_ms"] + r["iqr_ms"] / 2, f"{r['ratio']:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, 1.2 * max(r["median_ms"] + r["iqr_ms"] / 2 for r in steps))
        ax.set_title("training step (ms" + (f", batch {batch_size})" if batch_size else ")"), fontsize=10)
    fig.suptitle("error bars: interquartile range of the timings; ratios: step time / first step's", fontsize=9)
    return fig


def _bars(ax: Any, rows: Sequence[Mapping[str, Any]], key: str, spread: str | None, colour: Mapping[str, str]) -> None:
    """One bar per row (its colour from ``colour``), an error bar of +/- half the ``spread`` column when given."""
    ax.bar(range(len(rows)), [r[key] for r in rows], color=[colour[r["name"]] for r in rows],
           yerr=[r[spread] / 2 for r in rows] if spread else None, capsize=3 if spread else 0)
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=35, ha="right", fontsize=8)
