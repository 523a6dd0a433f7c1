"""Instance selectors up close (notebook 02): how selectors' per-instance values spread over classes and object sizes,
and how alike the selectors of a level are.

Per-instance values are ``[K, I]`` tensors (K selectors, I instances of a batch in order), e.g. a distiller's
``instance_scores(..., per_selector=True)`` or its ``scaled`` weights; boxes are ``[I, 4]`` (x1, y1, x2, y2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from torch import Tensor

from .viz import new_figure

__all__ = ["instance_groups", "mean_cosine", "plot_group_values", "plot_selector_cosines", "selector_cosines"]

SIZE_NAMES = ("small", "medium", "large")


def instance_groups(labels: Tensor, boxes: Tensor, class_names: Sequence[str]) -> dict[str, Tensor]:
    """Boolean masks ``[I]`` of the instances of each class (labels ``1..len(class_names)``; label ``i`` is
    ``class_names[i - 1]``) and of each size tercile by ``sqrt(box area)``, named with its pixel bounds.

    A tercile's bounds are the 1/3 and 2/3 quantiles of the sizes: an instance on a bound goes to the lower group.
    """
    if labels.dim() != 1 or boxes.shape != (len(labels), 4):
        raise ValueError(f"labels must be [I] and boxes [I, 4] for the same I, got {tuple(labels.shape)} and "
                         f"{tuple(boxes.shape)}")
    if not len(labels):
        raise ValueError("no instances to group")
    side = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(1).sqrt()
    edges = torch.quantile(side, torch.tensor([1 / 3, 2 / 3]))
    tercile = torch.bucketize(side, edges)
    groups = {name: labels == c for c, name in enumerate(class_names, start=1)}
    bounds = [0, *(round(float(e)) for e in edges), round(float(side.max()))]
    groups.update({f"{name} ({bounds[g]}-{bounds[g + 1]} px)": tercile == g for g, name in enumerate(SIZE_NAMES)})
    return groups


def plot_group_values(values: Tensor, groups: Mapping[str, Tensor], title: str, centre: float = 1.0,
                      label: str = "relative score (1 = average instance)") -> Figure:
    """Heatmap of the mean of ``values`` ``[K, I]`` over each group's instances (a row per selector, a column per
    group), each cell annotated. The colour scale diverges at ``centre`` and spans the data on both sides (no
    cell is clipped); an empty group's column is NaN (blank)."""
    if values.dim() != 2 or not groups:
        raise ValueError(f"values must be [K, I] and groups non-empty, got {tuple(values.shape)} and {len(groups)} groups")
    table = torch.stack([values[:, m].mean(1) if m.any() else torch.full((len(values),), float("nan"))
                         for m in groups.values()], dim=1)
    finite = table[torch.isfinite(table)]
    low = min(float(finite.min()), centre - 1e-6) if len(finite) else centre - 1
    high = max(float(finite.max()), centre + 1e-6) if len(finite) else centre + 1
    fig, axes = new_figure(1, panel=(1.3 + 0.95 * len(groups), 0.8 + 0.4 * len(values)))
    ax = axes[0, 0]
    image = ax.imshow(table.numpy(), cmap="coolwarm", norm=TwoSlopeNorm(centre, low, high), aspect="auto")
    ax.set_xticks(range(len(groups)), list(groups), rotation=25, ha="right")
    ax.set_yticks(range(len(values)), [f"E_{k + 1}" for k in range(len(values))])
    for k in range(len(values)):
        for g in range(len(groups)):
            ax.text(g, k, f"{table[k, g]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(title)
    return fig


def selector_cosines(weight: Tensor) -> Tensor:
    """``[K, K]`` cosine similarity ``E_i . E_j / (|E_i| |E_j|)`` of the rows of ``weight`` ``[K, D]``."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [K, D], got {tuple(weight.shape)}")
    unit = F.normalize(weight.detach().float(), dim=1)
    return unit @ unit.T


def mean_cosine(weight: Tensor) -> float:
    """The mean cosine similarity over the ordered pairs ``i != j`` of the rows of ``weight`` ``[K, D]``
    (``-1 / (K - 1)`` at the regular simplex, where Eq. 4's diversity loss is smallest)."""
    cos = selector_cosines(weight)
    k = len(cos)
    if k < 2:
        raise ValueError(f"need at least 2 selectors for a pair, got {k}")
    return float((cos.sum() - cos.trace()) / (k * (k - 1)))


def plot_selector_cosines(weights: Mapping[str, Tensor]) -> Figure:
    """One ``selector_cosines`` heatmap per level (``{level: [K, D]}``), on one colour scale from -1 to 1."""
    if not weights:
        raise ValueError("weights is empty: pass {level: selector weights [K, D]}")
    fig, axes = new_figure(len(weights), panel=(2.5, 2.4))
    for ax, (level, weight) in zip(axes[0], weights.items(), strict=True):
        k = len(weight)
        image = ax.imshow(selector_cosines(weight).numpy(), cmap="coolwarm", vmin=-1, vmax=1)
        ax.set_xticks(range(k), [f"E{i + 1}" for i in range(k)], fontsize=7)
        ax.set_yticks(range(k), [f"E{i + 1}" for i in range(k)], fontsize=7)
        ax.set_title(f"level {level}")
    fig.colorbar(image, ax=axes[0].tolist(), label="cosine similarity", fraction=0.02)
    return fig
