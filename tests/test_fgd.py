"""FGDDistiller against a literal, loop-by-loop reference of the public FGD code (yzd-v/FGD ``FeatureLoss``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import IMAGE, SIZES, STRIDES, gen, make_feats, random_boxes
from helpers import make_boxes as _make_boxes
from torch import Tensor, nn
from torch.func import functional_call

from liaf_lab.distillers import create_distiller, method_label, method_options
from liaf_lab.distillers.base import KDInputs
from liaf_lab.distillers.fgd import FGDDistiller, GcBlock, fgd_attention, fgd_masks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_syncs import count_device_reads
from references.fgd import ref_attention, ref_masks, ref_terms

TEACHER_C = 4
OPTIONS = {"temperature": 0.7, "alpha_fg": 1.3, "beta_bg": 0.6, "gamma_attention": 0.2, "lambda_global": 0.9}


def make_boxes(counts, seed: int = 0) -> list[Tensor]:
    return _make_boxes(counts, seed, min_side=2.0)


def make_fgd(student_c: int = 3, strides=STRIDES, seed: int = 0, randomize: bool = True, **options) -> FGDDistiller:
    """A double FGD distiller; ``randomize`` gives every GcBlock parameter random values (not the zero init)."""
    torch.manual_seed(seed)
    d = FGDDistiller(student_c, TEACHER_C, strides, **{**OPTIONS, **options}).double()
    if randomize:
        g = gen(seed + 100)
        with torch.no_grad():
            for name, p in d.named_parameters():
                if name.startswith("gc_"):
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5 + (1.0 if "channel_add.1.weight" in name else 0.0))
    return d


def terms_of(d: FGDDistiller, student, teacher, boxes) -> dict[str, Tensor]:
    return d.loss_terms(KDInputs(student, teacher, boxes))


def assert_terms_close(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert list(got) == ["fg", "bg", "attention", "global"]
    for k, value in want.items():
        torch.testing.assert_close(got[k], value, msg=lambda m, k=k: f"term {k}: {m}")


# -- loss and gradients vs the reference -------------------------------------------------------------------
CASES = {
    "projector-two-levels": (3, STRIDES, (3, 0, 2)),
    "same-channels": (TEACHER_C, STRIDES, (2, 4)),
    "batch-without-boxes": (3, STRIDES, (0, 0)),
    "single-level": (3, {"p3": 4.0}, (1, 3)),
    "single-level-p4": (TEACHER_C, {"p4": 8.0}, (5, 0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_terms_and_grads_match_reference(case):
    student_c, strides, counts = CASES[case]
    d = make_fgd(student_c, strides)
    student = make_feats(student_c, len(counts), 1, strides, requires_grad=True)
    teacher = make_feats(TEACHER_C, len(counts), 2, strides)
    boxes = make_boxes(counts, seed=3)
    got, want = terms_of(d, student, teacher, boxes), ref_terms(d, student, teacher, boxes)
    assert_terms_close(got, want)
    wrt = [*student.values(), *d.parameters()]
    g_got = torch.autograd.grad(sum(got.values()), wrt, allow_unused=True)
    g_want = torch.autograd.grad(sum(want.values()), wrt, allow_unused=True)
    for a, b in zip(g_got, g_want, strict=True):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b)


def test_boxes_cross_the_border_and_the_reference_sees_them():
    """Boxes beyond every border (negative and past the image) are clipped, not wrapped as the slices would."""
    boxes = [torch.tensor([[-9.5, -5.2, 6.1, 7.7], [30.2, 20.3, 47.0, 39.9]], dtype=torch.float64),
             torch.tensor([[-3.0, 25.0, 12.4, 44.0]], dtype=torch.float64)]
    d = make_fgd()
    student, teacher = make_feats(3, 2, 1), make_feats(TEACHER_C, 2, 2)
    assert_terms_close(terms_of(d, student, teacher, boxes), ref_terms(d, student, teacher, boxes))
    for lvl, stride in STRIDES.items():
        fg, bg = fgd_masks(boxes, stride, SIZES[lvl])
        want_fg, want_bg = ref_masks(boxes, stride, SIZES[lvl])
        torch.testing.assert_close(fg, torch.tensor(want_fg, dtype=torch.float64))
        torch.testing.assert_close(bg, torch.tensor(want_bg, dtype=torch.float64))


def test_gradcheck_tiny_double():
    d = make_fgd(3, {"p4": 8.0})
    teacher = make_feats(TEACHER_C, 2, 2, {"p4": 8.0})
    boxes = make_boxes((2, 1), seed=4)
    names = [n for n, _ in d.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in d.parameters())
    student = make_feats(3, 2, 1, {"p4": 8.0})["p4"].requires_grad_(True)

    def loss(s: Tensor, *ps: Tensor) -> Tensor:
        return functional_call(d, dict(zip(names, ps, strict=True)), ({"p4": s}, teacher, boxes))

    assert torch.autograd.gradcheck(loss, (student, *params))


# -- the masks ---------------------------------------------------------------------------------------------
def test_vectorised_masks_equal_the_loop_reference_for_fractional_boxes():
    g = gen(7)
    for trial in range(4):
        counts = [int(c) for c in torch.randint(0, 6, (3,), generator=g)]
        boxes = [random_boxes(g, n, IMAGE, min_side=0.5, overhang=0.3, dtype=torch.float64) for n in counts]
        for lvl, stride in STRIDES.items():
            fg, bg = fgd_masks(boxes, stride, SIZES[lvl])
            want_fg, want_bg = ref_masks(boxes, stride, SIZES[lvl])
            torch.testing.assert_close(fg, torch.tensor(want_fg, dtype=torch.float64), rtol=0, atol=1e-15)
            torch.testing.assert_close(bg, torch.tensor(want_bg, dtype=torch.float64), rtol=0, atol=1e-15)


def test_overlapping_boxes_take_the_max_so_the_small_box_wins():
    big = [0.0, 0.0, 20.0, 12.0]  # stride 4: cells w 0..5, h 0..3 -> 1/24
    small = [4.5, 4.5, 7.5, 7.5]  # cells w 1..2, h 1..2 -> 1/4
    for order in ([big, small], [small, big]):
        fg, bg = fgd_masks([torch.tensor(order)], 4.0, (8, 10))
        assert fg[0, 1:3, 1:3].eq(0.25).all()
        assert torch.isclose(fg[0, 0, 0], torch.tensor(1 / 24))
        assert torch.isclose(fg[0, 3, 5], torch.tensor(1 / 24))
        assert fg[0, 4:].eq(0).all() and fg[0, :, 6:].eq(0).all()
        assert torch.isclose(bg.sum(), torch.tensor(1.0)) and bg[0, :4, :6].eq(0).all()


def test_mask_indexes_rows_by_y_and_columns_by_x():
    fg, _ = fgd_masks([torch.tensor([[0.0, 20.0, 4.0, 24.0]])], 4.0, (8, 10))  # x 0..1, y 5..6
    assert fg[0, 5:7, 0:2].gt(0).all() and fg[0].gt(0).sum() == 4


def test_box_covering_the_whole_map_leaves_no_background_and_no_nan():
    boxes = [torch.tensor([[-4.0, -4.0, 44.0, 36.0]], dtype=torch.float64), torch.zeros(0, 4, dtype=torch.float64)]
    fg, bg = fgd_masks(boxes, 4.0, (8, 10))
    assert fg[0].gt(0).all() and bg[0].eq(0).all()
    assert fg[1].eq(0).all() and torch.isclose(bg[1].sum(), torch.tensor(1.0, dtype=torch.float64))
    d = make_fgd()
    terms = terms_of(d, make_feats(3, 2, 1), make_feats(TEACHER_C, 2, 2), boxes)
    assert all(torch.isfinite(v) for v in terms.values())
    assert_terms_close(terms, ref_terms(d, make_feats(3, 2, 1), make_feats(TEACHER_C, 2, 2), boxes))


# -- attention and global terms ---------------------------------------------------------------------------
def test_attention_matches_reference_and_sums_to_size():
    x = make_feats(5, 2, 3)["p3"]
    spatial, channel = fgd_attention(x, 0.5)
    want_s, want_c = ref_attention(x, 0.5)
    torch.testing.assert_close(spatial, want_s)
    torch.testing.assert_close(channel, want_c)
    torch.testing.assert_close(spatial.sum(dim=(1, 2)), torch.full((2,), 80.0, dtype=torch.float64))
    torch.testing.assert_close(channel.sum(dim=1), torch.full((2,), 5.0, dtype=torch.float64))


def test_attention_term_matches_reference():
    d = make_fgd(alpha_fg=0.0, beta_bg=0.0, lambda_global=0.0, gamma_attention=1.0)
    student, teacher = make_feats(3, 2, 1), make_feats(TEACHER_C, 2, 2)
    want = 0.0
    for lvl in STRIDES:
        s_sp, s_ch = ref_attention(d.projectors[lvl](student[lvl]), d.temperature)
        t_sp, t_ch = ref_attention(teacher[lvl], d.temperature)
        want = want + (s_ch - t_ch).abs().sum() / 2 + (s_sp - t_sp).abs().sum() / 2
    terms = terms_of(d, student, teacher, make_boxes((1, 2)))
    torch.testing.assert_close(terms["attention"], want)
    assert terms["fg"] == 0 and terms["bg"] == 0 and terms["global"] == 0


def test_zero_initialised_global_term_is_plain_sum_mse():
    d = make_fgd(TEACHER_C, randomize=False)
    for side in (d.gc_student, d.gc_teacher):
        for block in side.values():
            assert block.channel_add[-1].weight.eq(0).all() and block.channel_add[-1].bias.eq(0).all()
            assert block.conv_mask.bias.eq(0).all() and block.conv_mask.weight.ne(0).any()
    student, teacher = make_feats(TEACHER_C, 2, 1), make_feats(TEACHER_C, 2, 2)
    got = terms_of(d, student, teacher, make_boxes((2, 1)))["global"]
    want = d.lambda_global * sum(((student[lvl] - teacher[lvl]) ** 2).sum() / 2 for lvl in STRIDES)
    torch.testing.assert_close(got, want)


def test_gcblock_init_is_kaiming_fan_in():
    torch.manual_seed(0)
    block = GcBlock(256)
    std = block.conv_mask.weight.std().item()
    assert abs(std - math.sqrt(2 / 256)) < 0.02


# -- what learns -------------------------------------------------------------------------------------------
def test_stage2_trains_projector_and_both_gcblocks_not_the_teacher():
    d = make_fgd(3)
    assert d.two_stage is False and d.stage1_modules() == {} and d.stage1_ready
    assert {id(p) for p in d.stage2_parameters()} == {id(p) for p in d.parameters()}
    names = {n.split(".")[0] for n, _ in d.named_parameters()}
    assert names == {"projectors", "gc_student", "gc_teacher"}
    student = make_feats(3, 2, 1, requires_grad=True)
    teacher = make_feats(TEACHER_C, 2, 2, requires_grad=True)
    d(student, teacher, make_boxes((2, 1))).backward()
    assert all(t.grad is None for t in teacher.values())
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student.values())
    for side in (d.gc_student, d.gc_teacher):
        assert all(p.grad is not None for p in side.parameters())
        # the softmax over cells ignores conv_mask's bias: its gradient is 0; every other parameter learns
        assert all(p.grad.abs().sum() > 0 for n, p in side.named_parameters() if not n.endswith("conv_mask.bias"))


def test_projector_only_where_channels_differ():
    d = FGDDistiller({"p3": 3, "p4": 4}, 4, STRIDES)
    assert isinstance(d.projectors["p3"], nn.Conv2d) and isinstance(d.projectors["p4"], nn.Identity)


# -- protocol, registry, options --------------------------------------------------------------------------
def test_forward_is_the_sum_of_loss_terms():
    d = make_fgd(3)
    student, teacher, boxes = make_feats(3, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((3, 1))
    terms = terms_of(d, student, teacher, boxes)
    torch.testing.assert_close(d(student, teacher, boxes), sum(terms.values()))


def test_registry_and_defaults_are_the_retinanet_config():
    d = create_distiller("fgd", 8, 8, {"0": 8.0})
    assert isinstance(d, FGDDistiller) and method_label("fgd") == "FGD"
    assert method_options("fgd") == {"temperature": (float, 0.5), "alpha_fg": (float, 1e-3), "beta_bg": (float, 5e-4),
                                     "gamma_attention": (float, 5e-4), "lambda_global": (float, 5e-6)}


def test_compute_terms_reads_nothing_back_from_the_device():
    d = make_fgd(3)
    inputs = KDInputs(make_feats(3, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((3, 0)))
    d.compute_terms(inputs)
    with count_device_reads() as reads:
        d.compute_terms(inputs)
    assert reads == []


def test_reference_check_is_sensitive_to_each_option():
    student, teacher, boxes = make_feats(3, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((3, 2))
    base = {k: float(v.detach()) for k, v in terms_of(make_fgd(), student, teacher, boxes).items()}
    for option, term in [("temperature", "attention"), ("alpha_fg", "fg"), ("beta_bg", "bg"),
                         ("gamma_attention", "attention"), ("lambda_global", "global")]:
        other = terms_of(make_fgd(**{option: OPTIONS[option] * 1.5}), student, teacher, boxes)
        assert abs(float(other[term].detach()) - base[term]) > 1e-6 * abs(base[term]), option
    # the same boxes with x and y swapped give other masks on the non-square grid
    swapped = [b[:, [1, 0, 3, 2]] for b in boxes]
    assert abs(float(terms_of(make_fgd(), student, teacher, swapped)["fg"].detach()) - base["fg"]) > 1e-6


# -- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option,value", [
    ("temperature", 0.0), ("temperature", -1.0), ("temperature", float("inf")), ("alpha_fg", -1e-3),
    ("beta_bg", float("nan")), ("gamma_attention", -1.0), ("lambda_global", -5e-6),
])
def test_bad_options_raise(option, value):
    with pytest.raises(ValueError, match=option):
        FGDDistiller(4, 4, STRIDES, **{option: value})


def test_one_teacher_channel_raises():
    with pytest.raises(ValueError, match="teacher channels"):
        FGDDistiller(4, 1, STRIDES)


def test_wrong_channels_and_nan_raise():
    d = make_fgd(3)
    boxes = make_boxes((1, 1))
    with pytest.raises(ValueError, match="channels"):
        d(make_feats(5, 2, 1), make_feats(TEACHER_C, 2, 2), boxes)
    with pytest.raises(ValueError, match="channels"):
        d.loss_terms(KDInputs(make_feats(3, 2, 1), make_feats(TEACHER_C + 1, 2, 2), boxes))
    student = make_feats(3, 2, 1)
    student["p4"][1, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError):
        d(student, make_feats(TEACHER_C, 2, 2), boxes)
