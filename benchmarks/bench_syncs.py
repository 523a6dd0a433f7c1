"""Device-to-host reads (host syncs on a GPU) per forward of each registered distiller.

    .venv/bin/python benchmarks/bench_syncs.py                 # CPU: Python-level reads, what CI can count
    .venv/bin/python benchmarks/bench_syncs.py --device cuda   # CUDA: torch.cuda.set_sync_debug_mode

Inputs: batch 8, 3 boxes per image, FPN levels of a 256 x 256 input (strides 8, 16, ... per level),
8 student and 16 teacher channels (the counts do not depend on sizes). Each distiller runs once to
warm up, then one ``forward`` (and ``stage1`` where it has one) is counted, at 3 and at 5 levels.

On CPU a read is a call of ``Tensor.item``, ``tolist``, ``__bool__``, ``__int__``, ``__float__``,
``__index__``, ``cpu`` or ``numpy`` (each a sync on a GPU); reads inside C++ ops (``nonzero``,
``bincount`` on CUDA) are not seen. On CUDA every synchronising op that the sync debug mode reports
is counted.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from liaf_lab import create_distiller, list_distillers
from liaf_lab.models import create_detector, detector_adapter, fpn_strides
from liaf_lab.models.taps import head_from_split
from liaf_lab.distillers import KDInputs
from liaf_lab.utils.validation import debug_enabled

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")
IMAGE, BATCH, BOXES_PER_IMAGE, STUDENT_C, TEACHER_C = 256, 8, 3, 8, 16


@contextmanager
def count_device_reads(device: str | torch.device = "cpu") -> Iterator[list[str]]:
    """Record the device-to-host reads made in the block; yields a list with one entry per read.

    CPU: the name of each ``torch.Tensor`` read method called (see ``READS``), counted by patching
    the methods for the duration of the block. CUDA: the message of each synchronising operation
    reported by ``torch.cuda.set_sync_debug_mode("warn")`` (the list is filled when the block exits).
    """
    reads: list[str] = []
    if torch.device(device).type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield reads
            finally:
                torch.cuda.set_sync_debug_mode(0)
        reads.extend(str(w.message) for w in caught if "synchroniz" in str(w.message))
        return
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name: str):
        original = originals[name]

        def read(self, *args, **kwargs):
            reads.append(name)
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def make_inputs(num_levels: int, device: torch.device, batch: int = BATCH, seed: int = 0):
    """``strides, student_feats, teacher_feats, boxes, image_size`` for ``num_levels`` FPN levels."""
    g = torch.Generator().manual_seed(seed)
    strides = {str(i): float(8 * 2**i) for i in range(num_levels)}
    sizes = {lvl: -(-IMAGE // int(s)) for lvl, s in strides.items()}
    student = {lvl: torch.randn(batch, STUDENT_C, n, n, generator=g).to(device) for lvl, n in sizes.items()}
    teacher = {lvl: torch.randn(batch, TEACHER_C, n, n, generator=g).to(device) for lvl, n in sizes.items()}
    boxes = []
    for _ in range(batch):
        xy = torch.rand(BOXES_PER_IMAGE, 2, generator=g) * IMAGE * 0.6
        wh = 16 + torch.rand(BOXES_PER_IMAGE, 2, generator=g) * IMAGE * 0.3
        boxes.append(torch.cat([xy, xy + wh], 1).to(device))
    return strides, student, teacher, boxes, (IMAGE, IMAGE)


REG_MAX = 16  # GFL's largest distance bin, for methods that read ``box_bins``


def random_head(keys: tuple[str, ...], needs: frozenset[str], sizes: dict[str, tuple[int, int]], batch: int,
                anchors: int, classes: int, g: torch.Generator, device: torch.device,
                channels: tuple[int, int] = (STUDENT_C, TEACHER_C), split: int = 0) -> dict:
    """Random head outputs of both sides, level -> key -> ``[batch, anchors * D, H, W]`` (``cls_logits``:
    ``D = classes``; ``box_bins``: ``D = 4 * (REG_MAX + 1)``), and, if ``needs`` holds ``"assignment"``, a
    random student assignment ``[batch, anchors * H * W]`` (a third of the priors positive, box 0); if it
    holds ``"head_split"``, random tower features of both sides (``channels``: student, teacher) and the
    head of a GFL teacher (random weights, at most five levels) from ``split`` on:
    ``KDInputs`` fields by name."""
    per_prior = {"cls_logits": classes, "box_bins": 4 * (REG_MAX + 1)}
    student, teacher = ({lvl: {k: torch.randn(batch, anchors * per_prior[k], h, w, generator=g).to(device) for k in keys}
                         for lvl, (h, w) in sizes.items()} for _ in range(2))
    assignment = None
    if "assignment" in needs:
        assignment = {lvl: torch.where(torch.rand(batch, anchors * h * w, generator=g) < 1 / 3, 0, -1).to(device)
                      for lvl, (h, w) in sizes.items()}
    out = {"student_head": student, "teacher_head": teacher, "assignment": assignment}
    if "head_split" in needs:
        model = create_detector("gfl", classes, depth=18, width_mult=0.125, fpn_channels=channels[1]).to(device)
        model.eval().requires_grad_(False)
        branches = detector_adapter(model).towers(model)
        for field, c in (("student_tower", channels[0]), ("teacher_tower", channels[1])):
            out[field] = {lvl: {b: torch.randn(batch, c, h, w, generator=g).to(device) for b in branches}
                          for lvl, (h, w) in sizes.items()}
        out["teacher_head_from"] = partial(head_from_split, model, split=split,
                                           levels=dict(zip(sizes, fpn_strides(model), strict=False)))
    return out


def make_kd_inputs(num_levels: int, device: torch.device, needs: frozenset[str], num_classes: int = 4,
                   batch: int = BATCH, seed: int = 0, head_keys: tuple[str, ...] = ("cls_logits",),
                   split: int = 0) -> KDInputs:
    """``make_inputs`` as ``KDInputs``, with what a method ``needs``: random ``head_keys`` outputs of both
    sides (one anchor per cell, ``num_classes`` logits; ``random_head``) and the student's assignment, one
    stride-sized prior per cell (FCOS's), a generator."""
    strides, student, teacher, boxes, image_size = make_inputs(num_levels, device, batch, seed)
    g = torch.Generator().manual_seed(seed + 1)
    inputs = KDInputs(student, teacher, boxes, [torch.ones(len(b), dtype=torch.long, device=device) for b in boxes],
                      image_size, [image_size] * batch)
    if "head_outputs" in needs:
        head = random_head(head_keys, needs, {lvl: tuple(f.shape[-2:]) for lvl, f in student.items()}, batch, 1,
                           num_classes, g, device, split=split)
        for field, value in head.items():
            setattr(inputs, field, value)
    if "priors" in needs:
        inputs.priors = {}
        for lvl, f in student.items():
            s = strides[lvl]
            ys, xs = torch.meshgrid(torch.arange(f.shape[-2]), torch.arange(f.shape[-1]), indexing="ij")
            centre = torch.stack([xs, ys], -1).reshape(-1, 2).float().add(0.5).mul(s)
            inputs.priors[lvl] = torch.cat([centre - s / 2, centre + s / 2], 1).to(device)
    if "generator" in needs:
        inputs.generator = torch.Generator(device).manual_seed(seed)
    return inputs


def distiller_reads(name: str, num_levels: int, device: str | torch.device = "cpu", **options) -> dict[str, int]:
    """Reads of one ``loss_terms`` (and of one ``stage1``, if the distiller has it) of distiller ``name``.

    ``options``: further keyword arguments of the distiller (e.g. ``mask_scale="count"`` for LIAF).
    """
    device = torch.device(device)
    strides, _, teacher, boxes, image_size = make_inputs(num_levels, device)
    torch.manual_seed(0)
    distiller = create_distiller(name, student_channels=STUDENT_C, teacher_channels=TEACHER_C,
                                 strides=strides, **options).to(device)
    inputs = make_kd_inputs(num_levels, device, distiller.needs, head_keys=distiller.head_keys,
                            split=distiller.split_index)
    calls = {"forward": lambda: distiller.loss_terms(inputs)}
    if distiller.two_stage:
        calls["stage1"] = lambda: distiller.stage1(teacher, boxes, image_size=image_size)
    out = {}
    for what, call in calls.items():
        call()  # warm-up: lazy initialisation is not part of a step
        with count_device_reads(device) as reads:
            call()
        out[what] = len(reads)
    return out


def sync_table(device: str | torch.device = "cpu", levels: tuple[int, ...] = (3, 5)) -> dict[str, dict]:
    """``{distiller: {"forward_L{n}": reads, "stage1_L{n}": reads}}`` for every registered distiller."""
    table: dict[str, dict] = {}
    for name in list_distillers():
        row: dict[str, int] = {}
        for n in levels:
            row.update({f"{what}_L{n}": count for what, count in distiller_reads(name, n, device).items()})
        table[name] = row
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", type=Path, help="also write the counts here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    table = sync_table(args.device)
    print(f"# device-to-host reads per call, batch {BATCH}, device {args.device}, debug checks {debug_enabled()}")
    for name, row in table.items():
        print(f"{name:8s} " + "  ".join(f"{k} {v}" for k, v in row.items()))
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
