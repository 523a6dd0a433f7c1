"""FGFIDistiller against a literal, loop-by-loop reference of the public FGFI code (twangnh/Distilling-Object-Detectors:
``_AnchorTargetLayer.forward``'s ``mask_batch`` and ``trainval_net_sup.py``'s ``sup_loss``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import pytest
import torch
from helpers import IMAGE, SIZES, STRIDES, gen, make_feats, random_boxes
from helpers import make_boxes as _make_boxes
from torch import Tensor, nn
from torch.func import functional_call

from liaf_lab.distillers import create_distiller, method_label, method_options
from liaf_lab.distillers.base import KDInputs
from liaf_lab.distillers.base import prior_boxes
from liaf_lab.distillers.fgfi import FGFIDistiller, imitation_masks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_syncs import count_device_reads
from references.fgfi import ref_loss, ref_masks

TEACHER_C = 4
OPTIONS = {"loss_weight": 0.7, "psi": 0.5, "point_prior_scale": 3.0}


def make_boxes(counts, seed: int = 0) -> list[Tensor]:
    return _make_boxes(counts, seed, min_side=2.0)


def anchors(strides, kind: str = "anchors") -> dict[str, Tensor]:
    """Per level ``[H*W*A, 4]`` float64 priors centred on the cells, row-major then anchor (torchvision's order).

    ``"anchors"``: A = 3 (a square of 2 strides, one of 4 strides, a 2:1 box of 2 x 4 strides);
    ``"points"``: FCOS's zero-size points (A = 1).
    """
    out = {}
    for lvl, s in strides.items():
        h, w = SIZES[lvl]
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64) * s + s / 2,
                                torch.arange(w, dtype=torch.float64) * s + s / 2, indexing="ij")
        centre = torch.stack([xs, ys], -1).reshape(-1, 1, 2)
        if kind == "points":
            half = torch.zeros(1, 1, 2, dtype=torch.float64)
        else:
            half = torch.tensor([[1.0, 1.0], [2.0, 2.0], [2.0, 1.0]], dtype=torch.float64)[None] * s
        out[lvl] = torch.cat([centre - half, centre + half], -1).reshape(-1, 4)
    return out


def make_fgfi(student_c: int = 3, strides=STRIDES, seed: int = 0, **options) -> FGFIDistiller:
    """A double FGFI distiller with random adaptation weights (not the public 1e-4 init, so gradients show)."""
    torch.manual_seed(seed)
    d = FGFIDistiller(student_c, TEACHER_C, strides, **{**OPTIONS, **options}).double()
    g = gen(seed + 100)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return d


def inputs_of(student, teacher, boxes, priors) -> KDInputs:
    return KDInputs(student, teacher, boxes, priors=priors)


def grads(loss: Tensor, wrt: list[Tensor]) -> tuple[Tensor, ...]:
    return torch.autograd.grad(loss, wrt, retain_graph=True, allow_unused=True, materialize_grads=True)


# -- loss and gradients vs the reference -----------------------------------------------------------------
CASES = {
    "projector-two-levels": (3, STRIDES, (3, 0, 2), "anchors", {}),
    "same-channels": (TEACHER_C, STRIDES, (2, 4), "anchors", {}),
    "batch-without-boxes": (3, STRIDES, (0, 0), "anchors", {}),
    "single-level": (3, {"p3": 4.0}, (1, 3), "anchors", {}),
    "single-level-p4": (TEACHER_C, {"p4": 8.0}, (5, 0), "anchors", {}),
    "max-over-all-levels": (3, STRIDES, (3, 2), "anchors", {"iou_max": "all"}),
    "points-fcos": (3, STRIDES, (2, 3), "points", {}),
    "points-all-levels": (3, STRIDES, (4, 1), "points", {"iou_max": "all", "point_prior_scale": 5.0}),
    "psi-0.8-relu": (3, STRIDES, (3, 2), "anchors", {"psi": 0.8, "adapter_relu": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_grads_match_reference(case):
    student_c, strides, counts, kind, options = CASES[case]
    d = make_fgfi(student_c, strides, **options)
    student = make_feats(student_c, len(counts), 1, strides, requires_grad=True)
    teacher = make_feats(TEACHER_C, len(counts), 2, strides)
    boxes, priors = make_boxes(counts, seed=3), anchors(strides, kind)
    terms = d.loss_terms(inputs_of(student, teacher, boxes, priors))
    assert list(terms) == ["imitation"]
    want = ref_loss(d, student, teacher, boxes, priors)
    torch.testing.assert_close(terms["imitation"], want)
    wrt = [*student.values(), *d.parameters()]
    if sum(counts) == 0:
        assert float(terms["imitation"].detach()) == 0.0
        return
    for a, b in zip(grads(terms["imitation"], wrt), grads(want, wrt), strict=True):
        torch.testing.assert_close(a, b)


def test_masks_match_reference_for_random_boxes_across_the_border():
    g = gen(7)
    for trial in range(3):
        counts = [int(c) for c in torch.randint(0, 5, (3,), generator=g)]
        boxes = [random_boxes(g, n, IMAGE, min_side=0.5, overhang=0.3, dtype=torch.float64) for n in counts]
        for iou_max in ("level", "all"):
            for kind, scale in (("anchors", 8.0), ("points", 2.5)):
                priors = anchors(STRIDES, kind)
                got = imitation_masks(priors, boxes, SIZES, STRIDES, 0.5, scale, iou_max)
                want = ref_masks(priors, boxes, STRIDES, 0.5, scale, iou_max)
                for lvl in STRIDES:
                    torch.testing.assert_close(got[lvl], torch.tensor(want[lvl], dtype=torch.float64), rtol=0, atol=0)


def test_boxes_across_every_border_match_reference():
    boxes = [torch.tensor([[-9.5, -5.2, 6.1, 7.7], [30.2, 20.3, 47.0, 39.9]], dtype=torch.float64),
             torch.tensor([[-3.0, 25.0, 12.4, 44.0]], dtype=torch.float64)]
    d, priors = make_fgfi(), anchors(STRIDES)
    student, teacher = make_feats(3, 2, 1), make_feats(TEACHER_C, 2, 2)
    masks = d.masks(inputs_of(student, teacher, boxes, priors))
    assert all(m.sum() > 0 for m in masks.values())
    torch.testing.assert_close(d.loss_terms(inputs_of(student, teacher, boxes, priors))["imitation"],
                               ref_loss(d, student, teacher, boxes, priors))


def test_a_box_equal_to_an_anchor_marks_the_cells_of_its_good_anchors():
    """A 16 x 16 box on the stride-4 level equals the 4-stride square of cell (3, 5): max IoU 1, so the mask holds
    the cells with an anchor of IoU > 0.5, i.e. that cell and the cells one step away (IoU 0.6 for the big square)."""
    priors = anchors({"p3": 4.0})
    box = torch.tensor([[14.0, 6.0, 30.0, 22.0]], dtype=torch.float64)  # centre (22, 14) = cell (3, 5)
    mask = imitation_masks(priors, [box], {"p3": (8, 10)}, {"p3": 4.0})["p3"][0]
    want = torch.zeros(8, 10, dtype=torch.float64)
    want[3, 5] = want[2, 5] = want[4, 5] = want[3, 4] = want[3, 6] = 1
    torch.testing.assert_close(mask, want, rtol=0, atol=0)
    # psi = 1 keeps nothing (strictly above the max); psi = 0 every cell with any overlap
    assert imitation_masks(priors, [box], {"p3": (8, 10)}, {"p3": 4.0}, psi=1.0)["p3"].sum() == 0
    assert imitation_masks(priors, [box], {"p3": (8, 10)}, {"p3": 4.0}, psi=0.0)["p3"].sum() > 5


def test_point_priors_become_squares_of_point_prior_scale_strides():
    """A zero-size point and a one-cell anchor (torchvision FCOS) are points; a wider anchor is kept."""
    priors = torch.tensor([[10.0, 6.0, 10.0, 6.0], [0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 8.0]], dtype=torch.float64)
    want = torch.tensor([[6.0, 2.0, 14.0, 10.0], [-2.0, -2.0, 6.0, 6.0], [0.0, 0.0, 4.0, 8.0]], dtype=torch.float64)
    torch.testing.assert_close(prior_boxes(priors, 4.0, 2.0), want)


def test_gradcheck_tiny_double():
    strides = {"p4": 8.0}
    d = make_fgfi(3, strides)
    teacher = make_feats(TEACHER_C, 2, 2, strides)
    boxes, priors = make_boxes((2, 1), seed=4), anchors(strides)
    names = [n for n, _ in d.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in d.parameters())
    student = make_feats(3, 2, 1, strides)["p4"].requires_grad_(True)

    class Loss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.d = d

        def forward(self, inputs: KDInputs) -> Tensor:
            return self.d.loss_terms(inputs)["imitation"]

    def loss(s: Tensor, *ps: Tensor) -> Tensor:
        return functional_call(Loss(), {f"d.{n}": p for n, p in zip(names, ps, strict=True)},
                               (inputs_of({"p4": s}, teacher, boxes, priors),))

    assert torch.autograd.gradcheck(loss, (student, *params))


# -- what learns -------------------------------------------------------------------------------------------
def test_stage2_trains_the_adaptation_layers_not_the_teacher():
    d = make_fgfi(3)
    assert d.two_stage is False and d.stage1_modules() == {} and d.stage1_ready
    assert [id(p) for p in d.stage2_parameters()] == [id(p) for p in d.adapters.parameters()]
    student = make_feats(3, 2, 1, requires_grad=True)
    teacher = make_feats(TEACHER_C, 2, 2, requires_grad=True)
    d.loss_terms(inputs_of(student, teacher, make_boxes((2, 1)), anchors(STRIDES)))["imitation"].backward()
    assert all(t.grad is None for t in teacher.values())
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.parameters())


def test_adaptation_layer_is_the_public_3x3_conv_with_tiny_init():
    torch.manual_seed(0)
    d = FGFIDistiller(8, 16, {"0": 8.0})
    conv = d.adapters["0"]
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
    assert conv.weight.abs().max() <= 2e-4 and 0.5e-4 < conv.weight.std() < 1.5e-4
    relu = FGFIDistiller(8, 16, {"0": 8.0}, adapter_relu=True).adapters["0"]
    assert isinstance(relu, nn.Sequential) and isinstance(relu[1], nn.ReLU)


# -- protocol, registry, options ---------------------------------------------------------------------------
def test_registry_label_and_defaults():
    d = create_distiller("fgfi", 8, 8, {"0": 8.0})
    assert isinstance(d, FGFIDistiller) and method_label("fgfi") == "FGFI" and d.needs == frozenset({"priors"})
    assert method_options("fgfi") == {"loss_weight": (float, 0.01), "psi": (float, 0.5),
                                      "point_prior_scale": (float, 8.0),
                                      "iou_max": (Literal["level", "all"], "level"),
                                      "adapter_relu": (bool, False)}


def test_compute_terms_reads_nothing_back_from_the_device():
    d = make_fgfi(3)
    for priors in (anchors(STRIDES), anchors(STRIDES, "points")):
        inputs = inputs_of(make_feats(3, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((3, 0)), priors)
        d.compute_terms(inputs)
        with count_device_reads() as reads:
            d.compute_terms(inputs)
        assert reads == []


def test_reference_check_is_sensitive_to_each_option():
    student, teacher, boxes = make_feats(3, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((3, 2))

    def loss(kind="anchors", **options) -> float:
        return float(make_fgfi(**options).loss_terms(inputs_of(student, teacher, boxes, anchors(STRIDES, kind)))
                     ["imitation"].detach())

    base = loss()
    for options in ({"loss_weight": 0.3}, {"psi": 0.8}, {"iou_max": "all"}, {"adapter_relu": True}):
        assert abs(loss(**options) - base) > 1e-6 * abs(base), options
    assert abs(loss("points", point_prior_scale=2.0) - loss("points", point_prior_scale=6.0)) > 1e-6
    swapped = [b[:, [1, 0, 3, 2]] for b in boxes]
    other = make_fgfi().loss_terms(inputs_of(student, teacher, swapped, anchors(STRIDES)))["imitation"]
    assert abs(float(other.detach()) - base) > 1e-6


def test_with_a_real_fcos_and_retinanet_step():
    """The engine's priors (FCOS: zero-size points; RetinaNet: 9 anchors) give a finite loss with gradient."""
    from liaf_lab.engine.steps import DistillStep
    from liaf_lab.models import create_detector, fpn_strides

    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 2.0, 60.0, 20.0]]), "labels": torch.tensor([1, 2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    for arch in ("fcos", "retinanet"):
        torch.manual_seed(0)
        small = {"depth": 18, "min_size": 64, "max_size": 64}
        teacher = create_detector(arch, 3, width_mult=0.25, fpn_channels=16, **small)
        student = create_detector(arch, 3, width_mult=0.125, fpn_channels=8, **small)
        d = FGFIDistiller(8, 16, fpn_strides(student))
        losses = DistillStep(student, teacher, d).train()(images, targets)
        assert torch.isfinite(losses["kd_imitation"]) and losses["kd_imitation"] > 0
        losses["kd_imitation"].backward()
        assert all(p.grad is not None for p in d.parameters())


# -- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option,value", [
    ("loss_weight", -0.1), ("loss_weight", float("nan")), ("psi", -0.1), ("psi", 1.5), ("point_prior_scale", 0.0),
    ("point_prior_scale", float("inf")), ("iou_max", "image"),
])
def test_bad_options_raise(option, value):
    with pytest.raises(ValueError, match=option):
        FGFIDistiller(4, 4, STRIDES, **{option: value})


def test_missing_or_misshapen_priors_raise():
    d = make_fgfi(3)
    student, teacher, boxes = make_feats(3, 2, 1), make_feats(TEACHER_C, 2, 2), make_boxes((1, 1))
    with pytest.raises(ValueError, match=r"needs \['priors'\]"):
        d(student, teacher, boxes)
    with pytest.raises(ValueError, match=r"needs \['priors'\]"):
        d.loss_terms(KDInputs(student, teacher, boxes))
    priors = anchors(STRIDES)
    for bad in ({"p3": priors["p3"]}, {**priors, "p4": priors["p4"][:-1]}, {**priors, "p3": priors["p3"][:, :3]}):
        with pytest.raises(ValueError, match="priors"):
            d.loss_terms(inputs_of(student, teacher, boxes, bad))


def test_wrong_channels_and_nan_raise():
    d, priors = make_fgfi(3), anchors(STRIDES)
    boxes = make_boxes((1, 1))
    with pytest.raises(ValueError, match="channels"):
        d.loss_terms(inputs_of(make_feats(5, 2, 1), make_feats(TEACHER_C, 2, 2), boxes, priors))
    with pytest.raises(ValueError, match="channels"):
        d.loss_terms(inputs_of(make_feats(3, 2, 1), make_feats(TEACHER_C + 1, 2, 2), boxes, priors))
    student = make_feats(3, 2, 1)
    student["p4"][1, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError):
        d.loss_terms(inputs_of(student, make_feats(TEACHER_C, 2, 2), boxes, priors))
