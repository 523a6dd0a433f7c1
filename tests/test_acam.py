"""ACAMDistiller (ACAM-KD) against a literal reference of the paper's Eq. 2-9, written with explicit
matrices, an explicit softmax over the keys and Python loops over images, masks, channels and cells."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import STRIDES, gen, make_boxes, make_feats
from torch import Tensor, nn
from torch.func import functional_call

from liaf_lab.distillers import (
    KDInputs,
    create_distiller,
    list_distillers,
    method_label,
    method_options,
)
from liaf_lab.distillers.acam import ACAMDistiller, mask_diversity

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_syncs import count_device_reads
from references.acam import ref_acam_terms, ref_eq8

TEACHER_C = 4  # C_q = 2
MASKS = 3
IMAGE_SIZE = (32, 40)


def make_acam(student_c: int = 3, seed: int = 0, strides=STRIDES, teacher_c: int = TEACHER_C, **kw) -> ACAMDistiller:
    """A double-precision distiller whose selection units are large enough to give varied masks."""
    torch.manual_seed(seed)
    kw.setdefault("num_masks", MASKS)
    d = ACAMDistiller(student_c, teacher_c, strides, **kw).double()
    g = gen(seed + 100)
    with torch.no_grad():
        for m in d.masking.values():
            for p in (m.channel_units, m.spatial_units):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return d


def grads(loss: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(loss, tensors, retain_graph=True))


def nonzero(t: Tensor | None) -> bool:
    return t is not None and bool((t != 0).any())


def assert_terms_close(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert list(got) == ["channel", "spatial", "div"]
    for name, value in got.items():
        torch.testing.assert_close(value, want[name], msg=name)


def inputs(student_c: int = 3, n: int = 2, strides=STRIDES, counts=(2, 1), requires_grad: bool = False):
    return (make_feats(student_c, n, seed=1, strides=strides, requires_grad=requires_grad),
            make_feats(TEACHER_C, n, seed=2, strides=strides), make_boxes(counts, seed=3))


# -- loss and gradients vs the reference ----------------------------------------------------------------
VARIANTS = {
    "defaults": {},
    "vector-units": {"channel_units": "vector"},
    "detach-student": {"detach": "student"},
    "dice-channel": {"dice_masks": "channel"},
    "dice-spatial-pairwise": {"dice_masks": "spatial", "dice_form": "pairwise"},
    "pooled-mean-weights": {"batch_reduction": "pooled", "level_reduction": "mean", "alpha": 0.7, "lambda_div": 0.3},
}


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_terms_and_grads_match_reference(variant):
    d = make_acam(3, **VARIANTS[variant])
    student, teacher, boxes = inputs(3, requires_grad=True)
    got = d.loss_terms(KDInputs(student, teacher, boxes, image_size=IMAGE_SIZE))
    want = ref_acam_terms(student, teacher, d)
    assert_terms_close(got, want)
    wrt = [*student.values(), *d.parameters()]
    for g, w in zip(grads(sum(got.values()), wrt), grads(sum(want.values()), wrt), strict=True):
        torch.testing.assert_close(g, w)


def test_parameter_and_student_grads_match_reference_after_backward():
    """``.grad`` of every parameter (projector, W_q, W_k, W_v, both unit sets) and of the student."""
    d = make_acam(3)
    student, teacher, boxes = inputs(3, requires_grad=True)
    d(student, teacher, boxes).backward()
    got = {name: p.grad.clone() for name, p in d.named_parameters()}
    got_student = {lvl: s.grad.clone() for lvl, s in student.items()}
    d.zero_grad()
    for s in student.values():
        s.grad = None
    sum(ref_acam_terms(student, teacher, d).values()).backward()
    assert len(got) == 2 * (2 + 2 + 2 + 2 + 1 + 1)  # per level: projector, query, key, value (w, b); units
    for name, p in d.named_parameters():
        assert nonzero(p.grad), name
        torch.testing.assert_close(got[name], p.grad, msg=name)
    for lvl, s in student.items():
        torch.testing.assert_close(got_student[lvl], s.grad)


@pytest.mark.parametrize("counts", [(0, 2), (0, 0)], ids=["image-without-boxes", "batch-without-boxes"])
def test_boxes_are_not_read(counts):
    """ACAM-KD uses no boxes: none, some, or boxes over the border give the reference's loss."""
    d = make_acam(3)
    student, teacher, _ = inputs(3)
    crossing = [torch.tensor([[-5.0, -3.0, 12.0, 50.0]], dtype=torch.float64),
                torch.tensor([[30.0, 20.0, 47.0, 39.0], [-1.0, 10.0, 41.0, 33.0]], dtype=torch.float64)]
    with torch.no_grad():
        a = d(student, teacher, make_boxes(counts, seed=3), image_size=IMAGE_SIZE)
        b = d(student, teacher, crossing, image_size=IMAGE_SIZE)
        want = sum(ref_acam_terms(student, teacher, d).values())
    torch.testing.assert_close(a, want)
    torch.testing.assert_close(b, want)


@pytest.mark.parametrize("strides", [{"p3": 4.0}, {"p4": 8.0}, {"p3": 4.0, "p4": 8.0}],
                         ids=["single-p3", "single-p4", "two-levels"])
@pytest.mark.parametrize("student_c", [3, TEACHER_C], ids=["projector", "same-channels"])
def test_levels_strides_and_channels_match_reference(strides, student_c):
    d = make_acam(student_c, strides=strides)
    student, teacher, boxes = inputs(student_c, strides=strides)
    with torch.no_grad():
        got = d.loss_terms(KDInputs(student, teacher, boxes, image_size=IMAGE_SIZE))
        assert_terms_close(got, ref_acam_terms(student, teacher, d))


def test_without_projector_and_an_odd_width():
    """No ``f_align`` (equal channels), and an odd C = 5 (``C_q = 2``)."""
    d = make_acam(5, teacher_c=5, projector=False)
    assert all(isinstance(p, nn.Identity) for p in d.projectors.values())
    assert d.masking["p3"].query.out_features == 2
    student = make_feats(5, 2, seed=1, requires_grad=True)
    teacher = make_feats(5, 2, seed=2)
    got = d.loss_terms(KDInputs(student, teacher, make_boxes((1, 1))))
    assert_terms_close(got, ref_acam_terms(student, teacher, d))
    wrt = [*student.values(), *d.parameters()]
    for g, w in zip(grads(sum(got.values()), wrt), grads(sum(ref_acam_terms(student, teacher, d).values()), wrt), strict=True):
        torch.testing.assert_close(g, w)


def test_teacher_gradient_when_compute_terms_gets_a_differentiable_teacher():
    """``loss_terms`` detaches the teacher; ``compute_terms`` called directly still differentiates correctly."""
    d = make_acam(3, strides={"p4": 8.0})
    student = make_feats(3, 2, seed=1, strides={"p4": 8.0})
    teacher = make_feats(TEACHER_C, 2, seed=2, strides={"p4": 8.0}, requires_grad=True)
    got = sum(d.compute_terms(KDInputs(student, teacher, make_boxes((1, 0)))).values())
    want = sum(ref_acam_terms(student, teacher, d, detach_teacher=False).values())
    torch.testing.assert_close(got, want)
    (got_grad,), (want_grad,) = grads(got, [teacher["p4"]]), grads(want, [teacher["p4"]])
    assert nonzero(want_grad)
    torch.testing.assert_close(got_grad, want_grad)


class Loss(nn.Module):
    """The distiller's summed terms as a module of (student) for ``functional_call``."""

    def __init__(self, distiller: ACAMDistiller, teacher: dict[str, Tensor]) -> None:
        super().__init__()
        self.distiller, self.teacher = distiller, teacher

    def forward(self, student: Tensor) -> Tensor:
        return self.distiller({"p4": student}, self.teacher, [torch.zeros(0, 4)])


@pytest.mark.parametrize("budget", [2**20, 7 * 20], ids=["one-block", "blocks"])
def test_gradcheck_tiny_double(budget):
    d = make_acam(3, strides={"p4": 8.0}, num_masks=2, max_attention_elements=budget)  # 20 cells: 1 or 3 blocks
    student = make_feats(3, 1, seed=1, strides={"p4": 8.0}, requires_grad=True)["p4"]
    teacher = make_feats(TEACHER_C, 1, seed=2, strides={"p4": 8.0})
    wrapper = Loss(d, teacher)
    names = [f"distiller.{n}" for n, _ in d.named_parameters()]

    def f(s, *params):
        return functional_call(wrapper, dict(zip(names, params, strict=True)), (s,))

    params = [p.detach().clone().requires_grad_() for p in d.parameters()]
    assert torch.autograd.gradcheck(f, (student, *params))


# -- the attention blocks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [7, 1, 3])
def test_blocks_of_queries_equal_one_block(rows):
    """Splitting the queries into blocks (80 and 20 cells: 7 and 3 do not divide them) changes nothing."""
    whole = make_acam(3)
    blocks = make_acam(3, max_attention_elements=80 * rows)
    assert whole.rows_per_block("p3", 80) == 80 and blocks.rows_per_block("p3", 80) == rows
    student, teacher, boxes = inputs(3, requires_grad=True)
    a = whole.loss_terms(KDInputs(student, teacher, boxes))
    b = blocks.loss_terms(KDInputs(student, teacher, boxes))
    for name in a:
        torch.testing.assert_close(a[name], b[name])
    wrt_a = [*student.values(), *whole.parameters()]
    wrt_b = [*student.values(), *blocks.parameters()]
    for ga, gb in zip(grads(sum(a.values()), wrt_a), grads(sum(b.values()), wrt_b), strict=True):
        torch.testing.assert_close(ga, gb)


def test_no_grad_path_equals_grad_path():
    """Without autograd the blocks are not checkpointed; the values agree."""
    d = make_acam(3, max_attention_elements=80 * 5)
    student, teacher, boxes = inputs(3)
    with torch.no_grad():
        a = d(student, teacher, boxes)
    torch.testing.assert_close(a, d(student, teacher, boxes).detach())


def test_attention_too_large_is_a_value_error_naming_method_and_level():
    d = make_acam(3, max_attention_elements=80 - 1)  # p3: 80 cells per query row
    student, teacher, boxes = inputs(3)
    with pytest.raises(ValueError, match=r"ACAM-KD level 'p3'.*80 cells.*max_attention_elements=79"):
        d(student, teacher, boxes)
    assert make_acam(3, max_attention_elements=80).rows_per_block("p3", 80) == 1


def test_scale_is_one_over_sqrt_cq():
    """Eq. 3 divides by sqrt(C_q) (attention's scaling for query width C_q); a reference without it differs."""
    d = make_acam(3)
    student, teacher, boxes = inputs(3)
    with torch.no_grad():
        got = d.loss_terms(KDInputs(student, teacher, boxes))
        assert_terms_close(got, ref_acam_terms(student, teacher, d, scale=1 / math.sqrt(2)))
        wrong = ref_acam_terms(student, teacher, d, scale=1.0)
    assert abs(float(got["spatial"]) - float(wrong["spatial"])) > 1e-6


def test_half_precision_autocast_keeps_the_sums_in_float32():
    """Under autocast (bfloat16 on CPU) the squared-error sums over HW and the loss stay float32 and close."""
    torch.manual_seed(0)
    d = ACAMDistiller(8, 16, {"p3": 4.0}, num_masks=3)
    student = {"p3": torch.randn(2, 8, 8, 10, generator=gen(1), requires_grad=True)}
    teacher = {"p3": 30 * torch.randn(2, 16, 8, 10, generator=gen(2))}
    full = d(student, teacher, make_boxes((1, 0)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = d(student, teacher, make_boxes((1, 0)))
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, rtol=2e-2, atol=0)
    low.backward()
    assert student["p3"].grad.dtype == torch.float32 and bool(torch.isfinite(student["p3"].grad).all())


# -- the diversity term -----------------------------------------------------------------------------------
def test_mask_diversity_is_eq8():
    masks = torch.rand(2, 4, 7, generator=gen(0), dtype=torch.float64)
    want = sum(ref_eq8(list(masks[n])) for n in range(2)) / 2
    torch.testing.assert_close(mask_diversity(masks), want)
    same = torch.rand(1, 7, generator=gen(1), dtype=torch.float64).expand(4, 7)[None]
    torch.testing.assert_close(mask_diversity(same), torch.tensor(3.0, dtype=torch.float64))  # M - 1
    orthogonal = torch.eye(4, 7, dtype=torch.float64)[None]
    torch.testing.assert_close(mask_diversity(orthogonal), torch.tensor(0.0, dtype=torch.float64))


# -- sensitivity -------------------------------------------------------------------------------------------
def test_reference_check_is_sensitive_to_each_option():
    d = make_acam(3)
    student, teacher, boxes = inputs(3)
    with torch.no_grad():
        got = d.loss_terms(KDInputs(student, teacher, boxes))
        for override, term in (({"dice_masks": "spatial"}, "div"), ({"dice_masks": "channel"}, "div"),
                               ({"dice_form": "pairwise"}, "div"), ({"batch_reduction": "pooled"}, "spatial"),
                               ({"batch_reduction": "pooled"}, "channel"), ({"level_reduction": "mean"}, "channel")):
            wrong = ref_acam_terms(student, teacher, d, **override)
            assert abs(float(got[term]) - float(wrong[term])) > 1e-6 * abs(float(got[term])), override
        scaled = make_acam(3, alpha=2.0, lambda_div=3.0).loss_terms(KDInputs(student, teacher, boxes))
    want = {"channel": 2 * got["channel"], "spatial": 2 * got["spatial"], "div": 3 * got["div"]}
    torch.testing.assert_close(scaled, want)


def test_vector_units_equal_to_a_scalar_reproduce_scalar_units():
    """``channel_units="vector"`` with every row constant is the paper's scalar unit."""
    scalar = make_acam(3)
    vector = make_acam(3, channel_units="vector")
    for lvl in scalar.levels:
        rows = scalar.masking[lvl].channel_units[:, None].expand(MASKS, TEACHER_C).clone()
        vector.masking[lvl].load_state_dict({**scalar.masking[lvl].state_dict(), "channel_units": rows})
        vector.projectors[lvl].load_state_dict(scalar.projectors[lvl].state_dict())
    student, teacher, boxes = inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(vector(student, teacher, boxes), scalar(student, teacher, boxes))


# -- what learns -------------------------------------------------------------------------------------------
def test_one_stage_everything_learns_in_stage2():
    d = make_acam(3)
    assert not d.two_stage and d.stage1_ready and d.stage1_modules() == {}
    assert {id(p) for p in d.stage2_parameters()} == {id(p) for p in d.parameters()}
    with pytest.raises(ValueError, match="no stage 1"):
        d.stage1(make_feats(TEACHER_C, 2, 2), make_boxes((1, 1)))
    student = make_feats(3, 2, seed=1, requires_grad=True)
    teacher = make_feats(TEACHER_C, 2, seed=2, requires_grad=True)
    d(student, teacher, make_boxes((1, 1))).backward()
    # b_k adds q_p . b_k to every score of row p: the softmax of Eq. 3 ignores it, so its gradient is 0
    # (up to round-off, which is all the literal check of "learns" used to see)
    key_biases = {f"masking.{lvl}.key.bias" for lvl in d.levels}
    assert all(nonzero(p.grad) for name, p in d.named_parameters() if name not in key_biases)
    for name, p in d.named_parameters():
        if name in key_biases:
            torch.testing.assert_close(p.grad, torch.zeros_like(p), rtol=0, atol=1e-12)
    assert all(nonzero(s.grad) for s in student.values())
    assert all(t.grad is None for t in teacher.values())


def test_detach_student_cuts_the_fusion_path_into_the_student_only():
    """``detach="student"``: K and V read a detached ``f_align(F^S)``, so the student learns from the masked
    difference alone (the reference's gradients); the fusion projections and units still learn."""
    d = make_acam(3, detach="student")
    student, teacher, boxes = inputs(3, requires_grad=True)
    terms = d.loss_terms(KDInputs(student, teacher, boxes))
    loss = terms["channel"] + terms["spatial"]
    want = ref_acam_terms(student, teacher, d)
    got_student = grads(loss, list(student.values()))
    for g, w in zip(got_student, grads(want["channel"] + want["spatial"], list(student.values())), strict=True):
        torch.testing.assert_close(g, w)
    full = make_acam(3)  # the same weights without the detach
    full_terms = full.loss_terms(KDInputs(student, teacher, boxes))
    full_grads = grads(full_terms["channel"] + full_terms["spatial"], list(student.values()))
    torch.testing.assert_close(full_terms["channel"], terms["channel"])
    assert not torch.allclose(full_grads[0], got_student[0])
    masking = [p for m in d.masking.values() for p in (m.query.weight, m.key.weight, m.value.weight, m.spatial_units)]
    assert all(nonzero(g) for g in grads(loss, masking))


# -- protocol, registry, bad input -------------------------------------------------------------------------
def test_call_returns_the_sum_of_loss_terms():
    d = make_acam(3)
    student, teacher, boxes = inputs(3)
    with torch.no_grad():
        terms = d.loss_terms(KDInputs(student, teacher, boxes))
        total = d(student, teacher, boxes)
    assert list(terms) == ["channel", "spatial", "div"]
    torch.testing.assert_close(total, sum(terms.values()))


def test_compute_terms_reads_nothing_back():
    d = make_acam(3, max_attention_elements=80 * 7)
    student, teacher, boxes = inputs(3, requires_grad=True)
    with count_device_reads() as reads:
        terms = d.compute_terms(KDInputs(student, teacher, boxes))
        sum(terms.values()).backward()
    assert reads == []


def test_registry_and_defaults():
    assert "acam" in list_distillers() and method_label("acam") == "ACAM-KD"
    opts = method_options("acam")
    assert {k: v[1] for k, v in opts.items()} == {
        "alpha": 1.0, "lambda_div": 1.0, "num_masks": 6, "projector": True, "channel_units": "scalar",
        "detach": "none", "dice_masks": "both", "dice_form": "ratio", "batch_reduction": "image",
        "level_reduction": "sum", "max_attention_elements": 2**20}
    d = create_distiller("acam", 8, 16, {"0": 8.0})
    assert isinstance(d, ACAMDistiller) and d.method_name == "acam"
    m = d.masking["0"]
    assert (m.query.out_features, m.key.out_features, m.value.out_features) == (8, 8, 16)
    assert m.channel_units.shape == (6,) and m.spatial_units.shape == (6, 16)
    assert float(m.spatial_units.detach().std()) < 0.02
    assert isinstance(d.projectors["0"], nn.Conv2d)


@pytest.mark.parametrize("option,value", [
    ("alpha", -1.0), ("alpha", float("nan")), ("lambda_div", -0.5), ("lambda_div", float("inf")), ("num_masks", 1),
    ("channel_units", "matrix"), ("detach", "masks"), ("dice_masks", "none"), ("dice_form", "mean"),
    ("batch_reduction", "sum"), ("level_reduction", "max"), ("max_attention_elements", 0),
])
def test_bad_options(option, value):
    with pytest.raises(ValueError, match=option):
        ACAMDistiller(3, TEACHER_C, STRIDES, **{option: value})


def test_unknown_option_and_no_projector_needs_equal_channels():
    with pytest.raises(ValueError, match="unknown distiller 'acam' option"):
        create_distiller("acam", 3, TEACHER_C, STRIDES, temperature=1.0)
    with pytest.raises(ValueError, match="projector"):
        ACAMDistiller(3, TEACHER_C, STRIDES, projector=False)


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_wrong_channels(side):
    d = make_acam(3)
    student, teacher, boxes = inputs(3)
    if side == "student":
        student = make_feats(TEACHER_C, 2, 1)
    else:
        teacher = make_feats(5, 2, 2)
    with pytest.raises(ValueError, match="channels"):
        d(student, teacher, boxes)
    with pytest.raises(ValueError, match="channels"):
        d.loss_terms(KDInputs(student, teacher, boxes))


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_nan_features(side):
    d = make_acam(3)
    student, teacher, boxes = inputs(3)
    (student if side == "student" else teacher)["p4"][0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError):
        d(student, teacher, boxes)


def test_wrong_grid_for_the_stride():
    d = make_acam(3)
    student, teacher, boxes = inputs(3)
    with pytest.raises(ValueError):
        d(student, teacher, boxes, image_size=(64, 64))
