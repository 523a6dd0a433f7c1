"""The Grad-CAM box-share measurement of notebook 03: against a literal computation, empty maps, the
per-seed summary and its paired interval."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from liaf_lab.analysis import cam_box_share, plot_cam_shares, read_cam_shares, summarise_cam_shares, write_cam_shares
from liaf_lab.experiments.verdicts import paired_interval


def test_box_share_matches_a_literal_sum_over_the_union_of_boxes():
    rng = np.random.default_rng(0)
    heat = rng.random((20, 30)).astype(np.float32)
    boxes = torch.tensor([[2.2, 3.0, 10.4, 9.0], [8.0, 5.0, 14.0, 12.0], [25.0, 15.0, 40.0, 30.0]])
    share, area = cam_box_share(heat, boxes)
    inside = np.zeros((20, 30), bool)
    for y in range(20):
        for x in range(30):  # pixel (y, x) lies in a box rounded to whole pixels
            inside[y, x] = any(round(x1) <= x < round(x2) and round(y1) <= y < round(y2)
                               for x1, y1, x2, y2 in boxes.tolist())
    assert share == pytest.approx(heat[inside].sum() / heat.sum(), rel=1e-6)
    assert area == pytest.approx(inside.mean())  # overlapping boxes counted once


def test_an_empty_map_has_no_share_and_bad_input_is_named():
    share, area = cam_box_share(np.zeros((8, 8)), torch.tensor([[0.0, 0.0, 4.0, 4.0]]))
    assert math.isnan(share) and area == 0.25
    with pytest.raises(ValueError, match=r"\[H, W\] map"):
        cam_box_share(np.zeros((1, 8, 8)), torch.tensor([[0.0, 0.0, 4.0, 4.0]]))
    with pytest.raises(ValueError, match="no rows"):
        plot_cam_shares([])


def test_summary_averages_non_empty_maps_per_seed_and_pairs_seeds_with_the_baseline():
    rows = []
    shares = {"base": [[0.2, 0.4], [0.3, 0.5], [0.1, 0.3]], "kd": [[0.5, math.nan], [0.4, 0.6], [0.3, 0.5]]}
    for model, per_seed in shares.items():
        for seed, values in enumerate(per_seed):
            for image, v in enumerate(values):
                rows.append({"model": model, "seed": seed, "image": image, "share": v, "area": 0.25,
                             "empty": math.isnan(v)})
    base, kd = summarise_cam_shares(rows, baseline="base")
    kd_means = [0.5, 0.5, 0.4]  # seed 0's empty map is left out
    base_means = [0.3, 0.4, 0.2]
    assert kd["empty maps"] == 1 and kd["maps"] == 6 and kd["seeds"] == 3
    assert kd["share inside boxes"] == pytest.approx(np.mean(kd_means))
    assert kd["std over seeds"] == pytest.approx(np.std(kd_means, ddof=1))
    assert kd["std over images"] == pytest.approx(np.mean([np.std([0.4, 0.6], ddof=1), np.std([0.3, 0.5], ddof=1)]))
    mean, low, high = paired_interval([k - b for k, b in zip(kd_means, base_means, strict=True)])
    assert kd["- base [95% CI]"] == f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"
    assert "- base [95% CI]" not in base and base["box area share"] == 0.25
    assert plot_cam_shares(rows).axes[0].get_ylabel() == "share of CAM inside GT boxes"


def _rows(shares: dict[str, list[list[float]]]) -> list[dict]:
    return [{"model": model, "seed": seed, "image": image, "share": v, "area": 0.25, "empty": math.isnan(v)}
            for model, per_seed in shares.items() for seed, values in enumerate(per_seed) for image, v in enumerate(values)]


def test_empty_maps_counted_as_zero_can_reorder_models_and_one_seed_models_meet_the_baseline_mean():
    # "kd" has higher shares where it draws a map but two empty maps; counted as 0 it falls below "base"
    rows = _rows({"base": [[0.4, 0.4], [0.5, 0.5]], "kd": [[0.6, math.nan], [math.nan, 0.6]],
                  "teacher": [[0.7, 0.9]]})
    excluded = {e["model"]: e for e in summarise_cam_shares(rows, baseline="base")}
    zero = {e["model"]: e for e in summarise_cam_shares(rows, baseline="base", empty="zero")}
    assert excluded["kd"]["share inside boxes"] == pytest.approx(0.6)
    assert excluded["kd"]["share inside boxes"] > excluded["base"]["share inside boxes"]
    assert zero["kd"]["share inside boxes"] == pytest.approx(0.3)
    assert zero["kd"]["share inside boxes"] < zero["base"]["share inside boxes"]
    assert zero["kd"]["empty maps"] == excluded["kd"]["empty maps"] == 2
    assert zero["kd"]["std over images"] == pytest.approx(np.std([0.6, 0.0], ddof=1))
    # the teacher (one seed) against the mean of base's two seeds (0.45), not against base's seed 0 alone
    assert excluded["teacher"]["- base [95% CI]"].startswith(f"{0.8 - 0.45:+.3f} (one seed, against the mean")
    with pytest.raises(ValueError, match="'exclude' or 'zero'"):
        summarise_cam_shares(rows, empty="drop")


def test_the_cam_share_plot_has_a_legend_and_a_title_naming_the_empty_maps():
    rows = _rows({"base": [[0.4, math.nan]], "kd": [[0.6, 0.5]]})
    ax = plot_cam_shares(rows).axes[0]
    assert "1 empty maps left out" in ax.get_title()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["one map (image, seed)", "one seed's mean", "mean over seeds", "box area share (a uniform map)"]


def test_cam_shares_round_trip_through_a_file_and_a_missing_file_says_how_to_make_it(tmp_path):
    rows = _rows({"base": [[0.4, math.nan]]})
    path = write_cam_shares(tmp_path / "cam.json", rows, {"study": "x"})
    back, source = read_cam_shares(path)
    assert source == {"study": "x"} and back[0] == rows[0] and back[1]["empty"] and math.isnan(back[1]["share"])
    with pytest.raises(FileNotFoundError, match="tools/cam_shares.py"):
        read_cam_shares(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"rows": [{"model": "a"}]}')
    with pytest.raises(ValueError, match="not a CAM-share file"):
        read_cam_shares(tmp_path / "bad.json")
