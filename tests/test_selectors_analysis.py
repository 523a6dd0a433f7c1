"""Notebook 02's analysis of instance selectors, in the library: groups by class and size tercile, the group
heatmap's colour scale (no clipped cell), cosine similarities, and the score-gap band."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from liaf_lab.analysis import (
    ScoreHistory, instance_groups, mean_cosine, plot_group_values, plot_score_gaps, plot_selector_cosines,
    selector_cosines,
)
from liaf_lab.experiments.verdicts import paired_interval


def test_groups_by_class_and_size_tercile_match_a_literal_split():
    boxes = torch.tensor([[0, 0, 2, 2], [0, 0, 4, 4], [0, 0, 6, 6], [0, 0, 8, 8], [0, 0, 10, 10], [0, 0, 12, 12]],
                         dtype=torch.float32)
    labels = torch.tensor([1, 2, 1, 2, 1, 1])
    groups = instance_groups(labels, boxes, ["disc", "ring"])
    assert groups["disc"].tolist() == [True, False, True, False, True, True]
    assert groups["ring"].tolist() == [False, True, False, True, False, False]
    sides = [2, 4, 6, 8, 10, 12]
    q1, q2 = np.quantile(sides, [1 / 3, 2 / 3])  # torch.quantile's linear rule, as numpy's default
    size_groups = [g for name, g in groups.items() if "px" in name]
    literal = [[s <= q1 for s in sides], [q1 < s <= q2 for s in sides], [s > q2 for s in sides]]
    assert [g.tolist() for g in size_groups] == literal
    assert list(groups)[2].startswith("small (0-") and list(groups)[-1].endswith("-12 px)")
    with pytest.raises(ValueError, match="same I"):
        instance_groups(labels, boxes[:3], ["disc"])


def test_the_group_heatmap_spans_every_value_and_centres_at_one():
    values = torch.tensor([[0.5, 3.0, 1.0, 0.2], [1.5, 2.5, 0.1, 1.0]])
    groups = {"a": torch.tensor([True, True, False, False]), "b": torch.tensor([False, False, True, True]),
              "none": torch.zeros(4, dtype=torch.bool)}
    fig = plot_group_values(values, groups, "t")
    image = fig.axes[0].images[0]
    norm = image.norm
    assert norm.vcenter == 1.0 and norm.vmax >= 2.0 and norm.vmin <= 0.55 + 1e-6  # means: 1.75, 2.0, 0.6, 0.55: none clipped
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts[:3] == ["1.75", "0.60", "nan"] and texts[3:5] == ["2.00", "0.55"]
    with pytest.raises(ValueError, match=r"\[K, I\]"):
        plot_group_values(values[0], groups, "t")


def test_cosines_match_a_literal_pairwise_loop_and_the_simplex_gives_minus_one_over_k_minus_one():
    weight = torch.randn(4, 9)
    cos = selector_cosines(weight)
    for i in range(4):
        for j in range(4):
            literal = float(weight[i] @ weight[j] / (weight[i].norm() * weight[j].norm()))
            assert float(cos[i, j]) == pytest.approx(literal, abs=1e-6)
    k = 6
    simplex = torch.eye(k) - 1 / k  # k vectors summing to zero, equal lengths
    assert mean_cosine(simplex) == pytest.approx(-1 / (k - 1), abs=1e-6)
    fig = plot_selector_cosines({"0": weight, "1": simplex[:, :9] if simplex.shape[1] >= 9 else simplex})
    assert [ax.get_title() for ax in fig.axes[:2]] == ["level 0", "level 1"]
    assert fig.axes[0].images[0].get_clim() == (-1, 1)
    with pytest.raises(ValueError, match="at least 2"):
        mean_cosine(weight[:1])


def test_the_score_gap_band_is_the_t_interval_and_the_axis_starts_at_zero():
    histories = []
    for offset in (0.1, 0.2, 0.4):
        h = ScoreHistory()
        h.levels = ["0"]
        for it in (0, 5):
            for inst in range(2):
                h.records.extend([{"iteration": it, "level": "0", "side": side, "instance": inst, "mean": mean,
                                   "selectors": [mean]}
                                  for side, mean in (("teacher", 0.5), ("student", 0.5 + offset + it / 100))])
        histories.append(h)
    fig = plot_score_gaps(histories, "0")
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0
    band = ax.collections[0].get_paths()[0].vertices
    _, low, high = paired_interval([0.1, 0.2, 0.4])
    assert band[:, 1].min() == pytest.approx(low) and band[:, 1].max() == pytest.approx(high + 0.05)
    assert ax.get_legend().get_texts()[-1].get_text() == "95% t interval of the mean"
    assert not math.isnan(low)
