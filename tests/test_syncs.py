"""Device-to-host reads per forward (host syncs on a GPU), and the debug flag that restores the inner checks."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from liaf_lab import LIAFDistiller, list_distillers
from liaf_lab.utils.validation import debug_enabled, set_debug

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_syncs import count_device_reads, distiller_reads, make_inputs  # noqa: E402

# Reads LIAF-KD may make beyond FitNet's in one forward, whatever the number of levels.
EXTRA_READS = 1


@pytest.fixture(autouse=True)
def no_debug():
    """Count with the checks at the boundary only, even when the suite runs under LIAF_DEBUG=1 (one thread:
    the inputs are tiny)."""
    previous, threads = set_debug(False), torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    set_debug(previous)
    torch.set_num_threads(threads)


@pytest.fixture
def debug(no_debug):
    set_debug(True)


def test_count_device_reads_sees_each_read_and_restores_the_methods():
    t = torch.arange(3.0)
    with count_device_reads() as reads:
        bool(t.sum() > 0), t.sum().item(), t.tolist(), int(t[1]), float(t[2]), [0, 1][t[1].long()], t.cpu(), t.numpy()
        t + 1  # computing reads nothing
    assert reads == ["__bool__", "item", "tolist", "__int__", "__float__", "__index__", "cpu", "numpy"]
    bool(t.sum() > 0)
    assert len(reads) == 8  # nothing counted after the block
    assert torch.Tensor.item is torch._C.TensorBase.item


@pytest.mark.parametrize("options", [
    {},
    {"mask_scale": "count", "mask_side": "shared"},
    {"freeze_selectors": False, "detach_scores": False, "normalize": "batch"},
], ids=["default", "count-shared", "learning-selectors"])
def test_liaf_reads_match_fitnet_and_do_not_grow_with_levels(options):
    """Before the checks moved to the step boundary: LIAF 238 reads at 3 levels, 386 at 5; FitNet 22, 26."""
    fitnet = {n: distiller_reads("fitnet", n)["forward"] for n in (3, 5)}
    liaf = {n: distiller_reads("liaf", n, **options) for n in (3, 5)}
    assert fitnet[3] == fitnet[5] == 1  # one fused read of all features and boxes
    assert liaf[3] == liaf[5]
    assert liaf[5]["forward"] <= fitnet[5] + EXTRA_READS
    assert liaf[5]["stage1"] <= fitnet[5] + EXTRA_READS


def test_public_functions_validate_with_one_read_each():
    from liaf_lab import instance_mask, roi_instance_features

    _, _, teacher, boxes, _ = make_inputs(5, torch.device("cpu"))
    with count_device_reads() as reads:
        roi_instance_features(teacher["0"], boxes, 8.0)
    assert len(reads) == 1
    with count_device_reads() as reads:
        instance_mask(boxes, torch.rand(sum(map(len, boxes))), (32, 32), 8.0)
    assert len(reads) == 1


def test_debug_flag_turns_the_inner_checks_on(debug):
    d = LIAFDistiller(8, 16, {"0": 8.0})
    _, student, teacher, boxes, _ = make_inputs(1, torch.device("cpu"))
    teacher["0"][0, 0, 0, 0] = math.nan  # past the boundary: only an inner check can see it
    with pytest.raises(ValueError, match="features contains NaN or inf"):
        d.level_masks("0", student["0"], teacher["0"], boxes, validate=False)
    set_debug(False)
    d.level_masks("0", student["0"], teacher["0"], boxes, validate=False)  # trusted: no check, no error
    with pytest.raises(ValueError, match="features contains NaN or inf"):
        d.level_masks("0", student["0"], teacher["0"], boxes)  # called by a user: checked


def test_debug_mode_reads_per_level(debug):
    assert distiller_reads("liaf", 5)["forward"] > distiller_reads("liaf", 3)["forward"] > 1


def test_debug_env_variable():
    code = "from liaf_lab.utils.validation import debug_enabled; print(debug_enabled())"
    env = {**os.environ, "LIAF_DEBUG": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    assert debug_enabled() is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_reads_per_forward():
    """On a GPU every host sync counts, those inside C++ ops included (set_sync_debug_mode)."""
    counts = {name: {n: distiller_reads(name, n, "cuda") for n in (3, 5)} for name in list_distillers()}
    assert counts["liaf"][3] == counts["liaf"][5]
    assert counts["liaf"][5]["forward"] <= counts["fitnet"][5]["forward"] + EXTRA_READS
