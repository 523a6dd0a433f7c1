"""One training loop for every stage: optimiser, schedule, AMP, clipping, logging, checkpoints, resume, DDP."""

from __future__ import annotations

import csv
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import distributed as ddp
from ..atomic import DiskFullError, RecordError, atomic_write, read_json, save_figure, write_json, write_text
from ..checkpoint import (
    CheckpointError, load_checkpoint, load_module_state, previous_path, remove_orphan_temporaries, save_checkpoint,
)
from ..progress import progress
from .schedule import lr_factor, make_scheduler
from .seeding import SeededSamples, derive_seed, environment_info, reseed
from .tracking import TensorBoardLog


_CHOICES = {"optimizer": ("sgd", "adam", "adamw"), "schedule": ("constant", "step", "cosine"),
            "on_nonfinite": ("stop", "skip")}
_POSITIVE = ("iterations", "batch_size", "checkpoint_every", "log_every")
# A loss term this many times the largest other term is warned about (once per run).
RATIO_WARNING = 1000.0
# What ``fit(..., new_schedule=True)`` lets a resumed run change; any other difference is refused.
SCHEDULE_KEYS = ("iterations", "lr", "warmup", "schedule", "min_lr_factor", "checkpoint_every", "log_every",
                 "eval_every")


@dataclass
class TrainConfig:
    """How one stage trains. Defaults follow the paper (SGD, momentum 0.9, weight decay 1e-4).

    Values are type-checked on construction; a wrong one raises ``ValueError`` naming the option.
    ``on_nonfinite``: what a step with a non-finite loss or gradient does: ``"stop"`` the run (the
    last good checkpoint stays) or ``"skip"`` the optimiser step (counted in ``metrics.csv``).
    ``max_abs_weight``: a run whose largest parameter or buffer (BatchNorm statistics) magnitude
    exceeds it is diverging and stops before it checkpoints (``None``: no limit). ``sync_bn``:
    SyncBatchNorm under DDP (CUDA only).
    ``deterministic``: on CUDA, ``torch.use_deterministic_algorithms`` (slower; the CPU is always
    deterministic for a given thread count).
    """

    iterations: int = 1000
    batch_size: int = 8
    lr: float = 0.01
    optimizer: str = "sgd"  # sgd | adam | adamw
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup: int = 100
    schedule: str = "step"  # constant | step | cosine
    min_lr_factor: float = 0.0
    grad_clip: float | None = 10.0
    amp: bool = True  # mixed precision, used on CUDA only
    checkpoint_every: int = 200
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end (by the caller)
    num_workers: int = 0
    seed: int = 0
    on_nonfinite: str = "stop"  # stop | skip
    max_abs_weight: float | None = 1e6
    sync_bn: bool = False
    deterministic: bool = False

    def __post_init__(self) -> None:
        for name, f in self.__dataclass_fields__.items():
            value, kind = getattr(self, name), str(f.type)
            optional = "None" in kind
            if value is None and optional:
                continue
            if kind.startswith("bool"):
                ok = isinstance(value, bool)
            elif kind.startswith("int"):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif kind.startswith("float"):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                if ok:
                    object.__setattr__(self, name, float(value))
            else:
                ok = isinstance(value, str)
            if not ok:
                raise ValueError(f"training option {name}={value!r} must be {kind.replace(' | None', ' or None')}")
            if name in _CHOICES and value not in _CHOICES[name]:
                raise ValueError(f"training option {name}={value!r} must be one of {list(_CHOICES[name])}")
            if name in _POSITIVE and value < 1:
                raise ValueError(f"training option {name}={value!r} must be at least 1")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"training option {name}={value!r} must not be negative")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training options {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)


def make_optimizer(params: Sequence[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters were given to the optimiser")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {cfg.optimizer!r}")


def to_device(images: Sequence[Tensor], targets: Sequence[dict], device: torch.device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()}
               for t in targets]
    return images, targets


class RunConfigError(ValueError):
    """A run folder holds a run of another configuration (or is not a liaf_lab run folder)."""


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite loss, gradient or parameter, or the weights diverged."""


@dataclass
class FitResult:
    iterations: int
    final_losses: dict[str, float]
    metrics_csv: Path | None
    checkpoint: Path | None
    evaluations: list[dict] = field(default_factory=list)
    skipped_steps: int = 0


class MetricsLog:
    """Per-iteration metrics in ``metrics.csv``; rows past a resumed checkpoint are dropped."""

    def __init__(self, path: Path, resume_from: int) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path.exists() and resume_from > 0:
            with path.open() as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= resume_from]

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def flush(self) -> None:
        fields: list[str] = []
        for row in self.rows:
            fields += [k for k in row if k not in fields]
        with atomic_write(self.path, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)


class EvaluationLog:
    """``evaluations.jsonl``: one line per periodic evaluation, the file rewritten atomically as each is added."""

    def __init__(self, path: Path, resume_from: int) -> None:
        self.path = path
        self.lines: list[str] = []
        if path.exists():  # evaluations past the checkpoint are redone by the resumed run
            self.lines = [line for line in path.read_text().splitlines()
                          if line.strip() and json.loads(line)["iteration"] <= resume_from]
            self._write()

    def _write(self) -> None:
        write_text(self.path, "".join(line + "\n" for line in self.lines))

    def append(self, entry: dict[str, Any]) -> None:
        self.lines.append(json.dumps(entry))
        self._write()


def _open_tensorboard(out: Path, start: int) -> TensorBoardLog:
    """The run's TensorBoard events (``engine.tracking``), opened before training; a folder where the event file
    cannot be written stops the run here, like ``prepare_run_folder``."""
    try:
        return TensorBoardLog(out, start)
    except OSError as err:
        raise RunConfigError(f"TensorBoard folder {out} is not writable ({type(err).__name__}: "
                             f"{err.strerror or err})") from None


def module_signature(modules: dict[str, nn.Module]) -> dict[str, dict[str, Any]]:
    """What a checkpoint's modules are: class and every state tensor's shape (architecture and width)."""
    return {name: {"class": type(m).__name__,
                   "tensors": {k: list(v.shape) for k, v in m.state_dict().items()}} for name, m in modules.items()}


def run_spec(cfg: TrainConfig, modules: dict[str, nn.Module], run_config: dict[str, Any] | None) -> dict[str, Any]:
    """Everything a run folder is bound to: the training options, the caller's resolved config, the modules."""
    config = json.loads(json.dumps(run_config or {}, default=str))  # plain JSON types: weights_only loads them
    return {"train": asdict(cfg), "config": config, "modules": module_signature(modules)}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def spec_differences(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``key -> (saved value, new value)`` for every key that differs (module tensors summarised per module)."""
    diffs: dict[str, tuple[Any, Any]] = {}
    for section in ("train", "config"):
        a, b = _flatten(saved.get(section, {})), _flatten(new.get(section, {}))
        for key in sorted(set(a) | set(b)):
            if a.get(key, "<unset>") != b.get(key, "<unset>"):
                diffs[f"{section}.{key}"] = (a.get(key, "<unset>"), b.get(key, "<unset>"))
    old_m, new_m = saved.get("modules", {}), new.get("modules", {})
    for name in sorted(set(old_m) | set(new_m)):
        a, b = old_m.get(name), new_m.get(name)
        if a is None or b is None:
            diffs[f"modules.{name}"] = ("present" if a else "absent", "present" if b else "absent")
        elif a["class"] != b["class"]:
            diffs[f"modules.{name}"] = (a["class"], b["class"])
        elif a["tensors"] != b["tensors"]:
            changed = [k for k in sorted(set(a["tensors"]) | set(b["tensors"]))
                       if a["tensors"].get(k) != b["tensors"].get(k)]
            k = changed[0]
            diffs[f"modules.{name}"] = (f"{len(changed)} tensors differ, e.g. {k} {a['tensors'].get(k)}",
                                        f"{k} {b['tensors'].get(k)}")
    return diffs


def describe_differences(diffs: dict[str, tuple[Any, Any]]) -> str:
    """``"key: old in the folder, new now; ..."`` for the messages that refuse a changed config."""
    return "; ".join(f"{k}: {a!r} in the folder, {b!r} now" for k, (a, b) in diffs.items())


def prepare_run_folder(out: Path) -> None:
    """Create ``out``, check it is writable (before any training) and remove orphan temporary files."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_check"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        reason = f"{type(err).__name__}: {err.strerror or err}"
        raise RunConfigError(f"run folder {out} is not writable ({reason})") from None
    removed = remove_orphan_temporaries(out)
    if removed:
        warnings.warn(f"removed {len(removed)} temporary files left in {out} by an interrupted checkpoint write",
                      stacklevel=3)


def _read_run_record(path: Path) -> dict[str, Any]:
    """A run folder's previous ``run.json`` (``{}`` when there is none, or, with a warning, when it is damaged:
    the run rewrites it)."""
    if not path.exists():
        return {}
    try:
        return read_json(path, "run record")
    except RecordError as err:
        warnings.warn(f"{err}; it is written again", stacklevel=3)
        return {}


def _check_run_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``CheckpointError`` unless ``state`` is a whole ``fit`` checkpoint: its keys, and module tensors of the
    shapes its own spec records (a file damaged inside a valid zip is caught here, not deep in torch)."""
    missing = [k for k in ("modules", "optimizer", "scheduler", "scaler", "iteration", "spec") if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a liaf_lab run checkpoint (it lacks {missing}); expected the last.pt "
                              "that fit() writes")
    modules, spec = state["modules"], state["spec"]
    if not isinstance(modules, dict) or not isinstance(spec, dict) or not isinstance(state["iteration"], int) \
            or not all(isinstance(m, dict) for m in modules.values()):
        raise CheckpointError(f"{path} is a damaged run checkpoint (its modules, spec or iteration have the wrong "
                              "type)")
    shapes = {name: {k: list(v.shape) if isinstance(v, Tensor) else type(v).__name__ for k, v in m.items()}
              for name, m in modules.items()}
    recorded = {name: m.get("tensors") for name, m in spec.get("modules", {}).items()}
    if shapes != recorded:
        raise CheckpointError(f"{path} is a damaged run checkpoint (its module tensors do not match the shapes its "
                              "spec records)")


def _check_optimizer_state(path: Path, saved: Any, params: list[Tensor]) -> None:
    """``CheckpointError`` unless ``saved`` is an optimiser state of ``params`` (the optimiser's parameters in
    group order, as ``state_dict`` numbers them): its groups name as many
    parameters, and each per-parameter tensor (momentum, moments) has its parameter's shape."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    per_param = saved.get("state") if isinstance(saved, dict) else None
    ids = ([i for g in groups for i in g.get("params", [])]
           if isinstance(groups, list) and all(isinstance(g, dict) for g in groups) else None)
    if ids is None or not isinstance(per_param, dict) or len(ids) != len(params):
        raise CheckpointError(f"{path} is a damaged run checkpoint (its optimizer state does not fit the run's "
                              f"{len(params)} parameters)")
    by_id = dict(zip(ids, params, strict=True))
    for i, entry in per_param.items():
        p = by_id.get(i)
        if p is None or not isinstance(entry, dict) or any(
                isinstance(v, Tensor) and v.dim() > 0 and v.shape != p.shape for v in entry.values()):
            raise CheckpointError(f"{path} is a damaged run checkpoint (its optimizer state of parameter {i} does "
                                  "not match that parameter)")


def _load_resume_state(ckpt_path: Path, device: torch.device, params: list[Tensor],
                       modules: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint to resume from: ``last.pt``, or ``last.prev.pt`` when ``last.pt`` is missing or damaged in
    any way (unreadable, not a run checkpoint, inconsistent, or, for a checkpoint of this run's ``modules`` (its
    spec's), an optimiser state of other ``params``; a checkpoint of other modules is refused later, naming the
    config keys that differ)."""
    prev = previous_path(ckpt_path)
    candidates = [p for p in (ckpt_path, prev) if p.exists()]
    for i, path in enumerate(candidates):
        try:
            state = load_checkpoint(path, map_location=device)
            _check_run_checkpoint(path, state)
            if state["spec"].get("modules") == modules:
                _check_optimizer_state(path, state["optimizer"], params)
        except CheckpointError as err:
            if i + 1 < len(candidates):
                warnings.warn(f"{err}; resuming from the previous checkpoint {candidates[i + 1]}", stacklevel=3)
                continue
            raise CheckpointError(f"{err}; there is no earlier good checkpoint: use another --out, or delete {path} "
                                  "to start the run afresh") from None
        if path != ckpt_path and not ckpt_path.exists():
            warnings.warn(f"{ckpt_path} is missing (a kill between two renames); resuming from {path}", stacklevel=3)
        return state
    return None


def _schedule_key(key: str, spec: dict[str, Any]) -> bool:
    """Whether the spec key ``key`` (e.g. ``train.lr``, ``config.config.distill.iterations``) is a schedule key:
    one of ``SCHEDULE_KEYS`` in the training options, or in a table of the caller's config that holds only
    training options (a config's training section, which the CLI records whole)."""
    section, _, name = key.rpartition(".")
    if name not in SCHEDULE_KEYS:
        return False
    if section == "train":
        return True
    table: Any = spec
    for part in section.split("."):
        table = table.get(part) if isinstance(table, dict) else None
    return isinstance(table, dict) and set(table) <= set(TrainConfig.__dataclass_fields__)


def _check_resume(out: Path, saved: dict[str, Any], new: dict[str, Any], new_schedule: bool) -> dict[str, tuple]:
    diffs = spec_differences(saved, new)
    refused = {k: v for k, v in diffs.items() if not (new_schedule and _schedule_key(k, new))}
    if refused:
        listed = describe_differences(refused)
        hint = (" Only the schedule may change with new_schedule (--new-schedule): " + ", ".join(SCHEDULE_KEYS)
                if any(k.removeprefix("train.") in SCHEDULE_KEYS for k in refused) or new_schedule else "")
        raise RunConfigError(f"run folder {out} holds a run of another configuration ({listed}). Use another "
                             f"--out/out_dir for a new run, or the same settings to resume.{hint}")
    return diffs


def _set_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, iteration: int):
    """A new scheduler for ``cfg`` positioned at ``iteration`` (a resumed run with a new schedule)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = cfg.lr
    scheduler = make_scheduler(optimizer, cfg.iterations, cfg.warmup, cfg.schedule, cfg.min_lr_factor)
    scheduler.last_epoch = iteration
    lrs = [cfg.lr * lr_factor(iteration, cfg.iterations, cfg.warmup, cfg.schedule, min_factor=cfg.min_lr_factor)
           for _ in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports
    return scheduler


def _total_norm(tensors: list[Tensor], norm_type: float) -> Tensor:
    """One fused norm over many tensors (``torch._foreach_norm``); NaN or inf when any element is."""
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm(tensors, norm_type)
    stacked = torch.stack([n.to(norms[0].device) for n in norms])
    return stacked.max() if norm_type == math.inf else torch.linalg.vector_norm(stacked, norm_type)


def fit(
    step: nn.Module,
    checkpoint_modules: dict[str, nn.Module],
    dataset: Dataset,
    collate_fn: Callable,
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    desc: str = "train",
    evaluate: Callable[[int], dict[str, float]] | None = None,
    run_config: dict[str, Any] | None = None,
    new_schedule: bool = False,
    on_iteration: Callable[[int], None] | None = None,
) -> FitResult:
    """Train ``step`` (``step(images, targets) -> dict of losses``) for ``cfg.iterations`` iterations.

    Only the parameters of ``checkpoint_modules`` that require grad are optimised; those modules
    (with optimiser, scheduler, scaler and iteration) are saved atomically to ``out_dir/last.pt``
    every ``cfg.checkpoint_every`` iterations and at the end, the checkpoint before it kept as
    ``last.prev.pt``. All randomness is derived from ``(cfg.seed, iteration)`` (see
    ``liaf_lab.engine.seeding``), so a run resumed from any iteration ends bit-identical to an
    uninterrupted one on the same machine and thread count, under DDP too.

    A run folder belongs to one run: ``out_dir/run.json`` records the training options,
    ``run_config`` (the caller's resolved config, e.g. the CLI's), the modules' shapes and the
    environment. Resuming (or re-running a finished folder) with any difference raises
    ``RunConfigError`` listing it; ``new_schedule=True`` lets only the schedule keys
    (``SCHEDULE_KEYS``) change and records the change in ``run.json``.

    Before each optimiser step the gradients' total norm and after it the largest magnitude of the
    parameters and floating buffers (BatchNorm statistics) are checked in one fused reduction read
    once with the losses; a non-finite value or a diverging weight stops the run (``NonFiniteError``)
    without checkpointing it, or, with ``cfg.on_nonfinite="skip"``, a non-finite step is skipped and
    counted. Under torchrun the step is wrapped in ``DistributedDataParallel``, the data is sharded
    per rank and the logged losses are averaged over ranks.

    ``on_iteration(it)`` runs after every optimiser step (``it`` counts from 1), e.g. to record
    statistics of fixed images; it must not draw from torch's random generators, so a run with it
    trains exactly as one without.
    """
    device = ddp.resolve_device(device)
    distributed = ddp.init_distributed(device)
    out = Path(out_dir) if out_dir is not None else None
    main = ddp.is_main()
    if out is not None and main:
        prepare_run_folder(out)
    ddp.barrier()
    if cfg.deterministic and device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    step.to(device)
    params = [p for m in checkpoint_modules.values() for p in m.parameters() if p.requires_grad]
    # Floating buffers (BatchNorm's running statistics) are checked with the weights: they diverge too.
    watched = params + [b for m in checkpoint_modules.values() for b in m.buffers() if b.is_floating_point()]
    optimizer = make_optimizer(params, cfg)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    spec = run_spec(cfg, checkpoint_modules, run_config)

    start = 0
    ckpt_path = out / "last.pt" if out is not None else None
    optimized = [p for group in optimizer.param_groups for p in group["params"]]  # in the saved state's order
    state = _load_resume_state(ckpt_path, device, optimized, spec.get("modules")) if ckpt_path is not None else None
    # The scheduler is built before the optimiser state is loaded: building one sets the groups' lr.
    scheduler = make_scheduler(optimizer, cfg.iterations, cfg.warmup, cfg.schedule, cfg.min_lr_factor)
    changes: list[dict[str, Any]] = []
    if state is not None:
        diffs = _check_resume(out, state["spec"], spec, new_schedule)
        changes = list(state.get("schedule_changes", []))
        start = int(state["iteration"])
        for name, module in checkpoint_modules.items():
            load_module_state(module, state["modules"][name], ckpt_path, f"the {name!r} module of this run")
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if diffs:  # only schedule keys can differ here (new_schedule)
            changes.append({"iteration": start, "changed": {k: list(v) for k, v in diffs.items()}})
            scheduler = _set_schedule(optimizer, cfg, start)
        else:
            scheduler.load_state_dict(state["scheduler"])
    if out is not None and main:
        old = _read_run_record(out / "run.json")
        env = environment_info(device)
        if old.get("environment", {}).get("threads") not in (None, env["threads"]) and state is not None:
            warnings.warn(f"{out} was run with {old['environment']['threads']} threads and resumes with "
                          f"{env['threads']}: the result will not be bit-identical to an uninterrupted run",
                          stacklevel=2)
        write_json(out / "run.json", {"desc": desc, "seed": cfg.seed, "environment": env, "spec": spec,
                                       "schedule_changes": changes, "world_size": ddp.world_size()}, default=str)

    if cfg.sync_bn and distributed:
        if device.type != "cuda":
            raise ValueError("sync_bn=True needs CUDA devices (torch's SyncBatchNorm does not run on the CPU)")
        step = nn.SyncBatchNorm.convert_sync_batchnorm(step)
    model = step
    if distributed:
        model = DistributedDataParallel(step, find_unused_parameters=True,
                                        device_ids=[device.index] if device.type == "cuda" else None)

    log = MetricsLog(out / "metrics.csv", start) if (out is not None and main) else None
    eval_log = EvaluationLog(out / "evaluations.jsonl", start) if (out is not None and main) else None
    tensorboard = _open_tensorboard(out, start) if (out is not None and main and start < cfg.iterations) else None
    sampler = DistributedSampler(dataset, num_replicas=ddp.world_size(), rank=ddp.rank(), shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    per_epoch = len(sampler) // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(f"the dataset has {len(dataset)} images, fewer than one batch of {cfg.batch_size} "
                         f"per process ({ddp.world_size()} processes)")
    samples = SeededSamples(dataset)
    skipped = int(state.get("skipped_steps", 0)) if state is not None else 0
    saved_at = start if state is not None else None  # the iteration of the last good checkpoint

    def save(iteration: int) -> None:
        nonlocal saved_at
        if ckpt_path is None or not main:
            return
        try:
            save_checkpoint(ckpt_path, {
                "modules": {n: m.state_dict() for n, m in checkpoint_modules.items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "iteration": iteration, "spec": spec,
                "schedule_changes": changes, "skipped_steps": skipped,
            }, keep_previous=True)
            if log is not None:
                log.flush()
        except DiskFullError as err:
            last_good = (f"iteration {saved_at} ({ckpt_path}), which a rerun resumes from" if saved_at is not None
                         else "none: the run starts afresh when rerun")
            raise DiskFullError(err.errno, f"{err} at iteration {iteration}; the last good checkpoint is "
                                           f"{last_good}", err.filename) from err
        saved_at = iteration

    it = start
    evaluations: list[dict] = []
    last: dict[str, float] = {}
    warned_ratio = False
    step.train()
    bar = progress(total=cfg.iterations, initial=start, desc=desc, disable=not main, dynamic_ncols=True)
    tick = time.perf_counter()
    while it < cfg.iterations:
        epoch, offset = divmod(it, per_epoch)
        sampler.set_epoch(epoch)
        indices = [(i, derive_seed(cfg.seed, "sample", epoch, i)) for i in sampler]
        indices = indices[offset * cfg.batch_size: per_epoch * cfg.batch_size]
        batches = [indices[i:i + cfg.batch_size] for i in range(0, len(indices), cfg.batch_size)]
        loader = DataLoader(samples, batch_sampler=batches, collate_fn=collate_fn, num_workers=cfg.num_workers,
                            generator=torch.Generator())
        for images, targets in loader:
            images, targets = to_device(images, targets, device)
            reseed(cfg.seed, "step", ddp.rank(), it)
            with torch.autocast(device.type, enabled=use_amp):
                losses = model(images, targets)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if use_amp:
                scaler.unscale_(optimizer)
            grads = [p.grad for p in params if p.grad is not None]
            grad_norm = _total_norm(grads, 2.0)
            if cfg.grad_clip and grads:  # as clip_grad_norm_, with the norm computed once
                torch._foreach_mul_(grads, (cfg.grad_clip / (grad_norm + 1e-6)).clamp(max=1.0))
            # One device read per iteration: the loss terms (averaged over ranks) and the gradient norm.
            terms = torch.stack([v.detach().float() for v in losses.values()]
                                + [grad_norm.detach().float().to(loss.device)])
            if distributed:
                torch.distributed.all_reduce(terms)
                terms[:-1] /= ddp.world_size()
                terms[-1] = grad_norm
            values = terms.tolist()
            last = dict(zip(losses, values[:-1], strict=True))
            loss_value, gnorm = sum(values[:-1]), values[-1]
            loss_ok = all(math.isfinite(v) for v in values[:-1])
            if not loss_ok or (not math.isfinite(gnorm) and not use_amp):
                where = (f"{desc}: iteration {it + 1}: " + ("loss" if not loss_ok else "gradient norm") +
                         f" is not finite (loss terms { {k: round(v, 4) for k, v in last.items()} }, "
                         f"gradient norm {gnorm})")
                if cfg.on_nonfinite == "stop":
                    raise NonFiniteError(f"{where}; the run stopped without saving it (last good checkpoint: "
                                         f"{ckpt_path if ckpt_path is not None and ckpt_path.exists() else 'none'})."
                                         " Lower the learning rate or the loss weights, or check the data")
                skipped += 1
                warnings.warn(f"{where}; step skipped ({skipped} so far)", stacklevel=2)
                optimizer.zero_grad(set_to_none=True)
            else:
                scaler.step(optimizer)
                scaler.update()
                biggest = float(_total_norm([p.detach() for p in watched], math.inf))
                if not math.isfinite(biggest) or (cfg.max_abs_weight is not None and biggest > cfg.max_abs_weight):
                    raise NonFiniteError(
                        f"{desc}: iteration {it + 1}: the weights diverged (largest magnitude {biggest:.3g} of the "
                        f"parameters and buffers such as BatchNorm statistics, limit "
                        f"max_abs_weight={cfg.max_abs_weight}); the run stopped without saving it. Lower the "
                        "learning rate or enable grad_clip")
            if not warned_ratio and len(last) > 1:
                for k, v in last.items():
                    largest = max(abs(o) for name, o in last.items() if name != k)
                    if largest > 0 and abs(v) > RATIO_WARNING * largest:
                        warnings.warn(f"{desc}: loss term {k!r} is {abs(v) / largest:.3g}x the largest other term "
                                      f"at iteration {it + 1} ({v:.4g} against {largest:.4g}); check its loss "
                                      "weight", stacklevel=2)
                        warned_ratio = True
                        break
            scheduler.step()
            it += 1
            if log is not None and (it % cfg.log_every == 0 or it == cfg.iterations):
                now = time.perf_counter()
                log.add({"iteration": it, "lr": optimizer.param_groups[0]["lr"], "loss": loss_value, **last,
                         "grad_norm": gnorm, "skipped_steps": skipped, "sec_per_iter": (now - tick) / cfg.log_every})
                if tensorboard is not None:
                    tensorboard.add("train", log.rows[-1], it)
                tick = now
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if on_iteration is not None:
                on_iteration(it)
                step.train()
            if evaluate is not None and cfg.eval_every and it % cfg.eval_every == 0 and it < cfg.iterations:
                entry = {"iteration": it, **evaluate(it)}
                evaluations.append(entry)
                if eval_log is not None:
                    eval_log.append(entry)
                if tensorboard is not None:
                    tensorboard.add("eval", entry, it)
                step.train()
            if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
                save(it)
            if it >= cfg.iterations:
                break
    bar.close()
    if tensorboard is not None:
        tensorboard.close()
    if start >= cfg.iterations and log is not None:
        log.flush()
    if log is not None and log.rows:
        plot_curves(log, out)
    ddp.barrier()
    return FitResult(it, last, out / "metrics.csv" if log is not None else None, ckpt_path, evaluations, skipped)


def plot_curves(log: MetricsLog, out: Path) -> Path:
    """``out/curves.png``: the loss terms over iterations, and AP/AP50 from ``evaluations.jsonl``."""
    from ..analysis.viz import plot_training_curves

    evals_path = out / "evaluations.jsonl"
    evals = [json.loads(line) for line in evals_path.read_text().splitlines()] if evals_path.exists() else []
    skip = {"iteration", "lr", "sec_per_iter"}
    loss_keys = [k for k in log.rows[0] if k not in skip]
    fig = plot_training_curves([*log.rows, *evals], x="iteration", loss_keys=loss_keys,
                               metric_keys=[k for k in ("AP", "AP50") if any(k in e for e in evals)])
    return save_figure(fig, out / "curves.png", dpi=90)
