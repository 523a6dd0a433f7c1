"""One training loop for every stage: optimiser, schedule, AMP, clipping, logging, checkpoints, resume, DDP."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import distributed as ddp
from ..utils.atomic import DiskFullError
from ..utils.checkpoint import load_module_state, save_checkpoint
from ..utils.options import NonNegative, NonNegativeInt, Options, PositiveInt
from ..utils.progress import progress
from .run_folder import check_resume, load_resume_state, prepare_run_folder, record_run, run_spec
from .run_logs import RunLogs
from .schedule import lr_factor, make_scheduler
from .seeding import SeededSamples, derive_seed, reseed


# A loss term this many times the largest other term is warned about (once per run).
RATIO_WARNING = 1000.0


@dataclass
class TrainConfig(Options):
    """How one stage trains. Defaults follow the paper (SGD, momentum 0.9, weight decay 1e-4).

    Values are type-checked on construction; a wrong one raises ``ValueError`` naming the option.
    ``on_nonfinite``: what a step with a non-finite loss or gradient does: ``"stop"`` the run (the
    last good checkpoint stays) or ``"skip"`` the optimiser step (counted in ``metrics.csv``).
    ``max_abs_weight``: a run whose largest parameter or buffer (BatchNorm statistics) magnitude
    exceeds it is diverging and stops before it checkpoints (``None``: no limit). ``sync_bn``:
    SyncBatchNorm under DDP (CUDA only).
    ``deterministic``: on CUDA, ``torch.use_deterministic_algorithms`` (slower; the CPU is always
    deterministic for a given thread count).
    ``amp_cpu``: bfloat16 autocast on the CPU (no gradient scaler: bfloat16 has float32's range). Off by
    default: it changes the numerics, and it is faster only on CPUs with bfloat16 instructions (e.g.
    ``avx512_bf16``, AMX); elsewhere it warns once and runs slower (docs/benchmarks.md).
    """

    owner: ClassVar[str] = "training option"

    iterations: PositiveInt = 1000
    batch_size: PositiveInt = 8
    lr: NonNegative = 0.01
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: NonNegative = 0.9
    weight_decay: NonNegative = 1e-4
    warmup: NonNegativeInt = 100
    schedule: Literal["constant", "step", "cosine"] = "step"
    min_lr_factor: NonNegative = 0.0
    grad_clip: NonNegative | None = 10.0
    amp: bool = True  # mixed precision (float16 autocast and a gradient scaler), used on CUDA only
    amp_cpu: bool = False
    checkpoint_every: PositiveInt = 200
    log_every: PositiveInt = 10
    eval_every: NonNegativeInt = 0  # 0: only at the end (by the caller)
    num_workers: NonNegativeInt = 0
    seed: NonNegativeInt = 0
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_abs_weight: NonNegative | None = 1e6
    sync_bn: bool = False
    deterministic: bool = False


def cpu_has_bfloat16() -> bool:
    """Whether this CPU has bfloat16 arithmetic instructions (``avx512_bf16`` or AMX, from ``/proc/cpuinfo``;
    ``False`` where that cannot be read)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_enabled(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether training steps run under ``torch.autocast``: float16 on CUDA (``cfg.amp``), bfloat16 on the CPU
    (``cfg.amp_cpu``, with one warning on a CPU without bfloat16 instructions, where it is slower)."""
    if device.type == "cuda":
        return cfg.amp
    if device.type == "cpu" and cfg.amp_cpu:
        if not cpu_has_bfloat16():
            warnings.warn("amp_cpu: this CPU has no bfloat16 instructions (avx512_bf16, AMX), so bfloat16 autocast "
                          "runs slower than float32 here; set amp_cpu = false", stacklevel=3)
        return True
    return False


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


@dataclass
class _Run:
    """What a run carries from one iteration to the next and into its checkpoint."""

    iteration: int = 0
    skipped: int = 0  # optimiser steps skipped for a non-finite value (``on_nonfinite="skip"``)
    changes: list[dict[str, Any]] = field(default_factory=list)  # schedule changes of resumed runs
    saved_at: int | None = None  # the iteration of the last good checkpoint
    last: dict[str, float] = field(default_factory=dict)  # the last step's loss terms


def _resume(ckpt_path: Path | None, device: torch.device, modules: dict[str, nn.Module],
            optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, cfg: TrainConfig, spec: dict[str, Any],
            new_schedule: bool) -> tuple[_Run, Any, bool]:
    """The run's state, its scheduler, and whether it resumed: from ``ckpt_path`` (``load_resume_state``) when
    there is a checkpoint, the modules, optimiser, scaler and scheduler restored (a new scheduler positioned at
    the checkpoint's iteration when ``new_schedule`` changed the schedule), else a fresh run."""
    optimized = [p for group in optimizer.param_groups for p in group["params"]]  # in the saved state's order
    state = load_resume_state(ckpt_path, device, optimized, spec.get("modules")) if ckpt_path is not None else None
    # The scheduler is built before the optimiser state is loaded: building one sets the groups' lr.
    scheduler = make_scheduler(optimizer, cfg.iterations, cfg.warmup, cfg.schedule, cfg.min_lr_factor)
    if state is None:
        return _Run(), scheduler, False
    diffs = check_resume(ckpt_path.parent, state["spec"], spec, new_schedule, TrainConfig.__dataclass_fields__,
                         asdict(TrainConfig()))
    start = int(state["iteration"])
    run = _Run(start, int(state.get("skipped_steps", 0)), list(state.get("schedule_changes", [])), start)
    for name, module in modules.items():
        load_module_state(module, state["modules"][name], ckpt_path, f"the {name!r} module of this run")
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if diffs:  # only schedule keys can differ here (new_schedule)
        run.changes.append({"iteration": start, "changed": {k: list(v) for k, v in diffs.items()}})
        scheduler = _set_schedule(optimizer, cfg, start)
    else:
        scheduler.load_state_dict(state["scheduler"])
    return run, scheduler, True


def _distributed_model(step: nn.Module, cfg: TrainConfig, device: torch.device,
                       distributed: bool) -> tuple[nn.Module, nn.Module]:
    """``(step, model)``: the step (with SyncBatchNorm when ``cfg.sync_bn`` under DDP) and what trains it, the
    step itself or its ``DistributedDataParallel`` wrapper under torchrun."""
    if not distributed:
        return step, step
    if cfg.sync_bn:
        if device.type != "cuda":
            raise ValueError("sync_bn=True needs CUDA devices (torch's SyncBatchNorm does not run on the CPU)")
        step = nn.SyncBatchNorm.convert_sync_batchnorm(step)
    return step, DistributedDataParallel(step, find_unused_parameters=True,
                                         device_ids=[device.index] if device.type == "cuda" else None)


def _batches(dataset: Dataset, collate_fn: Callable, cfg: TrainConfig, start: int) -> Iterator[tuple[list, list]]:
    """The batches of iterations ``start + 1 .. cfg.iterations``: each epoch a permutation drawn from
    ``(cfg.seed, epoch)`` and sharded over the ranks (``DistributedSampler``, whole batches only), each sample
    augmented from its own seed (``SeededSamples``), so that a resumed run sees what an uninterrupted one does.
    ``ValueError`` (before any batch) when a process gets less than one batch per epoch."""
    sampler = DistributedSampler(dataset, num_replicas=ddp.world_size(), rank=ddp.rank(), shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    per_epoch = len(sampler) // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(f"the dataset has {len(dataset)} images, fewer than one batch of {cfg.batch_size} "
                         f"per process ({ddp.world_size()} processes)")
    return _epochs(sampler, SeededSamples(dataset), collate_fn, cfg, start, per_epoch)


def _epochs(sampler: DistributedSampler, samples: SeededSamples, collate_fn: Callable, cfg: TrainConfig, start: int,
            per_epoch: int) -> Iterator[tuple[list, list]]:
    """``_batches``' generator: epoch after epoch from iteration ``start`` until ``cfg.iterations``."""
    it = start
    while it < cfg.iterations:
        epoch, offset = divmod(it, per_epoch)
        sampler.set_epoch(epoch)
        indices = [(i, derive_seed(cfg.seed, "sample", epoch, i)) for i in sampler]
        indices = indices[offset * cfg.batch_size: per_epoch * cfg.batch_size]
        batches = [indices[i:i + cfg.batch_size] for i in range(0, len(indices), cfg.batch_size)]
        loader = DataLoader(samples, batch_sampler=batches, collate_fn=collate_fn, num_workers=cfg.num_workers,
                            generator=torch.Generator())
        for batch in loader:
            yield batch
            it += 1
            if it >= cfg.iterations:
                return


def _forward_backward(model: nn.Module, images: list[Tensor], targets: list[dict], optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler, params: list[nn.Parameter], cfg: TrainConfig, device: torch.device,
                      use_amp: bool, distributed: bool) -> tuple[dict[str, float], float]:
    """One forward and backward pass, the gradients clipped to ``cfg.grad_clip`` (as ``clip_grad_norm_``, the norm
    computed once): the loss terms (averaged over ranks) and the gradients' total norm, in one device read."""
    with torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else None, enabled=use_amp):
        losses = model(images, targets)
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    grads = [p.grad for p in params if p.grad is not None]
    grad_norm = _total_norm(grads, 2.0)
    if cfg.grad_clip and grads:
        torch._foreach_mul_(grads, (cfg.grad_clip / (grad_norm + 1e-6)).clamp(max=1.0))
    terms = torch.stack([v.detach().float() for v in losses.values()] + [grad_norm.detach().float().to(loss.device)])
    if distributed:
        torch.distributed.all_reduce(terms)
        terms[:-1] /= ddp.world_size()
        terms[-1] = grad_norm
    values = terms.tolist()
    return dict(zip(losses, values[:-1], strict=True)), values[-1]


def _guarded_step(run: _Run, gnorm: float, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  watched: list[Tensor], cfg: TrainConfig, desc: str, ckpt_path: Path | None) -> None:
    """The optimiser step, guarded: a non-finite loss term or gradient norm (the norm is left to the scaler under
    CUDA's AMP) stops the run (``NonFiniteError``) or, with ``cfg.on_nonfinite="skip"``, skips the step (counted and
    warned); after the step, weights or floating buffers beyond ``cfg.max_abs_weight`` (or non-finite) stop it."""
    it = run.iteration
    loss_ok = all(math.isfinite(v) for v in run.last.values())
    if not loss_ok or (not math.isfinite(gnorm) and not scaler.is_enabled()):
        where = (f"{desc}: iteration {it + 1}: " + ("loss" if not loss_ok else "gradient norm") +
                 f" is not finite (loss terms { {k: round(v, 4) for k, v in run.last.items()} }, "
                 f"gradient norm {gnorm})")
        if cfg.on_nonfinite == "stop":
            raise NonFiniteError(f"{where}; the run stopped without saving it (last good checkpoint: "
                                 f"{ckpt_path if ckpt_path is not None and ckpt_path.exists() else 'none'})."
                                 " Lower the learning rate or the loss weights, or check the data")
        run.skipped += 1
        warnings.warn(f"{where}; step skipped ({run.skipped} so far)", stacklevel=3)
        optimizer.zero_grad(set_to_none=True)
        return
    scaler.step(optimizer)
    scaler.update()
    biggest = float(_total_norm([p.detach() for p in watched], math.inf))
    if not math.isfinite(biggest) or (cfg.max_abs_weight is not None and biggest > cfg.max_abs_weight):
        raise NonFiniteError(
            f"{desc}: iteration {it + 1}: the weights diverged (largest magnitude {biggest:.3g} of the "
            f"parameters and buffers such as BatchNorm statistics, limit max_abs_weight={cfg.max_abs_weight}); "
            "the run stopped without saving it. Lower the learning rate or enable grad_clip")


def _warn_dominant_term(terms: dict[str, float], desc: str, it: int) -> bool:
    """Warn when one loss term is more than ``RATIO_WARNING`` times the largest other term (a loss weight off by
    orders of magnitude); whether it warned."""
    if len(terms) < 2:
        return False
    for k, v in terms.items():
        largest = max(abs(o) for name, o in terms.items() if name != k)
        if largest > 0 and abs(v) > RATIO_WARNING * largest:
            warnings.warn(f"{desc}: loss term {k!r} is {abs(v) / largest:.3g}x the largest other term at iteration "
                          f"{it} ({v:.4g} against {largest:.4g}); check its loss weight", stacklevel=3)
            return True
    return False


class _Checkpoints:
    """The main process's ``last.pt``, written atomically (the one before kept as ``last.prev.pt``), with the
    metrics written up to it."""

    def __init__(self, path: Path | None, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                 scheduler: Any, scaler: torch.amp.GradScaler, spec: dict[str, Any], logs: RunLogs | None) -> None:
        self.path, self.modules, self.optimizer, self.scheduler, self.scaler = path, modules, optimizer, scheduler, scaler
        self.spec, self.logs = spec, logs

    def save(self, run: _Run) -> None:
        """Checkpoint ``run`` at its iteration; a full disk raises ``DiskFullError`` naming the last good one."""
        if self.path is None or not ddp.is_main():
            return
        try:
            save_checkpoint(self.path, {
                "modules": {n: m.state_dict() for n, m in self.modules.items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "iteration": run.iteration, "spec": self.spec,
                "schedule_changes": run.changes, "skipped_steps": run.skipped,
            }, keep_previous=True)
            if self.logs is not None:
                self.logs.metrics.flush()
        except DiskFullError as err:
            last_good = (f"iteration {run.saved_at} ({self.path}), which a rerun resumes from"
                         if run.saved_at is not None else "none: the run starts afresh when rerun")
            raise DiskFullError(err.errno, f"{err} at iteration {run.iteration}; the last good checkpoint is "
                                           f"{last_good}", err.filename) from err
        run.saved_at = run.iteration


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
    (``SCHEDULE_KEYS``) change and records the change in ``run.json`` (``engine.run_folder``).

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
    main = out is not None and ddp.is_main()  # the process that writes the run folder
    if main:
        prepare_run_folder(out)
    ddp.barrier()
    if cfg.deterministic and device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    step.to(device)
    params, watched = _trainable(checkpoint_modules)
    optimizer = make_optimizer(params, cfg)
    use_amp = autocast_enabled(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and device.type == "cuda")
    spec = run_spec(cfg, checkpoint_modules, run_config)
    ckpt_path = out / "last.pt" if out is not None else None
    run, scheduler, resumed = _resume(ckpt_path, device, checkpoint_modules, optimizer, scaler, cfg, spec,
                                      new_schedule)
    start = run.iteration
    if main:
        record_run(out, desc, cfg.seed, device, spec, run.changes, ddp.world_size(), resumed)
    step, model = _distributed_model(step, cfg, device, distributed)
    logs = RunLogs(out, start, cfg.iterations, cfg.log_every) if main else None
    batches = _batches(dataset, collate_fn, cfg, start)
    checkpoints = _Checkpoints(ckpt_path, checkpoint_modules, optimizer, scheduler, scaler, spec, logs)
    evaluations: list[dict] = []
    warned = False
    step.train()
    bar = progress(total=cfg.iterations, initial=start, desc=desc, disable=not ddp.is_main(), dynamic_ncols=True)
    for images, targets in batches:
        images, targets = to_device(images, targets, device)
        reseed(cfg.seed, "step", ddp.rank(), run.iteration)
        run.last, gnorm = _forward_backward(model, images, targets, optimizer, scaler, params, cfg, device, use_amp,
                                            distributed)
        _guarded_step(run, gnorm, optimizer, scaler, watched, cfg, desc, ckpt_path)
        warned = warned or _warn_dominant_term(run.last, desc, run.iteration + 1)
        scheduler.step()
        run.iteration = it = run.iteration + 1
        loss_value = sum(run.last.values())
        if logs is not None:
            logs.iteration(it, {"lr": optimizer.param_groups[0]["lr"], "loss": loss_value, **run.last,
                                "grad_norm": gnorm, "skipped_steps": run.skipped})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if on_iteration is not None:
            on_iteration(it)
            step.train()
        if evaluate is not None and _due(it, cfg.eval_every, cfg.iterations):
            evaluations.append(_evaluate(evaluate, it, logs))
            step.train()
        if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
            checkpoints.save(run)
    bar.close()
    if logs is not None:
        _close_logs(logs, resumed_finished=start >= cfg.iterations)
    ddp.barrier()
    return FitResult(run.iteration, run.last, out / "metrics.csv" if logs is not None else None, ckpt_path,
                     evaluations, run.skipped)


def _trainable(modules: dict[str, nn.Module]) -> tuple[list[nn.Parameter], list[Tensor]]:
    """The parameters the optimiser trains (those that require grad), and what the divergence guard watches: them
    and the floating buffers (BatchNorm's running statistics diverge too)."""
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    return params, params + [b for m in modules.values() for b in m.buffers() if b.is_floating_point()]


def _due(it: int, every: int, iterations: int) -> bool:
    """Whether a periodic evaluation (every ``every`` iterations, 0: never) falls at ``it``; the caller evaluates
    the end of training itself."""
    return bool(every) and it % every == 0 and it < iterations


def _evaluate(evaluate: Callable[[int], dict[str, float]], it: int, logs: RunLogs | None) -> dict[str, Any]:
    """A periodic evaluation at iteration ``it``, logged."""
    entry = {"iteration": it, **evaluate(it)}
    if logs is not None:
        logs.evaluation(entry)
    return entry


def _close_logs(logs: RunLogs, resumed_finished: bool) -> None:
    """Close TensorBoard; write ``metrics.csv`` when a finished run was run again (no checkpoint wrote it)."""
    logs.close()
    if resumed_finished:
        logs.metrics.flush()
