"""BCKDDistiller against a literal reference of the public BCKD code's two terms (``NovelKDLoss`` and the
GIoU ``loss_score_kd`` of ``LDHead.loss_single``), and its refusal on detectors without box bins."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import SIZES, STRIDES, gen, make_boxes, make_feats
from test_ld import _batch, _pair, count_device_reads
from torch import Tensor

from liaf_lab.distillers import KDInputs, create_distiller, list_distillers, method_label, method_options
from liaf_lab.distillers.bckd import BCKDDistiller
from liaf_lab.engine.steps import DistillStep
from liaf_lab.models import fpn_strides
from references.bckd import ref_bckd, ref_sigmoid

F64 = torch.float64


def make_inputs(a: int = 1, reg_max: int = 3, k: int = 3, n: int = 2, seed: int = 0, strides=STRIDES,
                positives: float = 0.3, empty_levels: tuple[str, ...] = ()) -> KDInputs:
    """Random ``cls_logits`` and ``box_bins`` of both sides, square priors of side 4 strides at each cell
    centre (``a`` per cell, slightly shifted), and a random assignment (none at ``empty_levels``)."""
    g = gen(seed)
    d = 4 * (reg_max + 1)

    def head():
        return {lvl: {"cls_logits": 2 * torch.randn(n, a * k, *SIZES[lvl], generator=g, dtype=F64),
                      "box_bins": 2 * torch.randn(n, a * d, *SIZES[lvl], generator=g, dtype=F64)} for lvl in strides}

    student, teacher = head(), head()
    for out in student.values():
        for x in out.values():
            x.requires_grad_(True)
    priors, assignment = {}, {}
    for lvl, s in strides.items():
        h, w = SIZES[lvl]
        rows = []
        for y in range(h):
            for x in range(w):
                for j in range(a):
                    cx, cy = (x + 0.5) * s + j, (y + 0.5) * s
                    rows.append([cx - 2 * s, cy - 2 * s, cx + 2 * s, cy + 2 * s])
        priors[lvl] = torch.tensor(rows, dtype=F64)
        pos = torch.rand(n, a * h * w, generator=g) < (0.0 if lvl in empty_levels else positives)
        assignment[lvl] = torch.where(pos, 0, -1)
    return KDInputs(make_feats(2, n, seed + 1, strides), make_feats(3, n, seed + 2, strides), make_boxes([1] * n),
                    student_head=student, teacher_head=teacher, priors=priors, assignment=assignment)


def assert_terms_close(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert list(got) == ["cls", "loc"]
    for key in got:
        torch.testing.assert_close(got[key], torch.as_tensor(want[key], dtype=got[key].dtype), msg=key)


CASES = {
    "one-anchor": dict(),
    "two-anchors": dict(a=2, reg_max=2),
    "single-level": dict(strides={"p4": 8.0}),
    "level-without-positives": dict(empty_levels=("p4",)),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_terms_and_grads_match_reference(case):
    kw = CASES[case]
    strides = kw.get("strides", STRIDES)
    inputs = make_inputs(**kw)
    d = BCKDDistiller(2, 3, strides, cls_weight=0.7, loc_weight=3.0, beta=1.5)
    got = d.loss_terms(inputs)
    want = ref_bckd(inputs, strides, cls_weight=0.7, loc_weight=3.0, beta=1.5)
    assert_terms_close(got, want)
    wrt = [out[key] for out in inputs.student_head.values() for key in ("cls_logits", "box_bins")]
    for key in ("cls", "loc"):
        g_got = torch.autograd.grad(got[key], wrt, retain_graph=True, allow_unused=True)
        g_ref = torch.autograd.grad(want[key], wrt, retain_graph=True, allow_unused=True)
        for a, b in zip(g_got, g_ref, strict=True):
            if a is None or b is None:
                assert (a is None or not a.abs().sum()) and (b is None or not b.abs().sum()), key
            else:
                torch.testing.assert_close(a, b, msg=key)


def test_no_positives_anywhere_gives_zero_terms():
    inputs = make_inputs(positives=0.0)
    terms = BCKDDistiller(2, 3, STRIDES).loss_terms(inputs)
    assert float(terms["cls"].detach()) == 0.0 and float(terms["loc"].detach()) == 0.0


def test_reference_check_is_sensitive_to_the_public_choices():
    inputs = make_inputs(empty_levels=("p4",))
    d = BCKDDistiller(2, 3, STRIDES)
    with torch.no_grad():
        got = d.loss_terms(inputs)
        torch.testing.assert_close(got["cls"], ref_bckd(inputs, STRIDES)["cls"])
    for wrong in (ref_bckd(inputs, STRIDES, every_level=True), ref_bckd(inputs, STRIDES, beta=2.0)):
        assert not math.isclose(float(got["cls"]), float(wrong["cls"].detach()), rel_tol=1e-4)
    assert not math.isclose(float(got["loc"]), float(ref_bckd(inputs, STRIDES, loc_weight=2.0)["loc"].detach()),
                            rel_tol=1e-4)
    # the modulating factor carries gradient (public ``score = pred.sigmoid()``, not detached)
    inputs = make_inputs()
    cls = d.loss_terms(inputs)["cls"]
    wrt = [out["cls_logits"] for out in inputs.student_head.values()]
    g = torch.autograd.grad(cls, wrt)
    g_detached = torch.autograd.grad(ref_bckd(inputs, STRIDES, detach_factor=True)["cls"], wrt)
    assert not torch.allclose(g[0], g_detached[0])


def test_zero_for_the_teacher_s_own_predictions():
    inputs = make_inputs()
    for lvl in inputs.student_head:
        inputs.student_head[lvl] = {k: v.detach().clone() for k, v in inputs.teacher_head[lvl].items()}
    terms = BCKDDistiller(2, 3, STRIDES).loss_terms(inputs)
    assert float(terms["loc"]) < 1e-12  # equal boxes, and zero weight
    assert float(terms["cls"]) == 0.0  # the BCE is the entropy there, but the factor |p_t - p_s| is 0


@pytest.mark.parametrize("wrt", ["cls_logits", "box_bins"])
def test_gradcheck_tiny_double(wrt):
    """Each term in its own input: the localisation weight takes no gradient, so the classification logits
    are checked on the ``cls`` term and the bins on the ``loc`` term."""
    inputs = make_inputs(strides={"p4": 8.0}, reg_max=2, n=1, k=2, positives=0.5)
    d = BCKDDistiller(2, 3, {"p4": 8.0})
    x = inputs.student_head["p4"][wrt].detach().clone().requires_grad_(True)

    def loss(v):
        head = {"p4": {**{k: t.detach() for k, t in inputs.student_head["p4"].items()}, wrt: v}}
        terms = d.loss_terms(KDInputs(inputs.student_feats, inputs.teacher_feats, inputs.boxes, student_head=head,
                                      teacher_head=inputs.teacher_head, priors=inputs.priors,
                                      assignment=inputs.assignment))
        return terms["cls" if wrt == "cls_logits" else "loc"]

    assert torch.autograd.gradcheck(loss, (x,), eps=1e-6, atol=1e-5)


def test_weight_map_is_the_localisation_weight_per_cell_and_nothing_is_read_back():
    inputs = make_inputs(a=2, reg_max=2, empty_levels=("p4",))
    d = BCKDDistiller(2, 3, STRIDES)
    maps = d.weight_maps(inputs)
    assert list(maps) == ["box weight"]
    assert bool((maps["box weight"]["p4"] == 0).all())  # a level without positives adds no term
    h, w = SIZES["p3"]
    s_cls, t_cls = inputs.student_head["p3"]["cls_logits"].detach(), inputs.teacher_head["p3"]["cls_logits"]
    want = torch.zeros(2, h, w, dtype=F64)
    for i in range(2):
        for y in range(h):
            for x in range(w):
                for j in range(2):
                    want[i, y, x] += max(abs(ref_sigmoid(t_cls[i, j * 3 + c, y, x]) - ref_sigmoid(s_cls[i, j * 3 + c, y, x]))
                                         for c in range(3))
    torch.testing.assert_close(maps["box weight"]["p3"], want)
    with count_device_reads() as reads:
        d.compute_terms(inputs)
    assert reads == []


def test_registry_and_options():
    assert "bckd" in list_distillers() and method_label("bckd") == "BCKD"
    assert method_options("bckd") == {"cls_weight": (float, 1.0), "loc_weight": (float, 4.0), "beta": (float, 1.0)}
    d = create_distiller("bckd", 8, 16, {"0": 8.0})
    assert list(d.parameters()) == [] and d.needs == {"head_outputs", "priors", "assignment"}


@pytest.mark.parametrize("options,match", [
    ({"cls_weight": -1.0}, r"^distiller 'bckd' option cls_weight=\S+ must be a finite number >= 0"),
    ({"loc_weight": float("nan")}, r"^distiller 'bckd' option loc_weight=\S+ must be a finite number >= 0"),
    ({"beta": 0.0}, r"^distiller 'bckd' option beta=\S+ must be a finite number > 0"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        BCKDDistiller(2, 3, STRIDES, **options)


@pytest.mark.parametrize("student_arch,teacher_arch,role", [("fcos", "fcos", "student \\(FCOS\\)"),
                                                            ("gfl", "retinanet", "teacher \\(RetinaNet\\)")])
def test_detectors_without_box_bins_are_refused_before_training(student_arch, teacher_arch, role):
    student, teacher = _pair(student_arch, teacher_arch)
    with pytest.raises(ValueError, match=rf"^distiller 'bckd' reads the head outputs \['box_bins'\], which the {role}"):
        DistillStep(student, teacher, create_distiller("bckd", 8, 16, fpn_strides(student)))


def test_bckd_trains_a_gfl_student_through_the_step():
    student, teacher = _pair("gfl", "gfl")
    step = DistillStep(student, teacher, create_distiller("bckd", 8, 16, fpn_strides(student))).train()
    losses = step(*_batch())
    assert {"kd_cls", "kd_loc"} <= set(losses) and float(losses["kd_cls"].detach()) > 0 and float(losses["kd_loc"].detach()) > 0
    (losses["kd_cls"] + losses["kd_loc"]).backward()
    assert student.head.regression_head.bbox_reg.weight.grad.abs().sum() > 0
    assert student.head.classification_head.cls_logits.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
