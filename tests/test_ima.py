"""IMADistiller (Instance Mask Alignment) against a literal, slow reference of the reconstructed loss."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import STRIDES, assert_default_generator_draws, assert_seeded_draws, gen, make_boxes, make_feats

from liaf_lab.distillers import KDInputs, create_distiller, list_distillers, method_label, method_options
from liaf_lab.distillers.ima import IMADistiller

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_syncs import count_device_reads  # noqa: E402
from references.ima import ref_ima_loss

TEACHER_C = 3
IMAGE_SIZE = (32, 40)


def make_ima(student_c: int = 2, seed: int = 0, strides=STRIDES, **kw) -> IMADistiller:
    torch.manual_seed(seed)
    return IMADistiller(student_c, TEACHER_C, strides, **kw).double()


def grads(loss, tensors):
    return list(torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=True))


# Boxes that overlap, nest, cross the border and cover no cell (8 x 10 / 4 x 5 grids on a 32 x 40 input).
EDGE_BOXES = [
    torch.tensor([[-6.0, -4.0, 18.0, 21.0], [2.0, 3.0, 13.0, 11.0], [30.0, 20.0, 47.0, 39.0], [21.0, 5.0, 22.5, 6.0]],
                 dtype=torch.float64),
    torch.tensor([[-1.0, 10.0, 41.0, 33.0], [4.0, 12.0, 12.0, 20.0]], dtype=torch.float64),
]
BOXES = {
    "random": lambda: make_boxes((3, 2), seed=3),
    "image-without-boxes": lambda: make_boxes((2, 0), seed=3),
    "batch-without-boxes": lambda: make_boxes((0, 0), seed=3),
    "edge": lambda: EDGE_BOXES,
}


# -- loss and gradients vs the reference ----------------------------------------------------------------
@pytest.mark.parametrize("standardize", ["both", "student", "none"])
@pytest.mark.parametrize("instance", ["image", "box"])
@pytest.mark.parametrize("boxes", list(BOXES), ids=list(BOXES))
def test_loss_and_grads_match_reference(boxes, instance, standardize):
    d = make_ima(2, instance=instance, standardize=standardize, loss_weight=0.7, alpha=3.0)
    student = make_feats(2, 2, seed=1, requires_grad=True)
    teacher = make_feats(TEACHER_C, 2, seed=2)
    b = BOXES[boxes]()
    loss = d(student, teacher, b, image_size=IMAGE_SIZE, generator=gen(7))
    want = ref_ima_loss(student, teacher, b, d, gen(7))
    torch.testing.assert_close(loss, want)
    wrt = [*student.values(), *d.parameters()]
    for got, ref in zip(grads(loss, wrt), grads(want, wrt), strict=True):
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("mask_ratio", [0.0, 0.45, 0.9])
@pytest.mark.parametrize("scale_deflation", [True, False])
@pytest.mark.parametrize("instance", ["image", "box"])
def test_mask_ratio_and_scale_deflation_match_reference(instance, scale_deflation, mask_ratio):
    d = make_ima(TEACHER_C, instance=instance, mask_ratio=mask_ratio, scale_deflation=scale_deflation)
    student, teacher = make_feats(TEACHER_C, 2, 1), make_feats(TEACHER_C, 2, 2)
    with torch.no_grad():
        loss = d(student, teacher, EDGE_BOXES, generator=gen(5))
        torch.testing.assert_close(loss, ref_ima_loss(student, teacher, EDGE_BOXES, d, gen(5)))


def test_projector_grads_match_reference_after_backward():
    """``.grad`` of the ``f_align`` convs (``projector=True``: every level) after ``backward``."""
    d = make_ima(2, instance="box", projector=True)
    student = make_feats(2, 2, seed=1, requires_grad=True)
    teacher = make_feats(TEACHER_C, 2, seed=2)
    d(student, teacher, EDGE_BOXES, generator=gen(11)).backward()
    got = {name: p.grad.clone() for name, p in d.named_parameters()}
    d.zero_grad()
    ref_ima_loss(student, teacher, EDGE_BOXES, d, gen(11)).backward()
    assert set(got) == {f"projectors.{lvl}.{k}" for lvl in d.levels for k in ("weight", "bias")}
    for name, p in d.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
        torch.testing.assert_close(got[name], p.grad, msg=name)


@pytest.mark.parametrize("strides", [{"p3": 4.0}, {"p4": 8.0}, {"p3": 4.0, "p4": 8.0}],
                         ids=["single-p3", "single-p4", "two-levels"])
def test_levels_and_strides_match_reference(strides):
    d = make_ima(TEACHER_C, strides=strides, instance="box")
    assert all(isinstance(d.projectors[lvl], torch.nn.Identity) for lvl in d.levels)
    student = make_feats(TEACHER_C, 2, seed=1, strides=strides)
    teacher = make_feats(TEACHER_C, 2, seed=2, strides=strides)
    boxes = make_boxes((2, 3), seed=4)
    with torch.no_grad():
        loss = d(student, teacher, boxes, image_size=IMAGE_SIZE, generator=gen(5))
        torch.testing.assert_close(loss, ref_ima_loss(student, teacher, boxes, d, gen(5)))


def test_per_level_channels_and_a_single_projected_level():
    torch.manual_seed(0)
    d = IMADistiller({"p3": 2, "p4": TEACHER_C}, TEACHER_C, STRIDES, instance="box").double()
    assert isinstance(d.projectors["p3"], torch.nn.Conv2d) and isinstance(d.projectors["p4"], torch.nn.Identity)
    student = {"p3": make_feats(2, 2, 1)["p3"], "p4": make_feats(TEACHER_C, 2, 1)["p4"]}
    teacher = make_feats(TEACHER_C, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(d(student, teacher, EDGE_BOXES, generator=gen(3)),
                                   ref_ima_loss(student, teacher, EDGE_BOXES, d, gen(3)))


@pytest.mark.parametrize("instance", ["image", "box"])
def test_gradcheck_tiny_double(instance):
    """``alpha = 0`` makes ``gamma`` a constant 0.5, so the (detached) importance does not break gradcheck."""
    strides = {"p4": 8.0}
    d = make_ima(2, strides=strides, alpha=0.0, mask_ratio=0.3, instance=instance)
    student = make_feats(2, 1, seed=1, strides=strides, requires_grad=True)["p4"]
    teacher = make_feats(TEACHER_C, 1, seed=2, strides=strides)
    boxes = [EDGE_BOXES[1]]
    params = [p.detach().clone().requires_grad_(True) for p in d.parameters()]
    names = [n for n, _ in d.named_parameters()]

    def loss(s, *ps):
        return torch.func.functional_call(d, dict(zip(names, ps, strict=True)), ({"p4": s}, teacher, boxes), {"generator": gen(9)})

    assert torch.autograd.gradcheck(loss, (student, *params), eps=1e-6, atol=1e-5)


# -- the parts ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_ratio", [0.65, 0.45, 0.1])
def test_masked_fraction_is_close_to_the_ratio(mask_ratio):
    """Without standardisation and deflation, a ones student against a zeros teacher gives the kept fraction."""
    d = IMADistiller(4, 4, {"big": 1.0}, mask_ratio=mask_ratio, standardize="none", scale_deflation=False)
    with torch.no_grad():
        kept = float(d({"big": torch.ones(2, 4, 128, 128)}, {"big": torch.zeros(2, 4, 128, 128)},
                       [torch.zeros(0, 4)] * 2, generator=gen(0)))
    sigma = math.sqrt(mask_ratio * (1 - mask_ratio) / (2 * 128 * 128))
    assert abs((1 - kept) - mask_ratio) < 5 * sigma


@pytest.mark.parametrize("instance", ["image", "box"])
def test_standardised_copy_of_the_teacher_costs_nothing(instance):
    """``standardize="both"``, no mask, no deflation: a student equal to an affine copy (per image and
    channel) of the teacher has zero loss in image mode; in box mode a nested box's own statistics apply."""
    d = make_ima(TEACHER_C, mask_ratio=0.0, scale_deflation=False, instance=instance)
    teacher = make_feats(TEACHER_C, 2, 2)
    student = {lvl: 3.0 * t + 1.5 for lvl, t in teacher.items()}
    with torch.no_grad():
        loss = d(student, teacher, EDGE_BOXES, generator=gen(0))
    torch.testing.assert_close(loss, torch.zeros((), dtype=torch.float64), atol=1e-6, rtol=0)


def test_image_mode_ignores_boxes_and_box_mode_without_boxes_is_image_mode():
    student, teacher = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2)
    image, box = make_ima(2), make_ima(2, instance="box")
    none = make_boxes((0, 0))
    with torch.no_grad():
        a = image(student, teacher, EDGE_BOXES, generator=gen(4))
        b = image(student, teacher, none, generator=gen(4))
        c = box(student, teacher, none, generator=gen(4))
        e = box(student, teacher, EDGE_BOXES, generator=gen(4))
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c)
    assert abs(float(e) - float(a)) > 1e-4


def test_smallest_box_wins_and_empty_boxes_are_harmless():
    """A box covering no cell changes nothing; of two nested boxes the inner one sets its cells' statistics."""
    d = make_ima(TEACHER_C, instance="box", strides={"p3": 4.0})
    student, teacher = make_feats(TEACHER_C, 1, 1, {"p3": 4.0}), make_feats(TEACHER_C, 1, 2, {"p3": 4.0})
    outer = torch.tensor([[0.0, 0.0, 24.0, 24.0]], dtype=torch.float64)
    inner = torch.tensor([[4.0, 4.0, 12.0, 12.0]], dtype=torch.float64)
    empty = torch.tensor([[21.0, 5.0, 22.5, 6.0]], dtype=torch.float64)
    with torch.no_grad():
        def loss(*bs):
            return d(student, teacher, [torch.cat(bs)], generator=gen(2))

        torch.testing.assert_close(loss(outer, empty), loss(outer))
        torch.testing.assert_close(loss(inner, outer), loss(outer, inner))  # the order does not matter
        assert abs(float(loss(outer, inner)) - float(loss(outer))) > 1e-4
        torch.testing.assert_close(loss(outer, inner), ref_ima_loss(student, teacher, [torch.cat([outer, inner])],
                                                                     d, gen(2)))


def test_scale_deflation_follows_the_cosine():
    """A student equal to the teacher has ``cos = 1``: ``gamma = sigmoid(alpha)``; ``alpha = 0`` halves it."""
    teacher = make_feats(TEACHER_C, 2, 2)
    student = {lvl: t.clone() for lvl, t in teacher.items()}
    base = {"mask_ratio": 0.0, "standardize": "none"}
    with torch.no_grad():
        for alpha in (0.0, 1.0, 10.0):
            loss = make_ima(TEACHER_C, alpha=alpha, **base)(student, teacher, make_boxes((1, 1)), generator=gen(0))
            gamma = 1 / (1 + math.exp(-alpha))
            want = sum(((gamma - 1) * t).square().mean() for t in teacher.values())
            torch.testing.assert_close(loss, want)


def test_plain_mse_when_every_part_is_off():
    """No mask, no standardisation, no deflation: FitNet's ``sum_levels mean (f_align(S) - T)^2``."""
    d = make_ima(2, mask_ratio=0.0, standardize="none", scale_deflation=False, loss_weight=2.0)
    student, teacher = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2)
    with torch.no_grad():
        want = sum(F.mse_loss(d.projectors[lvl](student[lvl]), teacher[lvl]) for lvl in d.levels)
        torch.testing.assert_close(d(student, teacher, make_boxes((1, 1)), generator=gen(0)), 2.0 * want)


# -- determinism ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("instance", ["image", "box"])
def test_same_seed_same_loss_bit_for_bit_other_seed_other_loss(instance):
    torch.manual_seed(0)
    d = IMADistiller(2, TEACHER_C, STRIDES, instance=instance)
    student = make_feats(2, 2, 1, dtype=torch.float32)
    teacher = make_feats(TEACHER_C, 2, 2, dtype=torch.float32)
    assert_seeded_draws(d, student, teacher, make_boxes((2, 1)))


def test_without_generator_draws_from_torch_default():
    d = make_ima(2)
    student, teacher, boxes = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((1, 1))
    assert_default_generator_draws(d, student, teacher, boxes, lambda: ref_ima_loss(student, teacher, boxes, d, None))


@pytest.mark.parametrize("instance", ["image", "box"])
def test_compute_terms_reads_nothing_back(instance):
    d = make_ima(2, instance=instance)
    inputs = KDInputs(make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2), EDGE_BOXES, generator=gen(0))
    with count_device_reads() as reads:
        d.compute_terms(inputs)
    assert reads == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("instance", ["image", "box"])
def test_cuda_matches_cpu_and_reads_nothing_back(instance):
    """Without a mask (the CPU and CUDA generators draw differently) CUDA gives the CPU loss, with no device read."""
    torch.manual_seed(0)
    d = IMADistiller(2, TEACHER_C, STRIDES, instance=instance, mask_ratio=0.0)
    student = make_feats(2, 2, 1, dtype=torch.float32)
    teacher = make_feats(TEACHER_C, 2, 2, dtype=torch.float32)
    with torch.no_grad():
        want = d(student, teacher, EDGE_BOXES, generator=gen(1))
    d.cuda()
    s_cuda = {k: v.cuda() for k, v in student.items()}
    t_cuda = {k: v.cuda() for k, v in teacher.items()}
    boxes = [b.cuda() for b in EDGE_BOXES]
    with torch.no_grad():
        got = d(s_cuda, t_cuda, boxes, generator=torch.Generator(device="cuda").manual_seed(1))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)
    inputs = KDInputs(s_cuda, t_cuda, boxes, generator=torch.Generator(device="cuda").manual_seed(1))
    with count_device_reads("cuda") as reads:
        d.compute_terms(inputs)
    assert reads == []


# -- sensitivity ----------------------------------------------------------------------------------------
def test_reference_check_is_sensitive_to_each_option_and_the_seed():
    d = make_ima(2, instance="box", alpha=3.0)
    student, teacher = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2)
    with torch.no_grad():
        loss = d(student, teacher, EDGE_BOXES, generator=gen(5))
        torch.testing.assert_close(loss, ref_ima_loss(student, teacher, EDGE_BOXES, d, gen(5)))
        for override in ({"mask_ratio": 0.45}, {"alpha": 10.0}, {"instance": "image"}, {"standardize": "student"},
                         {"standardize": "none"}, {"scale_deflation": False}, {"loss_weight": 1.5}):
            wrong = ref_ima_loss(student, teacher, EDGE_BOXES, d, gen(5), **override)
            assert abs(float(loss) - float(wrong)) > 1e-3 * abs(float(loss)), override
        wrong = ref_ima_loss(student, teacher, EDGE_BOXES, d, gen(6))
        assert abs(float(loss) - float(wrong)) > 1e-3 * abs(float(loss))


# -- protocol -------------------------------------------------------------------------------------------
def test_call_returns_the_sum_of_loss_terms():
    d = make_ima(2, instance="box")
    student, teacher, boxes = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((2, 0))
    with torch.no_grad():
        terms = d.loss_terms(KDInputs(student, teacher, boxes, generator=gen(8)))
        total = d(student, teacher, boxes, generator=gen(8))
    assert list(terms) == ["ima"]
    assert torch.equal(total, terms["ima"])


def test_registry_and_options():
    assert "ima" in list_distillers()
    assert method_label("ima") == "IMA"
    assert IMADistiller.needs == frozenset({"generator"})
    options = method_options("ima")
    assert {k: v[1] for k, v in options.items()} == {
        "loss_weight": 1.0, "mask_ratio": 0.65, "alpha": 10.0, "instance": "image", "standardize": "both",
        "scale_deflation": True, "projector": False}
    assert options["loss_weight"][0] is float and options["scale_deflation"][0] is bool
    d = create_distiller("ima", 8, 16, {"0": 8.0}, instance="box", mask_ratio=0.45)
    assert isinstance(d, IMADistiller) and d.instance == "box" and d.mask_ratio == 0.45


def test_stage2_trains_only_the_projectors():
    d = make_ima(2)
    assert not d.two_stage and d.stage1_ready and d.stage1_modules() == {}
    assert {id(p) for p in d.stage2_parameters()} == {id(p) for p in d.projectors.parameters()}
    assert len(d.stage2_parameters()) == 4  # 2 levels x (weight, bias)
    assert make_ima(TEACHER_C).stage2_parameters() == []  # same channels: no f_align
    assert len(make_ima(TEACHER_C, projector=True).stage2_parameters()) == 4
    with pytest.raises(ValueError, match="no stage 1"):
        d.stage1(make_feats(TEACHER_C, 2, 2), make_boxes((1, 1)))


def test_no_gradient_into_the_teacher():
    d = make_ima(2, instance="box")
    teacher = make_feats(TEACHER_C, 2, 2, requires_grad=True)
    d(make_feats(2, 2, 1), teacher, make_boxes((1, 1)), generator=gen(0)).backward()
    assert all(t.grad is None for t in teacher.values())


@pytest.mark.parametrize("options,match", [
    ({"loss_weight": -1.0}, "loss_weight"),
    ({"loss_weight": float("nan")}, "loss_weight"),
    ({"mask_ratio": 1.0}, "mask_ratio"),
    ({"mask_ratio": -0.1}, "mask_ratio"),
    ({"mask_ratio": float("nan")}, "mask_ratio"),
    ({"alpha": -1.0}, "alpha"),
    ({"alpha": float("inf")}, "alpha"),
    ({"instance": "object"}, "instance"),
    ({"standardize": "teacher"}, "standardize"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        IMADistiller(2, TEACHER_C, STRIDES, **options)


def test_unknown_option():
    with pytest.raises(ValueError, match="unknown distiller 'ima' option"):
        create_distiller("ima", 2, TEACHER_C, STRIDES, zeta=0.5)


def test_bad_inputs():
    d = make_ima(2, instance="box")
    student, teacher, boxes = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((1, 1))
    with pytest.raises(ValueError, match="channels"):
        d(make_feats(TEACHER_C, 2, 1), teacher, boxes)
    with pytest.raises(ValueError, match="channels"):
        d.loss_terms(KDInputs(student, make_feats(2, 2, 2), boxes))
    for side in ("student", "teacher"):
        bad = dict(student if side == "student" else teacher)
        bad["p4"] = bad["p4"].clone()
        bad["p4"][0, 0, 1, 1] = float("nan")
        with pytest.raises(ValueError):
            d(bad, teacher, boxes) if side == "student" else d(student, bad, boxes)
    with pytest.raises(ValueError):
        d({"p3": student["p3"]}, teacher, boxes)
    with pytest.raises(ValueError):
        d(student, teacher, boxes, image_size=(64, 64))
    with pytest.raises(ValueError):
        d(student, teacher, make_boxes((1,)))  # one box list for two images
