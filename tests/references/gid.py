"""Literal, loop-by-loop reference of GID (GISM selection, feature, relation, response)."""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor
from torchvision.ops import roi_align

from liaf_lab.distillers.base import KDInputs
from liaf_lab.distillers.gid import GIDDistiller


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def ref_iou(a, b) -> float:
    """IoU of two boxes (Python floats), in the order of operations of a textbook IoU."""
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = max(a[2] - a[0], 0.0) * max(a[3] - a[1], 0.0) + max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0) - inter
    return inter / max(union, sys.float_info.min)


def ref_priors(d: GIDDistiller, inputs: KDInputs) -> list[dict]:
    """Every prior of every level in order: level index, GI box (points -> square of point_prior_scale strides),
    and its (level, channel base, h, w) to read its logits."""
    out = []
    for li, lvl in enumerate(d.levels):
        stride = d.strides[lvl]
        _, _, h, w = inputs.teacher_feats[lvl].shape
        priors = inputs.priors[lvl].tolist()
        a = len(priors) // (h * w)
        classes = inputs.teacher_head[lvl]["cls_logits"].shape[1] // a
        for i in range(h):
            for j in range(w):
                for k in range(a):
                    x1, y1, x2, y2 = priors[(i * w + j) * a + k]
                    if x2 - x1 <= stride and y2 - y1 <= stride:
                        cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, d.point_prior_scale * stride / 2
                        box = [cx - half, cy - half, cx + half, cy + half]
                    else:
                        box = [x1, y1, x2, y2]
                    out.append({"level": li, "lvl": lvl, "box": box, "cell": (i, j), "channels": range(k * classes,
                                                                                                    (k + 1) * classes)})
    return out


def ref_greedy_nms(scores: list[float], boxes: list, k: int, iou: float, pre_nms: int) -> list[int]:
    """Sort by score (ties: lower index first), keep the first ``pre_nms``, then greedy NMS until ``k`` are kept."""
    order = sorted(range(len(scores)), key=lambda p: (-scores[p], p))[:pre_nms]
    keep: list[int] = []
    for p in order:
        if len(keep) == k:
            break
        if all(ref_iou(boxes[p], boxes[q]) <= iou for q in keep):
            keep.append(p)
    return keep


def ref_select(d: GIDDistiller, inputs: KDInputs) -> list[list[int]]:
    """GISM per image: the GI score of each prior, max over classes of |sigmoid(t) - sigmoid(s)|, then NMS + top K."""
    priors = ref_priors(d, inputs)
    n = inputs.teacher_feats[d.levels[0]].shape[0]
    selected = []
    for b in range(n):
        scores = []
        for p in priors:
            t = inputs.teacher_head[p["lvl"]]["cls_logits"][b, :, p["cell"][0], p["cell"][1]].tolist()
            s = inputs.student_head[p["lvl"]]["cls_logits"][b, :, p["cell"][0], p["cell"][1]].tolist()
            scores.append(max(abs(sigmoid(t[c]) - sigmoid(s[c])) for c in p["channels"]))
        selected.append(ref_greedy_nms(scores, [p["box"] for p in priors], d.num_instances, d.nms_iou, d.pre_nms))
    return selected


def ref_level(d: GIDDistiller, prior: dict) -> int:
    """FPN's rule on the GI box (k = floor(4 + log2(sqrt(wh) / canonical_size)), clamped, nearest level) or the prior's level."""
    if d.roi_level == "prior":
        return prior["level"]
    x1, y1, x2, y2 = prior["box"]
    logs = [math.log2(d.strides[lvl]) for lvl in d.levels]
    k = math.floor(4 + math.log2(math.sqrt((x2 - x1) * (y2 - y1)) / d.canonical_size + 1e-8))
    k = min(max(k, min(logs)), max(logs))
    return min(range(len(logs)), key=lambda i: abs(k - logs[i]))


def ref_distances(xs: list[Tensor]) -> dict[tuple[int, int], Tensor]:
    """``|x_i - x_j| / mu`` for every ordered pair ``i != j``, ``mu`` the mean of those distances."""
    m = len(xs)
    dist = {(i, j): torch.sqrt(torch.clamp(((xs[i] - xs[j]) ** 2).sum(), min=1e-12))
            for i in range(m) for j in range(m) if i != j}
    mu = sum(dist.values()) / len(dist)
    return {key: v / mu for key, v in dist.items()}


def ref_terms(d: GIDDistiller, inputs: KDInputs, selected: list[list[int]] | None = None) -> dict[str, Tensor]:
    """The three weighted terms, instance by instance, pair by pair and prior by prior."""
    priors = ref_priors(d, inputs)
    selected = ref_select(d, inputs) if selected is None else selected
    n, r = len(selected), d.roi_size
    zero = inputs.teacher_feats[d.levels[0]].new_zeros(())
    # feature: RoIAlign of each GI box alone on its level; squared error summed over channels, mean over bins
    feature, count, pooled = zero, 0, []
    for b, keep in enumerate(selected):
        t_img, s_img = [], []
        for p in keep:
            lvl = d.levels[ref_level(d, priors[p])]
            box = [torch.tensor([priors[p]["box"]], dtype=torch.float64)]
            t, s = (roi_align(x[lvl][b:b + 1], box, (r, r), 1 / d.strides[lvl], d.sampling_ratio, aligned=True)
                    for x in (inputs.teacher_feats, inputs.student_feats))
            adapted = d.projectors[lvl](s)
            for c in range(t.shape[1]):
                for i in range(r):
                    for j in range(r):
                        feature = feature + (t[0, c, i, j] - adapted[0, c, i, j]) ** 2 / (r * r)
            count += 1
            t_img.append(t.flatten())
            s_img.append(s.flatten())
        pooled.append((t_img, s_img))
    feature = feature / max(count, 1)
    # relation: per image, distances normalised by their mean over pairs i != j, smooth L1, 1/n^2; mean over images
    relation = zero
    for t_img, s_img in pooled:
        m = len(t_img)
        if m < 2:
            continue
        dt, ds = ref_distances(t_img), ref_distances(s_img)
        for key in dt:
            x = (ds[key] - dt[key]).abs()
            relation = relation + (0.5 * x ** 2 if x < 1 else x - 0.5) / m ** 2
    relation = relation / n
    # response: BCE against the teacher's probabilities at every prior matching a selected GI (IoU >= threshold)
    response, hits = zero, 0
    for b, keep in enumerate(selected):
        for p in priors:
            if not any(ref_iou(p["box"], priors[q]["box"]) >= d.response_iou for q in keep):
                continue
            hits += 1
            i, j = p["cell"]
            for c in p["channels"]:
                t = inputs.teacher_head[p["lvl"]]["cls_logits"][b, c, i, j]
                s = inputs.student_head[p["lvl"]]["cls_logits"][b, c, i, j]
                target = torch.sigmoid(t)
                response = response - (target * torch.log(torch.sigmoid(s)) + (1 - target) * torch.log(1 - torch.sigmoid(s)))
    response = response / max(hits, 1)
    return {"feature": d.feature_weight * feature, "relation": d.relation_weight * relation,
            "response": d.response_weight * response}
