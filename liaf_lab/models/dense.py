"""What dense detectors share, for their families and for the distillers that read their outputs.

Box coding by distances from the prior's centre (``anchor_centres``, ``distance2box``), the expectation of the
distance bins of the shared head output ``box_bins`` (``integral_distances``; ``adapter.DetectorAdapter``'s
``shared_outputs``), and mmdetection's ``reduce_mean`` over ranks (``mean_over_ranks``), which normalises a dense
loss by a batch-wide count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def integral_distances(bbox_logits: Tensor, reg_max: int) -> Tensor:
    """Expected distances from the bin distributions (mmdetection ``Integral``: sum_i softmax(x)_i * i).

    Args:
        bbox_logits: ``[..., 4 * (reg_max + 1)]`` bin logits, side-major (left, top, right, bottom).
        reg_max: the largest bin value.

    Returns:
        ``[..., 4]`` distances in bins (units of the level's stride), each in ``[0, reg_max]``.
    """
    probs = bbox_logits.reshape(*bbox_logits.shape[:-1], 4, reg_max + 1).softmax(dim=-1)
    bins = torch.arange(reg_max + 1, dtype=probs.dtype, device=probs.device)
    return (probs * bins).sum(dim=-1)


def distance2box(centres: Tensor, distances: Tensor) -> Tensor:
    """Boxes from centres ``[..., 2]`` (x, y) and side distances ``[..., 4]`` (l, t, r, b).

    mmdetection ``distance2bbox`` (without clipping).

    Returns ``[..., 4]`` boxes (x1, y1, x2, y2) in the units of the inputs.
    """
    x, y = centres.unbind(-1)
    left, top, right, bottom = distances.unbind(-1)
    return torch.stack([x - left, y - top, x + right, y + bottom], dim=-1)


def anchor_centres(anchors: Tensor) -> Tensor:
    """``[..., 4]`` boxes -> ``[..., 2]`` centres (x, y)."""
    return (anchors[..., :2] + anchors[..., 2:]) / 2


def mean_over_ranks(value: Tensor) -> Tensor:
    """mmdetection ``reduce_mean``: the mean of ``value`` over the ranks of an initialised process group.

    Each rank's loss is then normalised by the batch-wide count, and DDP's gradient averaging
    gives the gradient of the global mean. Without a process group: ``value`` itself.
    """
    if dist.is_available() and dist.is_initialized():
        value = value.detach().clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value
