"""A linear-regression run on ``fit`` for the DDP equality test (no BatchNorm, no per-batch normaliser).

usage: toy_job.py OUT_DIR --batch-size B   (under torchrun, B is the per-process batch)
Each sample is flipped in sign at random by its augmentation (the global generator, as torchvision's
transforms draw), so the test also checks that augmentation depends on the sample, not on the rank.
Writes OUT_DIR/init.pt and OUT_DIR/final.pt (rank 0) with the linear layer's state.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from liaf_lab.engine import TrainConfig, fit
from liaf_lab.engine.distributed import is_main


class FlippedPoints(Dataset):
    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        sign = 1.0 if torch.rand(()) < 0.5 else -1.0
        return sign * self.x[i], {"y": sign * self.y[i]}


def collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


class LinearStep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, xs, targets):
        pred = self.linear(torch.stack(xs)).squeeze(1)
        return {"mse": ((pred - torch.stack([t["y"] for t in targets])) ** 2).mean()}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--batch-size", type=int, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    step = LinearStep()
    out = Path(args.out)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        torch.save(step.linear.state_dict(), out / "init.pt")
    cfg = TrainConfig(iterations=6, batch_size=args.batch_size, lr=0.05, warmup=0, schedule="constant",
                      grad_clip=None, log_every=1, checkpoint_every=100, seed=5)
    fit(step, {"linear": step.linear}, FlippedPoints(), collate, cfg, out_dir=out, device="cpu")
    if is_main():
        torch.save(step.linear.state_dict(), out / "final.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
