"""LDDistiller (Localization Distillation) against a literal reference of mmdetection's ``LDHead`` LD term,
the ``assignment`` and ``box_bins`` inputs it reads, and its refusal on detectors that cannot serve it."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import SIZES, STRIDES, gen, make_boxes, make_feats
from torch import Tensor

from liaf_lab.distillers import KDInputs, create_distiller, list_distillers, method_label, method_options
from liaf_lab.distillers.ld import LDDistiller
from liaf_lab.engine.steps import DistillStep
from liaf_lab.models import create_detector, fpn_strides, run_detector
from liaf_lab.models.gfl import atss_assign
from liaf_lab.models.taps import prior_assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_syncs import count_device_reads  # noqa: E402
from references.ld import ref_ld_loss

F64 = torch.float64
SMALL = dict(depth=18, min_size=64, max_size=64)


def make_inputs(a: int = 1, reg_max: int = 4, k: int = 3, n: int = 2, seed: int = 0, strides=STRIDES,
                positives: float = 0.3, student_c: int = 2, teacher_c: int = 3) -> KDInputs:
    """Random head outputs ``[n, A*K, H, W]`` and ``[n, A*4*(R+1), H, W]`` on both sides and a random
    assignment with about ``positives`` of the priors positive (box index 0 or 1)."""
    g = gen(seed)
    d = 4 * (reg_max + 1)

    def head():
        return {lvl: {"cls_logits": torch.randn(n, a * k, *SIZES[lvl], generator=g, dtype=F64),
                      "box_bins": 3 * torch.randn(n, a * d, *SIZES[lvl], generator=g, dtype=F64)} for lvl in strides}

    student, teacher = head(), head()
    for out in student.values():
        for x in out.values():
            x.requires_grad_(True)
    assignment = {}
    for lvl in strides:
        p = a * SIZES[lvl][0] * SIZES[lvl][1]
        pos = torch.rand(n, p, generator=g) < positives
        assignment[lvl] = torch.where(pos, torch.randint(0, 2, (n, p), generator=g), torch.full((n, p), -1))
    return KDInputs(make_feats(student_c, n, seed + 1, strides), make_feats(teacher_c, n, seed + 2, strides),
                    make_boxes([2] * n, seed), student_head=student, teacher_head=teacher, assignment=assignment)


def make_ld(strides=STRIDES, student_c: int = 2, teacher_c: int = 3, **kw) -> LDDistiller:
    return LDDistiller(student_c, teacher_c, strides, **kw)


def ld_loss(d: LDDistiller, inputs: KDInputs) -> Tensor:
    return d.loss_terms(inputs)["ld"]


CASES = {
    "one-anchor": dict(a=1),
    "two-anchors": dict(a=2, reg_max=2),
    "single-level": dict(strides={"p4": 8.0}),
    "same-channels": dict(student_c=3),
    "image-without-positives": dict(positives=0.0, n=1),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_loss_and_grads_match_reference(case):
    kw = CASES[case]
    strides = kw.get("strides", STRIDES)
    inputs = make_inputs(**kw)
    d = make_ld(strides, student_c=kw.get("student_c", 2), loss_weight=0.7, temperature=3.0)
    loss = ld_loss(d, inputs)
    want = ref_ld_loss(inputs, d.levels, loss_weight=0.7, temperature=3.0)
    torch.testing.assert_close(loss, torch.as_tensor(want, dtype=F64))
    if kw.get("positives") == 0.0:
        assert float(loss.detach()) == 0.0
    wrt = [inputs.student_head[lvl]["box_bins"] for lvl in d.levels]
    got = torch.autograd.grad(loss, wrt, retain_graph=True)
    ref = torch.autograd.grad(want, wrt, allow_unused=True) if torch.is_tensor(want) and want.requires_grad \
        else [torch.zeros_like(x) for x in wrt]
    for g_got, g_ref in zip(got, ref, strict=True):
        torch.testing.assert_close(g_got, torch.zeros_like(g_got) if g_ref is None else g_ref)


def test_batch_without_boxes_gives_zero_loss_and_zero_gradient():
    inputs = make_inputs(positives=0.0)
    loss = ld_loss(make_ld(), inputs)
    assert float(loss) == 0.0
    loss.backward()
    assert all(bool((out["box_bins"].grad == 0).all()) for out in inputs.student_head.values())


def test_weight_is_the_student_s_top_class_score_without_gradient_and_only_the_student_learns():
    inputs = make_inputs()
    d = make_ld()
    loss = ld_loss(d, inputs)
    assert not math.isclose(float(loss), float(ref_ld_loss(inputs, d.levels, weight_from="teacher")), rel_tol=1e-4)
    loss.backward()
    for lvl in d.levels:
        assert inputs.student_head[lvl]["cls_logits"].grad is None
        assert inputs.student_head[lvl]["box_bins"].grad.abs().sum() > 0
    changed = make_inputs()
    for lvl in d.levels:  # the teacher's class logits are not read
        changed.teacher_head[lvl]["cls_logits"] = changed.teacher_head[lvl]["cls_logits"] + 5
    torch.testing.assert_close(ld_loss(d, changed), ld_loss(d, make_inputs()))


def test_reference_check_is_sensitive_to_the_public_choices():
    """Mean over bins, avg_factor 4 without normalising by the positives, T, the weight."""
    inputs = make_inputs()
    d = make_ld()
    with torch.no_grad():
        loss = float(ld_loss(d, inputs))
        num_pos = sum(int((m >= 0).sum()) for m in inputs.assignment.values())
        for wrong in (ref_ld_loss(inputs, d.levels, mean_over_bins=False),
                      ref_ld_loss(inputs, d.levels, avg_factor=4.0 * num_pos),
                      ref_ld_loss(inputs, d.levels, temperature=1.0),
                      ref_ld_loss(inputs, d.levels, loss_weight=1.0)):
            assert not math.isclose(loss, float(wrong), rel_tol=1e-4)
        torch.testing.assert_close(torch.tensor(loss, dtype=F64), ref_ld_loss(inputs, d.levels))


def test_zero_for_the_teacher_s_own_bins():
    inputs = make_inputs()
    for lvl in inputs.student_head:
        inputs.student_head[lvl]["box_bins"] = inputs.teacher_head[lvl]["box_bins"].clone()
    assert abs(float(ld_loss(make_ld(), inputs))) < 1e-12


def test_gradcheck_tiny_double():
    inputs = make_inputs(strides={"p4": 8.0}, reg_max=2, n=1, positives=0.5)
    d = make_ld({"p4": 8.0}, temperature=2.0)
    bins = inputs.student_head["p4"]["box_bins"].detach().clone().requires_grad_(True)

    def loss(x):
        head = {"p4": {**inputs.student_head["p4"], "box_bins": x}}
        return ld_loss(d, KDInputs(inputs.student_feats, inputs.teacher_feats, inputs.boxes, student_head=head,
                                   teacher_head=inputs.teacher_head, assignment=inputs.assignment))

    assert torch.autograd.gradcheck(loss, (bins,), eps=1e-6, atol=1e-6)


def test_weight_map_is_the_positive_weight_per_cell():
    inputs = make_inputs(a=2)
    maps = make_ld().weight_maps(inputs)
    assert list(maps) == ["positive weight"]
    for lvl, m in maps["positive weight"].items():
        h, w = SIZES[lvl]
        cls = inputs.student_head[lvl]["cls_logits"].detach()
        want = torch.zeros(2, h, w, dtype=F64)
        for i in range(2):
            for y in range(h):
                for x in range(w):
                    for j in range(2):
                        if int(inputs.assignment[lvl][i, (y * w + x) * 2 + j]) >= 0:
                            want[i, y, x] += torch.sigmoid(cls[i, j * 3:(j + 1) * 3, y, x]).max()
        torch.testing.assert_close(m, want)
        assert not m.requires_grad


# -- registry, options, bad input ----------------------------------------------------------------------
def test_registry_and_options():
    assert "ld" in list_distillers() and method_label("ld") == "LD"
    assert method_options("ld") == {"loss_weight": (float, 0.25), "temperature": (float, 10.0)}
    d = create_distiller("ld", 8, 16, {"0": 8.0}, temperature=5.0)
    assert isinstance(d, LDDistiller) and d.temperature == 5.0 and list(d.parameters()) == []
    assert d.needs == {"head_outputs", "assignment"} and d.head_keys == ("cls_logits", "box_bins")


@pytest.mark.parametrize("options,match", [
    ({"loss_weight": -1.0}, r"^distiller 'ld' option loss_weight=\S+ must be a finite number >= 0"),
    ({"temperature": 0.0}, r"^distiller 'ld' option temperature=\S+ must be a finite number > 0"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        make_ld(**options)


def test_bad_inputs_are_one_line_errors():
    d = make_ld()
    inputs = make_inputs()
    with pytest.raises(ValueError, match=r"^distiller 'ld' needs \['assignment', 'head_outputs'\]"):
        d(inputs.student_feats, inputs.teacher_feats, inputs.boxes)
    bad = dict(inputs.assignment, p3=inputs.assignment["p3"].int())
    with pytest.raises(ValueError, match=r"^distiller 'ld': assignment\['p3'\] must be an int64 \[2, A \* 8 \* 10\]"):
        d.loss_terms(KDInputs(inputs.student_feats, inputs.teacher_feats, inputs.boxes, student_head=inputs.student_head,
                              teacher_head=inputs.teacher_head, assignment=bad))
    odd = {lvl: {**out, "box_bins": out["box_bins"][:, :18]} for lvl, out in inputs.student_head.items()}
    odd_t = {lvl: {**out, "box_bins": out["box_bins"][:, :18]} for lvl, out in inputs.teacher_head.items()}
    with pytest.raises(ValueError, match=r"^distiller 'ld': box_bins at level 'p3' must have 4 \* \(R \+ 1\) channels"):
        d.loss_terms(KDInputs(inputs.student_feats, inputs.teacher_feats, inputs.boxes, student_head=odd,
                              teacher_head=odd_t, assignment=inputs.assignment))


def _pair(student_arch: str, teacher_arch: str):
    torch.manual_seed(0)
    teacher = create_detector(teacher_arch, 4, width_mult=0.25, fpn_channels=16, **SMALL)
    student = create_detector(student_arch, 4, width_mult=0.125, fpn_channels=8, **SMALL)
    return student, teacher


@pytest.mark.parametrize("student_arch,teacher_arch,match", [
    ("fcos", "fcos", r"^distiller 'ld' reads the head outputs \['box_bins'\], which the student \(FCOS\) does not give"),
    ("retinanet", "retinanet", r"^distiller 'ld' reads the head outputs \['box_bins'\], which the student \(RetinaNet\)"),
    ("gfl", "fcos", r"^distiller 'ld' reads the head outputs \['box_bins'\], which the teacher \(FCOS\) does not give"),
])
def test_detectors_without_box_bins_are_refused_before_training(student_arch, teacher_arch, match):
    student, teacher = _pair(student_arch, teacher_arch)
    d = create_distiller("ld", 8, 16, fpn_strides(student))
    with pytest.raises(ValueError, match=match) as err:
        DistillStep(student, teacher, d)
    assert "\n" not in str(err.value)


def test_a_student_without_an_assignment_is_refused():
    from liaf_lab.distillers import FeatureDistiller

    class NeedsAssignment(FeatureDistiller):
        needs = frozenset({"assignment"})

    student, teacher = _pair("fcos", "fcos")
    with pytest.raises(ValueError, match=r"^distiller 'base' reads the student's assignment of priors to boxes, which "
                                         r"the student \(FCOS\) does not give \(given by: \['gfl'\]\)$"):
        DistillStep(student, teacher, NeedsAssignment(8, 16, fpn_strides(student)))


# -- through the training step on GFL ------------------------------------------------------------------
def _batch():
    images = [torch.rand(3, 64, 64, generator=gen(1)), torch.rand(3, 48, 64, generator=gen(2))]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 2.0, 60.0, 30.0]]), "labels": torch.tensor([1, 3])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    return images, targets


def test_step_gives_the_student_s_atss_assignment_and_the_loss_of_the_reference():
    student, teacher = _pair("gfl", "gfl")
    d = create_distiller("ld", 8, 16, fpn_strides(student))
    step = DistillStep(student, teacher, d).train()
    images, targets = _batch()
    torch.manual_seed(0)
    _, inputs = step.kd_inputs(images, targets)
    out = run_detector(student, images, targets)
    levels = list(out.priors)
    anchors = torch.cat([out.priors[lvl] for lvl in levels])
    counts = [out.priors[lvl].shape[0] for lvl in levels]
    for i, t in enumerate(out.targets):
        want = atss_assign(anchors, counts, t["boxes"], student.head.atss_topk)
        got = torch.cat([inputs.assignment[lvl][i] for lvl in levels])
        assert torch.equal(got, want)
    assert bool((torch.cat([inputs.assignment[lvl][0] for lvl in levels]) >= 0).any())
    assert bool((torch.cat([inputs.assignment[lvl][1] for lvl in levels]) == -1).all())  # no boxes, no positives
    for lvl in levels:
        assert torch.equal(inputs.student_head[lvl]["box_bins"], inputs.student_head[lvl]["bbox_regression"])
        assert inputs.student_head[lvl]["box_bins"].shape[1] == 4 * (student.reg_max + 1)
    torch.testing.assert_close(d.loss_terms(inputs)["ld"], ref_ld_loss(inputs, levels).to(torch.float32))
    assert torch.equal(prior_assignment(student, out.priors, out.targets)[levels[0]], inputs.assignment[levels[0]])


def test_ld_trains_a_gfl_student_and_its_term_reaches_the_box_head_only():
    student, teacher = _pair("gfl", "gfl")
    step = DistillStep(student, teacher, create_distiller("ld", 8, 16, fpn_strides(student))).train()
    losses = step(*_batch())
    assert "kd_ld" in losses and float(losses["kd_ld"]) > 0
    losses["kd_ld"].backward()
    assert student.head.regression_head.bbox_reg.weight.grad.abs().sum() > 0
    assert student.head.classification_head.cls_logits.weight.grad is None
    assert all(p.grad is None for p in teacher.parameters())


def test_compute_terms_reads_nothing_back():
    inputs = make_inputs()
    with count_device_reads() as reads:
        make_ld().compute_terms(inputs)
    assert reads == []


def test_sums_with_the_prediction_distillers_read_every_part_s_inputs():
    """A combination asks for what any part reads (head outputs by name, the split of the part that splits)."""
    student, teacher = _pair("gfl", "gfl")
    strides = fpn_strides(student)
    both = create_distiller("fitnet+ld", 8, 16, strides)
    assert both.needs == {"head_outputs", "assignment"} and both.head_keys == ("cls_logits", "box_bins")
    losses = DistillStep(student, teacher, both).train()(*_batch())
    assert {"kd_fitnet", "kd_ld"} <= set(losses)
    split = create_distiller("bckd+crosskd", 8, 16, strides, crosskd={"split": 2})
    assert split.split_index == 2
    losses = DistillStep(student, teacher, split).train()(*_batch())
    assert {"kd_bckd_cls", "kd_bckd_loc", "kd_crosskd_cls", "kd_crosskd_reg", "kd_crosskd_box"} <= set(losses)
    with pytest.raises(ValueError, match=r"^distiller 'fitnet\+ld' reads the head outputs \['box_bins'\], which the "
                                         r"student \(FCOS\)"):
        fcos_student, fcos_teacher = _pair("fcos", "fcos")
        DistillStep(fcos_student, fcos_teacher, create_distiller("fitnet+ld", 8, 16, fpn_strides(fcos_student)))
