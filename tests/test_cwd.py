"""CWDDistiller against a literal reference of mmrazor's ``ChannelWiseDivergence`` on FPN levels."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import STRIDES, assert_loss_and_grads_close, feature_gradcheck, make_boxes, make_feats

from liaf_lab.distillers import KDInputs, create_distiller, list_distillers, method_label, method_options
from liaf_lab.distillers.cwd import CWDDistiller
from references.cwd import ref_cwd_loss

TEACHER_C = 3


def make_cwd(student_c: int = 2, strides=STRIDES, **kw) -> CWDDistiller:
    torch.manual_seed(0)
    return CWDDistiller(student_c, TEACHER_C, strides, **kw).double()


CASES = {
    "projector-two-levels": (2, STRIDES, (3, 1), 1.0),
    "same-channels-T4": (TEACHER_C, STRIDES, (2, 0), 4.0),
    "batch-without-boxes": (2, STRIDES, (0, 0), 1.0),
    "single-level": (2, {"p3": 4.0}, (1, 2), 0.5),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_loss_and_grads_match_reference(case):
    student_c, strides, counts, tau = CASES[case]
    d = make_cwd(student_c, strides, loss_weight=0.7, temperature=tau)
    assert all(isinstance(d.projectors[lvl], torch.nn.Conv2d) == (student_c != TEACHER_C) for lvl in d.levels)
    student = make_feats(student_c, 2, seed=1, strides=strides, requires_grad=True)
    teacher = make_feats(TEACHER_C, 2, seed=2, strides=strides)
    loss = d(student, teacher, make_boxes(counts), image_size=(32, 40))
    want = ref_cwd_loss(student, teacher, d)
    assert_loss_and_grads_close(loss, want, [*student.values(), *d.parameters()])


def test_zero_for_the_teacher_and_for_a_per_channel_shift_of_it():
    """The spatial softmax ignores a constant added to a channel; the KL is 0 only for equal distributions."""
    d = make_cwd(TEACHER_C)
    t, boxes = make_feats(TEACHER_C, 2, 2), make_boxes((1, 0))
    shifted = {lvl: x + torch.tensor([1.0, -4.0, 9.0]).double()[:, None, None] for lvl, x in t.items()}
    assert float(d(t, t, boxes)) < 1e-12 and float(d(shifted, t, boxes)) < 1e-12
    assert float(d(make_feats(TEACHER_C, 2, 1), t, boxes)) > 0.1


def test_direction_is_teacher_to_student():
    """KL(teacher || student), not the reverse: the two differ for asymmetric maps."""
    d = make_cwd(TEACHER_C, {"p4": 8.0}, loss_weight=1.0)
    s, t = make_feats(TEACHER_C, 1, 1, strides={"p4": 8.0}), make_feats(TEACHER_C, 1, 2, strides={"p4": 8.0})
    t["p4"] = 3 * t["p4"]
    boxes = [torch.zeros(0, 4)]
    forward, reverse = d(s, t, boxes), d(t, s, boxes)
    assert not math.isclose(float(forward), float(reverse), rel_tol=1e-3)
    torch.testing.assert_close(forward, ref_cwd_loss(s, t, d))


def test_gradcheck_tiny_double():
    assert feature_gradcheck(make_cwd(2, {"p4": 8.0}, temperature=2.0), 2, TEACHER_C)


def test_reference_check_is_sensitive_to_temperature_and_weight():
    d = make_cwd(2, temperature=2.0)
    s, t, boxes = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((1, 1))
    with torch.no_grad():
        loss = float(d(s, t, boxes))
    for wrong in (ref_cwd_loss(s, t, d, temperature=1.0), ref_cwd_loss(s, t, d, loss_weight=5.0)):
        assert not math.isclose(loss, float(wrong), rel_tol=1e-3)


def test_registry_options_and_stage2_parameters():
    assert "cwd" in list_distillers() and method_label("cwd") == "CWD"
    assert method_options("cwd") == {"loss_weight": (float, 10.0), "temperature": (float, 1.0)}
    d = create_distiller("cwd", 8, 16, {"0": 8.0}, temperature=4.0)
    assert isinstance(d, CWDDistiller) and d.temperature == 4.0 and not d.two_stage
    assert {id(p) for p in d.stage2_parameters()} == {id(p) for p in d.projectors.parameters()}
    terms = d.loss_terms(KDInputs({"0": torch.randn(2, 8, 4, 4)}, {"0": torch.randn(2, 16, 4, 4)}, [torch.zeros(0, 4)] * 2))
    assert list(terms) == ["cwd"]


def test_no_gradient_into_the_teacher():
    d = make_cwd(2)
    teacher = make_feats(TEACHER_C, 2, 2, requires_grad=True)
    d(make_feats(2, 2, 1), teacher, make_boxes((1, 1))).backward()
    assert all(t.grad is None for t in teacher.values())


@pytest.mark.parametrize("options,match", [
    ({"loss_weight": -1.0}, r"^distiller 'cwd' option loss_weight=\S+ must be a finite number >= 0"),
    ({"temperature": 0.0}, r"^distiller 'cwd' option temperature=\S+ must be a finite number > 0"),
    ({"temperature": float("nan")}, r"^distiller 'cwd' option temperature=\S+ must be a finite number > 0"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        CWDDistiller(2, TEACHER_C, STRIDES, **options)


def test_bad_inputs():
    d = make_cwd(2)
    s, t, boxes = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((1, 1))
    with pytest.raises(ValueError, match="channels"):
        d(s, make_feats(2, 2, 2), boxes)
    with pytest.raises(ValueError):
        d({"p3": s["p3"]}, t, boxes)
