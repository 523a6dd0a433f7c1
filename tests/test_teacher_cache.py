"""Issue 23: the frozen teacher's features shared by the runs of a study (``liaf_lab.engine.teacher_cache``).

The cache must be exact (a student trained through it is bit-identical to one trained without it, whichever run
wrote the entries), keyed so that another teacher or other inputs never read an entry, robust to damaged entries,
and refused up front when it would not fit its bound."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from liaf_lab.experiments.builders import build_datasets, build_detector
from liaf_lab.experiments.config import load_config
from liaf_lab.data import collate_fn
from liaf_lab.engine.teacher_cache import TeacherCache, input_key, teacher_fingerprint
from liaf_lab.models.backbones import fpn_levels
from liaf_lab.experiments.study import TEACHER_CACHE, StudyError, run_study

sys.path.insert(0, str(Path(__file__).parent))
from test_study import TEACHER  # noqa: E402


@pytest.fixture
def teacher_and_batch(small):
    cfg = load_config("bench", small)
    train, _ = build_datasets(cfg)
    teacher = build_detector(cfg, "teacher", len(train.class_names) + 1, weights_path=TEACHER).eval()
    images, _ = collate_fn([train[i] for i in range(4)])
    return teacher, teacher.transform(images)[0].tensors


def _equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) and a[k].stride() == b[k].stride() for k in a)


def test_an_entry_is_read_back_bit_for_bit_and_only_for_the_same_bytes(tmp_path, teacher_and_batch):
    teacher, x = teacher_and_batch
    with torch.no_grad():
        want = fpn_levels(teacher.backbone, x)
    cache = TeacherCache(tmp_path, teacher)
    assert _equal(cache.fpn_levels(teacher.backbone, x), want) and (cache.hits, cache.misses) == (0, 1)
    other = TeacherCache(tmp_path, teacher)  # another run of the study
    assert _equal(other.fpn_levels(teacher.backbone, x), want) and (other.hits, other.misses) == (1, 0)
    y = x.clone()
    y[0, 0, 0, 0] += 1e-3  # one value differs: another key
    assert input_key(y) != input_key(x)
    other.fpn_levels(teacher.backbone, y)
    assert other.misses == 1


def test_features_computed_under_autocast_are_kept_apart_from_float32_ones(tmp_path, teacher_and_batch):
    """A run under ``amp_cpu`` (bfloat16 autocast) and a float32 run of the same seed share a study's cache folder:
    neither reads the other's entries."""
    teacher, x = teacher_and_batch
    with torch.no_grad():
        want = fpn_levels(teacher.backbone, x)
    cache = TeacherCache(tmp_path, teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = cache.fpn_levels(teacher.backbone, x)
        assert _equal(cache.fpn_levels(teacher.backbone, x), low) and (cache.hits, cache.misses) == (1, 1)
    assert all(v.dtype == torch.bfloat16 for v in low.values())
    assert _equal(cache.fpn_levels(teacher.backbone, x), want) and (cache.hits, cache.misses) == (1, 2)
    assert sorted(p.parent.name for p in tmp_path.rglob("*.pt")) == sorted(["autocast_bfloat16", cache.folder.name])


def test_another_teacher_or_thread_count_never_reads_the_entries(tmp_path, teacher_and_batch):
    teacher, x = teacher_and_batch
    first = teacher_fingerprint(teacher)
    changed = copy.deepcopy(teacher)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-6
    assert teacher_fingerprint(changed) != first
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert teacher_fingerprint(teacher) != first
    finally:
        torch.set_num_threads(threads)
    assert teacher_fingerprint(teacher) == first


def test_a_damaged_entry_is_recomputed(tmp_path, teacher_and_batch):
    teacher, x = teacher_and_batch
    cache = TeacherCache(tmp_path, teacher)
    want = cache.fpn_levels(teacher.backbone, x)
    entry = next(cache.folder.glob("*.pt"))
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    again = TeacherCache(tmp_path, teacher)
    assert _equal(again.fpn_levels(teacher.backbone, x), want) and again.misses == 1
    assert _equal(TeacherCache(tmp_path, teacher).fpn_levels(teacher.backbone, x), want)  # rewritten whole


@pytest.mark.slow
def test_students_are_bit_identical_with_and_without_the_cache(tmp_path, small):
    """LIAF-KD (stage 1 and distillation) and FitNet of one seed, through a study with and without the cache: same
    students, and the cache was read (each run after the first of its seed reads what that one computed)."""
    kw = dict(config="bench", methods=["none", "fitnet", "liaf"], seeds=[0], overrides=small, device="cpu",
              teacher_weights=TEACHER)
    off = run_study(tmp_path / "off", teacher_cache=False, **kw)
    on = run_study(tmp_path / "on", teacher_cache=True, **kw)
    for method in ("fitnet", "liaf"):
        folder = f"runs/{method}/default/seed0"
        a = torch.load(tmp_path / "off" / folder / "student.pt", weights_only=True)
        b = torch.load(tmp_path / "on" / folder / "student.pt", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))
        assert not (tmp_path / "off" / folder / "teacher_cache.json").exists()
    strip = [{k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds")} for r in off.rows]
    assert strip == [{k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds")} for r in on.rows]
    used = [json.loads((tmp_path / "on" / f"runs/{m}/default/seed0/teacher_cache.json").read_text())
            for m in ("fitnet", "liaf")]
    assert sum(u["read"] for u in used) > 0
    assert not (tmp_path / "on" / TEACHER_CACHE / "seed0").exists()  # removed once the seed's runs finished


def test_a_cache_that_would_not_fit_is_refused_before_any_run(tmp_path, small):
    with pytest.raises(StudyError, match=r"teacher cache would need about .* GiB .* above the bound of 1e-06 GiB"):
        run_study(tmp_path / "s", "bench", ["none", "fitnet"], [0], overrides=small, device="cpu",
                  teacher_weights=TEACHER, teacher_cache=True, teacher_cache_gb=1e-6)
    assert not (tmp_path / "s" / "runs").exists()
