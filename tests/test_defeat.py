"""DeFeatDistiller against a literal, loop-by-loop reference of the public DeFeat code (ggjy/DeFeat.pytorch:
``get_gt_mask`` / ``_map_roi_levels`` masks, ``batch_processor_kd``'s ``neck-decouple`` losses and
``KLDivergenceLoss``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import pytest
import torch
from helpers import IMAGE, STRIDES, gen, random_boxes
from torch import Tensor, nn
from torch.func import functional_call

from liaf_lab.distillers import create_distiller, method_label, method_options
from liaf_lab.distillers.base import KDInputs
from liaf_lab.distillers.defeat import DeFeatDistiller, box_level_index, gt_masks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_syncs import count_device_reads
from references.defeat import ALL_SIZES, ref_masks, ref_terms

TEACHER_C = 4
CLASSES = 3
OPTIONS = {"fg_weight": 1.3, "bg_weight": 0.6, "cls_pos_weight": 0.9, "cls_neg_weight": 0.4, "temperature": 1.5}
# Large strides on a 256 x 320 input: boxes of 40-256 pixels fall on both levels under the public size rule.
BIG_STRIDES = {"a": 32.0, "b": 64.0}
BIG_IMAGE = (256.0, 320.0)


def feats(channels: int, n: int, seed: int, strides=STRIDES, requires_grad: bool = False) -> dict[str, Tensor]:
    g = gen(seed)
    return {lvl: torch.randn(n, channels, *ALL_SIZES[lvl], generator=g, dtype=torch.float64).requires_grad_(requires_grad)
            for lvl in strides}


def boxes_for(counts, seed: int = 3, strides=STRIDES) -> list[Tensor]:
    g = gen(seed)
    image, min_side = (BIG_IMAGE, 40.0) if strides is BIG_STRIDES else (IMAGE, 2.0)
    return [random_boxes(g, n, image, min_side=min_side, dtype=torch.float64) for n in counts]


def priors_for(strides, anchors: int) -> dict[str, Tensor]:
    """Only the shape of the priors matters here (``A`` per cell): ``[H*W*A, 4]``."""
    return {lvl: torch.zeros(ALL_SIZES[lvl][0] * ALL_SIZES[lvl][1] * anchors, 4, dtype=torch.float64) for lvl in strides}


def heads(n: int, seed: int, strides, anchors: int, requires_grad: bool = False) -> dict[str, dict[str, Tensor]]:
    g = gen(seed)
    return {lvl: {"cls_logits": (2 * torch.randn(n, anchors * CLASSES, *ALL_SIZES[lvl], generator=g, dtype=torch.float64)
                                 ).requires_grad_(requires_grad)} for lvl in strides}


def make_defeat(student_c: int = 3, strides=STRIDES, seed: int = 0, **options) -> DeFeatDistiller:
    """A double DeFeat distiller with random adaptation weights (not the public 1e-4 init)."""
    torch.manual_seed(seed)
    d = DeFeatDistiller(student_c, TEACHER_C, strides, **{**OPTIONS, **options}).double()
    g = gen(seed + 100)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return d


def make_inputs(student_c: int, counts, strides=STRIDES, anchors: int = 2, requires_grad: bool = True) -> KDInputs:
    n = len(counts)
    return KDInputs(feats(student_c, n, 1, strides, requires_grad), feats(TEACHER_C, n, 2, strides),
                    boxes_for(counts, strides=strides), student_head=heads(n, 4, strides, anchors, requires_grad),
                    teacher_head=heads(n, 5, strides, anchors), priors=priors_for(strides, anchors))


def as_tensor(v, like: Tensor) -> Tensor:
    return v if isinstance(v, Tensor) else like.new_tensor(float(v))


def assert_terms_close(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert list(got) == ["fg", "bg", "cls_pos", "cls_neg"]
    for k, value in want.items():
        torch.testing.assert_close(got[k], as_tensor(value, got[k]), msg=lambda m, k=k: f"term {k}: {m}")


def learnable(d: DeFeatDistiller, inputs: KDInputs) -> list[Tensor]:
    return [*inputs.student_feats.values(), *(h["cls_logits"] for h in inputs.student_head.values()), *d.parameters()]


# -- loss and gradients vs the reference -------------------------------------------------------------------
CASES = {
    "projector-two-levels": (3, STRIDES, (3, 0, 2), 2, {}),
    "same-channels": (TEACHER_C, STRIDES, (2, 4), 2, {}),
    "batch-without-boxes": (3, STRIDES, (0, 0), 2, {}),
    "single-level": (3, {"p3": 4.0}, (1, 3), 3, {}),
    "single-level-p4-fcos": (TEACHER_C, {"p4": 8.0}, (5, 0), 1, {}),
    "boxes-on-every-level": (3, STRIDES, (3, 2), 2, {"box_levels": "all"}),
    "sigmoid-kl": (3, STRIDES, (3, 2), 2, {"head_kl": "sigmoid", "temperature": 2.0}),
    "size-rule-two-levels": (3, BIG_STRIDES, (6, 5), 2, {}),
    "size-rule-sigmoid-all": (3, BIG_STRIDES, (4, 0), 1, {"head_kl": "sigmoid", "box_levels": "all"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_terms_and_grads_match_reference(case):
    student_c, strides, counts, anchors, options = CASES[case]
    d = make_defeat(student_c, strides, **options)
    inputs = make_inputs(student_c, counts, strides, anchors)
    got, want = d.loss_terms(inputs), ref_terms(d, inputs)
    assert_terms_close(got, want)
    wrt = learnable(d, inputs)
    g_got = torch.autograd.grad(sum(got.values()), wrt, allow_unused=True, materialize_grads=True)
    g_want = torch.autograd.grad(sum(as_tensor(v, got["fg"]) for v in want.values()), wrt, allow_unused=True,
                                 materialize_grads=True)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b)
    if sum(counts) == 0:
        assert float(got["fg"].detach()) == 0 and float(got["cls_pos"].detach()) == 0
        assert float(got["bg"].detach()) > 0 and float(got["cls_neg"].detach()) > 0


def test_the_size_rule_puts_boxes_on_both_levels():
    boxes = boxes_for((6, 5), strides=BIG_STRIDES)
    masks = gt_masks(boxes, {lvl: ALL_SIZES[lvl] for lvl in BIG_STRIDES}, BIG_STRIDES)
    assert masks["a"].sum() > 0 and masks["b"].sum() > 0
    every = gt_masks(boxes, {lvl: ALL_SIZES[lvl] for lvl in BIG_STRIDES}, BIG_STRIDES, "all")
    assert bool((every["a"] >= masks["a"]).all()) and every["a"].sum() > masks["a"].sum()


def test_masks_match_reference_for_random_boxes_across_the_border():
    g = gen(7)
    for trial in range(4):
        counts = [int(c) for c in torch.randint(0, 6, (3,), generator=g)]
        for strides, image in ((STRIDES, IMAGE), (BIG_STRIDES, BIG_IMAGE)):
            boxes = [random_boxes(g, n, image, min_side=0.5, overhang=0.3, dtype=torch.float64) for n in counts]
            for box_levels in ("scale", "all"):
                got = gt_masks(boxes, {lvl: ALL_SIZES[lvl] for lvl in strides}, strides, box_levels)
                want = ref_masks(boxes, strides, box_levels)
                for lvl in strides:
                    torch.testing.assert_close(got[lvl], torch.tensor(want[lvl], dtype=torch.float64), rtol=0, atol=0)


def test_hand_made_masks_follow_the_public_cell_rule():
    stride, size = 4.0, {"p3": (8, 10)}
    boxes = [torch.tensor([[5.0, 9.0, 7.0, 11.0],     # inside cell (2, 1): lx = rx -> that single cell
                           [20.5, 28.2, 36.0, 30.9],  # one row (ly = ry = 7): only its first cell (7, 5)
                           [-6.0, -3.0, 9.0, 8.5],    # across the top-left border: rows 0-1, columns 0-1
                           [33.0, 21.0, 52.0, 40.0]], dtype=torch.float64)]  # across bottom-right: rows 5-7, cols 8-9
    mask = gt_masks(boxes, size, {"p3": stride}, "all")["p3"][0]
    want = torch.zeros(8, 10, dtype=torch.float64)
    want[2, 1] = want[7, 5] = 1
    want[0:2, 0:2] = 1
    want[5:8, 8:10] = 1
    torch.testing.assert_close(mask, want, rtol=0, atol=0)


def test_box_level_index_is_the_public_size_rule():
    sides = torch.tensor([10.0, 110.0, 111.0, 200.0, 223.0, 500.0, 2000.0], dtype=torch.float64)
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], dim=1)
    # sqrt((w + 1)(h + 1)) / 56: 0.2, 1.98 -> 0; 2.0, 3.6 -> 1; 4.0 -> 2; 8.9 -> 3; 35.7 -> 5, clipped to 3
    assert box_level_index(boxes, 4).tolist() == [0, 0, 1, 1, 2, 3, 3]
    assert box_level_index(boxes, 1).tolist() == [0] * 7


def test_gradcheck_tiny_double():
    strides = {"p4": 8.0}
    d = make_defeat(3, strides)
    inputs = make_inputs(3, (2, 1), strides, anchors=2, requires_grad=False)
    names = [n for n, _ in d.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in d.parameters())
    student = inputs.student_feats["p4"].clone().requires_grad_(True)
    logits = inputs.student_head["p4"]["cls_logits"].clone().requires_grad_(True)

    class Loss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.d = d

        def forward(self, kd_inputs: KDInputs) -> Tensor:
            return sum(self.d.loss_terms(kd_inputs).values())

    def loss(s: Tensor, z: Tensor, *ps: Tensor) -> Tensor:
        kd_inputs = KDInputs({"p4": s}, inputs.teacher_feats, inputs.boxes, student_head={"p4": {"cls_logits": z}},
                             teacher_head=inputs.teacher_head, priors=inputs.priors)
        return functional_call(Loss(), {f"d.{n}": p for n, p in zip(names, ps, strict=True)}, (kd_inputs,))

    assert torch.autograd.gradcheck(loss, (student, logits, *params))


# -- what learns -------------------------------------------------------------------------------------------
def test_stage2_trains_the_adaptation_convs_and_the_student_head_not_the_teacher():
    d = make_defeat(3)
    assert d.two_stage is False and d.stage1_modules() == {} and d.stage1_ready
    assert [id(p) for p in d.stage2_parameters()] == [id(p) for p in d.adapters.parameters()]
    inputs = make_inputs(3, (2, 1))
    for lvl in STRIDES:
        inputs.teacher_feats[lvl].requires_grad_(True)
        inputs.teacher_head[lvl]["cls_logits"].requires_grad_(True)
    sum(d.loss_terms(inputs).values()).backward()
    assert all(t.grad is None for t in inputs.teacher_feats.values())
    assert all(h["cls_logits"].grad is None for h in inputs.teacher_head.values())
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in inputs.student_feats.values())
    assert all(h["cls_logits"].grad.abs().sum() > 0 for h in inputs.student_head.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.parameters())


def test_adaptation_conv_is_the_public_3x3_without_relu():
    torch.manual_seed(0)
    conv = DeFeatDistiller(8, 16, {"0": 8.0}).adapters["0"]
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
    assert conv.weight.abs().max() <= 2e-4


def test_same_student_and_teacher_give_no_classification_loss():
    d = make_defeat(3)
    inputs = make_inputs(3, (3, 1))
    for form in ("softmax", "sigmoid"):
        d.head_kl = form
        same = KDInputs(inputs.student_feats, inputs.teacher_feats, inputs.boxes, student_head=inputs.teacher_head,
                        teacher_head=inputs.teacher_head, priors=inputs.priors)
        terms = d.loss_terms(same)
        torch.testing.assert_close(terms["cls_pos"], torch.zeros((), dtype=torch.float64))
        torch.testing.assert_close(terms["cls_neg"], torch.zeros((), dtype=torch.float64))


# -- protocol, registry, options ---------------------------------------------------------------------------
def test_registry_label_and_public_defaults():
    d = create_distiller("defeat", 8, 8, {"0": 8.0})
    assert isinstance(d, DeFeatDistiller) and method_label("defeat") == "DeFeat"
    assert d.needs == frozenset({"head_outputs", "priors"}) and d.head_keys == ("cls_logits",)
    assert method_options("defeat") == {
        "fg_weight": (float, 3.0), "bg_weight": (float, 12.0), "cls_pos_weight": (float, 2.0),
        "cls_neg_weight": (float, 2.0), "temperature": (float, 1.0),
        "box_levels": (Literal["scale", "all"], "scale"), "head_kl": (Literal["softmax", "sigmoid"], "softmax"),
    }


def test_compute_terms_reads_nothing_back_from_the_device():
    for strides in (STRIDES, BIG_STRIDES):
        d, inputs = make_defeat(3, strides), make_inputs(3, (3, 0), strides)
        d.compute_terms(inputs)
        with count_device_reads() as reads:
            d.compute_terms(inputs)
        assert reads == []


def test_reference_check_is_sensitive_to_each_option():
    inputs = make_inputs(3, (3, 2), BIG_STRIDES, requires_grad=False)
    base = {k: float(v.detach()) for k, v in make_defeat(strides=BIG_STRIDES).loss_terms(inputs).items()}
    for option, value, terms in [("fg_weight", 2.0, ["fg"]), ("bg_weight", 2.0, ["bg"]),
                                 ("cls_pos_weight", 2.0, ["cls_pos"]), ("cls_neg_weight", 2.0, ["cls_neg"]),
                                 ("temperature", 3.0, ["cls_pos", "cls_neg"]),
                                 ("box_levels", "all", ["fg", "bg", "cls_pos", "cls_neg"]),
                                 ("head_kl", "sigmoid", ["cls_pos", "cls_neg"])]:
        other = make_defeat(strides=BIG_STRIDES, **{option: value}).loss_terms(inputs)
        for term in terms:
            assert abs(float(other[term].detach()) - base[term]) > 1e-6 * abs(base[term]), (option, term)
    swapped = KDInputs(inputs.student_feats, inputs.teacher_feats, [b[:, [1, 0, 3, 2]] for b in inputs.boxes],
                       student_head=inputs.student_head, teacher_head=inputs.teacher_head, priors=inputs.priors)
    assert abs(float(make_defeat(strides=BIG_STRIDES).loss_terms(swapped)["fg"].detach()) - base["fg"]) > 1e-6


def test_with_a_real_retinanet_and_fcos_step():
    """The engine's head outputs and priors (RetinaNet: 9 anchors, FCOS: 1 point per cell) reach the method."""
    from liaf_lab.engine.steps import DistillStep
    from liaf_lab.models import create_detector, fpn_strides

    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 2.0, 60.0, 20.0]]), "labels": torch.tensor([1, 2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    for arch in ("retinanet", "fcos"):
        torch.manual_seed(0)
        small = {"depth": 18, "min_size": 64, "max_size": 64}
        teacher = create_detector(arch, 3, width_mult=0.25, fpn_channels=16, **small)
        student = create_detector(arch, 3, width_mult=0.125, fpn_channels=8, **small)
        d = DeFeatDistiller(8, 16, fpn_strides(student))
        losses = DistillStep(student, teacher, d).train()(images, targets)
        kd = {k: v for k, v in losses.items() if k.startswith("kd_")}
        assert set(kd) == {"kd_fg", "kd_bg", "kd_cls_pos", "kd_cls_neg"}
        assert all(torch.isfinite(v) for v in kd.values()) and kd["kd_fg"] > 0 and kd["kd_bg"] > 0
        sum(kd.values()).backward()
        assert all(p.grad is not None for p in d.parameters())


# -- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option,value", [
    ("fg_weight", -1.0), ("bg_weight", float("nan")), ("cls_pos_weight", -0.1), ("cls_neg_weight", float("inf")),
    ("temperature", 0.0), ("temperature", -1.0), ("box_levels", "size"), ("head_kl", "kl"),
])
def test_bad_options_raise(option, value):
    with pytest.raises(ValueError, match=option):
        DeFeatDistiller(4, 4, STRIDES, **{option: value})


def test_missing_head_outputs_or_priors_raise():
    d = make_defeat(3)
    inputs = make_inputs(3, (1, 1), requires_grad=False)
    with pytest.raises(ValueError, match=r"needs \['head_outputs', 'priors'\]"):
        d(inputs.student_feats, inputs.teacher_feats, inputs.boxes)
    with pytest.raises(ValueError, match=r"needs \['head_outputs'\]"):
        d.loss_terms(KDInputs(inputs.student_feats, inputs.teacher_feats, inputs.boxes, student_head=inputs.student_head,
                              priors=inputs.priors))
    with pytest.raises(ValueError, match=r"needs \['priors'\]"):
        d.loss_terms(KDInputs(inputs.student_feats, inputs.teacher_feats, inputs.boxes, student_head=inputs.student_head,
                              teacher_head=inputs.teacher_head))


@pytest.mark.parametrize("what", ["missing-level", "missing-key", "other-anchors", "student-vs-teacher", "grid"])
def test_misshapen_head_outputs_raise(what):
    d = make_defeat(3)
    inputs = make_inputs(3, (1, 1), requires_grad=False)
    student_head = {lvl: dict(h) for lvl, h in inputs.student_head.items()}
    z = student_head["p4"]["cls_logits"]
    if what == "missing-level":
        del student_head["p4"]
    elif what == "missing-key":
        student_head["p4"] = {"bbox_regression": z}
    elif what == "other-anchors":  # 2 anchors x 3 classes = 6 channels; 7 is no multiple of A = 2
        student_head["p4"]["cls_logits"] = torch.cat([z, z[:, :1]], dim=1)
    elif what == "student-vs-teacher":  # 2 anchors x 4 classes against the teacher's 2 x 3
        student_head["p4"]["cls_logits"] = torch.cat([z, z[:, :2]], dim=1)
    else:
        student_head["p4"]["cls_logits"] = z[..., :-1]
    with pytest.raises(ValueError, match="cls_logits"):
        d.loss_terms(KDInputs(inputs.student_feats, inputs.teacher_feats, inputs.boxes, student_head=student_head,
                              teacher_head=inputs.teacher_head, priors=inputs.priors))


def test_wrong_channels_priors_and_nan_raise():
    d = make_defeat(3)
    inputs = make_inputs(3, (1, 1), requires_grad=False)

    def with_(**changes) -> KDInputs:
        fields = {"student_feats": inputs.student_feats, "teacher_feats": inputs.teacher_feats, "boxes": inputs.boxes,
                  "student_head": inputs.student_head, "teacher_head": inputs.teacher_head, "priors": inputs.priors}
        return KDInputs(**{**fields, **changes})

    with pytest.raises(ValueError, match="channels"):
        d.loss_terms(with_(student_feats=feats(5, 2, 1)))
    with pytest.raises(ValueError, match="channels"):
        d.loss_terms(with_(teacher_feats=feats(TEACHER_C + 1, 2, 2)))
    with pytest.raises(ValueError, match="priors"):
        d.loss_terms(with_(priors={**inputs.priors, "p3": inputs.priors["p3"][:-1]}))
    student = {lvl: f.clone() for lvl, f in inputs.student_feats.items()}
    student["p3"][0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError):
        d.loss_terms(with_(student_feats=student))
