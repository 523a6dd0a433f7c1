"""MGDDistiller (Masked Generative Distillation) against a literal reference of the public code's loss."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import STRIDES, assert_default_generator_draws, assert_seeded_draws, gen, make_boxes, make_feats

from liaf_lab.distillers import KDInputs, create_distiller, list_distillers, method_label, method_options
from liaf_lab.distillers.mgd import MGDDistiller
from liaf_lab.distillers.ops import random_keep_mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_syncs import count_device_reads  # noqa: E402
from references.mgd import ref_mgd_loss

TEACHER_C = 3


def make_mgd(student_c: int = 2, seed: int = 0, strides=STRIDES, **kw) -> MGDDistiller:
    torch.manual_seed(seed)
    return MGDDistiller(student_c, TEACHER_C, strides, **kw).double()


def grads(loss, tensors):
    return list(torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=True))


# -- loss and gradients vs the reference ----------------------------------------------------------------
BOXES = {
    "boxes": (3, 1),
    "image-without-boxes": (2, 0),
    "batch-without-boxes": (0, 0),
}


@pytest.mark.parametrize("student_c", [2, TEACHER_C], ids=["align-conv", "same-channels"])
@pytest.mark.parametrize("lambda_mask", [0.65, 0.45, 0.0, 1.0])
@pytest.mark.parametrize("boxes", list(BOXES), ids=list(BOXES))
def test_loss_and_grads_match_reference(student_c, lambda_mask, boxes):
    d = make_mgd(student_c, alpha=0.3, lambda_mask=lambda_mask)
    student = make_feats(student_c, 2, seed=1, requires_grad=True)
    teacher = make_feats(TEACHER_C, 2, seed=2)
    loss = d(student, teacher, make_boxes(BOXES[boxes], seed=3), image_size=(32, 40), generator=gen(7))
    want = ref_mgd_loss(student, teacher, d, gen(7))
    torch.testing.assert_close(loss, want)
    wrt = [*student.values(), *d.parameters()]
    for got, ref in zip(grads(loss, wrt), grads(want, wrt), strict=True):
        torch.testing.assert_close(got, ref)


def test_align_and_generator_grads_match_reference_after_backward():
    """``.grad`` of the align conv and both generator convs after ``backward``, per level."""
    d = make_mgd(2)
    assert all(isinstance(d.align[lvl], torch.nn.Conv2d) for lvl in d.levels)
    student = make_feats(2, 2, seed=1, requires_grad=True)
    teacher = make_feats(TEACHER_C, 2, seed=2)
    d(student, teacher, make_boxes((2, 1)), generator=gen(11)).backward()
    got = {name: p.grad.clone() for name, p in d.named_parameters()}
    d.zero_grad()
    ref_mgd_loss(student, teacher, d, gen(11)).backward()
    assert set(got) == {f"{prefix}.{k}" for lvl in d.levels
                        for prefix in (f"align.{lvl}", f"generation.{lvl}.0", f"generation.{lvl}.2")
                        for k in ("weight", "bias")}
    for name, p in d.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
        torch.testing.assert_close(got[name], p.grad, msg=name)


def test_boxes_crossing_the_border_change_nothing():
    """MGD reads no boxes: boxes over the border, or none at all, give the same loss for the same seed."""
    d = make_mgd(2)
    student, teacher = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2)
    crossing = [torch.tensor([[-5.0, -3.0, 12.0, 50.0], [30.0, 20.0, 47.0, 39.0]], dtype=torch.float64),
                torch.tensor([[-1.0, 10.0, 41.0, 33.0]], dtype=torch.float64)]
    with torch.no_grad():
        a = d(student, teacher, crossing, generator=gen(4))
        b = d(student, teacher, make_boxes((0, 0)), generator=gen(4))
    assert torch.equal(a, b)
    torch.testing.assert_close(a, ref_mgd_loss(student, teacher, d, gen(4)))


@pytest.mark.parametrize("strides", [{"p3": 4.0}, {"p4": 8.0}, {"p3": 4.0, "p4": 8.0}],
                         ids=["single-p3", "single-p4", "two-levels"])
def test_levels_and_strides_match_reference(strides):
    d = make_mgd(TEACHER_C, strides=strides, alpha=1.0)
    assert all(isinstance(d.align[lvl], torch.nn.Identity) for lvl in d.levels)
    student = make_feats(TEACHER_C, 2, seed=1, strides=strides)
    teacher = make_feats(TEACHER_C, 2, seed=2, strides=strides)
    with torch.no_grad():
        loss = d(student, teacher, make_boxes((1, 2)), image_size=(32, 40), generator=gen(5))
        torch.testing.assert_close(loss, ref_mgd_loss(student, teacher, d, gen(5)))


def test_per_level_channels_and_a_single_projected_level():
    """Per-level channels: only the level whose channels differ gets an align conv."""
    torch.manual_seed(0)
    d = MGDDistiller({"p3": 2, "p4": TEACHER_C}, TEACHER_C, STRIDES).double()
    assert isinstance(d.align["p3"], torch.nn.Conv2d) and isinstance(d.align["p4"], torch.nn.Identity)
    student = {"p3": make_feats(2, 2, 1)["p3"], "p4": make_feats(TEACHER_C, 2, 1)["p4"]}
    teacher = make_feats(TEACHER_C, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(d(student, teacher, make_boxes((1, 1)), generator=gen(3)),
                                   ref_mgd_loss(student, teacher, d, gen(3)))


def test_gradcheck_tiny_double():
    d = make_mgd(2, strides={"p4": 8.0}, alpha=0.5, lambda_mask=0.5)
    student = make_feats(2, 1, seed=1, strides={"p4": 8.0}, requires_grad=True)["p4"]
    teacher = make_feats(TEACHER_C, 1, seed=2, strides={"p4": 8.0})
    params = [p.detach().clone().requires_grad_(True) for p in d.parameters()]
    names = [n for n, _ in d.named_parameters()]

    def loss(s, *ps):
        state = dict(zip(names, ps, strict=True))
        return torch.func.functional_call(d, state, ({"p4": s}, teacher, [torch.zeros(0, 4)] * 1),
                                          {"generator": gen(9)})

    assert torch.autograd.gradcheck(loss, (student, *params), eps=1e-6, atol=1e-5)


# -- the random mask ------------------------------------------------------------------------------------
@pytest.mark.parametrize("lambda_mask", [0.65, 0.45, 0.1])
def test_dropped_fraction_is_close_to_lambda_and_shared_over_channels(lambda_mask):
    """The generator's input on a ones student is the mask: equal over channels, a fraction lambda of zeros."""
    d = MGDDistiller(4, 4, {"big": 1.0}, lambda_mask=lambda_mask)
    seen = []
    d.generation["big"].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    ones = {"big": torch.ones(2, 4, 128, 128)}
    with torch.no_grad():
        d(ones, ones, [torch.zeros(0, 4)] * 2, generator=gen(0))
    masked = seen[0]
    assert torch.equal(masked, masked[:, :1].expand_as(masked))
    assert set(masked.unique().tolist()) == {0.0, 1.0}
    dropped = float((masked[:, 0] == 0).double().mean())
    sigma = math.sqrt(lambda_mask * (1 - lambda_mask) / (2 * 128 * 128))
    assert abs(dropped - lambda_mask) < 5 * sigma


def test_random_keep_mask_follows_the_public_rule():
    """Drop where ``r > 1 - lambda`` (not ``r < lambda``, the paper's Eq. 2 on the same draw)."""
    like = torch.zeros(3, 5, 6, 7)
    mask = random_keep_mask(like, 0.3, gen(2))
    r = torch.rand(3, 1, 6, 7, generator=gen(2))
    assert mask.shape == (3, 1, 6, 7) and mask.dtype == like.dtype
    assert torch.equal(mask, (r <= 0.7).float())
    assert not torch.equal(mask, (r >= 0.3).float())
    assert bool((random_keep_mask(like, 0.0, gen(2)) == 1).all())


def test_lambda_zero_is_plain_generation_mse():
    """No masking: ``alpha * sum_levels sum (G(f_align(S)) - T)^2 / N``."""
    d = make_mgd(2, alpha=0.7, lambda_mask=0.0)
    student, teacher = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2)
    with torch.no_grad():
        loss = d(student, teacher, make_boxes((1, 1)), generator=gen(3))
        want = sum(F.mse_loss(d.generation[lvl](d.align[lvl](student[lvl])), teacher[lvl], reduction="sum") / 2
                   for lvl in d.levels)
    torch.testing.assert_close(loss, 0.7 * want)


# -- determinism ----------------------------------------------------------------------------------------
def test_same_seed_same_loss_bit_for_bit_other_seed_other_loss():
    torch.manual_seed(0)
    d = MGDDistiller(2, TEACHER_C, STRIDES)
    student, teacher = make_feats(2, 2, 1, dtype=torch.float32), make_feats(TEACHER_C, 2, 2, dtype=torch.float32)
    assert_seeded_draws(d, student, teacher, make_boxes((1, 1)))


def test_without_generator_draws_from_torch_default():
    d = make_mgd(2)
    student, teacher, boxes = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((1, 1))
    assert_default_generator_draws(d, student, teacher, boxes, lambda: ref_mgd_loss(student, teacher, d, None))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generator_on_the_feature_device():
    torch.manual_seed(0)
    d = MGDDistiller(2, TEACHER_C, STRIDES).cuda()
    student = {k: v.cuda() for k, v in make_feats(2, 2, 1, dtype=torch.float32).items()}
    teacher = {k: v.cuda() for k, v in make_feats(TEACHER_C, 2, 2, dtype=torch.float32).items()}
    boxes = [b.cuda() for b in make_boxes((1, 1))]

    def run(seed):
        with torch.no_grad():
            return d(student, teacher, boxes, generator=torch.Generator(device="cuda").manual_seed(seed))

    a, b, c = run(1), run(1), run(2)
    assert a.device.type == "cuda" and torch.equal(a, b) and not torch.equal(a, c)
    with count_device_reads("cuda") as reads:
        d.compute_terms(KDInputs(student, teacher, boxes, generator=torch.Generator(device="cuda").manual_seed(1)))
    assert reads == []


def test_compute_terms_reads_nothing_back():
    d = make_mgd(2)
    inputs = KDInputs(make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((2, 1)), generator=gen(0))
    with count_device_reads() as reads:
        d.compute_terms(inputs)
    assert reads == []


# -- sensitivity ----------------------------------------------------------------------------------------
def test_reference_check_is_sensitive_to_options_and_seed():
    d = make_mgd(2)
    student, teacher, boxes = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((1, 1))
    with torch.no_grad():
        loss = d(student, teacher, boxes, generator=gen(5))
        for wrong in (ref_mgd_loss(student, teacher, d, gen(5), lambda_mask=0.45),
                      ref_mgd_loss(student, teacher, d, gen(5), alpha=3e-5),
                      ref_mgd_loss(student, teacher, d, gen(6))):
            assert abs(float(loss) - float(wrong)) > 1e-3 * abs(float(loss))
        torch.testing.assert_close(make_mgd(2, alpha=4e-5)(student, teacher, boxes, generator=gen(5)), 2 * loss)


# -- protocol -------------------------------------------------------------------------------------------
def test_call_returns_the_sum_of_loss_terms():
    d = make_mgd(2)
    student, teacher, boxes = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((2, 0))
    with torch.no_grad():
        terms = d.loss_terms(KDInputs(student, teacher, boxes, generator=gen(8)))
        total = d(student, teacher, boxes, generator=gen(8))
    assert list(terms) == ["mgd"]
    assert torch.equal(total, terms["mgd"])


def test_registry_and_options():
    assert "mgd" in list_distillers()
    assert method_label("mgd") == "MGD"
    assert method_options("mgd") == {"alpha": (float, 2e-5), "lambda_mask": (float, 0.65)}
    d = create_distiller("mgd", 8, 16, {"0": 8.0}, alpha=5e-7, lambda_mask=0.45)
    assert isinstance(d, MGDDistiller) and d.alpha == 5e-7 and d.lambda_mask == 0.45


def test_stage2_trains_align_and_generators():
    d = make_mgd(2)
    assert not d.two_stage and d.stage1_ready and d.stage1_modules() == {}
    want = {id(p) for p in [*d.align.parameters(), *d.generation.parameters()]}
    assert {id(p) for p in d.stage2_parameters()} == want == {id(p) for p in d.parameters()}
    # 2 levels x (align weight, bias + 2 convs x (weight, bias))
    assert len(want) == 12
    with pytest.raises(ValueError, match="no stage 1"):
        d.stage1(make_feats(TEACHER_C, 2, 2), make_boxes((1, 1)))


def test_no_gradient_into_the_teacher():
    d = make_mgd(2)
    teacher = make_feats(TEACHER_C, 2, 2, requires_grad=True)
    d(make_feats(2, 2, 1), teacher, make_boxes((1, 1)), generator=gen(0)).backward()
    assert all(t.grad is None for t in teacher.values())


@pytest.mark.parametrize("options,match", [
    ({"alpha": -1.0}, "alpha"),
    ({"alpha": float("nan")}, "alpha"),
    ({"lambda_mask": 1.5}, "lambda_mask"),
    ({"lambda_mask": -0.1}, "lambda_mask"),
    ({"lambda_mask": float("nan")}, "lambda_mask"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        MGDDistiller(2, TEACHER_C, STRIDES, **options)


def test_unknown_option():
    with pytest.raises(ValueError, match="unknown distiller 'mgd' option"):
        create_distiller("mgd", 2, TEACHER_C, STRIDES, mask_ratio=0.5)


def test_bad_inputs():
    d = make_mgd(2)
    student, teacher, boxes = make_feats(2, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((1, 1))
    with pytest.raises(ValueError, match="channels"):
        d(make_feats(TEACHER_C, 2, 1), teacher, boxes)
    with pytest.raises(ValueError, match="channels"):
        d.loss_terms(KDInputs(student, make_feats(2, 2, 2), boxes))
    bad = dict(student)
    bad["p4"] = bad["p4"].clone()
    bad["p4"][0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError):
        d(bad, teacher, boxes)
    with pytest.raises(ValueError):
        d({"p3": student["p3"]}, teacher, boxes)
    with pytest.raises(ValueError):
        d(student, teacher, boxes, image_size=(64, 64))
