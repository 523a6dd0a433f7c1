"""Scores tracked during distillation (``ScoreHistory.tracker`` via ``distill(on_iteration=...)``): the
run trains exactly as without tracking, records land at the asked iterations, and gaps average them."""

from __future__ import annotations

import pytest
import torch

from liaf_lab.analysis import ScoreHistory, plot_score_gaps
from liaf_lab.experiments.builders import build_detector, build_distiller, train_config
from liaf_lab.experiments.demo import load_demo_models
from liaf_lab.engine import distill


@pytest.fixture(scope="module")
def shipped():
    return load_demo_models()


def run(shipped, out, history: ScoreHistory | None):
    cfg = shipped["config"]
    student = build_detector(cfg, "student", len(shipped["val"].class_names) + 1)
    kd = build_distiller("liaf", cfg, student)
    kd.load_state_dict(shipped["distiller"].state_dict())
    samples = [shipped["val"][i] for i in range(2)]
    images, targets = [s[0] for s in samples], [s[1] for s in samples]
    track = history.tracker(student, shipped["teacher"], kd, images, targets, every=2) if history else None
    distill(student, shipped["teacher"], kd, shipped["train"],
            train_config(cfg, "distill", iterations=4, batch_size=2, warmup=1), out, "cpu", on_iteration=track)
    return student


def test_tracking_leaves_training_unchanged_and_records_every_k(shipped, tmp_path):
    torch.set_num_threads(1)
    history = ScoreHistory(levels=["0"])
    tracked = run(shipped, tmp_path / "tracked", history)
    plain = run(shipped, tmp_path / "plain", None)
    assert all(torch.equal(a, b) for a, b in zip(tracked.state_dict().values(), plain.state_dict().values(), strict=True))
    assert sorted({r["iteration"] for r in history.records}) == [0, 2, 4]
    gaps = history.gaps()
    literal = {}
    for it in (0, 2, 4):
        rows = [r for r in history.records if r["iteration"] == it]
        t = {r["instance"]: r["mean"] for r in rows if r["side"] == "teacher"}
        s = {r["instance"]: r["mean"] for r in rows if r["side"] == "student"}
        literal[it] = sum(abs(s[i] - t[i]) for i in t) / len(t)
    assert gaps == pytest.approx(literal)
    fig = plot_score_gaps([history, history])
    assert fig.axes[0].get_ylabel() == "mean |A^S - A^T| over instances"


def test_bad_tracking_input_is_named():
    with pytest.raises(ValueError, match="histories is empty"):
        plot_score_gaps([])
    with pytest.raises(ValueError, match="ScoreHistory is empty"):
        ScoreHistory().gaps()
    with pytest.raises(ValueError, match="every must be at least 1"):
        ScoreHistory().tracker(None, None, None, [], [], every=0)
