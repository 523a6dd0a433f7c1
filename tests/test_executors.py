"""Studies through submitit (``--executor slurm``), tested with submitit's local executor: no Slurm needed."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import liaf_lab.experiments.study
from liaf_lab.cli import main
from liaf_lab.experiments.executors import ExecutorError, SlurmOptions, _Resumable, execute
from liaf_lab.experiments.study import Run, run_one, run_study

sys.path.insert(0, str(Path(__file__).parent))
from test_study import TEACHER  # noqa: E402

LOCAL = SlurmOptions(cluster="local", gpus=0, cpus=1)


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds")} for r in rows]


@pytest.mark.slow
def test_a_study_through_submitit_gives_the_results_of_local_processes(tmp_path, small):
    kw = dict(config="bench", methods=["none", "fitnet"], seeds=[0], overrides=small, device="cpu",
              teacher_weights=TEACHER)
    local = run_study(tmp_path / "local", jobs=2, **kw)
    out = tmp_path / "cluster"
    cluster = run_study(out, executor="slurm", executor_options=LOCAL, **kw)
    assert _strip(cluster.rows) == _strip(local.rows)
    for method in ("none", "fitnet"):
        rel = f"runs/{method}/default/seed0"
        a = torch.load(tmp_path / "local" / rel / "student.pt", weights_only=True)["model"]
        b = torch.load(out / rel / "student.pt", weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)
        events = EventAccumulator(str(out / rel)).Reload()  # every study run has events and its HParams entry
        assert "train/loss" in events.Tags()["scalars"] and "hparam/val_AP" in events.Tags()["scalars"]
        assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
    jobs = json.loads((out / "slurm" / "jobs.json").read_text())
    assert sorted(jobs) == ["runs/fitnet/default/seed0", "runs/none/default/seed0"]
    # The parent started again collects the finished runs without submitting anything.
    submitted = sorted((out / "slurm").glob("*_submitted.pkl"))
    again = run_study(out, executor="slurm", executor_options=LOCAL, **kw)
    assert _strip(again.rows) == _strip(local.rows) and sorted((out / "slurm").glob("*_submitted.pkl")) == submitted
    # A run whose result is missing is resubmitted alone (it resumes from its last.pt: no training left).
    (out / "runs/fitnet/default/seed0/result.json").unlink()
    again = run_study(out, executor="slurm", executor_options=LOCAL, **kw)
    assert _strip(again.rows) == _strip(local.rows)
    new = json.loads((out / "slurm" / "jobs.json").read_text())
    assert new["runs/none/default/seed0"] == jobs["runs/none/default/seed0"]
    assert new["runs/fitnet/default/seed0"] != jobs["runs/fitnet/default/seed0"]


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (submitit's local controller starts the job's task)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the job's process in /proc")
def test_a_preempted_run_is_requeued_and_resumes_from_last_pt(tmp_path, small):
    overrides = [*small, "distill.iterations=40", "distill.checkpoint_every=5"]
    run = Run((), 0, "fitnet")
    straight = tmp_path / "straight"
    (_, expected), = execute(run_one, [("run", (str(straight), "bench", overrides, run, TEACHER, "cpu", 1))])
    out = tmp_path / "preempted"
    executor = submitit.AutoExecutor(folder=out / "slurm", cluster="local")
    executor.update_parameters(**LOCAL.parameters())
    job = executor.submit(_Resumable(), run_one, (str(out), "bench", overrides, run, TEACHER, "cpu", 1))
    last = out / run.folder / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline:
        time.sleep(0.1)
    tasks = _children(job._process.pid)
    assert last.exists() and len(tasks) == 1
    os.kill(tasks[0], signal.SIGUSR2)  # what Slurm sends before pre-empting a job or at its time limit
    row = job.result()
    assert {k: v for k, v in row.items() if k not in ("seconds", "cpu_seconds")} == {k: v for k, v in expected.items() if k not in ("seconds", "cpu_seconds")}
    assert len(list((out / run.folder).glob("events.out.tfevents.*"))) == 3  # first try, resumed try, summary
    a = torch.load(straight / run.folder / "student.pt", weights_only=True)["model"]
    b = torch.load(out / run.folder / "student.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_slurm_absent_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    out = tmp_path / "study"
    assert main(["study", "--executor", "slurm", "--teacher", TEACHER, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --executor slurm needs Slurm") and "sbatch" in err and "\n" not in err
    assert not out.exists()
    with pytest.raises(ExecutorError, match="not one of"):
        list(execute(print, [("a", ())], executor="ray"))


def test_cluster_flags_reach_the_study(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_run_study(*args, **kwargs):
        seen["executor"], seen["options"] = kwargs["executor"], kwargs["executor_options"]
        raise liaf_lab.experiments.executors.JobsPending("2 runs are submitted")

    monkeypatch.setattr(liaf_lab.experiments.study, "run_study", fake_run_study)
    argv = ["study", "--executor", "slurm", "--partition", "gpu", "--time", "120", "--gpus", "2", "--cpus", "8",
            "--mem-gb", "32", "--array-parallelism", "4", "--no-wait", "--out", str(tmp_path)]
    assert main(argv) == 0 and "2 runs are submitted" in capsys.readouterr().out
    assert seen["executor"] == "slurm"
    assert seen["options"] == SlurmOptions("gpu", 120, 2, 8, 4, 32, wait=False)
    assert seen["options"].parameters() == {
        "name": "liaf-lab", "timeout_min": 120, "gpus_per_node": 2, "cpus_per_task": 8, "tasks_per_node": 1,
        "nodes": 1, "slurm_array_parallelism": 4, "slurm_partition": "gpu", "mem_gb": 32}
