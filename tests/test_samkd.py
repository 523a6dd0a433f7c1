"""SAMKDDistiller (spatial-pyramid masked feature + cell-averaged logit distillation) against a literal reference
of the paper's Eq. 1-13, written cell by cell, pixel by pixel and channel by channel."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import IMAGE, STRIDES, gen, make_boxes, make_feats
from torch import Tensor, nn
from torch.func import functional_call

from liaf_lab.distillers import KDInputs, create_distiller, list_distillers, method_label, method_options
from liaf_lab.distillers.samkd import SAMKDDistiller, cell_bounds

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_syncs import count_device_reads
from references.samkd import ref_samkd

TEACHER_C = 4
CLASSES = 3
# p4 is 5 x 7 here: no pyramid size but 1 divides it, so the adaptive cells overlap
ODD = {"p3": (8, 10), "p4": (5, 7)}
OPTIONS = {"alpha": 0.7, "beta": 0.9}


def make_samkd(student_c: int = 3, strides=STRIDES, seed: int = 0, **options) -> SAMKDDistiller:
    torch.manual_seed(seed)
    return SAMKDDistiller(student_c, TEACHER_C, strides, **{**OPTIONS, **options}).double()


def feats(channels: int, seed: int, sizes=ODD, n: int = 2, requires_grad: bool = False) -> dict[str, Tensor]:
    g = gen(seed)
    return {lvl: torch.randn(n, channels, *hw, generator=g, dtype=torch.float64).requires_grad_(requires_grad)
            for lvl, hw in sizes.items()}


def heads(seed: int, sizes=ODD, n: int = 2, channels: int = CLASSES, requires_grad: bool = False, scale: float = 2.0):
    g = gen(seed)
    return {lvl: {"cls_logits": (scale * torch.randn(n, channels, *hw, generator=g, dtype=torch.float64) - 1.0)
                  .requires_grad_(requires_grad)} for lvl, hw in sizes.items()}


def case(student_c: int = 3, sizes=ODD, n: int = 2, channels: int = CLASSES, boxes=(2, 1)):
    """Student and teacher features and logits (student ones with grad) and boxes."""
    return (feats(student_c, 1, sizes, n, True), feats(TEACHER_C, 2, sizes, n), heads(3, sizes, n, channels, True),
            heads(4, sizes, n, channels), make_boxes(boxes[:n], seed=5))


def inputs_of(s, t, sh, th, boxes, **kw) -> KDInputs:
    return KDInputs(s, t, boxes, student_head=sh, teacher_head=th, **kw)


def cuda(x: Tensor) -> Tensor:
    return x.detach().cuda()


def total(d: SAMKDDistiller, inputs: KDInputs) -> Tensor:
    return torch.stack(list(d.loss_terms(inputs).values())).sum()


def grads(loss: Tensor, tensors: list[Tensor]) -> list[Tensor | None]:
    return list(torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=True))


def learnable(s, sh, d) -> list[Tensor]:
    return [*s.values(), *(h["cls_logits"] for h in sh.values()), *d.parameters()]


# -- cells ----------------------------------------------------------------------------------------------
def test_cell_bounds_are_adaptive_pooling_s():
    """Mean over each ``cell_bounds`` cell equals ``adaptive_avg_pool2d``, also where ``n`` does not divide."""
    assert cell_bounds(5, 2) == [(0, 3), (2, 5)]
    assert cell_bounds(7, 4) == [(0, 2), (1, 4), (3, 6), (5, 7)]
    assert cell_bounds(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    for size in range(1, 13):
        x = torch.randn(1, 1, size, 1, generator=gen(size), dtype=torch.float64)
        for n in (1, 2, 4):
            if n <= size:
                want = torch.stack([x[0, 0, a:b, 0].mean() for a, b in cell_bounds(size, n)])
                torch.testing.assert_close(F.adaptive_avg_pool2d(x, (n, 1)).flatten(), want)


# -- loss and gradients vs the reference ----------------------------------------------------------------
BOXES = {"boxes": (3, 1), "image-without-boxes": (2, 0), "batch-without-boxes": (0, 0)}


@pytest.mark.parametrize("student_c", [3, TEACHER_C], ids=["projector", "same-channels"])
@pytest.mark.parametrize("boxes", list(BOXES), ids=list(BOXES))
def test_loss_and_grads_match_reference(student_c, boxes):
    d = make_samkd(student_c)
    assert isinstance(d.align["p3"], nn.Conv2d) == (student_c != TEACHER_C)
    s, t, sh, th, _ = case(student_c)
    terms = d.loss_terms(inputs_of(s, t, sh, th, make_boxes(BOXES[boxes], seed=5)))
    want = ref_samkd(d, s, t, sh, th)
    assert list(terms) == ["feature", "logit"]
    for name in terms:
        torch.testing.assert_close(terms[name], want[name], msg=name)
    wrt = learnable(s, sh, d)
    got, ref = grads(sum(terms.values()), wrt), grads(sum(want.values()), wrt)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("options", [
    {"spatial_norm": "softmax"},
    {"spatial_norm": "none", "omega_s": 0.9},
    {"divergence": "softmax", "kl_temperature": 2.0},
    {"kl_temperature": 0.5, "tau": 1.3, "omega_c": 0.45, "lambda_s": 0.3, "mu_c": 0.8},
    {"feature_norm": "mean"},
    {"detach_weight": False},
    {"pyramid": "2-4"},
    {"pyramid": "1"},
    {"always_project": True},
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_options_match_reference(options):
    d = make_samkd(TEACHER_C, **options)
    s, t, sh, th, boxes = case(TEACHER_C)
    terms = d.loss_terms(inputs_of(s, t, sh, th, boxes))
    want = ref_samkd(d, s, t, sh, th)
    for name in terms:
        torch.testing.assert_close(terms[name], want[name], msg=name)
    wrt = learnable(s, sh, d)
    for g, r in zip(grads(sum(terms.values()), wrt), grads(sum(want.values()), wrt), strict=True):
        torch.testing.assert_close(g, r)


def test_retinanet_like_anchors_softmax_per_anchor():
    """``A = 3`` anchors x ``K = 2`` classes: the softmax runs over each anchor's classes."""
    d = make_samkd(3, divergence="softmax", num_anchors=3)
    s, t, sh, th, boxes = case(3, channels=6)
    with torch.no_grad():
        terms = d.loss_terms(inputs_of(s, t, sh, th, boxes))
        want = ref_samkd(d, s, t, sh, th)
        wrong = ref_samkd(d, s, t, sh, th, num_anchors=1)
    torch.testing.assert_close(terms["logit"], want["logit"])
    assert abs(float(terms["logit"]) - float(wrong["logit"])) > 1e-3 * abs(float(wrong["logit"]))


def test_learnable_parts_grads_after_backward_match_reference():
    """``.grad`` of ``Theta``, ``theta_s`` and ``theta_c`` of every level after ``backward``, and of the student
    features and logits."""
    d = make_samkd(3)
    s, t, sh, th, boxes = case(3)
    total(d, inputs_of(s, t, sh, th, boxes)).backward()
    got = {name: p.grad.clone() for name, p in d.named_parameters()}
    got_inputs = [x.grad.clone() for x in [*s.values(), *(h["cls_logits"] for h in sh.values())]]
    d.zero_grad()
    for x in [*s.values(), *(h["cls_logits"] for h in sh.values())]:
        x.grad = None
    sum(ref_samkd(d, s, t, sh, th).values()).backward()
    assert set(got) == {f"{prefix}.{lvl}.{i}.{k}" for lvl in d.levels
                        for prefix, i in (("spatial_blocks", 0), ("spatial_blocks", 2), ("channel_blocks", 0),
                                          ("channel_blocks", 2))
                        for k in ("weight", "bias")} | {f"align.{lvl}.{k}" for lvl in d.levels
                                                        for k in ("weight", "bias")}
    for name, p in d.named_parameters():
        assert bool(p.grad.abs().sum() > 0), name
        torch.testing.assert_close(got[name], p.grad, msg=name)
    for g, x in zip(got_inputs, [*s.values(), *(h["cls_logits"] for h in sh.values())], strict=True):
        assert bool(g.abs().sum() > 0)
        torch.testing.assert_close(g, x.grad)


@pytest.mark.parametrize("strides,sizes", [
    ({"p3": 4.0}, {"p3": (8, 10)}),
    ({"p4": 8.0}, {"p4": (5, 7)}),
    ({"p3": 4.0, "p4": 8.0}, ODD),
], ids=["single-p3", "single-odd-p4", "two-levels"])
def test_levels_and_strides_match_reference(strides, sizes):
    d = make_samkd(3, strides=strides)
    s, t, sh, th, boxes = case(3, sizes=sizes)
    with torch.no_grad():
        terms = d.loss_terms(inputs_of(s, t, sh, th, boxes))
        want = ref_samkd(d, s, t, sh, th)
    for name in terms:
        torch.testing.assert_close(terms[name], want[name], msg=name)


def test_grid_checked_against_the_padded_input():
    """With ``image_size`` the levels must have the grid of their stride (``reference.SIZES``)."""
    d = make_samkd(3)
    s, t = make_feats(3, 2, 1, requires_grad=True), make_feats(TEACHER_C, 2, 2)
    sizes = {lvl: tuple(x.shape[2:]) for lvl, x in s.items()}
    sh, th = heads(3, sizes, requires_grad=True), heads(4, sizes)
    terms = d.loss_terms(inputs_of(s, t, sh, th, make_boxes((1, 2)), image_size=(int(IMAGE[0]), int(IMAGE[1]))))
    want = ref_samkd(d, s, t, sh, th)
    torch.testing.assert_close(sum(terms.values()), sum(want.values()))
    with pytest.raises(ValueError):
        d.loss_terms(inputs_of(s, t, sh, th, make_boxes((1, 2)), image_size=(64, 64)))


def test_per_level_channels_and_a_single_projected_level():
    torch.manual_seed(0)
    d = SAMKDDistiller({"p3": 2, "p4": TEACHER_C}, TEACHER_C, STRIDES).double()
    assert isinstance(d.align["p3"], nn.Conv2d) and isinstance(d.align["p4"], nn.Identity)
    s = {"p3": feats(2, 1)["p3"], "p4": feats(TEACHER_C, 1)["p4"]}
    t, sh, th = feats(TEACHER_C, 2), heads(3), heads(4)
    with torch.no_grad():
        torch.testing.assert_close(total(d, inputs_of(s, t, sh, th, make_boxes((1, 1)))),
                                   sum(ref_samkd(d, s, t, sh, th).values()))


# -- edge cases -----------------------------------------------------------------------------------------
def test_boxes_are_not_read():
    """Boxes crossing the border, an image without boxes and a batch without boxes give the same loss."""
    d = make_samkd(3)
    s, t, sh, th, _ = case(3)
    crossing = [torch.tensor([[-5.0, -3.0, 12.0, 50.0], [30.0, 20.0, 47.0, 39.0]], dtype=torch.float64),
                torch.tensor([[-1.0, 10.0, 41.0, 33.0]], dtype=torch.float64)]
    with torch.no_grad():
        a = total(d, inputs_of(s, t, sh, th, crossing))
        b = total(d, inputs_of(s, t, sh, th, make_boxes((0, 0))))
        c = total(d, inputs_of(s, t, sh, th, make_boxes((2, 0))))
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("size", [(3, 5), (1, 1), (2, 9)], ids=["3x5", "1x1", "2x9"])
def test_levels_smaller_than_a_pyramid_size_skip_it(size):
    """``small_levels="skip"`` (default): on a level of H or W below ``n`` the ``n x n`` cells are left out."""
    sizes = {"p3": (8, 10), "p4": size}
    d = make_samkd(3)
    assert d.small_levels == "skip"
    s, t, sh, th, boxes = case(3, sizes=sizes)
    terms = d.loss_terms(inputs_of(s, t, sh, th, boxes))
    want = ref_samkd(d, s, t, sh, th)
    for name in terms:
        torch.testing.assert_close(terms[name], want[name], msg=name)
    assert d.level_pyramid("p4", *size) == tuple(n for n in (1, 2, 4) if n <= min(size))


def test_levels_smaller_than_a_pyramid_size_error():
    d = make_samkd(3, small_levels="error")
    s, t, sh, th, boxes = case(3, sizes={"p3": (8, 10), "p4": (3, 5)})
    with pytest.raises(ValueError, match=r"'samkd' \(SAMKD\): level 'p4' is 3x5, smaller than its 4x4 pyramid cells"):
        d.loss_terms(inputs_of(s, t, sh, th, boxes))
    d = make_samkd(3, small_levels="error", pyramid="1-2")
    d.loss_terms(inputs_of(s, t, sh, th, boxes))  # 2x2 fits a 3x5 level


def test_masks_and_weights_behave_as_the_equations_say():
    """``omega = 0`` masks everything (the rebuild no longer sees the student); identical features make ``W = 0``."""
    d = make_samkd(TEACHER_C, omega_s=0.0, omega_c=0.0)
    s, t, sh, th, boxes = case(TEACHER_C)
    terms = d.loss_terms(inputs_of(s, t, sh, th, boxes))
    assert all(g is None or bool((g == 0).all()) for g in grads(terms["feature"], list(s.values())))
    # identical student and teacher features: W = 0 in every cell, so no logit loss
    d = make_samkd(TEACHER_C)
    same = {lvl: x.detach().clone().requires_grad_(True) for lvl, x in t.items()}
    terms = d.loss_terms(inputs_of(same, t, sh, th, boxes))
    torch.testing.assert_close(terms["logit"], torch.zeros((), dtype=torch.float64), atol=1e-12, rtol=0)
    # identical logits: D = 0
    copied = {k: {"cls_logits": v["cls_logits"].detach()} for k, v in th.items()}
    terms = d.loss_terms(inputs_of(s, t, copied, th, boxes))
    torch.testing.assert_close(terms["logit"], torch.zeros((), dtype=torch.float64), atol=1e-12, rtol=0)


def test_detached_weight_sends_no_logit_gradient_into_the_features():
    s, t, sh, th, boxes = case(3)
    detached = make_samkd(3).loss_terms(inputs_of(s, t, sh, th, boxes))["logit"]
    assert all(g is None for g in grads(detached, list(s.values())))
    attached = make_samkd(3, detach_weight=False).loss_terms(inputs_of(s, t, sh, th, boxes))["logit"]
    torch.testing.assert_close(attached, detached)
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads(attached, list(s.values())))


def test_gradcheck_tiny_double():
    """Student features, student logits and every learnable parameter (``W`` attached, so all paths count)."""
    sizes = {"p4": (3, 5)}
    d = make_samkd(2, strides={"p4": 8.0}, alpha=0.5, beta=0.8, detach_weight=False, kl_temperature=1.5)
    s, t, sh, th, boxes = case(2, sizes=sizes, n=1, channels=2)

    class Total(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.d = d

        def forward(self, student: Tensor, logits: Tensor) -> Tensor:
            return total(self.d, inputs_of({"p4": student}, t, {"p4": {"cls_logits": logits}}, th, boxes))

    wrapper = Total()
    names = [n for n, _ in wrapper.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in wrapper.parameters()]

    def loss(student, logits, *ps):
        return functional_call(wrapper, dict(zip(names, ps, strict=True)), (student, logits))

    assert torch.autograd.gradcheck(loss, (s["p4"], sh["p4"]["cls_logits"], *params), eps=1e-6, atol=1e-5)


# -- determinism, reads, sensitivity ---------------------------------------------------------------------
def test_compute_terms_reads_nothing_back():
    d = make_samkd(3)
    s, t, sh, th, boxes = case(3)
    inputs = inputs_of(s, t, sh, th, boxes)
    with count_device_reads() as reads:
        d.compute_terms(inputs)
    assert reads == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_reads_nothing_back():
    d = make_samkd(3)
    s, t, sh, th, boxes = case(3)
    with torch.no_grad():
        want = d.loss_terms(inputs_of(s, t, sh, th, boxes))
        dc = d.cuda()
        inputs = inputs_of({k: cuda(v) for k, v in s.items()}, {k: cuda(v) for k, v in t.items()},
                           {k: {"cls_logits": cuda(v["cls_logits"])} for k, v in sh.items()},
                           {k: {"cls_logits": cuda(v["cls_logits"])} for k, v in th.items()}, [cuda(b) for b in boxes])
        got = dc.loss_terms(inputs)
        with count_device_reads("cuda") as reads:
            dc.compute_terms(inputs)
    assert reads == []
    for name in want:
        torch.testing.assert_close(got[name].cpu(), want[name])


def test_reference_check_is_sensitive_to_options():
    d = make_samkd(3)
    s, t, sh, th, boxes = case(3)
    with torch.no_grad():
        terms = d.loss_terms(inputs_of(s, t, sh, th, boxes))
        for name, wrong in [("feature", {"omega_s": 1.05}), ("feature", {"omega_c": 0.55}),
                            ("feature", {"lambda_s": 0.55, "mu_c": 0.45}), ("feature", {"tau": 2.0}),
                            ("feature", {"spatial_norm": "softmax"}), ("feature", {"pyramid": (1, 2)}),
                            ("logit", {"divergence": "softmax"}), ("logit", {"kl_temperature": 2.0}),
                            ("logit", {"pyramid": (1, 4)})]:
            other = ref_samkd(d, s, t, sh, th, **wrong)[name]
            # assert_close on doubles (rtol 1e-7) tells apart anything beyond 1e-5
            assert abs(float(terms[name]) - float(other)) > 1e-5 * abs(float(other)), wrong
        doubled = make_samkd(3, alpha=2 * OPTIONS["alpha"], beta=2 * OPTIONS["beta"]).loss_terms(
            inputs_of(s, t, sh, th, boxes))
    for name in terms:
        torch.testing.assert_close(doubled[name], 2 * terms[name])


def test_rebuild_is_per_cell_not_on_the_whole_map():
    """The 3x3 convs zero-pad at cell borders: running ``theta_s`` on the whole map gives another loss."""
    d = make_samkd(TEACHER_C, pyramid="2", lambda_s=1.0, mu_c=0.0, omega_s=10.0, omega_c=10.0, alpha=1.0)
    s, t, sh, th, boxes = case(TEACHER_C)
    with torch.no_grad():
        got = d.loss_terms(inputs_of(s, t, sh, th, boxes))["feature"]
        # nothing masked, only theta_s: the per-cell loss vs the whole-map loss
        whole = sum(((d.spatial_blocks[lvl](s[lvl]) - t[lvl]) ** 2).sum() / 2 for lvl in d.levels)
    torch.testing.assert_close(got, ref_samkd(d, s, t, sh, th)["feature"])
    assert abs(float(got) - float(whole)) > 1e-3 * float(whole)


# -- protocol -------------------------------------------------------------------------------------------
def test_terms_sum_and_the_plain_call_needs_head_outputs():
    d = make_samkd(3)
    s, t, sh, th, boxes = case(3)
    with torch.no_grad():
        terms = d.loss_terms(inputs_of(s, t, sh, th, boxes))
        assert list(terms) == ["feature", "logit"] and all(v.dim() == 0 for v in terms.values())
        torch.testing.assert_close(total(d, inputs_of(s, t, sh, th, boxes)), terms["feature"] + terms["logit"])
    with pytest.raises(ValueError, match=r"distiller 'samkd' needs \['head_outputs'\]"):
        d(s, t, boxes)
    with pytest.raises(ValueError, match=r"needs \['head_outputs'\]"):
        d.loss_terms(KDInputs(s, t, boxes, teacher_head=th))


def test_registry_and_options():
    assert "samkd" in list_distillers() and method_label("samkd") == "SAMKD"
    options = method_options("samkd")
    assert {k: v[1] for k, v in options.items()} == {
        "alpha": 2e-3, "beta": 6e-6, "tau": 0.5, "omega_s": 0.95, "omega_c": 0.5, "lambda_s": 0.45, "mu_c": 0.55,
        "pyramid": "1-2-4", "small_levels": "skip", "spatial_norm": "mean", "feature_norm": "sum",
        "divergence": "binary", "kl_temperature": 1.0, "num_anchors": 1, "detach_weight": True,
        "always_project": False}
    assert options["alpha"][0] is float and options["num_anchors"][0] is int and options["detach_weight"][0] is bool
    d = create_distiller("samkd", 8, 16, {"0": 8.0}, alpha=1e-3, pyramid="1-2")
    assert isinstance(d, SAMKDDistiller) and d.alpha == 1e-3 and d.pyramid == (1, 2)
    assert d.needs == frozenset({"head_outputs"}) and d.head_keys == ("cls_logits",)
    with pytest.raises(ValueError, match="unknown distiller 'samkd' option"):
        create_distiller("samkd", 8, 16, {"0": 8.0}, gamma=1.0)


def test_stage2_trains_align_and_both_rebuild_blocks():
    d = make_samkd(3)
    assert not d.two_stage and d.stage1_ready and d.stage1_modules() == {}
    want = {id(p) for p in [*d.align.parameters(), *d.spatial_blocks.parameters(), *d.channel_blocks.parameters()]}
    assert {id(p) for p in d.stage2_parameters()} == want == {id(p) for p in d.parameters()}
    assert len(want) == 2 * (2 + 4 + 4)  # per level: align (w, b), 2 convs of theta_s and 2 of theta_c
    assert len(list(make_samkd(TEACHER_C).parameters())) == 2 * 8  # no align where the channels agree
    with pytest.raises(ValueError, match="no stage 1"):
        d.stage1(feats(TEACHER_C, 2), make_boxes((1, 1)))


def test_no_gradient_into_the_teacher():
    d = make_samkd(3, detach_weight=False)
    s, _, sh, _, boxes = case(3)
    t, th = feats(TEACHER_C, 2, requires_grad=True), heads(4, requires_grad=True)
    total(d, inputs_of(s, t, sh, th, boxes)).backward()
    assert all(x.grad is None for x in t.values())
    assert all(h["cls_logits"].grad is None for h in th.values())


@pytest.mark.parametrize("options,match", [
    ({"alpha": -1.0}, "alpha"), ({"beta": float("nan")}, "beta"), ({"tau": 0.0}, "tau"),
    ({"omega_s": -0.1}, "omega_s"), ({"omega_c": float("inf")}, "omega_c"), ({"lambda_s": -1.0}, "lambda_s"),
    ({"mu_c": float("nan")}, "mu_c"), ({"kl_temperature": 0.0}, "kl_temperature"),
    ({"pyramid": "1-3"}, "pyramid"), ({"small_levels": "drop"}, "small_levels"),
    ({"spatial_norm": "max"}, "spatial_norm"), ({"feature_norm": "level"}, "feature_norm"),
    ({"divergence": "mse"}, "divergence"), ({"num_anchors": 0}, "num_anchors"), ({"num_anchors": True}, "num_anchors"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        SAMKDDistiller(3, TEACHER_C, STRIDES, **options)


def test_bad_inputs():
    d = make_samkd(3)
    s, t, sh, th, boxes = case(3)
    with pytest.raises(ValueError, match="channels"):
        d.loss_terms(inputs_of(feats(TEACHER_C, 1), t, sh, th, boxes))
    with pytest.raises(ValueError, match="channels"):
        d.loss_terms(inputs_of(s, feats(3, 2), sh, th, boxes))
    bad = {k: v.detach().clone() for k, v in s.items()}
    bad["p4"][0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        d.loss_terms(inputs_of(bad, t, sh, th, boxes))
    with pytest.raises(ValueError, match=r"student_head\['p4'\]\['cls_logits'\], which is missing"):
        d.loss_terms(inputs_of(s, t, {"p3": sh["p3"]}, th, boxes))
    with pytest.raises(ValueError, match=r"teacher_head\['p3'\]\['cls_logits'\], which is missing"):
        d.loss_terms(inputs_of(s, t, sh, {**th, "p3": {"bbox_regression": th["p3"]["cls_logits"]}}, boxes))
    wrong_grid = {**sh, "p4": {"cls_logits": torch.zeros(2, CLASSES, 4, 7, dtype=torch.float64)}}
    with pytest.raises(ValueError, match=r"student_head\['p4'\]\['cls_logits'\] must be \["):
        d.loss_terms(inputs_of(s, t, wrong_grid, th, boxes))
    with pytest.raises(ValueError, match="'cls_logits' at level 'p3' have shapes"):
        d.loss_terms(inputs_of(s, t, sh, {**th, "p3": {"cls_logits": torch.zeros(2, 2 * CLASSES, 8, 10)}}, boxes))
    with pytest.raises(ValueError, match="not a multiple of num_anchors=2"):
        make_samkd(3, divergence="softmax", num_anchors=2).loss_terms(inputs_of(s, t, sh, th, boxes))
