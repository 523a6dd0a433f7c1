"""The GPU suite (benchmarks/gpu_suite.py) runs end to end in its CPU smoke mode and writes its summaries."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import liaf_lab as ll
from liaf_lab.analysis.efficiency import gpu_suite_latency

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_suite  # noqa: E402
from bench_step import served_methods  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster, and much faster on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_smoke_run_writes_json_and_markdown(tmp_path):
    assert gpu_suite.main(["--device", "cpu", "--smoke", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    sec = summary["sections"]
    assert summary["status"] == "ok" and summary["info"]["smoke"] is True
    latency = gpu_suite_latency(tmp_path / "summary.json")  # what notebook 05's GPU column reads
    assert [r["name"] for r in sec["latency"]["rows"]] == list(latency)
    assert all(latency[r["name"]]["latency_ms"] == r["latency_ms"] for r in sec["latency"]["rows"])
    assert gpu_suite_latency(tmp_path / "missing.json") == {}
    assert list(sec) == ["pytest", "syncs", "amp", "step", "memory", "latency"]
    assert sec["pytest"] == {"status": "skipped", "reason": "no CUDA device: the CUDA tests would all skip"}
    assert sec["syncs"]["reads"]["liaf"]["forward_L5"] <= sec["syncs"]["reads"]["fitnet"]["forward_L5"] + 1
    amp = sec["amp"]
    assert amp["dtype"] == "bfloat16" and len(amp["loss_amp"]) == len(amp["loss_fp32"]) == 2
    assert amp["max_rel_diff"] <= amp["rtol"] and amp["skipped_steps"] == 0
    assert amp["loss_fp32"][1] != amp["loss_fp32"][0]  # the steps do train
    methods = ["none", *served_methods(gpu_suite.smoke_config("tiny"))]  # FCOS: not LD, BCKD, CrossKD
    assert set(ll.list_distillers()) - set(methods) == {"ld", "bckd", "crosskd"}
    assert list(sec["step"]["methods"]) == methods and sec["step"]["methods"]["fitnet"]["ratio_vs_fitnet"] == 1.0
    assert all(sec["memory"]["methods"][m]["step_peak_MiB"] > 0 for m in methods)
    assert [r["name"] for r in sec["latency"]["rows"]] == ["teacher", "student"]
    md = (tmp_path / "summary.md").read_text()
    assert "status: **ok**" in md and "| liaf |" in md and "latency_ms (" in md and "loss_bfloat16" in md


def test_a_failing_section_is_reported_and_the_others_run(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("AMP exploded")

    monkeypatch.setattr(gpu_suite, "run_amp", broken)
    out = ["--device", "cpu", "--smoke", "--out", str(tmp_path), "--skip", "step", "latency"]
    assert gpu_suite.main(out) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed: amp"
    assert summary["sections"]["amp"]["error"] == "RuntimeError: AMP exploded"
    assert summary["sections"]["syncs"]["status"] == "ok"
    assert summary["sections"]["latency"] == {"status": "skipped", "reason": "--skip"}
    assert "failed: RuntimeError: AMP exploded" in (tmp_path / "summary.md").read_text()


def test_cuda_without_a_gpu_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_suite.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device here: run `benchmarks/gpu_suite.sh --device cpu --smoke`"):
        gpu_suite.main(["--out", str(tmp_path)])
