"""A random-feature toy problem that runs LIAF-KD end to end in seconds on a CPU.

Images are noise with bright rectangles (the instances); the teacher is a fixed random two-level
conv pyramid with a fixed objectness head. Stage 1 learns the selectors on the teacher's task loss
(objectness of the masked teacher features) plus the diversity loss; stage 2 distills a thinner
student with LIAF-KD and with FitNet, and reports how close each student's features get.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.atomic import write_json
from ..distillers import FitNetDistiller, LIAFDistiller
from ..utils.progress import progress

STRIDES = {"0": 8.0, "1": 16.0}


class TinyPyramid(nn.Module):
    """Two conv stages giving ``{'0': [N, c, H/8, W/8], '1': [N, c, H/16, W/16]}``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, 4, 1), nn.ReLU(), nn.Conv2d(channels, channels, 3, 2, 1))
        self.down = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, 2, 1))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        p3 = self.stem(x)
        return {"0": p3, "1": self.down(p3)}


def make_batch(n: int, size: int, generator: torch.Generator) -> tuple[Tensor, list[Tensor]]:
    """``n`` noisy images ``[n, 3, size, size]`` with 1-4 bright rectangles each, and their boxes."""
    images = torch.rand(n, 3, size, size, generator=generator) * 0.3
    boxes = []
    for i in range(n):
        k = int(torch.randint(1, 5, (1,), generator=generator))
        xy = torch.rand(k, 2, generator=generator) * size * 0.7
        wh = 6 + torch.rand(k, 2, generator=generator) * size * 0.3
        b = torch.cat([xy, (xy + wh).clamp(max=size)], dim=1)
        for x1, y1, x2, y2 in b.round().int().tolist():
            images[i, :, y1:y2, x1:x2] += torch.rand(3, 1, 1, generator=generator)
        boxes.append(b)
    return images, boxes


def objectness_target(boxes: list[Tensor], size: tuple[int, int], stride: float) -> Tensor:
    """``[N, 1, H, W]``: 1 on cells inside any box."""
    from ..distillers.instance import instance_mask

    zeros = torch.cat(boxes).new_zeros(sum(len(b) for b in boxes))
    return 1 - instance_mask(boxes, zeros, size, stride)


def run_toy(steps: int = 60, seed: int = 0, out_dir: str | Path | None = None) -> dict[str, float]:
    """Stage 1 then stage 2 (LIAF-KD and FitNet) on the toy problem; returns final feature errors."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    teacher, head = TinyPyramid(32).eval(), nn.Conv2d(32, 1, 1)
    for p in [*teacher.parameters(), *head.parameters()]:
        p.requires_grad_(False)

    liaf = LIAFDistiller(16, 32, STRIDES, num_selectors=4)
    opt = torch.optim.Adam(liaf.selectors.parameters(), lr=0.01, weight_decay=1e-3)
    for _ in progress(range(steps), desc="stage 1 (selectors)"):
        images, boxes = make_batch(4, 64, gen)
        with torch.no_grad():
            feats = teacher(images)
        out = liaf.stage1(feats, boxes)
        masked, div = out.views["liaf"], out.terms["diversity"]
        task = sum(
            F.binary_cross_entropy_with_logits(head(masked[lvl]), objectness_target(boxes, masked[lvl].shape[-2:], s))
            for lvl, s in STRIDES.items()
        )
        opt.zero_grad()
        (task + div).backward()
        opt.step()

    results = {"stage1_diversity": liaf.diversity_loss().item()}
    eval_images, eval_boxes = make_batch(8, 64, torch.Generator().manual_seed(seed + 1))
    for name, distiller in [("liaf", liaf), ("fitnet", FitNetDistiller(16, 32, STRIDES))]:
        torch.manual_seed(seed)
        student = TinyPyramid(16)
        opt = torch.optim.SGD([*student.parameters(), *distiller.projectors.parameters()], lr=0.05, momentum=0.9)
        gen_s = torch.Generator().manual_seed(seed + 2)
        for _ in progress(range(steps), desc=f"stage 2 ({name})"):
            images, boxes = make_batch(4, 64, gen_s)
            with torch.no_grad():
                t_feats = teacher(images)
            loss = distiller(student(images), t_feats, boxes)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            results[f"{name}_final_loss"] = float(distiller(student(eval_images), teacher(eval_images), eval_boxes))
    if out_dir is not None:
        write_json(Path(out_dir) / "toy_results.json", results)
    return results


if __name__ == "__main__":
    print(json.dumps(run_toy(out_dir="runs/toy"), indent=2))
