"""Literal reference of SAMKD (spatial-pyramid masked feature + cell-averaged logit distillation): the paper's
Eq. 1-13 cell by cell, pixel by pixel and channel by channel."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from liaf_lab.distillers.samkd import SAMKDDistiller

from .common import ref_align


def ref_mlp(x: Tensor, block: nn.Sequential) -> Tensor:
    """``theta_c``: Linear -> ReLU -> Linear on the channel vector of each pixel of ``x [C, h, w]``."""
    w1, b1 = block[0].weight[:, :, 0, 0], block[0].bias
    w2, b2 = block[2].weight[:, :, 0, 0], block[2].bias
    out = [[w2 @ torch.relu(w1 @ x[:, p, q] + b1) + b2 for q in range(x.shape[2])] for p in range(x.shape[1])]
    return torch.stack([torch.stack(row, dim=-1) for row in out], dim=-2)


def ref_conv_block(x: Tensor, block: nn.Sequential) -> Tensor:
    """``theta_s`` on one cell ``[C, h, w]`` alone: conv3x3 (zero padding at the cell border) -> ReLU -> conv3x3."""
    hidden = torch.relu(F.conv2d(x[None], block[0].weight, block[0].bias, padding=1))
    return F.conv2d(hidden, block[2].weight, block[2].bias, padding=1)[0]


def ref_phi(values: list[list[Tensor]], norm: str) -> list[list[Tensor]]:
    """``phi`` of Eq. 1 on a cell's list of sigmoid values."""
    flat = [v for row in values for v in row]
    if norm == "mean":
        mean = sum(flat) / len(flat)
        return [[v / mean for v in row] for row in values]
    if norm == "softmax":
        denominator = sum(torch.exp(v) for v in flat)
        return [[len(flat) * torch.exp(v) / denominator for v in row] for row in values]
    return values


def ref_divergence(zt: Tensor, zs: Tensor, kind: str, temperature: float, num_anchors: int) -> Tensor:
    """``D`` of Eq. 12, class by class: binary KL per class, or softmax KL per anchor; times ``T^2``."""
    out = zt.new_zeros(())
    if kind == "binary":
        for k in range(zt.shape[0]):
            p, q = torch.sigmoid(zt[k] / temperature), torch.sigmoid(zs[k] / temperature)
            out = out + p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    else:
        classes = zt.shape[0] // num_anchors
        for a in range(num_anchors):
            p = torch.softmax(zt[a * classes:(a + 1) * classes] / temperature, dim=0)
            q = torch.softmax(zs[a * classes:(a + 1) * classes] / temperature, dim=0)
            for k in range(classes):
                out = out + p[k] * torch.log(p[k] / q[k])
    return temperature**2 * out


def ref_samkd(d: SAMKDDistiller, student, teacher, s_head, t_head, **override) -> dict[str, Tensor]:
    """Eq. 1-13 literally: loop over levels, pyramid sizes, cells, images, pixels and channels.

    Cell ``i`` of ``n`` spans ``floor(i L / n) .. ceil((i + 1) L / n)``; pyramid sizes larger than a side
    are skipped. ``override`` replaces any option of ``d`` (to show the check is sensitive to it).
    """
    o = {k: override.get(k, getattr(d, k)) for k in (
        "alpha", "beta", "tau", "omega_s", "omega_c", "lambda_s", "mu_c", "pyramid", "spatial_norm", "feature_norm",
        "divergence", "kl_temperature", "num_anchors", "detach_weight")}
    feat_total, logit_total = 0, 0
    for lvl in d.levels:
        s_map, t_map = ref_align(student[lvl], d.align[lvl]), teacher[lvl].detach()
        s_log, t_log = s_head[lvl]["cls_logits"], t_head[lvl]["cls_logits"].detach()
        n_img, channels, height, width = t_map.shape
        feat_level, logit_level = 0, 0
        for n in o["pyramid"]:
            if n > height or n > width:
                continue
            for i in range(n):
                r0, r1 = math.floor(i * height / n), math.ceil((i + 1) * height / n)
                for j in range(n):
                    c0, c1 = math.floor(j * width / n), math.ceil((j + 1) * width / n)
                    for b in range(n_img):
                        t, s = t_map[b, :, r0:r1, c0:c1], s_map[b, :, r0:r1, c0:c1]
                        h, w = r1 - r0, c1 - c0
                        # Eq. 1, 3
                        sig = [[torch.sigmoid(sum(t[k, p, q] ** 2 for k in range(channels)) / (o["tau"] * channels))
                                for q in range(w)] for p in range(h)]
                        att = ref_phi(sig, o["spatial_norm"])
                        m_s = torch.stack([torch.stack([t.new_tensor(0.0 if float(att[p][q]) >= o["omega_s"] else 1.0)
                                                        for q in range(w)]) for p in range(h)])
                        # Eq. 2, 4
                        m_c = torch.stack([t.new_tensor(
                            0.0 if float(torch.sigmoid(t[k].sum() / (o["tau"] * h * w))) >= o["omega_c"] else 1.0)
                            for k in range(channels)])
                        # Eq. 5-8
                        rebuilt = (o["lambda_s"] * ref_conv_block(s * m_s, d.spatial_blocks[lvl])
                                   + o["mu_c"] * ref_mlp(s * m_c[:, None, None], d.channel_blocks[lvl]))
                        feat_level = feat_level + ((t - rebuilt) ** 2).sum()
                        # Eq. 11
                        u, v = t.flatten(), s.flatten()
                        weight = 1 - torch.dot(u, v) / (torch.sqrt(torch.dot(u, u)) * torch.sqrt(torch.dot(v, v)))
                        if o["detach_weight"]:
                            weight = weight.detach()
                        # Eq. 9-10, 12
                        zt = torch.stack([t_log[b, k, r0:r1, c0:c1].sum() / (h * w) for k in range(t_log.shape[1])])
                        zs = torch.stack([s_log[b, k, r0:r1, c0:c1].sum() / (h * w) for k in range(s_log.shape[1])])
                        div = ref_divergence(zt, zs, o["divergence"], o["kl_temperature"], o["num_anchors"])
                        logit_level = logit_level + weight * div
        norm = n_img * (channels * height * width if o["feature_norm"] == "mean" else 1)
        feat_total = feat_total + feat_level / norm
        logit_total = logit_total + logit_level / n_img
    return {"feature": o["alpha"] * feat_total, "logit": o["beta"] * logit_total}


def ref_samkd_maps(d, teacher: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Eq. 1 and 3 cell by cell for every pyramid size that fits the level (bounds as ``adaptive_avg_pool2d``);
    a pixel in two cells takes the mean of its two values."""
    out: dict[str, dict[str, Tensor]] = {}
    for lvl in d.levels:
        t_map = teacher[lvl]
        n_img, channels, height, width = t_map.shape
        for n in d.pyramid:
            if n > height or n > width:
                continue
            att, keep, count = (torch.zeros(n_img, height, width, dtype=torch.float64) for _ in range(3))
            for i in range(n):
                r0, r1 = math.floor(i * height / n), math.ceil((i + 1) * height / n)
                for j in range(n):
                    c0, c1 = math.floor(j * width / n), math.ceil((j + 1) * width / n)
                    for b in range(n_img):
                        t = t_map[b, :, r0:r1, c0:c1]
                        sig = [[torch.sigmoid(sum(t[k, p, q] ** 2 for k in range(channels)) / (d.tau * channels))
                                for q in range(c1 - c0)] for p in range(r1 - r0)]
                        values = ref_phi(sig, d.spatial_norm)
                        for p in range(r1 - r0):
                            for q in range(c1 - c0):
                                att[b, r0 + p, c0 + q] += values[p][q]
                                keep[b, r0 + p, c0 + q] += 0.0 if float(values[p][q]) >= d.omega_s else 1.0
                                count[b, r0 + p, c0 + q] += 1
            out.setdefault(f"spatial attention {n}x{n}", {})[lvl] = att / count
            out.setdefault(f"spatial mask {n}x{n}", {})[lvl] = keep / count
    return out
