"""Shared test setup: ``tests/helpers.py`` and the ``tests/references/`` package importable (``helpers``,
``references.<method>``); one torch thread in-process; the ``small`` study overrides.

One thread: tiny models run faster without intra-op threading, and results do not depend on the
machine's core count (subprocess tests set ``OMP_NUM_THREADS`` themselves).
"""

import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """8 training and 4 validation procedural scenes of 64 px (COCO layout): 4 iterations per epoch at batch 2."""
    from liaf_lab.data import generate_scenes

    root = tmp_path_factory.mktemp("shapes")
    generate_scenes(root, 8, (64, 64), seed=0, split="train")
    generate_scenes(root, 4, (64, 64), seed=0, split="val")
    return root


@pytest.fixture
def small(tmp_path) -> list[str]:
    """The bench preset shrunk to seconds: 16/8/8 images of 64 px, 2 iterations per stage."""
    return ["data.num_train=16", "data.num_val=8", "data.num_test=8", "data.image_size=64",
            f"data.cache='{tmp_path / 'cache'}'", "input.min_size=64", "input.max_size=64", "distill.iterations=2",
            "distill.batch_size=2", "distill.warmup=1", "stage1.iterations=2", "stage1.batch_size=2"]
