"""LIAFDistiller and FitNetDistiller against the literal references (Eq. 2-9) for every option."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from helpers import SIZES, STRIDES, gen, make_boxes, make_feats
from references.fitnet import ref_fitnet_loss
from references.liaf import (
    ref_diversity_loss,
    ref_instance_mask,
    ref_level_scores,
    ref_liaf_loss,
    ref_roi_features,
    ref_scores,
)
from torch import nn
from torch.func import functional_call

from liaf_lab import FeatureDistiller, FitNetDistiller, LIAFDistiller, create_distiller, list_distillers, register_distiller
from liaf_lab.distillers import registry
from liaf_lab.utils.options import Weight

TEACHER_C = 3


def make_liaf(student_c: int = 2, seed: int = 0, **kw) -> LIAFDistiller:
    torch.manual_seed(seed)
    d = LIAFDistiller(student_c, TEACHER_C, STRIDES, num_selectors=3, roi_size=(3, 3), **kw).double()
    g = gen(seed + 100)
    with torch.no_grad():
        for sel in d.selectors.values():
            sel.weight.copy_(torch.randn(sel.weight.shape, generator=g, dtype=torch.float64) * 0.5)
    return d


def ref_kwargs(d: LIAFDistiller) -> dict:
    first = d.selectors[d.levels[0]]
    return dict(
        strides=d.strides,
        selector_weights={lvl: d.selectors[lvl].weight for lvl in d.levels},
        projectors=dict(d.projectors.items()),
        loss_weight=d.loss_weight,
        mask_scale=d.mask_scale,
        mask_side=d.mask_side,
        per_image=first.normalize == "image",
        detach_scores=d.detach_scores,
        freeze_selectors=d.freeze_selectors,
        diversity_weight=None if d.freeze_selectors else d.diversity_weight,
        roi_size=d.roi_size,
        sampling_ratio=d.sampling_ratio,
        logit_factors={lvl: d.selectors[lvl].logit_factor() for lvl in d.levels},
    )


def grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=True))


def assert_grads_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if w is None or g is None:
            # an unused input: both sides must agree that there is no gradient (or an all-zero one)
            other = g if w is None else w
            assert other is None or bool((other == 0).all())
        else:
            torch.testing.assert_close(g, w)


OPTIONS = list(itertools.product(["literal", "count"], ["separate", "shared"], [True, False], [True, False]))


# -- LIAF vs the literal Eq. 9 for every option ----------------------------------------------------------
@pytest.mark.parametrize("student_c", [2, TEACHER_C], ids=["proj-channels", "same-channels"])
@pytest.mark.parametrize("normalize", ["image", "batch"])
@pytest.mark.parametrize("mask_scale,mask_side,detach_scores,freeze_selectors", OPTIONS)
def test_liaf_loss_and_grads_match_reference(student_c, normalize, mask_scale, mask_side, detach_scores, freeze_selectors):
    d = make_liaf(student_c, normalize=normalize, mask_scale=mask_scale, mask_side=mask_side,
                  detach_scores=detach_scores, freeze_selectors=freeze_selectors, loss_weight=0.7,
                  diversity_weight=0.3)
    student = make_feats(student_c, 3, seed=1, requires_grad=True)
    teacher = make_feats(TEACHER_C, 3, seed=2)
    boxes = make_boxes((3, 0, 2), seed=3)
    loss = d(student, teacher, boxes)
    want = ref_liaf_loss(student, teacher, boxes, **ref_kwargs(d))
    torch.testing.assert_close(loss, want)
    wrt = [*student.values(), *d.parameters()]
    assert_grads_close(grads(loss, wrt), grads(want, wrt))


@pytest.mark.parametrize("detach_scores", [True, False])
def test_liaf_without_projector_matches_reference(detach_scores):
    d = make_liaf(TEACHER_C, projector=False, detach_scores=detach_scores, mask_scale="count")
    assert all(isinstance(p, nn.Identity) for p in d.projectors.values())
    student = make_feats(TEACHER_C, 2, seed=1, requires_grad=True)
    teacher = make_feats(TEACHER_C, 2, seed=2)
    boxes = make_boxes((2, 3), seed=3)
    loss = d(student, teacher, boxes)
    want = ref_liaf_loss(student, teacher, boxes, **ref_kwargs(d))
    torch.testing.assert_close(loss, want)
    assert_grads_close(grads(loss, list(student.values())), grads(want, list(student.values())))


@pytest.mark.parametrize("student_c", [2, TEACHER_C])
def test_liaf_with_a_replaced_projector_matches_reference(student_c):
    """A 3x3 projector does not commute with the mask: Eq. 9 must convolve the masked student."""
    d = make_liaf(student_c, detach_scores=False)
    torch.manual_seed(5)
    d.projectors["p3"] = nn.Conv2d(student_c, TEACHER_C, 3, padding=1).double()
    d.projectors["p4"] = nn.Conv2d(student_c, TEACHER_C, 1, bias=False).double()
    student = make_feats(student_c, 2, seed=1, requires_grad=True)
    teacher = make_feats(TEACHER_C, 2, seed=2)
    boxes = make_boxes((3, 1), seed=3)
    loss = d(student, teacher, boxes)
    want = ref_liaf_loss(student, teacher, boxes, **ref_kwargs(d))
    torch.testing.assert_close(loss, want)
    wrt = [*student.values(), *d.parameters()]
    assert_grads_close(grads(loss, wrt), grads(want, wrt))


def test_reference_check_is_sensitive_to_the_mask_option():
    """The comparison above would notice a wrong option: literal and count give different losses."""
    student, teacher, boxes = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((3, 2))
    a = make_liaf(mask_scale="literal")
    b = make_liaf(mask_scale="count")
    with torch.no_grad():
        assert abs(float(a(student, teacher, boxes)) - float(b(student, teacher, boxes))) > 1e-6
        c = make_liaf(mask_side="shared")
        assert abs(float(a(student, teacher, boxes)) - float(c(student, teacher, boxes))) > 1e-6


def test_liaf_masks_match_reference():
    d = make_liaf(2, mask_scale="count")
    student, teacher, boxes = make_feats(2, 3, 1), make_feats(TEACHER_C, 3, 2), make_boxes((2, 0, 4))
    masks = d.masks(student, teacher, boxes)
    for lvl, stride in STRIDES.items():
        w = d.selectors[lvl].weight
        a_t = ref_level_scores(teacher[lvl], boxes, stride, w, roi_size=(3, 3))
        a_s = ref_level_scores(d.projectors[lvl](student[lvl]), boxes, stride, w, roi_size=(3, 3))
        counts = torch.tensor([float(len(b)) for b in boxes for _ in range(len(b))], dtype=torch.float64)
        m_t, m_s = masks[lvl]
        torch.testing.assert_close(m_t, ref_instance_mask(boxes, a_t * counts, SIZES[lvl], stride))
        torch.testing.assert_close(m_s, ref_instance_mask(boxes, a_s * counts, SIZES[lvl], stride))
        assert bool((m_t[1] == 1).all()) and bool((m_s[1] == 1).all())  # image 1 has no instances
        assert not torch.allclose(m_t, m_s)


def test_fitnet_matches_reference():
    torch.manual_seed(0)
    d = FitNetDistiller(2, TEACHER_C, STRIDES, loss_weight=1.5).double()
    student = make_feats(2, 2, 1, requires_grad=True)
    teacher = make_feats(TEACHER_C, 2, 2)
    loss = d(student, teacher, make_boxes((1, 2)))
    want = ref_fitnet_loss(student, teacher, STRIDES, dict(d.projectors.items()), loss_weight=1.5)
    torch.testing.assert_close(loss, want)
    wrt = [*student.values(), *d.parameters()]
    assert_grads_close(grads(loss, wrt), grads(want, wrt))


def test_fitnet_without_projector_is_plain_mse():
    d = FitNetDistiller(TEACHER_C, TEACHER_C, STRIDES, projector=False)
    student, teacher = make_feats(TEACHER_C, 2, 1), make_feats(TEACHER_C, 2, 2)
    want = sum(((student[lvl] - teacher[lvl]) ** 2).mean() for lvl in STRIDES)
    torch.testing.assert_close(d(student, teacher, make_boxes((0, 1))).double(), want)
    assert list(d.parameters()) == []


# -- which parameters learn ------------------------------------------------------------------------
def backward_once(d: LIAFDistiller, student_c: int = 2):
    student = make_feats(student_c, 2, 1, requires_grad=True)
    teacher = make_feats(TEACHER_C, 2, 2, requires_grad=True)
    d(student, teacher, make_boxes((3, 2), seed=4)).backward()
    return student, teacher


def nonzero(t: torch.Tensor | None) -> bool:
    return t is not None and bool((t != 0).any())


@pytest.mark.parametrize("detach_scores", [True, False])
def test_frozen_selectors_get_no_gradient(detach_scores):
    d = make_liaf(freeze_selectors=True, detach_scores=detach_scores)
    _, teacher = backward_once(d)
    assert all(p.grad is None for p in d.selectors.parameters())
    assert all(nonzero(p.grad) for p in d.projectors.parameters())
    assert all(t.grad is None for t in teacher.values())  # the teacher never learns
    assert d.stage2_parameters() == list(d.projectors.parameters())


@pytest.mark.parametrize("detach_scores", [True, False])
def test_learning_selectors_get_distillation_gradient(detach_scores):
    d = make_liaf(freeze_selectors=False, detach_scores=detach_scores, diversity_weight=0.0)
    _, teacher = backward_once(d)
    # mu = 0, so the selectors' gradient comes from the distillation loss alone
    assert all(nonzero(p.grad) for p in d.selectors.parameters())
    assert all(t.grad is None for t in teacher.values())
    assert set(map(id, d.stage2_parameters())) == set(map(id, d.parameters()))


def test_learning_selectors_add_weighted_diversity():
    d = make_liaf(freeze_selectors=False, diversity_weight=0.4)
    student, teacher, boxes = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((1, 1))
    frozen = make_liaf(freeze_selectors=True)
    div = sum(ref_diversity_loss(d.selectors[lvl].weight) for lvl in STRIDES) / len(STRIDES)
    torch.testing.assert_close(d(student, teacher, boxes), frozen(student, teacher, boxes) + 0.4 * div)
    torch.testing.assert_close(d.diversity_loss(), div)


@pytest.mark.parametrize("student_c", [2, TEACHER_C])
def test_detach_scores_false_sends_gradient_through_the_scores(student_c):
    grads_by_option = {}
    for detach in (True, False):
        d = make_liaf(student_c, detach_scores=detach)
        student, _ = backward_once(d, student_c)
        grads_by_option[detach] = ([s.grad for s in student.values()], [p.grad for p in d.projectors.parameters()])
    (s_det, p_det), (s_live, p_live) = grads_by_option[True], grads_by_option[False]
    assert any(not torch.allclose(a, b) for a, b in zip(s_det, s_live, strict=True))
    if student_c != TEACHER_C:
        # the student scores read the projected features, so the projector's gradient changes too
        assert not torch.allclose(p_det[0], p_live[0])
    else:
        # scores read raw student features: the projector's gradient is the same either way
        for a, b in zip(p_det, p_live, strict=True):
            torch.testing.assert_close(a, b)


def test_detached_scores_equal_a_fixed_mask():
    """With detached scores the student gradient is that of an MSE under a constant mask."""
    d = make_liaf(2, detach_scores=True)
    student, teacher, boxes = make_feats(2, 2, 1, requires_grad=True), make_feats(TEACHER_C, 2, 2), make_boxes((2, 3))
    masks = d.masks(student, teacher, boxes)
    loss = d(student, teacher, boxes)
    want = sum(
        ((masks[lvl][0] * teacher[lvl] - d.projectors[lvl](masks[lvl][1] * student[lvl])) ** 2).mean() for lvl in STRIDES
    )
    torch.testing.assert_close(loss, want)
    assert_grads_close(grads(loss, list(student.values())), grads(want, list(student.values())))


# -- LIAF with all masks equal to 1 is FitNet ---------------------------------------------------------
def same_projectors(student_c: int = 2) -> tuple[LIAFDistiller, FitNetDistiller]:
    liaf = make_liaf(student_c)
    fitnet = FitNetDistiller(student_c, TEACHER_C, STRIDES).double()
    fitnet.projectors.load_state_dict(liaf.projectors.state_dict())
    return liaf, fitnet


@pytest.mark.parametrize("student_c", [2, TEACHER_C])
def test_liaf_without_instances_equals_fitnet(student_c):
    liaf, fitnet = same_projectors(student_c)
    student = make_feats(student_c, 2, 1, requires_grad=True)
    teacher = make_feats(TEACHER_C, 2, 2)
    boxes = [torch.zeros(0, 4, dtype=torch.float64)] * 2
    a, b = liaf(student, teacher, boxes), fitnet(student, teacher, boxes)
    torch.testing.assert_close(a, b)
    wrt = list(student.values())
    torch.testing.assert_close(grads(a, wrt), grads(b, wrt))
    for m_t, m_s in liaf.masks(student, teacher, boxes).values():
        assert bool((m_t == 1).all()) and bool((m_s == 1).all())


def test_liaf_with_one_instance_per_image_equals_fitnet():
    """Per-image softmax over a single instance gives A = 1: the literal mask is 1 everywhere."""
    liaf, fitnet = same_projectors()
    student, teacher, boxes = make_feats(2, 3, 1), make_feats(TEACHER_C, 3, 2), make_boxes((1, 1, 1))
    torch.testing.assert_close(liaf(student, teacher, boxes), fitnet(student, teacher, boxes))
    assert not torch.allclose(  # while two instances in an image do change the loss
        liaf(student, teacher, make_boxes((2, 1, 1))), fitnet(student, teacher, make_boxes((2, 1, 1)))
    )


def test_batch_without_instances_gives_finite_loss_and_gradient():
    d = LIAFDistiller(4, 6, {"0": 8, "1": 16})
    student = {"0": torch.randn(2, 4, 8, 8, requires_grad=True), "1": torch.randn(2, 4, 4, 4, requires_grad=True)}
    teacher = {"0": torch.randn(2, 6, 8, 8), "1": torch.randn(2, 6, 4, 4)}
    loss = d(student, teacher, [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert loss.ndim == 0 and bool(torch.isfinite(loss))
    loss.backward()
    assert all(bool(torch.isfinite(s.grad).all()) for s in student.values())


def test_image_without_instances_gets_mask_of_ones():
    d = make_liaf(2, mask_scale="count", mask_side="shared")
    student, teacher, boxes = make_feats(2, 3, 1), make_feats(TEACHER_C, 3, 2), make_boxes((4, 0, 2))
    for m_t, m_s in d.masks(student, teacher, boxes).values():
        assert bool((m_t[1] == 1).all()) and bool((m_s[1] == 1).all())
        assert bool((m_t[0] != 1).any())
        torch.testing.assert_close(m_t, m_s)  # shared mask


# -- stage 1 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_scale", ["literal", "count"])
def test_stage1_masks_teacher_and_weights_diversity(mask_scale):
    d = make_liaf(2, mask_scale=mask_scale, diversity_weight=0.25)
    teacher = make_feats(TEACHER_C, 3, 2, requires_grad=True)
    extra = torch.randn(3, TEACHER_C, 2, 2)
    boxes = make_boxes((2, 0, 3), seed=5)
    out = d.stage1({**teacher, "p5": extra}, boxes)
    masked, div = out.views["liaf"], out.terms["diversity"]
    assert set(masked) == set(STRIDES) and set(out.terms) == {"diversity"}  # only the distiller's levels
    for lvl, stride in STRIDES.items():
        a = ref_level_scores(teacher[lvl].detach(), boxes, stride, d.selectors[lvl].weight, roi_size=(3, 3))
        if mask_scale == "count":
            a = a * torch.tensor([float(len(b)) for b in boxes for _ in range(len(b))], dtype=torch.float64)
        want = teacher[lvl] * ref_instance_mask(boxes, a, SIZES[lvl], stride)
        torch.testing.assert_close(masked[lvl], want)
    ref_div = sum(ref_diversity_loss(d.selectors[lvl].weight) for lvl in STRIDES) / len(STRIDES)
    torch.testing.assert_close(div, 0.25 * ref_div)

    # the gradient of L_task^T + mu L_div reaches the selectors only
    loss = sum((masked[lvl] ** 2).sum() for lvl in STRIDES) + div
    loss.backward()
    assert all(nonzero(p.grad) for p in d.selectors.parameters())
    assert all(p.grad is None for p in d.projectors.parameters())
    assert all(t.grad is None for t in teacher.values())


def test_stage1_selector_gradient_matches_reference():
    d = make_liaf(2)
    teacher, boxes = make_feats(TEACHER_C, 2, 2), make_boxes((3, 2), seed=6)
    out = d.stage1(teacher, boxes)
    masked, div = out.views["liaf"], out.terms["diversity"]
    target = make_feats(TEACHER_C, 2, 9)
    loss = sum(((masked[lvl] - target[lvl]) ** 2).mean() for lvl in STRIDES) + div
    ws = [d.selectors[lvl].weight for lvl in STRIDES]
    want = sum(
        ((teacher[lvl] * ref_instance_mask(boxes, ref_level_scores(teacher[lvl], boxes, s, d.selectors[lvl].weight,
                                                                  roi_size=(3, 3)), SIZES[lvl], s)
          - target[lvl]) ** 2).mean()
        for lvl, s in STRIDES.items()
    ) + sum(ref_diversity_loss(w) for w in ws) / len(ws)
    torch.testing.assert_close(loss, want)
    assert_grads_close(grads(loss, ws), grads(want, ws))


@pytest.mark.parametrize("logit_scale", ["sqrt_dim", "learned"])
@pytest.mark.parametrize("freeze_selectors", [True, False])
def test_liaf_logit_scale_matches_reference(logit_scale, freeze_selectors):
    """Eq. 3 with a temperature: logits times ``1/sqrt(C h w)``, or a learned ``exp(s)`` per level."""
    d = make_liaf(2, logit_scale=logit_scale, freeze_selectors=freeze_selectors, detach_scores=False)
    dim = TEACHER_C * 3 * 3
    if logit_scale == "learned":
        with torch.no_grad():
            d.selectors["p3"].log_scale.fill_(0.7)  # levels differ, and no level sits at its start value
        torch.testing.assert_close(d.selectors["p4"].log_scale, torch.tensor(-0.5 * math.log(dim), dtype=torch.float64))
    student, teacher = make_feats(2, 3, seed=1, requires_grad=True), make_feats(TEACHER_C, 3, seed=2)
    boxes = make_boxes((3, 0, 2), seed=3)
    loss = d(student, teacher, boxes)
    want = ref_liaf_loss(student, teacher, boxes, **ref_kwargs(d))
    torch.testing.assert_close(loss, want)
    wrt = [*student.values(), *d.parameters()]
    assert_grads_close(grads(loss, wrt), grads(want, wrt))
    factors = {lvl: float(d.selectors[lvl].logit_factor()) for lvl in d.levels}
    if logit_scale == "sqrt_dim":
        assert factors == {lvl: dim ** -0.5 for lvl in d.levels}
    # the paper's unscaled logits give another loss: the reference check sees the factor
    unscaled = ref_liaf_loss(student, teacher, boxes, **{**ref_kwargs(d), "logit_factors": None})
    assert abs(float(loss) - float(unscaled)) > 1e-6 * abs(float(loss))
    if logit_scale == "learned":
        scale_grad = torch.autograd.grad(loss, d.selectors["p3"].log_scale, allow_unused=True)[0]
        assert (scale_grad is None) == freeze_selectors
        assert "selectors.p3.log_scale" in dict(d.named_parameters())
        params = {id(p) for p in d.stage2_parameters()}
        assert (id(d.selectors["p3"].log_scale) in params) != freeze_selectors
        stage1 = {id(p) for m in d.stage1_modules().values() for p in m.parameters()}
        assert id(d.selectors["p3"].log_scale) in stage1


def test_liaf_stage1_stats_are_the_selector_entropies():
    d = make_liaf(2)
    teacher, boxes = make_feats(TEACHER_C, 3, 2), make_boxes((3, 1, 2), seed=6)
    stats = d.stage1_stats(teacher, boxes)
    assert set(stats) == {f"selector_entropy_{lvl}" for lvl in d.levels}
    for lvl, stride in STRIDES.items():
        got = stats[f"selector_entropy_{lvl}"]
        assert got.shape == (3, d.selectors[lvl].num_selectors)
        assert bool(got[1].isnan().all())  # one instance: no choice made
        roi, index = ref_roi_features(teacher[lvl], boxes, stride, (3, 3), 2)
        scores = ref_scores(roi, index, d.selectors[lvl].weight)
        for n, first in ((0, 0), (2, 4)):
            for k in range(scores.shape[0]):
                p = scores[k, first:first + len(boxes[n])]
                want = -sum(float(x) * math.log(float(x)) for x in p) / math.log(len(p))
                assert abs(float(got[n, k]) - want) < 1e-9
    with pytest.raises(ValueError, match="channels"):
        d.stage1_stats(make_feats(2, 3, 2), boxes)
    assert FitNetDistiller(2, TEACHER_C, STRIDES).double().stage1_stats(teacher, boxes) == {}


# -- gradcheck of the whole loss ------------------------------------------------------------------------
def test_liaf_loss_gradcheck():
    d = make_liaf(2, mask_scale="count", detach_scores=False, freeze_selectors=False)
    strides = {"p3": 4.0, "p4": 8.0}
    teacher = {lvl: torch.randn(2, TEACHER_C, 4, 5, generator=gen(20), dtype=torch.float64) for lvl in strides}
    boxes = [torch.tensor([[1.0, 2.0, 13.0, 11.0], [5.0, 0.0, 19.0, 9.0]], dtype=torch.float64),
             torch.tensor([[0.5, 0.5, 9.0, 15.5]], dtype=torch.float64)]
    names = ["selectors.p3.weight", "selectors.p4.weight", "projectors.p3.weight"]

    def f(s3, s4, w3, w4, pw):
        params = dict(zip(names, (w3, w4, pw), strict=True))
        return functional_call(d, params, ({"p3": s3, "p4": s4}, teacher, boxes))

    s3 = torch.randn(2, 2, 4, 5, generator=gen(21), dtype=torch.float64, requires_grad=True)
    s4 = torch.randn(2, 2, 4, 5, generator=gen(22), dtype=torch.float64, requires_grad=True)
    inputs = [s3, s4] + [dict(d.named_parameters())[n].detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(f, tuple(inputs))


# -- registry -----------------------------------------------------------------------------------------
def test_registry_lists_and_creates():
    assert {"fitnet", "liaf"} <= set(list_distillers())
    assert list_distillers() == sorted(list_distillers())
    d = create_distiller("liaf", student_channels=4, teacher_channels=6, strides={"0": 8}, num_selectors=2,
                         mask_scale="count")
    assert type(d) is LIAFDistiller and d.mask_scale == "count" and d.selectors["0"].num_selectors == 2
    assert d.method_name == "liaf"
    f = create_distiller("fitnet", student_channels=4, teacher_channels=6, strides={"0": 8})
    assert type(f) is FitNetDistiller and f.method_name == "fitnet"
    with pytest.raises(ValueError, match="unknown distiller 'nope'"):
        create_distiller("nope", 4, 6, {"0": 8})


def test_register_distiller_adds_and_rejects_duplicates():
    try:
        @register_distiller("test-dummy")
        class Dummy(FeatureDistiller):
            @dataclass(frozen=True)
            class Options(FeatureDistiller.Options):
                scale: Weight = 1.0

        assert "test-dummy" in list_distillers()
        made = create_distiller("test-dummy", 4, 6, {"0": 8}, scale=3)
        assert isinstance(made, Dummy) and made.scale == 3.0 and Dummy.method_name == "test-dummy"
        assert made.options == Dummy.Options(scale=3.0)
        with pytest.raises(ValueError, match="already registered"):
            register_distiller("test-dummy")(Dummy)
        with pytest.raises(ValueError, match=r"distiller 'test-bare' \(Bare\) must declare its options"):
            register_distiller("test-bare")(type("Bare", (FeatureDistiller,), {}))
    finally:
        registry._REGISTRY.pop("test-dummy", None)
    assert "test-dummy" not in list_distillers()


def test_paper_literal_variant_is_liaf_with_the_literal_options_fixed():
    """``liaf_paper``: the same class and losses as ``liaf`` built with the paper's readings."""
    from liaf_lab.distillers import method_label, method_options, variant_of

    literal = {"normalize": "batch", "mask_scale": "literal", "mask_side": "separate", "logit_scale": "none"}
    assert variant_of("liaf_paper") == ("liaf", literal) and variant_of("liaf") == ("liaf", {})
    assert method_label("liaf_paper") == "LIAF-KD (paper-literal)"
    ours, paper = method_options("liaf"), method_options("liaf_paper")
    assert ours.keys() == paper.keys() and ours["normalize"][1] == "image"
    assert {k: v[1] for k, v in paper.items()} == {**{k: v[1] for k, v in ours.items()}, **literal}
    assert all(paper[k][0] == ours[k][0] for k in ours)  # same option types
    strides = {"0": 8.0, "1": 16.0}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        d = create_distiller("liaf_paper", 4, 6, strides, mask_scale="count")  # a given option still wins
        torch.manual_seed(0)
        ref = create_distiller("liaf", 4, 6, strides, **{**literal, "mask_scale": "count"})
    assert isinstance(d, LIAFDistiller) and d.method_name == "liaf_paper" and d.mask_scale == "count"
    assert all(s.normalize == "batch" for s in d.selectors.values())
    assert all(torch.equal(a, b) for a, b in zip(d.state_dict().values(), ref.state_dict().values(), strict=True))
    s = {lvl: torch.randn(2, 4, 8, 8) for lvl in strides}
    t = {lvl: torch.randn(2, 6, 8, 8) for lvl in strides}
    boxes = [torch.tensor([[2.0, 2.0, 30.0, 40.0], [10.0, 5.0, 50.0, 60.0]]), torch.tensor([[0.0, 0.0, 20.0, 20.0]])]
    assert torch.equal(d(s, t, boxes), ref(s, t, boxes))  # batch softmax couples the two images in both
    with pytest.raises(ValueError, match="unknown distiller 'liaf' option 'nope'"):
        registry.register_variant("test-variant", of="liaf", label="x", nope=1)
    assert "test-variant" not in list_distillers()


@pytest.mark.parametrize("option,value", [("mask_scale", "sum"), ("mask_side", "student"), ("normalize", "all")])
def test_liaf_rejects_unknown_options(option, value):
    with pytest.raises(ValueError, match=option):
        LIAFDistiller(2, 3, STRIDES, **{option: value})
