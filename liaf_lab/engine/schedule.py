"""Learning-rate schedules: linear warm-up, then constant, step or cosine decay."""

from __future__ import annotations

import math

import torch


def lr_factor(it: int, total: int, warmup: int, schedule: str, steps: tuple[float, ...] = (0.67, 0.89),
              min_factor: float = 0.0) -> float:
    """Multiplier of the base learning rate at iteration ``it`` of ``total``."""
    warm = min(1.0, (it + 1) / warmup) if warmup > 0 else 1.0
    if schedule == "constant":
        decay = 1.0
    elif schedule == "step":
        decay = 0.1 ** sum(it >= s * total for s in steps)
    elif schedule == "cosine":
        decay = min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(it, total) / max(total, 1)))
    else:
        raise ValueError(f"schedule must be 'constant', 'step' or 'cosine', got {schedule!r}")
    return warm * decay


def make_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int, schedule: str,
                   min_factor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following ``lr_factor``, stepped once per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, total, warmup, schedule, min_factor=min_factor)
    )
