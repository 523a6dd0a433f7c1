"""One training loop for every stage: optimiser, schedule, AMP, clipping, logging, checkpoints, resume, DDP."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from . import distributed as ddp
from ..checkpoint import load_checkpoint, save_checkpoint
from .schedule import make_scheduler


@dataclass
class TrainConfig:
    """How one stage trains. Defaults follow the paper (SGD, momentum 0.9, weight decay 1e-4)."""

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
    num_workers: int = 0  # 0 keeps resumed runs bit-exact (augmentation RNG lives in this process)
    seed: int = 0

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


def _to_device(images: Sequence[Tensor], targets: Sequence[dict], device: torch.device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()}
               for t in targets]
    return images, targets


@dataclass
class FitResult:
    iterations: int
    final_losses: dict[str, float]
    metrics_csv: Path | None
    checkpoint: Path | None
    evaluations: list[dict] = field(default_factory=list)


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
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)


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
) -> FitResult:
    """Train ``step`` (``step(images, targets) -> dict of losses``) for ``cfg.iterations`` iterations.

    Only the parameters of ``checkpoint_modules`` that require grad are optimised; those modules
    (with optimiser, scheduler, scaler, iteration and RNG state) are saved atomically to
    ``out_dir/last.pt`` every ``cfg.checkpoint_every`` iterations and at the end. When
    ``out_dir/last.pt`` exists the run resumes from it and, with the same seed and
    ``num_workers=0``, ends with the same weights as an uninterrupted run.
    Under torchrun the step is wrapped in ``DistributedDataParallel`` (``find_unused_parameters``,
    since stages train only some parameters) and the data is sharded per rank.
    """
    device = ddp.resolve_device(device)
    distributed = ddp.init_distributed(device)
    out = Path(out_dir) if out_dir is not None else None
    main = ddp.is_main()
    torch.manual_seed(cfg.seed)
    step.to(device)
    params = [p for m in checkpoint_modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    scheduler = make_scheduler(optimizer, cfg.iterations, cfg.warmup, cfg.schedule, cfg.min_lr_factor)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)

    start = 0
    ckpt_path = out / "last.pt" if out is not None else None
    if ckpt_path is not None and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=device)
        for name, module in checkpoint_modules.items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"][ddp.rank()] if state["rng"].dim() == 2 else state["rng"])
        start = int(state["iteration"])
    model = DistributedDataParallel(step, find_unused_parameters=True,
                                    device_ids=[device.index] if device.type == "cuda" else None) if distributed else step

    log = MetricsLog(out / "metrics.csv", start) if (out is not None and main) else None
    sampler = DistributedSampler(dataset, num_replicas=ddp.world_size(), rank=ddp.rank(), shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    per_epoch = len(sampler) // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(f"the dataset has {len(dataset)} images, fewer than one batch of {cfg.batch_size} "
                         f"per process ({ddp.world_size()} processes)")

    def save(iteration: int) -> None:
        if ckpt_path is None:
            return
        rng = torch.get_rng_state()
        if distributed:
            gathered = [torch.empty_like(rng) for _ in range(ddp.world_size())]
            torch.distributed.all_gather_object(gathered, rng)
            rng = torch.stack(gathered)
        if main:
            save_checkpoint(ckpt_path, {
                "modules": {n: m.state_dict() for n, m in checkpoint_modules.items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "iteration": iteration, "rng": rng,
                "config": asdict(cfg),
            })
            if log is not None:
                log.flush()

    it = start
    evaluations: list[dict] = []
    last: dict[str, float] = {}
    step.train()
    bar = tqdm(total=cfg.iterations, initial=start, desc=desc, disable=not main, dynamic_ncols=True)
    tick = time.perf_counter()
    while it < cfg.iterations:
        epoch, offset = divmod(it, per_epoch)
        sampler.set_epoch(epoch)
        indices = list(sampler)[offset * cfg.batch_size: per_epoch * cfg.batch_size]
        batches = [indices[i:i + cfg.batch_size] for i in range(0, len(indices), cfg.batch_size)]
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn, num_workers=cfg.num_workers)
        for images, targets in loader:
            images, targets = _to_device(images, targets, device)
            with torch.autocast(device.type, enabled=use_amp):
                losses = model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{desc}: loss is {loss.item()} at iteration {it + 1} "
                    f"({ {k: round(float(v), 4) for k, v in losses.items()} }); lower the learning rate "
                    "or check the data"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            it += 1
            last = {k: float(v.detach()) for k, v in losses.items()}
            loss_value = float(loss.detach())
            if log is not None and (it % cfg.log_every == 0 or it == cfg.iterations):
                now = time.perf_counter()
                log.add({"iteration": it, "lr": optimizer.param_groups[0]["lr"], "loss": loss_value,
                         **last, "sec_per_iter": (now - tick) / cfg.log_every})
                tick = now
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if evaluate is not None and cfg.eval_every and it % cfg.eval_every == 0 and it < cfg.iterations:
                evaluations.append({"iteration": it, **evaluate(it)})
                step.train()
            if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
                save(it)
            if it >= cfg.iterations:
                break
    bar.close()
    if start >= cfg.iterations and log is not None:
        log.flush()
    if out is not None and main and evaluations:
        with (out / "evaluations.jsonl").open("a") as f:
            f.writelines(json.dumps(e) + "\n" for e in evaluations)
    if log is not None and log.rows:
        plot_curves(log, out)
    ddp.barrier()
    return FitResult(it, last, out / "metrics.csv" if log is not None else None, ckpt_path, evaluations)



def plot_curves(log: MetricsLog, out: Path) -> Path:
    """``out/curves.png``: the loss terms over iterations, and AP/AP50 from ``evaluations.jsonl``."""
    from ..analysis.viz import plot_training_curves

    evals_path = out / "evaluations.jsonl"
    evals = [json.loads(line) for line in evals_path.read_text().splitlines()] if evals_path.exists() else []
    skip = {"iteration", "lr", "sec_per_iter"}
    loss_keys = [k for k in log.rows[0] if k not in skip]
    fig = plot_training_curves([*log.rows, *evals], x="iteration", loss_keys=loss_keys,
                               metric_keys=["AP", "AP50"] if evals else [])
    fig.savefig(out / "curves.png", dpi=90)
    return out / "curves.png"
