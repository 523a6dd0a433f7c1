"""TensorBoard events in run folders, read back with TensorBoard's own reader (``EventAccumulator``)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from liaf_lab.engine import TrainConfig, fit
from liaf_lab.engine.run_folder import RunConfigError
from liaf_lab.engine.tracking import log_run_summary

sys.path.insert(0, str(Path(__file__).parent))
from toy_job import FlippedPoints, LinearStep, collate  # noqa: E402


def _cfg(**kw) -> TrainConfig:
    base = dict(iterations=6, batch_size=4, lr=0.05, warmup=0, schedule="cosine", grad_clip=None, log_every=1,
                checkpoint_every=2, eval_every=3, seed=0)
    return TrainConfig(**{**base, **kw})


def _fit(out: Path, step: LinearStep | None = None, **kw):
    step = step if step is not None else LinearStep()
    return fit(step, {"linear": step.linear}, FlippedPoints(), collate, _cfg(), out_dir=out, device="cpu",
               evaluate=lambda it: {"AP": it / 10, "AP50": it / 5}, **kw)


def _events(folder: Path) -> EventAccumulator:
    return EventAccumulator(str(folder)).Reload()


def _scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_every_logged_column_and_evaluation_is_in_the_events(tmp_path):
    _fit(tmp_path)
    acc = _events(tmp_path)
    with (tmp_path / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    columns = [k for k in rows[0] if k != "iteration"]
    assert {f"train/{k}" for k in columns} <= set(acc.Tags()["scalars"])
    for key in ("loss", "lr", "grad_norm"):
        assert _scalars(acc, f"train/{key}") == [(int(r["iteration"]), pytest.approx(float(r[key]), rel=1e-6))
                                                 for r in rows]
    assert _scalars(acc, "eval/AP") == [(3, pytest.approx(0.3))]


def test_a_resumed_run_appends_without_duplicating_steps(tmp_path):
    straight = tmp_path / "straight"
    _fit(straight)
    resumed = tmp_path / "resumed"

    def die(it: int) -> None:  # a kill between two checkpoints
        if it == 5:  # iterations 1..5 logged, checkpoint at 4, evaluation at 3
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fit(resumed, on_iteration=die)
    assert 5 in [s for s, _ in _scalars(_events(resumed), "train/loss")]
    _fit(resumed)  # resumes from iteration 4 and redoes 5, 6
    assert len(list(resumed.glob("events.out.tfevents.*"))) == 2
    acc, ref = _events(resumed), _events(straight)
    steps = [s for s, _ in _scalars(acc, "train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert _scalars(acc, "train/loss") == _scalars(ref, "train/loss")  # the same values as an uninterrupted run
    assert _scalars(acc, "eval/AP") == _scalars(ref, "eval/AP") == [(3, pytest.approx(0.3))]


def test_a_folder_where_events_cannot_be_written_stops_before_training(tmp_path, monkeypatch):
    import liaf_lab.engine.run_logs as run_logs

    class Unwritable:
        def __init__(self, out, start):
            raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(run_logs, "TensorBoardLog", Unwritable)
    step = LinearStep()
    with pytest.raises(RunConfigError, match=f"TensorBoard folder {tmp_path} is not writable .*Permission denied"):
        _fit(tmp_path, step)
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "metrics.csv").exists()


def test_run_summary_writes_final_metrics_and_one_hparams_entry(tmp_path):
    log_run_summary(tmp_path, 6, {"val_AP": 0.25, "val_AP50": 0.5, "note": "x"},
                    {"method": "liaf", "seed": 1, "kd.liaf.mask_scale": "count"})
    acc = _events(tmp_path)
    assert _scalars(acc, "final/val_AP") == [(6, 0.25)] and _scalars(acc, "hparam/val_AP50") == [(6, 0.5)]
    content = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(content)
    session = content["_hparams_/session_start_info"]
    assert b"mask_scale" in session and b"liaf" in session
