"""PKDDistiller against a literal reference of mmrazor's ``PKDLoss`` (Pearson-correlation feature KD)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import STRIDES, assert_loss_and_grads_close, feature_gradcheck, make_boxes, make_feats

from liaf_lab.distillers import KDInputs, create_distiller, list_distillers, method_label, method_options
from liaf_lab.distillers.ops import channel_standardise
from liaf_lab.distillers.pkd import PKDDistiller
from references.pkd import ref_pkd_loss

TEACHER_C = 3


def make_pkd(student_c: int = 2, strides=STRIDES, **kw) -> PKDDistiller:
    torch.manual_seed(0)
    return PKDDistiller(student_c, TEACHER_C, strides, **kw).double()


CASES = {
    "projector-two-levels": (2, STRIDES, (3, 1)),
    "same-channels": (TEACHER_C, STRIDES, (2, 0)),
    "batch-without-boxes": (2, STRIDES, (0, 0)),
    "single-level": (2, {"p4": 8.0}, (1, 2)),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_loss_and_grads_match_reference(case):
    student_c, strides, counts = CASES[case]
    d = make_pkd(student_c, strides, loss_weight=0.7)
    assert all(isinstance(d.projectors[lvl], torch.nn.Conv2d) == (student_c != TEACHER_C) for lvl in d.levels)
    student = make_feats(student_c, 2, seed=1, strides=strides, requires_grad=True)
    teacher = make_feats(TEACHER_C, 2, seed=2, strides=strides)
    loss = d(student, teacher, make_boxes(counts), image_size=(32, 40))
    want = ref_pkd_loss(student, teacher, d)
    assert_loss_and_grads_close(loss, want, [*student.values(), *d.parameters()])


def test_loss_is_one_minus_the_pearson_correlation_per_channel():
    """Half the MSE of standardised maps = ``(M - 1) / M * mean_c (1 - r_c)`` up to the 1e-6 (M = N*H*W)."""
    d = make_pkd(TEACHER_C, {"p3": 4.0}, loss_weight=1.0)
    s, t = make_feats(TEACHER_C, 2, 1, strides={"p3": 4.0}), make_feats(TEACHER_C, 2, 2, strides={"p3": 4.0})
    t["p3"] = t["p3"] + 0.8 * s["p3"]  # correlated
    flat_s, flat_t = (x["p3"].transpose(0, 1).flatten(1) for x in (s, t))
    r = torch.stack([torch.corrcoef(torch.stack([a, b]))[0, 1] for a, b in zip(flat_s, flat_t, strict=True)])
    m = flat_s.shape[1]
    torch.testing.assert_close(d(s, t, make_boxes((0, 0))), (m - 1) / m * (1 - r).mean(), rtol=1e-5, atol=1e-6)


def test_invariant_to_each_channel_s_scale_and_shift_and_zero_for_the_teacher_itself():
    d = make_pkd(TEACHER_C)
    s, t, boxes = make_feats(TEACHER_C, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((1, 0))
    scale, shift = torch.tensor([0.5, 3.0, 7.0]).double(), torch.tensor([-2.0, 0.0, 5.0]).double()
    moved = {lvl: x * scale[:, None, None] + shift[:, None, None] for lvl, x in s.items()}
    torch.testing.assert_close(d(moved, t, boxes), d(s, t, boxes), rtol=1e-5, atol=0)  # up to the 1e-6 of std + eps
    assert float(d(t, t, boxes)) < 1e-10
    assert float(d(s, t, boxes)) > 1.0  # independent maps: r near 0, loss near 10 x 2 levels x 1


def test_standardised_channels_have_zero_mean_and_unit_deviation():
    x = make_feats(4, 3, 5)["p3"] * 4 + 1
    hat = channel_standardise(x)
    torch.testing.assert_close(hat.mean(dim=(0, 2, 3)), torch.zeros(4, dtype=x.dtype), atol=1e-12, rtol=0)
    torch.testing.assert_close(hat.std(dim=(0, 2, 3)), torch.ones(4, dtype=x.dtype), atol=1e-6, rtol=0)


def test_a_constant_channel_gives_zero_and_a_finite_gradient():
    d = make_pkd(TEACHER_C, {"p4": 8.0})
    s = make_feats(TEACHER_C, 2, 1, strides={"p4": 8.0}, requires_grad=True)
    t = make_feats(TEACHER_C, 2, 2, strides={"p4": 8.0})
    flat = {"p4": torch.cat([s["p4"][:, :1] * 0 + 3.0, s["p4"][:, 1:]], dim=1)}
    hat = channel_standardise(flat["p4"])
    assert bool((hat[:, 0] == 0).all())
    d(flat, t, make_boxes((0, 0))).backward()
    assert bool(torch.isfinite(s["p4"].grad).all()) and s["p4"].grad[:, 1:].abs().sum() > 0


def test_boxes_change_nothing():
    d = make_pkd(2)
    s, t = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2)
    crossing = [torch.tensor([[-5.0, -3.0, 12.0, 50.0]], dtype=torch.float64), torch.zeros(0, 4, dtype=torch.float64)]
    assert torch.equal(d(s, t, crossing), d(s, t, make_boxes((0, 0))))


def test_gradcheck_tiny_double():
    assert feature_gradcheck(make_pkd(2, {"p4": 8.0}), 2, TEACHER_C)


def test_reference_check_is_sensitive_to_the_weight_and_the_deviation():
    d = make_pkd(2)
    s, t, boxes = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((1, 1))
    with torch.no_grad():
        loss = d(s, t, boxes)
        assert not math.isclose(float(loss), float(ref_pkd_loss(s, t, d, loss_weight=6.0)), rel_tol=1e-3)

        def biased(x):
            return (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True, correction=0)

        biased = d.loss_weight * sum(torch.nn.functional.mse_loss(biased(d.projectors[lvl](s[lvl])), biased(t[lvl])) / 2
                                     for lvl in d.levels)
    assert not math.isclose(float(loss), float(biased), rel_tol=1e-4)


def test_registry_options_and_stage2_parameters():
    assert "pkd" in list_distillers() and method_label("pkd") == "PKD"
    assert method_options("pkd") == {"loss_weight": (float, 10.0)}
    d = create_distiller("pkd", 8, 16, {"0": 8.0}, loss_weight=6.0)
    assert isinstance(d, PKDDistiller) and d.loss_weight == 6.0 and not d.two_stage
    assert {id(p) for p in d.stage2_parameters()} == {id(p) for p in d.projectors.parameters()}
    terms = d.loss_terms(KDInputs({"0": torch.randn(2, 8, 4, 4)}, {"0": torch.randn(2, 16, 4, 4)}, [torch.zeros(0, 4)] * 2))
    assert list(terms) == ["pkd"]


def test_no_gradient_into_the_teacher():
    d = make_pkd(2)
    teacher = make_feats(TEACHER_C, 2, 2, requires_grad=True)
    d(make_feats(2, 2, 1), teacher, make_boxes((1, 1))).backward()
    assert all(t.grad is None for t in teacher.values())


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_bad_options(value):
    with pytest.raises(ValueError, match=r"^distiller 'pkd' option loss_weight=\S+ must be a finite number >= 0"):
        PKDDistiller(2, TEACHER_C, STRIDES, loss_weight=value)


def test_bad_inputs():
    d = make_pkd(2)
    s, t, boxes = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((1, 1))
    with pytest.raises(ValueError, match="channels"):
        d(make_feats(TEACHER_C, 2, 1), t, boxes)
    bad = {k: v.clone() for k, v in s.items()}
    bad["p4"][0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError):
        d(bad, t, boxes)
