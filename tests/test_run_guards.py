"""The loop's guards, in process on a linear model: config-locked run folders, non-finite steps, diverging
weights, loss-weight warnings, live evaluations, unwritable folders, orphan temporaries, bad TrainConfig."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from liaf_lab.utils.checkpoint import CheckpointError, save_checkpoint
from liaf_lab.engine import TrainConfig, fit, load_checkpoint
from liaf_lab.engine.loop import NonFiniteError
from liaf_lab.engine.run_folder import RunConfigError

sys.path.insert(0, str(Path(__file__).parent))
from toy_job import FlippedPoints, LinearStep, collate  # noqa: E402


def _cfg(**kw) -> TrainConfig:
    base = dict(iterations=4, batch_size=4, lr=0.05, warmup=0, schedule="cosine", grad_clip=None, log_every=1,
                checkpoint_every=1, seed=0)
    return TrainConfig(**{**base, **kw})


def _fit(out: Path | None, cfg: TrainConfig, step: nn.Module | None = None, **kw):
    step = step if step is not None else LinearStep()
    return fit(step, {"linear": step.linear}, FlippedPoints(), collate, cfg, out_dir=out, device="cpu", **kw)


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


# -- a run folder belongs to one config -------------------------------------------------------------
def test_resuming_or_rerunning_with_another_config_is_refused_listing_the_keys(tmp_path):
    _fit(tmp_path, _cfg(iterations=2), run_config={"kd": {"loss_weight": 1.0}})
    with pytest.raises(RunConfigError, match=r"train.lr: 0.05 in the folder, 0.1 now; train.seed: 0 in the folder, 1 now"):
        _fit(tmp_path, _cfg(iterations=2, lr=0.1, seed=1), run_config={"kd": {"loss_weight": 1.0}})
    with pytest.raises(RunConfigError, match=r"config.kd.loss_weight: 1.0 in the folder, 2.0 now"):
        _fit(tmp_path, _cfg(iterations=2), run_config={"kd": {"loss_weight": 2.0}})
    with pytest.raises(RunConfigError, match="train.batch_size: 4 in the folder, 2 now"):
        _fit(tmp_path, _cfg(iterations=2, batch_size=2), run_config={"kd": {"loss_weight": 1.0}})
    wider = LinearStep()
    wider.linear = nn.Linear(4, 2)
    with pytest.raises(RunConfigError, match=r"modules.linear: '2 tensors differ, e.g. bias \[1\]' in the folder, 'bias \[2\]' now"):
        _fit(tmp_path, _cfg(iterations=2), step=wider, run_config={"kd": {"loss_weight": 1.0}})
    # the same config: the finished run is returned as it is
    assert _fit(tmp_path, _cfg(iterations=2), run_config={"kd": {"loss_weight": 1.0}}).iterations == 2


def test_new_schedule_continues_with_the_new_lr_and_records_it(tmp_path):
    _fit(tmp_path, _cfg(iterations=2, schedule="constant"))
    with pytest.raises(RunConfigError, match="Only the schedule may change with new_schedule"):
        _fit(tmp_path, _cfg(iterations=4, lr=0.01, schedule="constant"))
    with pytest.raises(RunConfigError, match="train.seed"):  # not a schedule key: refused even with the flag
        _fit(tmp_path, _cfg(iterations=4, seed=3, schedule="constant"), new_schedule=True)
    result = _fit(tmp_path, _cfg(iterations=4, lr=0.01, schedule="constant"), new_schedule=True)
    assert result.iterations == 4
    assert [float(r["lr"]) for r in _rows(tmp_path)] == [0.05, 0.05, 0.01, 0.01]
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["schedule_changes"] == [{"iteration": 2, "changed": {"train.iterations": [2, 4], "train.lr": [0.05, 0.01]}}]
    assert run["spec"]["train"]["lr"] == 0.01 and run["environment"]["threads"] == torch.get_num_threads()
    assert {"torch", "torchvision", "liaf_lab", "device", "threads"} <= run["environment"].keys()
    # resuming the changed run again with its new config is a plain resume
    assert _fit(tmp_path, _cfg(iterations=4, lr=0.01, schedule="constant")).iterations == 4


def test_a_plain_state_dict_as_last_pt_is_named_not_a_keyerror(tmp_path):
    save_checkpoint(tmp_path / "last.pt", LinearStep().state_dict())
    with pytest.raises(CheckpointError, match=r"last.pt is not a liaf_lab run checkpoint \(it lacks \['modules'"):
        _fit(tmp_path, _cfg())


def test_a_corrupt_last_pt_falls_back_to_the_previous_one(tmp_path):
    _fit(tmp_path, _cfg(iterations=3))
    assert load_checkpoint(tmp_path / "last.prev.pt")["iteration"] == 2
    (tmp_path / "last.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="resuming from the previous checkpoint"):
        assert _fit(tmp_path, _cfg(iterations=3)).iterations == 3
    assert [int(r["iteration"]) for r in _rows(tmp_path)] == [1, 2, 3]


# -- nothing non-finite is ever saved ----------------------------------------------------------------
class NaNGradAt(LinearStep):
    """A finite loss whose gradient is NaN at the given forward calls."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__()
        self.bad, self.calls = bad, 0

    def forward(self, xs, targets):
        self.calls += 1
        losses = super().forward(xs, targets)
        if self.calls in self.bad:
            losses["mse"].register_hook(lambda g: g * float("nan"))
        return losses


def test_a_nan_gradient_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteError, match=r"iteration 3: gradient norm is not finite .*mse"):
        _fit(tmp_path, _cfg(), step=NaNGradAt({3}))
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["modules"]["linear"].values())
    assert load_checkpoint(tmp_path / "last.prev.pt")["iteration"] == 1


def test_skip_mode_skips_and_counts_nonfinite_steps(tmp_path):
    with pytest.warns(UserWarning, match="step skipped"):
        result = _fit(tmp_path, _cfg(on_nonfinite="skip"), step=NaNGradAt({2, 3}))
    assert result.iterations == 4 and result.skipped_steps == 2
    assert [int(r["skipped_steps"]) for r in _rows(tmp_path)] == [0, 1, 2, 2]
    assert all(torch.isfinite(v).all() for v in load_checkpoint(tmp_path / "last.pt")["modules"]["linear"].values())


def test_diverging_weights_stop_before_they_are_checkpointed(tmp_path):
    with pytest.raises(NonFiniteError, match=r"the weights diverged \(largest magnitude .* max_abs_weight=1000000.0"):
        _fit(tmp_path, _cfg(lr=1e5, iterations=20))
    state = load_checkpoint(tmp_path / "last.pt")
    assert all(v.abs().max() <= 1e6 for v in state["modules"]["linear"].values())


class TwoTerms(LinearStep):
    def forward(self, xs, targets):
        mse = super().forward(xs, targets)["mse"]
        return {"task": mse, "kd": 1e6 * mse}


def test_a_loss_term_orders_of_magnitude_above_the_others_is_warned_about_once(tmp_path, recwarn):
    _fit(None, _cfg(lr=1e-9), step=TwoTerms())
    messages = [str(w.message) for w in recwarn if "loss term 'kd'" in str(w.message)]
    assert len(messages) == 1 and "1e+06x the largest other term at iteration 1" in messages[0]


class SmallTerms(LinearStep):
    """A task term beside two near-zero terms of opposite sign (stage 1: diversity is negative)."""

    def forward(self, xs, targets):
        mse = super().forward(xs, targets)["mse"]
        return {"task": mse, "tiny": 0.01 * mse, "negative": -0.0099 * mse}


def test_no_warning_for_terms_that_only_dwarf_a_near_zero_sum(tmp_path, recwarn):
    _fit(None, _cfg(lr=1e-9), step=SmallTerms())
    assert not [w for w in recwarn if "loss term" in str(w.message)]


# -- lost or late -----------------------------------------------------------------------------------
def test_evaluations_are_written_as_they_happen(tmp_path):
    calls = []

    def evaluate(it: int) -> dict[str, float]:
        calls.append(it)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill during the second evaluation
        return {"AP": 0.5}

    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, _cfg(iterations=6, eval_every=2), evaluate=evaluate)
    assert [json.loads(line) for line in (tmp_path / "evaluations.jsonl").read_text().splitlines()] == \
        [{"iteration": 2, "AP": 0.5}]
    calls.clear()
    _fit(tmp_path, _cfg(iterations=6, eval_every=2), evaluate=lambda it: {"AP": it / 10})
    lines = [json.loads(line) for line in (tmp_path / "evaluations.jsonl").read_text().splitlines()]
    assert lines == [{"iteration": 2, "AP": 0.5}, {"iteration": 4, "AP": 0.4}]


def test_an_unwritable_run_folder_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    step = NaNGradAt(set())
    with pytest.raises(RunConfigError, match=r"run folder .*file/run is not writable"):
        _fit(tmp_path / "file" / "run", _cfg(), step=step)
    assert step.calls == 0


def test_orphan_temporary_checkpoints_are_removed_on_start(tmp_path):
    orphan = tmp_path / ".last.pt.abc123.tmp"
    orphan.write_bytes(b"x" * 100)
    with pytest.warns(UserWarning, match="removed 1 temporary files"):
        _fit(tmp_path, _cfg(iterations=1))
    assert not orphan.exists()


# -- TrainConfig -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, message", [
    ({"iterations": "abc"}, "iterations='abc' must be a positive int"),
    ({"iterations": 0}, "iterations=0 must be a positive int"),
    ({"lr": float("nan")}, "lr=nan must be a finite number >= 0"),
    ({"lr": -1.0}, "lr=-1.0 must be a finite number >= 0"),
    ({"amp": 1}, "amp=1 must be true or false"),
    ({"schedule": "linear"}, "schedule='linear' must be one of"),
    ({"on_nonfinite": "ignore"}, "on_nonfinite='ignore' must be one of"),
    ({"grad_clip": "x"}, "grad_clip='x' must be a finite number >= 0 or None"
),
])
def test_train_config_values_are_checked(kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**kw)
    assert math.isclose(TrainConfig(lr=1).lr, 1.0) and isinstance(TrainConfig(lr=1).lr, float)


# -- bfloat16 autocast on the CPU (amp_cpu) ----------------------------------------------------------------------
def test_amp_cpu_trains_in_bfloat16_reproducibly_and_warns_on_a_cpu_without_it(tmp_path, monkeypatch):
    import warnings

    import liaf_lab.engine.loop as loop

    seen = []

    class Probe(LinearStep):
        def forward(self, xs, targets):
            seen.append(self.linear(torch.stack(xs)).dtype)
            return super().forward(xs, targets)

    def fresh(step_class=LinearStep):
        torch.manual_seed(0)  # the same initial weights in every run
        return step_class()

    monkeypatch.setattr(loop, "cpu_has_bfloat16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a CPU with bfloat16 instructions: no warning
        a = _fit(tmp_path / "a", _cfg(amp_cpu=True), step=fresh(Probe))
    assert set(seen) == {torch.bfloat16}
    _fit(tmp_path / "b", _cfg(amp_cpu=True), step=fresh())
    _fit(tmp_path / "c", _cfg(), step=fresh())
    weights = [load_checkpoint(tmp_path / x / "last.pt")["modules"]["linear"]["weight"] for x in "abc"]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    assert a.iterations == 4 and json.loads((tmp_path / "a" / "run.json").read_text())["spec"]["train"]["amp_cpu"]
    monkeypatch.setattr(loop, "cpu_has_bfloat16", lambda: False)
    with pytest.warns(UserWarning, match="no bfloat16 instructions .* runs slower than float32 here"):
        _fit(tmp_path / "d", _cfg(amp_cpu=True))


def test_a_run_started_before_a_training_option_existed_resumes_while_the_option_is_at_its_default(tmp_path):
    _fit(tmp_path, _cfg(iterations=2))
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    del state["spec"]["train"]["amp_cpu"]  # what a run folder of the package before amp_cpu holds
    save_checkpoint(tmp_path / "last.pt", state)
    assert _fit(tmp_path, _cfg(iterations=2)).iterations == 2  # checked against the folder's spec, then returned
    with pytest.raises(RunConfigError, match=r"train.amp_cpu: '<unset>' in the folder, True now"):
        _fit(tmp_path, _cfg(iterations=2, amp_cpu=True))
