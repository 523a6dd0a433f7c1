"""Tiny training runs used by the resume and DDP tests in subprocesses (SIGKILL, torchrun).

usage: engine_job.py DATA_DIR OUT_DIR [--stage distill|stage1] [--method M] [--iterations N] [--kill-at K]
                     [--kill-in-save S --kill-at-replace R]
--kill-at K: the process SIGKILLs itself in the forward of iteration K + 1 (rank 1 only under DDP).
--kill-in-save S --kill-at-replace R: SIGKILL at the R-th ``os.replace`` (1: the rotation of last.pt
to last.prev.pt, 2: the final rename; 0: before either, the temporary file written) of the S-th
checkpoint save.
Writes OUT_DIR/final_rank{r}.pt with the trained modules' state and the optimiser state at the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

from liaf_lab.utils import checkpoint
from liaf_lab.data import CocoDetectionDataset, detection_transforms
from liaf_lab.distillers import create_distiller
from liaf_lab.engine import TrainConfig, distill, learn_stage1, loop
from liaf_lab.engine.distributed import rank
from liaf_lab.engine.seeding import seeded
from liaf_lab.engine.steps import DistillStep, Stage1Step
from liaf_lab.models import create_detector, fpn_strides


def tiny_detector(depth: int, width: float, fpn: int, num_classes: int, seed: int) -> torch.nn.Module:
    with seeded(seed, "detector"):
        return create_detector("retinanet", num_classes, depth=depth, width_mult=width, fpn_channels=fpn,
                               min_size=64, max_size=64)


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_forward(step_cls: type, at: int) -> None:
    calls = {"n": 0}
    forward = step_cls.forward

    def killing_forward(self, images, targets):
        calls["n"] += 1
        if calls["n"] == at + 1 and rank() == int(os.environ.get("KILL_RANK", "0")):
            _kill()
        return forward(self, images, targets)

    step_cls.forward = killing_forward


def kill_in_save(save: int, replace: int) -> None:
    saves, replaces = {"n": 0}, {"n": 0}
    real_save, real_replace = checkpoint.save_checkpoint, os.replace

    def counting_replace(src, dst):
        replaces["n"] += 1
        if saves["n"] == save and replaces["n"] == replace:
            _kill()
        return real_replace(src, dst)

    def counting_save(path, state, keep_previous=False):
        saves["n"] += 1
        replaces["n"] = 0
        if saves["n"] == save and replace == 0:
            real_torch_save = torch.save

            def save_then_kill(obj, f, *a, **k):
                real_torch_save(obj, f, *a, **k)
                f.flush()
                _kill()

            torch.save = save_then_kill
        return real_save(path, state, keep_previous)

    os.replace = counting_replace  # every atomic write (liaf_lab.utils.atomic) renames with os.replace
    loop.save_checkpoint = counting_save


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--stage", choices=["distill", "stage1"], default="distill")
    p.add_argument("--method", default="liaf", help="a registered distiller (default: liaf, two selectors)")
    p.add_argument("--iterations", type=int, default=7)
    p.add_argument("--checkpoint-every", type=int, default=3)
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--kill-in-save", type=int, default=None)
    p.add_argument("--kill-at-replace", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = Path(args.data)
    train = CocoDetectionDataset(data / "train", data / "annotations" / "instances_train.json",
                                 detection_transforms(train=True))
    nc = len(train.class_names) + 1
    teacher = tiny_detector(18, 0.25, 16, nc, seed=1)
    student = tiny_detector(18, 0.125, 8, nc, seed=2)
    options = {"liaf": {"num_selectors": 2}, "maskd": {"custom_mask_warmup": 3}}.get(args.method, {})
    with seeded(3, "distiller"):
        distiller = create_distiller(args.method, 8, 16, fpn_strides(student), **options)
    if args.stage == "distill":
        distiller.mark_stage1(1)  # stage 2 on the initial stage-1 modules: the resume tests need no stage 1
    if args.kill_at is not None:
        kill_in_forward(Stage1Step if args.stage == "stage1" else DistillStep, args.kill_at)
    if args.kill_in_save is not None:
        kill_in_save(args.kill_in_save, args.kill_at_replace)
    cfg = TrainConfig(iterations=args.iterations, batch_size=2, lr=0.01, warmup=2, schedule="cosine",
                      checkpoint_every=args.checkpoint_every, log_every=1, seed=3)
    if args.stage == "stage1":
        result = learn_stage1(teacher, distiller, train, TrainConfig(**{**cfg.__dict__, "optimizer": "adam"}),
                                 out_dir=args.out, device="cpu")
        modules = {"distiller": distiller}
    else:
        result = distill(student, teacher, distiller, train, cfg, out_dir=args.out, device="cpu")
        modules = {"student": student, "distiller": distiller}
    state = torch.load(result.checkpoint, weights_only=True) if rank() == 0 else {"optimizer": {}}
    torch.save({"modules": {n: m.state_dict() for n, m in modules.items()}, "optimizer": state["optimizer"]},
               Path(args.out) / f"final_rank{rank()}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
