"""Shared test setup: ``tests/reference.py`` importable as ``reference``; one torch thread in-process.

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
