"""A tiny LIAF-KD distillation run used by test_engine.py in a subprocess (for SIGKILL and torchrun).

usage: engine_job.py DATA_DIR OUT_DIR [--iterations N] [--kill-at K]
With --kill-at K the process SIGKILLs itself during iteration K + 1 (after the checkpoint of K).
Writes OUT_DIR/final_rank{r}.pt with the student's parameters and buffers at the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

from liaf_lab.data import CocoDetectionDataset, detection_transforms
from liaf_lab.distillers import LIAFDistiller
from liaf_lab.engine import TrainConfig, distill
from liaf_lab.engine.distributed import rank
from liaf_lab.engine.steps import DistillStep
from liaf_lab.models import create_detector, fpn_strides


def tiny_detector(depth: int, width: float, fpn: int, num_classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_detector("retinanet", num_classes, depth=depth, width_mult=width, fpn_channels=fpn,
                           min_size=64, max_size=64)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--kill-at", type=int, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = Path(args.data)
    train = CocoDetectionDataset(data / "train", data / "annotations" / "instances_train.json",
                                 detection_transforms(train=True))
    nc = len(train.class_names) + 1
    teacher = tiny_detector(18, 0.25, 16, nc, seed=1)
    student = tiny_detector(18, 0.125, 8, nc, seed=2)
    distiller = LIAFDistiller(8, 16, fpn_strides(student), num_selectors=2)
    if args.kill_at is not None:
        calls = {"n": 0}
        forward = DistillStep.forward

        def killing_forward(self, images, targets):
            calls["n"] += 1
            if calls["n"] == args.kill_at + 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return forward(self, images, targets)

        DistillStep.forward = killing_forward
    cfg = TrainConfig(iterations=args.iterations, batch_size=2, lr=0.01, warmup=2, checkpoint_every=2,
                      log_every=1, seed=3)
    distill(student, teacher, distiller, train, cfg, out_dir=args.out, device="cpu")
    torch.save({"params": {k: v.detach() for k, v in student.named_parameters()},
                "buffers": dict(student.named_buffers())}, Path(args.out) / f"final_rank{rank()}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
