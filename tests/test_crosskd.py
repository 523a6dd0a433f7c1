"""CrossKDDistiller: the head split of the detectors, and the cross-head loss against a literal reference of
the public CrossKD GFL terms (align_scale, KDQualityFocalLoss, bin KL with class_reduction="sum", GIoU)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from references.common import ref_sigmoid
from test_ld import _batch, _pair, count_device_reads

from liaf_lab.distillers import KDInputs, create_distiller, list_distillers, method_label, method_options
from liaf_lab.distillers.crosskd import CrossKDDistiller
from liaf_lab.engine.steps import DistillStep
from liaf_lab.models import create_detector, fpn_strides, run_detector
from liaf_lab.models.taps import head_from_split, head_split_depth, tower_features
from references.crosskd import ref_crosskd

SMALL = dict(depth=18, min_size=64, max_size=64)


def gfl(width: float, fpn: int, seed: int = 0):
    torch.manual_seed(seed)
    return create_detector("gfl", 4, width_mult=width, fpn_channels=fpn, **SMALL)


# -- the detectors' head split ---------------------------------------------------------------------------
@pytest.mark.parametrize("split", [0, 1, 2, 3, 4])
def test_towers_then_the_rest_of_the_head_is_the_whole_head(split):
    model = gfl(0.125, 16).eval()
    out = run_detector(model, [torch.rand(3, 64, 64), torch.rand(3, 48, 64)])
    rest = head_from_split(model, tower_features(model, out.features, split), split)
    for lvl in out.features:
        for key in ("cls_logits", "box_bins"):
            torch.testing.assert_close(rest[lvl][key], out.head_outputs[lvl][key])
    held = tower_features(model, out.features, 3)["0"]["cls"]
    assert held.min() < 0  # before the ReLU of the 3rd conv, as the public ``activate=False``


def test_only_gfl_heads_split():
    assert head_split_depth(gfl(0.125, 16)) == 4
    fcos, _ = _pair("fcos", "fcos")
    with pytest.raises(ValueError, match=r"^FCOS's head cannot be split \(given by: \['gfl'\]\)$"):
        head_split_depth(fcos)


def step_inputs(student_fpn: int = 8, levels: tuple[str, ...] | None = None, targets=None, **options):
    """A GFL pair (student FPN ``student_fpn``, teacher 16), its DistillStep and one batch's ``KDInputs``."""
    student, teacher = gfl(0.125, student_fpn), gfl(0.25, 16, seed=1)
    strides = fpn_strides(student)
    d = create_distiller("crosskd", student_fpn, 16, {k: strides[k] for k in (levels or strides)}, **options)
    step = DistillStep(student, teacher, d).train()
    images, batch_targets = _batch()
    _, inputs = step.kd_inputs(images, targets or batch_targets)
    return d, step, inputs


CASES = {  # the 1x1 levels p6, p7 of a 64-px input hold one value per GroupNorm group: a constant tower
    "projector-three-levels": dict(levels=("0", "1", "2")),
    "same-width": dict(student_fpn=16, levels=("0", "1", "2")),
    "one-level-split-1": dict(levels=("1",), split=1),
    "split-0-no-boxes": dict(split=0, targets=[{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_terms_and_grads_match_reference(case):
    d, step, inputs = step_inputs(**CASES[case])
    assert all(isinstance(d.projectors[b][lvl], torch.nn.Conv2d) == (d.student_channels[lvl] != 16)
               for b in ("cls", "reg") for lvl in d.levels)
    got = d.loss_terms(inputs)
    want = ref_crosskd(d, inputs)
    assert list(got) == ["cls", "reg", "box"]
    for key in got:
        torch.testing.assert_close(got[key], want[key].to(got[key].dtype), rtol=1e-4, atol=1e-6, msg=key)
    params = [p for p in step.student.parameters() if p.requires_grad] + list(d.parameters())
    total, ref_total = sum(got.values()), sum(want.values())
    for a, b in zip(torch.autograd.grad(total, params, allow_unused=True, retain_graph=True),
                    torch.autograd.grad(ref_total, params, allow_unused=True), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_gradient_reaches_the_student_up_to_the_split_only_and_never_the_teacher():
    d, step, inputs = step_inputs(split=3)
    sum(d.loss_terms(inputs).values()).backward()
    tower = step.student.head.classification_head.conv
    assert tower[0].weight.grad.abs().sum() > 0 and tower[6].weight.grad.abs().sum() > 0  # convs 1 and 3
    assert tower[9].weight.grad is None  # conv 4: after the split, the teacher's is used instead
    assert step.student.head.classification_head.cls_logits.weight.grad is None
    assert all(p.grad is None for p in step.teacher.parameters())
    assert all(p.grad is not None for p in d.parameters())


def test_a_constant_tower_channel_gives_finite_gradients():
    """P6 and P7 of a 64-px input are 1x1: a GroupNorm group of one channel then outputs a constant, whose
    deviation is 0 (``torch.std``'s gradient there is NaN)."""
    d, step, inputs = step_inputs(levels=("p6", "p7"))
    assert bool((inputs.student_tower["p7"]["cls"] == inputs.student_tower["p7"]["cls"][:, :, :1, :1]).all())
    sum(d.loss_terms(inputs).values()).backward()
    grads = [p.grad for p in [*step.student.parameters(), *d.parameters()] if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


def test_reference_check_is_sensitive_to_the_public_choices():
    """(The temperature's effect vanishes for the near-zero bin logits of an untrained head; ``test_ld`` checks it.)"""
    d, _, inputs = step_inputs(levels=("0", "1"))
    with torch.no_grad():
        got = d.loss_terms(inputs)
        assert not math.isclose(float(got["reg"]), float(ref_crosskd(d, inputs, mean_over_bins=True)["reg"]), rel_tol=1e-3)
        assert not math.isclose(float(got["box"]), float(ref_crosskd(d, inputs, box_weight=1.0)["box"]), rel_tol=1e-3)
        assert not math.isclose(float(got["cls"]), float(ref_crosskd(d, inputs, beta=2.0)["cls"]), rel_tol=1e-3)


def test_gradcheck_tiny_double():
    teacher = gfl(0.25, 16, seed=1).double().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    out = run_detector(teacher, [torch.rand(3, 64, 64, dtype=torch.float64), torch.rand(3, 64, 64, dtype=torch.float64)])
    lvl = "1"
    d = CrossKDDistiller(16, 16, {lvl: 16.0}, split=3).double()
    t_tower = tower_features(teacher, {lvl: out.features[lvl]}, 3)
    g = torch.Generator().manual_seed(0)
    s_cls = torch.randn(t_tower[lvl]["cls"].shape, generator=g, dtype=torch.float64, requires_grad=True)
    s_reg = torch.randn(t_tower[lvl]["reg"].shape, generator=g, dtype=torch.float64)
    assignment = {lvl: torch.tensor([[0] + [-1] * 15, [-1] * 16])}

    def loss(x):
        inputs = KDInputs({lvl: torch.zeros(2, 16, 4, 4, dtype=torch.float64)}, {lvl: out.features[lvl]},
                          [torch.zeros(0, 4)] * 2, student_head=out.head_outputs, teacher_head=out.head_outputs,
                          priors={lvl: out.priors[lvl]}, assignment=assignment,
                          student_tower={lvl: {"cls": x, "reg": s_reg}}, teacher_tower=t_tower,
                          teacher_head_from=partial(head_from_split, teacher, split=3))
        return sum(d.loss_terms(inputs).values())

    assert torch.autograd.gradcheck(loss, (s_cls,), eps=1e-6, atol=1e-5)


def test_weight_map_is_the_teacher_s_top_score_per_cell():
    d, _, inputs = step_inputs(levels=("1",))
    (maps,) = d.weight_maps(inputs).values()
    t_cls = inputs.teacher_head["1"]["cls_logits"]
    n, k, h, w = t_cls.shape
    want = torch.tensor([[[max(float(ref_sigmoid(t_cls[i, c, y, x])) for c in range(k)) for x in range(w)]
                          for y in range(h)] for i in range(n)])
    torch.testing.assert_close(maps["1"], want)


def test_compute_terms_reads_nothing_back():
    d, _, inputs = step_inputs()
    with count_device_reads() as reads:
        d.compute_terms(inputs)
    assert reads == []


# -- registry, options, bad input ----------------------------------------------------------------------
def test_registry_and_options():
    assert "crosskd" in list_distillers() and method_label("crosskd") == "CrossKD"
    assert method_options("crosskd") == {"split": (int, 3), "cls_weight": (float, 1.0), "reg_weight": (float, 3.0),
                                         "box_weight": (float, 2.0), "temperature": (float, 1.0), "beta": (float, 1.0)}
    d = create_distiller("crosskd", 8, 16, {"0": 8.0}, split=2)
    assert d.split_index == 2 and d.needs == {"head_outputs", "priors", "assignment", "head_split"}


@pytest.mark.parametrize("options,match", [
    ({"split": -1}, r"^distiller 'crosskd' option split=\S+ must be an int >= 0"),
    ({"split": 1.5}, r"^distiller 'crosskd' option split=\S+ must be an int >= 0"),
    ({"reg_weight": -1.0}, r"^distiller 'crosskd' option reg_weight=\S+ must be a finite number >= 0"),
    ({"temperature": 0.0}, r"^distiller 'crosskd' option temperature=\S+ must be a finite number > 0"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        CrossKDDistiller(8, 16, {"0": 8.0}, **options)


@pytest.mark.parametrize("student_arch,teacher_arch,match", [
    ("fcos", "fcos", r"^distiller 'crosskd' reads the head outputs \['box_bins'\], which the student \(FCOS\)"),
    ("retinanet", "retinanet", r"^distiller 'crosskd' reads the head outputs \['box_bins'\], which the student "
                               r"\(RetinaNet\)"),
])
def test_detectors_that_cannot_serve_it_are_refused_before_training(student_arch, teacher_arch, match):
    student, teacher = _pair(student_arch, teacher_arch)
    with pytest.raises(ValueError, match=match):
        DistillStep(student, teacher, create_distiller("crosskd", 8, 16, fpn_strides(student)))


def test_a_split_beyond_the_towers_is_refused_before_training():
    student, teacher = gfl(0.125, 8), gfl(0.25, 16, seed=1)
    with pytest.raises(ValueError, match=r"^distiller 'crosskd' splits the heads after conv 5, but the student's "
                                         r"towers have 4 convs$"):
        DistillStep(student, teacher, create_distiller("crosskd", 8, 16, fpn_strides(student), split=5))


def test_missing_towers_are_named():
    d, _, inputs = step_inputs()
    inputs.student_tower = None
    with pytest.raises(ValueError, match=r"^distiller 'crosskd' needs \['head_split'\]"):
        d.loss_terms(inputs)


def test_crosskd_trains_a_gfl_student_through_the_step():
    d, step, _ = step_inputs()
    losses = step(*_batch())
    assert {"kd_cls", "kd_reg", "kd_box"} <= set(losses)
    assert all(math.isfinite(float(losses[k].detach())) and float(losses[k].detach()) > 0
               for k in ("kd_cls", "kd_reg", "kd_box"))


def test_a_sum_of_parts_splitting_the_heads_at_different_convs_is_refused():
    from liaf_lab.distillers import CombinedDistiller

    parts = {name: CrossKDDistiller(8, 16, {"0": 8.0}, split=k) for name, k in (("a", 1), ("b", 2))}
    with pytest.raises(ValueError, match=r"^the parts of 'a\+b' split the heads at different convs \[1, 2\]"):
        CombinedDistiller(parts)
    same = CombinedDistiller({name: CrossKDDistiller(8, 16, {"0": 8.0}, split=2) for name in ("a", "b")})
    assert same.split_index == 2
