"""One seed fixes every random draw: the same CLI commands in fresh processes give bit-identical files."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from liaf_lab.experiments.config import PROJECT_ROOT

TEACHER = PROJECT_ROOT / "data_samples" / "checkpoints" / "teacher_tiny.pt"


def _overrides(data: Path) -> list[str]:
    sets = [f"data.train_images='{data / 'train'}'", f"data.train_ann='{data / 'annotations' / 'instances_train.json'}'",
            f"data.val_images='{data / 'val'}'", f"data.val_ann='{data / 'annotations' / 'instances_val.json'}'",
            "input.min_size=64", "input.max_size=64", "stage1.iterations=3", "stage1.batch_size=2",
            "distill.iterations=3", "distill.batch_size=2", "distill.warmup=1"]
    return [arg for s in sets for arg in ("--set", s)]


def _cli(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-m", "liaf_lab.cli", *args], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _run_recipe(out: Path, data: Path, seed: int, stage2: bool = True) -> None:
    common = ["--config", "tiny", "--device", "cpu", "--seed", str(seed), *_overrides(data)]
    _cli(["learn-stage1", *common, "--teacher", str(TEACHER), "--out", str(out / "stage1")])
    if stage2:
        _cli(["distill", "--method", "liaf", *common, "--teacher", str(TEACHER),
              "--stage1", str(out / "stage1" / "stage1.pt"), "--out", str(out / "liaf")])


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    def walk(obj, prefix=""):
        if isinstance(obj, torch.Tensor):
            yield prefix, obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield from walk(v, f"{prefix}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from walk(v, f"{prefix}/{i}")

    return dict(walk(torch.load(path, weights_only=True)))


def _metrics(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return [{k: v for k, v in r.items() if k != "sec_per_iter"} for r in csv.DictReader(f)]


def test_same_seed_in_fresh_processes_gives_bit_identical_checkpoints_and_metrics(tiny_data, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _run_recipe(a, tiny_data, seed=0)
    _run_recipe(b, tiny_data, seed=0)
    files = sorted(p.relative_to(a) for p in a.rglob("*.pt"))
    assert {"stage1/stage1.pt", "stage1/last.pt", "liaf/last.pt", "liaf/student.pt"} <= {str(f) for f in files}
    for rel in files:
        ta, tb = _tensors(a / rel), _tensors(b / rel)
        assert ta.keys() == tb.keys(), rel
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{rel}{k}"
    for rel in ("stage1/metrics.csv", "liaf/metrics.csv"):
        assert _metrics(a / rel) == _metrics(b / rel)
    assert json.loads((a / "liaf" / "eval.json").read_text()) == json.loads((b / "liaf" / "eval.json").read_text())
    run = json.loads((a / "liaf" / "run.json").read_text())
    assert run["seed"] == 0 and run["spec"]["config"]["config"]["input"]["min_size"] == 64
    assert {"torch", "threads", "device"} <= run["environment"].keys()
    # Another seed changes the initialisation (the seed is not ignored).
    _run_recipe(c, tiny_data, seed=1, stage2=False)
    sa, sc = _tensors(a / "stage1" / "stage1.pt"), _tensors(c / "stage1" / "stage1.pt")
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
