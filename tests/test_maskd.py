"""MasKDDistiller against literal references of the public code (hunto/MasKD: ``MaskModule``,
``dice_coeff``, ``MasKDLoss``, ``maskd_hook.py``), written as Python loops over images, tokens,
channels and cells."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import STRIDES, gen, make_boxes, make_feats
from torch import Tensor, nn
from torch.func import functional_call

from liaf_lab.distillers import create_distiller, method_label, method_options
from liaf_lab.distillers.base import KDInputs
from liaf_lab.distillers.maskd import MasKDDistiller

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_syncs import count_device_reads
from references.maskd import ref_maskd_loss, ref_stage1

TEACHER_C = 3
TOKENS = 3


def make_maskd(student_c: int = 2, seed: int = 0, strides=STRIDES, **kw) -> MasKDDistiller:
    """A double-precision distiller whose tokens are large enough to give varied masks."""
    torch.manual_seed(seed)
    kw.setdefault("num_tokens", TOKENS)
    d = MasKDDistiller(student_c, TEACHER_C, strides, **kw).double()
    g = gen(seed + 100)
    with torch.no_grad():
        for m in d.mask_modules.values():
            m.mask_token.copy_(torch.randn(m.mask_token.shape, generator=g, dtype=torch.float64))
            if m.prob is not None:
                m.prob[2].bias.copy_(torch.randn(m.prob[2].bias.shape, generator=g, dtype=torch.float64))
    return d


def grads(loss: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(loss, tensors, retain_graph=True))


def nonzero(t: Tensor | None) -> bool:
    return t is not None and bool((t != 0).any())


# -- stage 2 vs the reference ----------------------------------------------------------------------
@pytest.mark.parametrize("student_c", [2, TEACHER_C], ids=["proj-channels", "same-channels"])
@pytest.mark.parametrize("weight_mask", [True, False])
@pytest.mark.parametrize("custom_mask,warmup", [(True, 0), (True, 5), (False, 0)], ids=["custom", "warmup", "teacher"])
def test_loss_and_grads_match_reference(student_c, weight_mask, custom_mask, warmup):
    d = make_maskd(student_c, weight_mask=weight_mask, custom_mask=custom_mask, custom_mask_warmup=warmup,
                   loss_weight=0.7)
    student = make_feats(student_c, 2, seed=1, requires_grad=True)
    teacher = make_feats(TEACHER_C, 2, seed=2)
    loss = d(student, teacher, make_boxes((3, 0), seed=3))
    want = ref_maskd_loss(d, student, teacher, use_student_mask=custom_mask and warmup == 0)
    torch.testing.assert_close(loss, want)
    wrt = [*student.values(), *d.projectors.parameters()]
    torch.testing.assert_close(grads(loss, wrt), grads(want, wrt))


def test_loss_ignores_boxes():
    """MasKD reads no boxes: an image without boxes, a batch without boxes and boxes across the border agree."""
    d = make_maskd(2, custom_mask=False)
    student, teacher = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2)
    crossing = [torch.tensor([[-5.0, -3.0, 50.0, 12.0]], dtype=torch.float64),
                torch.tensor([[30.0, 20.0, 45.0, 40.0]], dtype=torch.float64)]
    losses = [d(student, teacher, b) for b in (make_boxes((3, 0)), make_boxes((0, 0)), crossing)]
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0])
    torch.testing.assert_close(losses[0], ref_maskd_loss(d, student, teacher, False))


def test_single_level_and_differing_strides():
    one = {"p4": 8.0}
    d = make_maskd(2, strides=one, custom_mask_warmup=0)
    student, teacher = make_feats(2, 2, 1, strides=one), make_feats(TEACHER_C, 2, 2, strides=one)
    loss = d(student, teacher, make_boxes((1, 2)), image_size=(32, 40))
    torch.testing.assert_close(loss, ref_maskd_loss(d, student, teacher, True))
    two = make_maskd(2, custom_mask_warmup=0)  # p3 at stride 4 (8 x 10), p4 at stride 8 (4 x 5)
    student, teacher = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2)
    loss = two(student, teacher, make_boxes((1, 2)), image_size=(32, 40))
    torch.testing.assert_close(loss, ref_maskd_loss(two, student, teacher, True))


def test_reference_check_is_sensitive_to_the_options():
    student, teacher, boxes = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((1, 1))
    with torch.no_grad():
        weighted = make_maskd(custom_mask=False)(student, teacher, boxes)
        mean = make_maskd(custom_mask=False, weight_mask=False)(student, teacher, boxes)
        custom = make_maskd(custom_mask=True, custom_mask_warmup=0)(student, teacher, boxes)
        assert abs(float(weighted - mean)) > 1e-4
        assert abs(float(weighted - custom)) > 1e-4
        # the student mask reads the aligned student: another projector gives another mask
        d = make_maskd(custom_mask=True, custom_mask_warmup=0)
        a = ref_maskd_loss(d, student, teacher, True)
        torch.testing.assert_close(d(student, teacher, boxes), a)
        assert abs(float(a - ref_maskd_loss(d, student, teacher, False))) > 1e-4


def test_loss_gradcheck():
    """With the teacher mask alone (the student mask is a constant to autograd, as in the public code's
    ``no_grad``, so finite differences would see it move)."""
    d = make_maskd(2, custom_mask=False, strides={"p4": 8.0})
    teacher = {"p4": torch.randn(2, TEACHER_C, 3, 4, generator=gen(20), dtype=torch.float64)}
    names = ["projectors.p4.weight", "projectors.p4.bias"]

    def f(s, w, b):
        return functional_call(d, dict(zip(names, (w, b), strict=True)), ({"p4": s}, teacher, [torch.zeros(0, 4)] * 2))

    s = torch.randn(2, 2, 3, 4, generator=gen(21), dtype=torch.float64, requires_grad=True)
    params = [dict(d.named_parameters())[n].detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(f, (s, *params))


# -- warm-up of the student mask --------------------------------------------------------------------
def test_warmup_switches_to_the_product_mask_after_the_warmup_calls():
    d = make_maskd(2, custom_mask_warmup=2)
    student, teacher, boxes = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((1, 0))
    teacher_only = ref_maskd_loss(d, student, teacher, False)
    product = ref_maskd_loss(d, student, teacher, True)
    assert abs(float((teacher_only - product).detach())) > 1e-4
    got = []
    for _ in range(3):
        got.append(d(student, teacher, boxes).detach())
    torch.testing.assert_close(got[0], teacher_only)
    torch.testing.assert_close(got[1], teacher_only)
    torch.testing.assert_close(got[2], product)
    assert d.kd_steps.dtype == torch.long and d.kd_steps.shape == () and int(d.kd_steps) == 3


def test_eval_calls_do_not_advance_the_counter():
    d = make_maskd(2, custom_mask_warmup=2)
    student, teacher, boxes = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((1, 0))
    d.eval()
    for _ in range(3):
        torch.testing.assert_close(d(student, teacher, boxes), ref_maskd_loss(d, student, teacher, False))
    assert int(d.kd_steps) == 0
    d.train()
    d(student, teacher, boxes)
    d(student, teacher, boxes)
    d.eval()  # after two training calls the warm-up is over, in eval mode as well
    torch.testing.assert_close(d(student, teacher, boxes), ref_maskd_loss(d, student, teacher, True))
    assert int(d.kd_steps) == 2


def test_state_dict_round_trip_keeps_the_counter():
    d = make_maskd(2, custom_mask_warmup=2)
    student, teacher, boxes = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((1, 0))
    for _ in range(2):
        d(student, teacher, boxes)
    state = d.state_dict()
    assert "kd_steps" in state and int(state["kd_steps"]) == 2
    fresh = make_maskd(2, seed=7, custom_mask_warmup=2)
    assert int(fresh.kd_steps) == 0
    fresh.load_state_dict(state)
    assert int(fresh.kd_steps) == 2
    a, b = d(student, teacher, boxes), fresh(student, teacher, boxes)
    assert torch.equal(a, b)  # both in the product phase, bit-identical
    torch.testing.assert_close(a, ref_maskd_loss(d, student, teacher, True))
    assert int(d.kd_steps) == int(fresh.kd_steps) == 3


def test_compute_terms_reads_nothing_from_the_device():
    d = make_maskd(2, custom_mask_warmup=1)
    inputs = KDInputs(make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((1, 0)))
    with count_device_reads() as reads:
        for _ in range(2):
            d.compute_terms(inputs)
    assert reads == []


# -- stage 1 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight_mask", [True, False])
def test_stage1_view_and_dice_match_reference(weight_mask):
    d = make_maskd(2, weight_mask=weight_mask)
    teacher = make_feats(TEACHER_C, 2, 2, requires_grad=True)
    extra = torch.randn(2, TEACHER_C, 2, 2, dtype=torch.float64)
    out = d.stage1({**teacher, "p5": extra}, make_boxes((2, 0), seed=5))
    assert set(out.views) == {"maskd"} and set(out.terms) == {"dice"}
    assert set(out.views["maskd"]) == set(STRIDES)  # only the distiller's levels
    want_views, want_dice = ref_stage1(d, {lvl: v.detach() for lvl, v in teacher.items()})
    for lvl in STRIDES:
        torch.testing.assert_close(out.views["maskd"][lvl], want_views[lvl])
    torch.testing.assert_close(out.terms["dice"], want_dice)

    # a differentiable stand-in for the teacher head: its gradient reaches the mask modules only
    loss = sum((v ** 2).sum() for v in out.views["maskd"].values()) + out.terms["dice"]
    loss.backward()
    assert all(nonzero(p.grad) for p in d.stage1_modules()["tokens"].parameters())
    assert all(p.grad is None for p in d.projectors.parameters())
    assert all(t.grad is None for t in teacher.values())


def test_stage1_token_gradient_matches_reference():
    d = make_maskd(2)
    teacher = make_feats(TEACHER_C, 2, 2)
    out = d.stage1(teacher, make_boxes((1, 1)))
    loss = sum((v ** 2).sum() for v in out.views["maskd"].values()) + out.terms["dice"]
    views, dice = ref_stage1(d, teacher)
    want = sum((v ** 2).sum() for v in views.values()) + dice
    torch.testing.assert_close(loss, want)
    wrt = list(d.mask_modules.parameters())
    torch.testing.assert_close(grads(loss, wrt), grads(want, wrt))


class Stage1Loss(nn.Module):
    """Stage 1 of a distiller as a module (for ``functional_call``): ``sum view^2 + dice``."""

    def __init__(self, distiller: MasKDDistiller) -> None:
        super().__init__()
        self.distiller = distiller

    def forward(self, teacher: dict[str, Tensor]) -> Tensor:
        out = self.distiller.compute_stage1(teacher, [], None)
        return sum((v ** 2).sum() for v in out.views["maskd"].values()) + out.terms["dice"]


def test_stage1_gradcheck():
    d = make_maskd(2, strides={"p4": 8.0})
    teacher = {"p4": torch.randn(2, TEACHER_C, 3, 4, generator=gen(30), dtype=torch.float64)}
    wrapper = Stage1Loss(d)
    names = [f"distiller.mask_modules.{n}" for n, _ in d.mask_modules.named_parameters()]

    def f(*params):
        return functional_call(wrapper, dict(zip(names, params, strict=True)), (teacher,))

    params = [p.detach().clone().requires_grad_() for p in d.mask_modules.parameters()]
    assert torch.autograd.gradcheck(f, tuple(params))


def test_dice_of_identical_masks_is_one():
    d = make_maskd(2, strides={"p4": 8.0})
    with torch.no_grad():
        d.mask_modules["p4"].mask_token.copy_(torch.ones(TOKENS, TEACHER_C, dtype=torch.float64))
    out = d.stage1(make_feats(TEACHER_C, 2, 2, strides={"p4": 8.0}), make_boxes((0, 0)))
    torch.testing.assert_close(out.terms["dice"], torch.tensor(1.0, dtype=torch.float64))


# -- which parameters learn -------------------------------------------------------------------------
@pytest.mark.parametrize("student_c", [2, TEACHER_C])
def test_stage2_trains_the_projectors_only(student_c):
    d = make_maskd(student_c, custom_mask_warmup=0)
    assert all(isinstance(p, nn.Conv2d) for p in d.projectors.values())  # the align conv, also for equal channels
    assert d.stage1_modules() == {"tokens": d.mask_modules}
    assert d.stage2_parameters() == list(d.projectors.parameters())
    student = make_feats(student_c, 2, 1, requires_grad=True)
    teacher = make_feats(TEACHER_C, 2, 2, requires_grad=True)
    d(student, teacher, make_boxes((1, 1))).backward()
    assert all(nonzero(p.grad) for p in d.projectors.parameters())
    assert all(nonzero(s.grad) for s in student.values())
    assert all(p.grad is None for p in d.mask_modules.parameters())  # frozen tokens
    assert all(t.grad is None for t in teacher.values())


def test_init_is_seeded_and_follows_the_public_scales():
    torch.manual_seed(3)
    d1 = MasKDDistiller(4, 16, {"0": 8, "1": 16})
    torch.manual_seed(3)
    d2 = MasKDDistiller(4, 16, {"0": 8, "1": 16})
    for (n1, p1), (n2, p2) in zip(d1.state_dict().items(), d2.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    m = d1.mask_modules["0"].requires_grad_(False)
    assert m.mask_token.shape == (6, 16) and float(m.mask_token.std()) < 0.02
    assert m.prob[0].weight.shape == (16, 16, 3, 3) and m.prob[2].weight.shape == (6, 16, 1, 1)
    assert float(m.prob[0].bias.abs().max()) == 0 and float(m.prob[2].bias.abs().max()) == 0
    assert abs(float(m.prob[0].weight.std()) - math.sqrt(2 / (9 * 16))) < 0.03
    assert MasKDDistiller(4, 16, {"0": 8}, weight_mask=False).mask_modules["0"].prob is None


# -- registry, options, bad input -------------------------------------------------------------------
def test_registry_and_defaults():
    d = create_distiller("maskd", student_channels=4, teacher_channels=8, strides={"0": 8})
    assert type(d) is MasKDDistiller and d.method_name == "maskd" and method_label("maskd") == "MasKD"
    assert d.two_stage and not d.stage1_ready
    opts = method_options("maskd")
    assert {k: v[1] for k, v in opts.items()} == {
        "loss_weight": 7.0, "num_tokens": 6, "weight_mask": True, "custom_mask": True,
        "custom_mask_warmup": 7000, "projector": True}


def test_forward_is_the_sum_of_loss_terms():
    d = make_maskd(2, custom_mask_warmup=0).eval()
    student, teacher, boxes = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((2, 1))
    terms = d.loss_terms(KDInputs(student, teacher, boxes))
    assert list(terms) == ["maskd"]
    torch.testing.assert_close(d(student, teacher, boxes), sum(terms.values()))


@pytest.mark.parametrize("option,value", [("loss_weight", -1.0), ("loss_weight", float("nan")), ("num_tokens", 1),
                                          ("custom_mask_warmup", -1)])
def test_bad_options(option, value):
    with pytest.raises(ValueError, match=option):
        MasKDDistiller(2, 3, STRIDES, **{option: value})


def test_no_projector_needs_equal_channels():
    with pytest.raises(ValueError, match="projector"):
        MasKDDistiller(2, 3, STRIDES, projector=False)
    d = make_maskd(TEACHER_C, projector=False, custom_mask_warmup=0)
    assert all(isinstance(p, nn.Identity) for p in d.projectors.values())
    student, teacher = make_feats(TEACHER_C, 2, 1), make_feats(TEACHER_C, 2, 2)
    torch.testing.assert_close(d(student, teacher, make_boxes((1, 0))), ref_maskd_loss(d, student, teacher, True))


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_wrong_channels(side):
    d = make_maskd(2)
    student, teacher = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2)
    if side == "student":
        student = make_feats(4, 2, 1)
    else:
        teacher = make_feats(5, 2, 2)
    with pytest.raises(ValueError, match="channels"):
        d(student, teacher, make_boxes((1, 0)))
    with pytest.raises(ValueError, match="channels"):
        d.loss_terms(KDInputs(student, teacher, make_boxes((1, 0))))
    if side == "teacher":
        with pytest.raises(ValueError, match="channels"):
            d.stage1(teacher, make_boxes((1, 0)))
    assert int(d.kd_steps) == 0  # a rejected call does not count


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_nan_features(side):
    d = make_maskd(2)
    student, teacher = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2)
    (student if side == "student" else teacher)["p4"][0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError):
        d(student, teacher, make_boxes((1, 0)))
    if side == "teacher":
        with pytest.raises(ValueError):
            d.stage1(teacher, make_boxes((1, 0)))
