"""GIDDistiller against a literal, loop-by-loop reference of GID (GISM selection, feature, relation, response)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import IMAGE, SIZES, STRIDES, gen, make_boxes, make_feats
from torch import Tensor, nn
from torch.func import functional_call

from liaf_lab.distillers import create_distiller, method_label, method_options
from liaf_lab.distillers.base import KDInputs
from liaf_lab.distillers.gid import GIDDistiller, select_instances

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_syncs import count_device_reads
from references.gid import ref_greedy_nms, ref_select, ref_terms

TEACHER_C, CLASSES = 4, 3
OPTIONS = {"feature_weight": 1.3, "relation_weight": 0.7, "response_weight": 0.9, "roi_size": 3,
           "canonical_size": 32.0, "point_prior_scale": 2.0}


# -- inputs ------------------------------------------------------------------------------------------------
def make_priors(kind: str, strides=STRIDES) -> dict[str, Tensor]:
    """Per level ``[H*W*A, 4]`` in the detectors' order (row-major H, W, then anchor), float64.

    ``anchors``: 4 anchors per cell (2s x 2s, 3s x 1.5s, 1.5s x 3s, 3.2s x 3.2s) centred on the cell, crossing the
    border at the edges; ``points``: FCOS's zero-size points; ``cells``: torchvision FCOS's one-cell anchors.
    """
    shapes = {"anchors": [(2.0, 2.0), (3.0, 1.5), (1.5, 3.0), (3.2, 3.2)], "points": [(0.0, 0.0)], "cells": [(1.0, 1.0)]}[kind]
    out = {}
    for lvl, s in strides.items():
        h, w = SIZES[lvl]
        rows = []
        for i in range(h):
            for j in range(w):
                cx, cy = (j + 0.5) * s, (i + 0.5) * s
                for bw, bh in shapes:
                    rows.append([cx - bw * s / 2, cy - bh * s / 2, cx + bw * s / 2, cy + bh * s / 2])
        out[lvl] = torch.tensor(rows, dtype=torch.float64)
    return out


def make_heads(num_anchors: int, n: int, seed: int, strides=STRIDES, requires_grad: bool = False) -> dict:
    g = gen(seed)
    return {lvl: {"cls_logits": (torch.randn(n, num_anchors * CLASSES, *SIZES[lvl], generator=g, dtype=torch.float64)
                                 * 2).requires_grad_(requires_grad)} for lvl in strides}


def make_inputs(student_c: int = 3, kind: str = "anchors", strides=STRIDES, counts=(3, 0), seed: int = 0,
                requires_grad: bool = True) -> KDInputs:
    priors = make_priors(kind, strides)
    a = 4 if kind == "anchors" else 1
    return KDInputs(make_feats(student_c, len(counts), seed + 1, strides, requires_grad=requires_grad),
                    make_feats(TEACHER_C, len(counts), seed + 2, strides), make_boxes(counts, seed + 3),
                    image_size=(int(IMAGE[0]), int(IMAGE[1])),
                    student_head=make_heads(a, len(counts), seed + 4, strides, requires_grad),
                    teacher_head=make_heads(a, len(counts), seed + 5, strides), priors=priors)


def make_gid(student_c: int = 3, strides=STRIDES, seed: int = 0, **options) -> GIDDistiller:
    torch.manual_seed(seed)
    return GIDDistiller(student_c, TEACHER_C, strides, **{**OPTIONS, **options}).double()


def indices_of(selected: list[list[int]], k: int) -> tuple[Tensor, Tensor]:
    """The reference's kept lists as ``index [N, k]`` and ``valid [N, k]`` (padding: index 0, invalid)."""
    index = torch.tensor([keep + [0] * (k - len(keep)) for keep in selected], dtype=torch.long)
    valid = torch.tensor([[True] * len(keep) + [False] * (k - len(keep)) for keep in selected])
    return index, valid


def assert_terms_close(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert list(got) == ["feature", "relation", "response"]
    for k, value in want.items():
        torch.testing.assert_close(got[k], value, msg=lambda m, k=k: f"term {k}: {m}")


# -- loss, selection and gradients vs the reference ----------------------------------------------------------
CASES = {
    "anchors-projector-two-levels": (3, "anchors", STRIDES, (3, 0), {}),
    "anchors-same-channels-prior-level": (TEACHER_C, "anchors", STRIDES, (1, 2), {"roi_level": "prior"}),
    "single-level": (3, "anchors", {"p3": 4.0}, (2, 1), {}),
    "fcos-points": (3, "points", STRIDES, (0, 0), {"nms_iou": 0.5}),
    "fcos-cells": (TEACHER_C, "cells", STRIDES, (2, 2), {"response_iou": 0.3}),
    "pool-smaller-than-k": (3, "anchors", STRIDES, (1, 1), {"pre_nms": 6}),
    "fewer-priors-than-k": (3, "points", {"p4": 8.0}, (1, 0), {"num_instances": 25, "nms_iou": 0.0}),
    "one-instance": (3, "anchors", STRIDES, (0, 1), {"num_instances": 1}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_selection_terms_and_grads_match_reference(case):
    student_c, kind, strides, counts, options = CASES[case]
    d = make_gid(student_c, strides, **options)
    inputs = make_inputs(student_c, kind, strides, counts)
    want_sel = ref_select(d, inputs)
    index, valid = d.select(inputs)
    want_index, want_valid = indices_of(want_sel, d.num_instances)
    torch.testing.assert_close(valid, want_valid)
    torch.testing.assert_close(torch.where(valid, index, 0), want_index)
    got, want = d.loss_terms(inputs), ref_terms(d, inputs, want_sel)
    assert_terms_close(got, want)
    wrt = [*inputs.student_feats.values(), *(h["cls_logits"] for h in inputs.student_head.values()), *d.parameters()]
    g_got = torch.autograd.grad(sum(got.values()), wrt, allow_unused=True)
    g_want = torch.autograd.grad(sum(want.values()), wrt, allow_unused=True)
    for x, a, b in zip(wrt, g_got, g_want, strict=True):
        assert a is not None  # an unused level gets zeros here, None in the reference
        torch.testing.assert_close(a, torch.zeros_like(x) if b is None else b)
    assert any(g.abs().sum() > 0 for g in g_got[:len(inputs.student_feats)])


def test_select_instances_matches_python_greedy_nms_with_ties_and_small_pools():
    g = gen(11)
    for trial in range(30):
        n, p = 2, int(torch.randint(1, 40, (), generator=g))
        xy = torch.rand(p, 2, generator=g, dtype=torch.float64) * 30 - 5  # some boxes cross the border
        wh = torch.rand(p, 2, generator=g, dtype=torch.float64) * 12 + 0.5
        boxes = torch.cat([xy, xy + wh], dim=1)
        ties = trial % 2 == 0
        scores = (torch.randint(0, 4, (n, p), generator=g) / 4).double() if ties else torch.rand(n, p, generator=g,
                                                                                                dtype=torch.float64)
        k = int(torch.randint(1, 12, (), generator=g))
        pre_nms = 1000 if ties else int(torch.randint(1, p + 5, (), generator=g))  # ties at the pool's edge are arbitrary
        iou = float(torch.rand((), generator=g)) * 0.6
        index, valid = select_instances(scores, boxes, k, iou, pre_nms)
        for b in range(n):
            want = ref_greedy_nms(scores[b].tolist(), boxes.tolist(), k, iou, pre_nms)
            assert valid[b].tolist() == [True] * len(want) + [False] * (k - len(want)), (trial, b)
            assert index[b, :len(want)].tolist() == want, (trial, b)


def test_each_prior_is_picked_at_most_once_even_when_nms_cannot_suppress_it():
    g = gen(12)
    scores = torch.rand(2, 8, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[0.0, 0, 4, 4]] * 4 + [[5.0, 5, 5, 5]] * 4, dtype=torch.float64)  # last four: empty boxes
    for iou in (1.0, 0.3):
        index, valid = select_instances(scores, boxes, 6, iou, 100)
        for b in range(2):
            want = ref_greedy_nms(scores[b].tolist(), boxes.tolist(), 6, iou, 100)
            assert index[b, :len(want)].tolist() == want and valid[b].sum() == len(want)
            assert len(set(want)) == len(want)
    assert valid.sum(dim=1).tolist() == [5, 5]  # one of the overlapping boxes and the four empty ones


def test_ties_go_to_the_lower_prior_index_and_equal_logits_give_zero_scores():
    boxes = torch.tensor([[0.0, 0, 4, 4], [10, 10, 14, 14], [0, 0, 4, 4], [20, 20, 24, 24]], dtype=torch.float64)
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    index, valid = select_instances(scores, boxes, 4, 0.3, 100)
    assert index[0, :3].tolist() == [0, 1, 3] and valid[0].tolist() == [True, True, True, False]
    # equal teacher and student logits: every score is 0, the GIs are the lowest non-overlapping priors
    d = make_gid(num_instances=4)
    inputs = make_inputs()
    inputs.student_head = {lvl: {"cls_logits": h["cls_logits"].detach().clone().requires_grad_(True)}
                           for lvl, h in inputs.teacher_head.items()}
    want = ref_select(d, inputs)
    index, valid = d.select(inputs)
    assert valid.all() and index.tolist() == want
    assert_terms_close(d.loss_terms(inputs), ref_terms(d, inputs, want))


def test_fewer_than_two_valid_instances_give_a_zero_relation_and_finite_gradients():
    # one level of 4 x 5 cells with 4 identical huge anchors each: NMS keeps one per image
    strides = {"p4": 8.0}
    d = make_gid(strides=strides, num_instances=10)
    inputs = make_inputs(strides=strides, counts=(0, 0))
    inputs.priors = {"p4": torch.tensor([[-50.0, -50.0, 90.0, 90.0]] * 80, dtype=torch.float64)}
    assert d.select(inputs)[1].sum(dim=1).tolist() == [1, 1]
    terms = d.loss_terms(inputs)
    assert terms["relation"] == 0 and all(torch.isfinite(v) for v in terms.values())
    assert_terms_close(terms, ref_terms(d, inputs))
    sum(terms.values()).backward()
    assert all(torch.isfinite(x.grad).all() for x in inputs.student_feats.values())


def test_invalid_padding_instances_contribute_nothing():
    d = make_gid(num_instances=6)
    inputs = make_inputs()
    index, valid = d.select(inputs)
    base = d.losses_at(inputs, index, valid)
    # pad each image with four more instances (any prior) marked invalid: the terms do not move
    padded_index = torch.cat([index, torch.tensor([[5, 17, 40, 2], [9, 9, 0, 1]])], dim=1)
    padded_valid = torch.cat([valid, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    assert_terms_close(d.losses_at(inputs, padded_index, padded_valid), base)


def test_ground_truth_boxes_are_not_read():
    d = make_gid()
    a, b = make_inputs(counts=(3, 0)), make_inputs(counts=(0, 0))
    assert_terms_close(d.loss_terms(a), d.loss_terms(b))


class LossesAt(nn.Module):
    """``d.losses_at`` as a module's forward, so ``functional_call`` can swap the projector parameters."""

    def __init__(self, d: GIDDistiller) -> None:
        super().__init__()
        self.d = d

    def forward(self, inputs: KDInputs, index: Tensor, valid: Tensor) -> dict[str, Tensor]:
        return self.d.losses_at(inputs, index, valid)


def test_gradcheck_tiny_double_with_fixed_selection():
    strides = {"p4": 8.0}
    d = make_gid(2, strides, num_instances=3, roi_size=2)
    inputs = make_inputs(2, "points", strides, counts=(0, 0), requires_grad=False)
    index, valid = d.select(inputs)
    assert valid.all()
    wrapper = LossesAt(d)
    names = [n for n, _ in wrapper.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in wrapper.parameters())

    def loss(s: Tensor, z: Tensor, *ps: Tensor) -> Tensor:
        x = KDInputs({"p4": s}, inputs.teacher_feats, inputs.boxes, student_head={"p4": {"cls_logits": z}},
                     teacher_head=inputs.teacher_head, priors=inputs.priors)
        return torch.stack(list(functional_call(wrapper, dict(zip(names, ps, strict=True)), (x, index, valid)).values())).sum()

    student = inputs.student_feats["p4"].detach().clone().requires_grad_(True)
    logits = inputs.student_head["p4"]["cls_logits"].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (student, logits, *params))


# -- what learns, and where gradients go ------------------------------------------------------------------
def test_stage2_trains_only_the_projectors_where_channels_differ():
    d = make_gid(3)
    assert d.two_stage is False and d.stage1_modules() == {} and d.stage1_ready
    assert {id(p) for p in d.stage2_parameters()} == {id(p) for p in d.projectors.parameters()}
    assert all(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in d.projectors.values())
    assert list(make_gid(TEACHER_C).parameters()) == []
    inputs = make_inputs()
    inputs.teacher_feats = {k: v.clone().requires_grad_(True) for k, v in inputs.teacher_feats.items()}
    sum(d.loss_terms(inputs).values()).backward()
    assert all(t.grad is None for t in inputs.teacher_feats.values())
    assert all(s.grad.abs().sum() > 0 for s in inputs.student_feats.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.projectors.parameters())


def test_selection_carries_no_gradient_into_the_logits():
    d = make_gid(response_weight=0.0)
    inputs = make_inputs()
    index, valid = d.select(inputs)
    assert not index.requires_grad and not valid.requires_grad
    terms = d.loss_terms(inputs)
    logits = [h["cls_logits"] for h in inputs.student_head.values()]
    grads = torch.autograd.grad(sum(terms.values()), logits, allow_unused=True)
    assert all(g is None or g.eq(0).all() for g in grads)


def test_response_gradient_only_at_priors_matching_a_gi():
    d = make_gid(feature_weight=0.0, relation_weight=0.0, response_iou=0.9)
    inputs = make_inputs()
    terms = d.loss_terms(inputs)
    logits = [h["cls_logits"] for h in inputs.student_head.values()]
    grads = torch.autograd.grad(terms["response"], logits)
    nonzero = sum(int(g.abs().sum(dim=1).gt(0).sum()) for g in grads)
    assert 0 < nonzero < sum(g[:, 0].numel() for g in grads)


# -- protocol, registry, options --------------------------------------------------------------------------------
def test_registry_label_needs_and_defaults():
    d = create_distiller("gid", 8, 8, {"0": 8.0})
    assert isinstance(d, GIDDistiller) and method_label("gid") == "GID"
    assert GIDDistiller.needs == frozenset({"head_outputs", "priors"}) and GIDDistiller.head_keys == ("cls_logits",)
    assert method_options("gid") == {
        "feature_weight": (float, 5e-3), "relation_weight": (float, 40.0), "response_weight": (float, 0.1),
        "num_instances": (int, 10), "nms_iou": (float, 0.3), "pre_nms": (int, 3000), "roi_size": (int, 10),
        "sampling_ratio": (int, 2), "roi_level": (method_options("gid")["roi_level"][0], "size"),
        "canonical_size": (float, 224.0), "point_prior_scale": (float, 8.0), "response_iou": (float, 0.5)}


def test_forward_without_head_outputs_raises():
    d = make_gid()
    inputs = make_inputs()
    with pytest.raises(ValueError, match=r"needs \['head_outputs', 'priors'\]"):
        d(inputs.student_feats, inputs.teacher_feats, inputs.boxes)


def test_compute_terms_reads_nothing_back_from_the_device():
    d = make_gid()
    inputs = make_inputs()
    d.compute_terms(inputs)
    with count_device_reads() as reads:
        d.compute_terms(inputs)
    assert reads == []


def test_reference_check_is_sensitive_to_the_options():
    inputs = make_inputs(counts=(1, 1))
    for common, option, value, term in [({}, "nms_iou", 0.6, "feature"), ({}, "num_instances", 4, "relation"),
                                        ({}, "canonical_size", 64.0, "feature"), ({}, "response_iou", 0.3, "response"),
                                        ({"canonical_size": 64.0}, "roi_level", "prior", "feature"),
                                        ({}, "roi_size", 2, "feature"), ({}, "pre_nms", 5, "relation")]:
        base = float(make_gid(**common).loss_terms(inputs)[term].detach())
        d = make_gid(**common, **{option: value})
        got = d.loss_terms(inputs)
        assert_terms_close(got, ref_terms(d, inputs))
        assert abs(float(got[term].detach()) - base) > 1e-6 * abs(base), option
    points = make_inputs(kind="points")
    a, b = make_gid().loss_terms(points), make_gid(point_prior_scale=3.0).loss_terms(points)
    assert abs(float((a["response"] - b["response"]).detach())) > 1e-6


# -- bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option,value", [
    ("feature_weight", -1.0), ("relation_weight", float("nan")), ("response_weight", float("inf")),
    ("num_instances", 0), ("pre_nms", 0), ("roi_size", 0), ("sampling_ratio", 0), ("nms_iou", 1.5),
    ("response_iou", -0.1), ("canonical_size", 0.0), ("point_prior_scale", -2.0), ("roi_level", "all"),
])
def test_bad_options_raise(option, value):
    with pytest.raises(ValueError, match=option):
        GIDDistiller(4, 4, STRIDES, **{option: value})


def test_levels_with_different_channels_raise():
    with pytest.raises(ValueError, match="share their channels"):
        GIDDistiller({"p3": 4, "p4": 8}, 4, STRIDES)


def test_missing_and_malformed_head_outputs_and_priors_raise():
    d = make_gid()
    for field in ("student_head", "teacher_head", "priors"):
        inputs = make_inputs()
        setattr(inputs, field, None)
        with pytest.raises(ValueError, match=r"needs \["):
            d.loss_terms(inputs)
    inputs = make_inputs()
    inputs.teacher_head = {"p3": inputs.teacher_head["p3"]}
    with pytest.raises(ValueError, match=r"teacher_head\['p4'\]"):
        d.loss_terms(inputs)
    inputs = make_inputs()
    inputs.student_head["p3"]["cls_logits"] = inputs.student_head["p3"]["cls_logits"][:, :, :4]
    with pytest.raises(ValueError, match=r"student_head\['p3'\]"):
        d.loss_terms(inputs)
    inputs = make_inputs()
    inputs.student_head["p4"]["cls_logits"] = inputs.student_head["p4"]["cls_logits"][:, :6]
    with pytest.raises(ValueError, match="'cls_logits' at level 'p4' have shapes"):
        d.loss_terms(inputs)
    inputs = make_inputs()
    inputs.priors["p4"] = inputs.priors["p4"][:-1]
    with pytest.raises(ValueError, match=r"priors\['p4'\]"):
        d.loss_terms(inputs)
    inputs = make_inputs()
    inputs.priors["p4"] = torch.cat([inputs.priors["p4"]] * 2)  # A = 8 does not divide 12 channels
    with pytest.raises(ValueError, match="'cls_logits' at level 'p4' has 12 channels, not a multiple of the 8 priors"):
        d.loss_terms(inputs)


def test_wrong_channels_and_nan_raise():
    d = make_gid(3)
    inputs = make_inputs(5)
    with pytest.raises(ValueError, match="channels"):
        d.loss_terms(inputs)
    inputs = make_inputs(3)
    inputs.student_feats["p4"].detach()[1, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        d.loss_terms(inputs)
