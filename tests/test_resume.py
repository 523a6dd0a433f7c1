"""Nothing lost, nothing mixed: SIGKILL anywhere then resume, DDP kill/resume and 1-vs-2-process equality."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from liaf_lab.engine import load_checkpoint

HERE = Path(__file__).parent
JOB = HERE / "engine_job.py"
TOY = HERE / "toy_job.py"


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int) -> list[str]:
    return ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}"]


def assert_same_run(a: Path, b: Path, rank: int = 0) -> None:
    """Bit-identical modules (parameters and buffers), optimiser state and metrics.csv (timing aside)."""
    fa = torch.load(a / f"final_rank{rank}.pt", weights_only=True)
    fb = torch.load(b / f"final_rank{rank}.pt", weights_only=True)
    for name, state in fa["modules"].items():
        assert state.keys() == fb["modules"][name].keys()
        for k, v in state.items():
            assert torch.equal(v, fb["modules"][name][k]), f"{name}.{k}"
    oa, ob = fa["optimizer"], fb["optimizer"]
    if oa:
        assert oa["state"].keys() == ob["state"].keys()
        for i, s in oa["state"].items():
            for k, v in s.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob["state"][i][k])), (i, k)

    def rows(run: Path) -> list[dict[str, str]]:
        with (run / "metrics.csv").open() as f:
            return [{k: v for k, v in r.items() if k != "sec_per_iter"} for r in csv.DictReader(f)]

    if rank == 0:
        assert rows(a) == rows(b)


def test_stage2_killed_mid_epoch_and_during_checkpoint_writes_resumes_bit_exact(tiny_data, tmp_path):
    straight = _run([str(JOB), str(tiny_data), str(tmp_path / "a")])
    assert straight.returncode == 0, straight.stderr[-2000:]
    b = tmp_path / "b"
    # 1. kill in the forward of iteration 6 (mid-epoch 2; checkpoints at 3, 6, 7 -> resumes from 3, mid-epoch 1)
    run = _run([str(JOB), str(tiny_data), str(b), "--kill-at", "5"])
    assert run.returncode == -signal.SIGKILL
    assert load_checkpoint(b / "last.pt")["iteration"] == 3
    # 2. resume, and die during the next checkpoint write (iteration 6) after the temporary file is written
    run = _run([str(JOB), str(tiny_data), str(b), "--kill-in-save", "1", "--kill-at-replace", "0"])
    assert run.returncode == -signal.SIGKILL
    assert list(b.glob(".last.pt.*.tmp")), "the killed write should leave its temporary file"
    assert load_checkpoint(b / "last.pt")["iteration"] == 3
    # 3. resume (the orphan is removed), die between the rotation last.pt -> last.prev.pt and the final rename
    run = _run([str(JOB), str(tiny_data), str(b), "--kill-in-save", "1", "--kill-at-replace", "2"])
    assert run.returncode == -signal.SIGKILL
    assert not (b / "last.pt").exists() and load_checkpoint(b / "last.prev.pt")["iteration"] == 3
    # 4. resume from last.prev.pt to the end
    run = _run([str(JOB), str(tiny_data), str(b)])
    assert run.returncode == 0, run.stderr[-2000:]
    assert "removed 1 temporary files" in run.stderr and "resuming from" in run.stderr
    assert not list(b.glob(".*.tmp"))
    assert_same_run(tmp_path / "a", b)


@pytest.mark.parametrize("method", ["mgd", "maskd"])
def test_methods_with_random_masks_or_step_counters_resume_bit_exact(method, tiny_data, tmp_path):
    """MGD draws its masks from the step's generator; MasKD counts steps for its warm-up (here 3 of 7)."""
    common = [str(tiny_data), "--method", method]
    straight = _run([str(JOB), common[0], str(tmp_path / "a"), *common[1:]])
    assert straight.returncode == 0, straight.stderr[-2000:]
    b = tmp_path / "b"
    run = _run([str(JOB), common[0], str(b), *common[1:], "--kill-at", "5"])
    assert run.returncode == -signal.SIGKILL
    run = _run([str(JOB), common[0], str(b), *common[1:]])
    assert run.returncode == 0, run.stderr[-2000:]
    assert_same_run(tmp_path / "a", b)


def test_stage1_killed_mid_epoch_resumes_bit_exact(tiny_data, tmp_path):
    straight = _run([str(JOB), str(tiny_data), str(tmp_path / "a"), "--stage", "stage1", "--iterations", "5"])
    assert straight.returncode == 0, straight.stderr[-2000:]
    b = tmp_path / "b"
    run = _run([str(JOB), str(tiny_data), str(b), "--stage", "stage1", "--iterations", "5", "--kill-at", "4"])
    assert run.returncode == -signal.SIGKILL
    assert load_checkpoint(b / "last.pt")["iteration"] == 3
    run = _run([str(JOB), str(tiny_data), str(b), "--stage", "stage1", "--iterations", "5"])
    assert run.returncode == 0, run.stderr[-2000:]
    assert_same_run(tmp_path / "a", b)


def test_ddp_two_processes_killed_and_resumed_bit_exact_on_every_rank(tiny_data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = [str(JOB), str(tiny_data), "--iterations", "4", "--checkpoint-every", "2"]
    straight = _run([*_torchrun(2), args[0], args[1], str(a), *args[2:]])
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _run([*_torchrun(2), args[0], args[1], str(b), *args[2:], "--kill-at", "3"], env={"KILL_RANK": "1"})
    assert killed.returncode != 0
    assert load_checkpoint(b / "last.pt")["iteration"] == 2
    resumed = _run([*_torchrun(2), args[0], args[1], str(b), *args[2:]])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for rank in (0, 1):
        assert_same_run(a, b, rank)
    w0 = torch.load(a / "final_rank0.pt", weights_only=True)["modules"]["student"]
    w1 = torch.load(a / "final_rank1.pt", weights_only=True)["modules"]["student"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0 if "running" not in k and "num_batches" not in k)


def test_ddp_two_processes_equal_one_process_at_the_same_global_batch(tmp_path):
    """A linear model and MSE (no BatchNorm, no per-batch normaliser): DDP's gradient average then equals
    the global-batch gradient, so the two runs agree up to float summation order (atol 1e-6)."""
    one = _run([str(TOY), str(tmp_path / "one"), "--batch-size", "4"])
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run([*_torchrun(2), str(TOY), str(tmp_path / "two"), "--batch-size", "2"])
    assert two.returncode == 0, two.stderr[-3000:]
    w1 = torch.load(tmp_path / "one" / "final.pt", weights_only=True)
    w2 = torch.load(tmp_path / "two" / "final.pt", weights_only=True)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-6, rtol=0)
    assert not torch.equal(w1["weight"], torch.load(tmp_path / "one" / "init.pt", weights_only=True)["weight"])

    def losses(run: Path) -> list[float]:
        with (run / "metrics.csv").open() as f:
            return [float(r["loss"]) for r in csv.DictReader(f)]

    # The logged loss is the average over ranks, i.e. the global-batch loss.
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "two")), torch.tensor(losses(tmp_path / "one")),
                               atol=1e-6, rtol=1e-6)
