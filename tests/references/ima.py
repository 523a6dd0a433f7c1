"""Literal, slow reference of IMA (Instance Mask Alignment): the reconstructed loss."""

from __future__ import annotations

import math

import torch

from liaf_lab.distillers.ima import IMADistiller

from .common import ref_align

EPS = 1e-5  # the variance epsilon of the standardisation


def ref_owner(instances: list[list[tuple[int, int]]], h: int, w: int) -> int:
    """The instance a cell belongs to: the smallest box covering it (index >= 1), else the image (0)."""
    owner = 0
    for k in range(1, len(instances)):
        if (h, w) in instances[k] and (owner == 0 or len(instances[k]) < len(instances[owner])):
            owner = k
    return owner


def ref_box_cells(box: torch.Tensor, stride: float, height: int, width: int) -> list[tuple[int, int]]:
    """The cells ``(h, w)`` of a box: ``y1 <= h * stride < y2`` and ``x1 <= w * stride < x2``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return [(h, w) for h in range(height) for w in range(width)
            if y1 <= h * stride < y2 and x1 <= w * stride < x2]


def ref_stats(x: torch.Tensor, cells: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and ``sqrt(population variance + eps)`` of ``x [C, H, W]`` over ``cells``, cell by cell."""
    if not cells:
        return None, None
    mean = sum(x[:, h, w] for h, w in cells) / len(cells)
    var = sum((x[:, h, w] - mean) ** 2 for h, w in cells) / len(cells)
    return mean, torch.sqrt(var + EPS)


def ref_cosine(a: torch.Tensor, t: torch.Tensor, cells: list[tuple[int, int]]) -> float:
    """Cosine of the flattened ``a`` and ``t`` ``[C, H, W]`` over ``cells``, as Python floats."""
    dot = sum(float((a[:, h, w] * t[:, h, w]).sum()) for h, w in cells)
    na = math.sqrt(sum(float((a[:, h, w] ** 2).sum()) for h, w in cells))
    nt = math.sqrt(sum(float((t[:, h, w] ** 2).sum()) for h, w in cells))
    return dot / max(na * nt, 1e-8)


def ref_ima_loss(student, teacher, boxes, d: IMADistiller, generator, **override) -> torch.Tensor:
    """Per level: align; draw ``r [N, 1, H, W]`` and zero the cells with ``r > 1 - zeta``; per image list the
    instances (the image, and with ``instance="box"`` each box's cells); standardise each cell with the
    statistics of its instance (smallest covering box, first on ties, else the image); scale by
    ``sigmoid(alpha * cos)`` of that instance; squared error summed cell by cell over ``N * C * H * W``."""
    opt = {"loss_weight": d.loss_weight, "mask_ratio": d.mask_ratio, "alpha": d.alpha, "instance": d.instance,
           "standardize": d.standardize, "scale_deflation": d.scale_deflation}
    opt.update(override)
    total = 0
    for lvl in d.levels:
        a = ref_align(student[lvl], d.projectors[lvl])
        t = teacher[lvl]
        n_img, channels, height, width = t.shape
        stride = d.strides[lvl]
        r = torch.rand((n_img, 1, height, width), generator=generator, dtype=a.dtype)
        mask = torch.ones(n_img, 1, height, width, dtype=a.dtype)
        for n in range(n_img):
            for h in range(height):
                for w in range(width):
                    if float(r[n, 0, h, w]) > 1 - opt["mask_ratio"]:
                        mask[n, 0, h, w] = 0.0
        s = a * mask
        err = 0
        for n in range(n_img):
            every = [(h, w) for h in range(height) for w in range(width)]
            instances = [every]  # instance 0: the image
            if opt["instance"] == "box":
                instances += [ref_box_cells(box, stride, height, width) for box in boxes[n]]
            s_stats = [ref_stats(s[n], cells) for cells in instances]
            t_stats = [ref_stats(t[n], cells) for cells in instances]
            gammas = [1 / (1 + math.exp(-opt["alpha"] * ref_cosine(a[n].detach(), t[n], cells)))
                      if cells else None for cells in instances]
            for h in range(height):
                for w in range(width):
                    owner = ref_owner(instances, h, w)
                    s_hat, t_hat = s[n, :, h, w], t[n, :, h, w]
                    if opt["standardize"] != "none":
                        s_hat = (s_hat - s_stats[owner][0]) / s_stats[owner][1]
                    if opt["standardize"] == "both":
                        t_hat = (t_hat - t_stats[owner][0]) / t_stats[owner][1]
                    if opt["scale_deflation"]:
                        s_hat = gammas[owner] * s_hat
                    err = err + ((s_hat - t_hat) ** 2).sum()
        total = total + err / (n_img * channels * height * width)
    return opt["loss_weight"] * total
