"""Bad input raises ValueError or TypeError, and the message names the offending argument."""

from __future__ import annotations

import math

import pytest
import torch

from liaf_lab import (
    FitNetDistiller,
    InstanceSelectors,
    LIAFDistiller,
    create_distiller,
    diversity_loss,
    instance_mask,
    roi_instance_features,
)

STRIDES = {"0": 8.0, "1": 16.0}


def feats(channels: int, n: int = 2) -> dict[str, torch.Tensor]:
    return {"0": torch.randn(n, channels, 8, 8), "1": torch.randn(n, channels, 4, 4)}


def good_boxes(n: int = 2) -> list[torch.Tensor]:
    return [torch.tensor([[0.0, 0.0, 16.0, 16.0]]) for _ in range(n)]


@pytest.fixture(params=["liaf", "fitnet"])
def distiller(request):
    return create_distiller(request.param, student_channels=4, teacher_channels=6, strides=STRIDES)


# -- boxes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("box", [[10.0, 0.0, 5.0, 8.0], [0.0, 10.0, 8.0, 5.0]], ids=["x2<x1", "y2<y1"])
def test_degenerate_boxes(distiller, box):
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0], box]), torch.zeros(0, 4)]
    with pytest.raises(ValueError, match=r"boxes\[0\]\[1\].*x2 >= x1 and y2 >= y1"):
        distiller(feats(4), feats(6), boxes)
    with pytest.raises(ValueError, match=r"boxes\[0\]\[1\]"):
        instance_mask(boxes, torch.ones(2), (8, 8), 8.0)
    with pytest.raises(ValueError, match=r"boxes\[0\]\[1\]"):
        roi_instance_features(torch.randn(2, 3, 8, 8), boxes, 8.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_boxes(distiller, bad):
    boxes = [torch.tensor([[0.0, 0.0, bad, 8.0]]), torch.zeros(0, 4)]
    with pytest.raises(ValueError, match=r"boxes\[0\] contains NaN or inf"):
        distiller(feats(4), feats(6), boxes)
    with pytest.raises(ValueError, match=r"boxes\[0\] contains NaN or inf"):
        instance_mask(boxes, torch.ones(1), (8, 8), 8.0)


@pytest.mark.parametrize("shape", [(4,), (1, 5), (1, 2, 4)])
def test_boxes_of_wrong_shape(distiller, shape):
    boxes = [torch.zeros(shape), torch.zeros(0, 4)]
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        distiller(feats(4), feats(6), boxes)


def test_boxes_not_a_list(distiller):
    with pytest.raises(TypeError, match="boxes must be a list"):
        distiller(feats(4), feats(6), torch.zeros(2, 4))
    with pytest.raises(TypeError, match=r"boxes\[1\] must be a torch.Tensor"):
        distiller(feats(4), feats(6), [torch.zeros(0, 4), [[0.0, 0.0, 1.0, 1.0]]])


@pytest.mark.parametrize("n_boxes", [1, 3])
def test_boxes_length_differs_from_batch(distiller, n_boxes):
    with pytest.raises(ValueError, match=f"boxes has {n_boxes} entries but the features hold 2 images"):
        distiller(feats(4), feats(6), good_boxes(n_boxes))


def test_boxes_length_differs_from_batch_in_roi_features_and_stage1():
    with pytest.raises(ValueError, match="boxes has 1 entries"):
        roi_instance_features(torch.randn(2, 3, 8, 8), good_boxes(1), 8.0)
    d = LIAFDistiller(4, 6, STRIDES)
    with pytest.raises(ValueError, match="boxes has 3 entries"):
        d.stage1(feats(6), good_boxes(3))


# -- features ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["student_feats", "teacher_feats"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_features(distiller, side, bad):
    s, t = feats(4), feats(6)
    (s if side == "student_feats" else t)["1"][0, 0, 1, 1] = bad
    with pytest.raises(ValueError, match=rf"{side}\['1'\] contains NaN or inf"):
        distiller(s, t, good_boxes())


def test_non_finite_features_in_functions():
    f = torch.randn(1, 3, 8, 8)
    f[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="features contains NaN or inf"):
        roi_instance_features(f, good_boxes(1), 8.0)
    with pytest.raises(ValueError, match="scores contains NaN or inf"):
        instance_mask(good_boxes(1), torch.tensor([math.nan]), (8, 8), 8.0)
    with pytest.raises(ValueError, match="E contains NaN or inf"):
        diversity_loss(torch.tensor([[1.0, math.inf]]))
    sel = InstanceSelectors(2, 3, (2, 2))
    with pytest.raises(ValueError, match="roi_feats contains NaN or inf"):
        sel.scores(torch.full((1, 3, 2, 2), math.nan), torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("side", ["student_feats", "teacher_feats"])
def test_wrong_rank_features(distiller, side):
    s, t = feats(4), feats(6)
    (s if side == "student_feats" else t)["0"] = torch.randn(2, 8, 8)
    with pytest.raises(ValueError, match=rf"{side}\['0'\] must have 4 dimensions"):
        distiller(s, t, good_boxes())


def test_wrong_rank_in_functions():
    with pytest.raises(ValueError, match="features must have 4 dimensions"):
        roi_instance_features(torch.randn(3, 8, 8), good_boxes(3), 8.0)
    with pytest.raises(ValueError, match="scores must have 1 dimensions"):
        instance_mask(good_boxes(1), torch.ones(1, 1), (8, 8), 8.0)
    with pytest.raises(ValueError, match="E must have 2 dimensions"):
        diversity_loss(torch.ones(6))
    sel = InstanceSelectors(2, 3, (2, 2))
    with pytest.raises(ValueError, match="roi_feats must have 4 dimensions"):
        sel.scores(torch.ones(1, 12), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"roi_feats must have shape \[I, 3, 2, 2\]"):
        sel.scores(torch.ones(1, 3, 7, 7), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"batch_index must have shape \[1\]"):
        sel.scores(torch.ones(1, 3, 2, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_index holds image 2 but num_images is 2"):
        sel.scores(torch.ones(2, 3, 2, 2), torch.tensor([0, 2]), num_images=2)


def test_features_not_tensors_or_dicts(distiller):
    with pytest.raises(TypeError, match="student_feats must be a dict"):
        distiller([torch.randn(2, 4, 8, 8)], feats(6), good_boxes())
    s = feats(4)
    s["0"] = s["0"].numpy()
    with pytest.raises(TypeError, match=r"student_feats\['0'\] must be a torch.Tensor"):
        distiller(s, feats(6), good_boxes())
    with pytest.raises(TypeError, match="features must be a torch.Tensor"):
        roi_instance_features([[0.0]], good_boxes(1), 8.0)


@pytest.mark.parametrize("side", ["student_feats", "teacher_feats"])
def test_missing_level(distiller, side):
    s, t = feats(4), feats(6)
    del (s if side == "student_feats" else t)["1"]
    with pytest.raises(ValueError, match=rf"{side} lacks the levels \['1'\]"):
        distiller(s, t, good_boxes())


def test_missing_level_in_stage1():
    t = feats(6)
    del t["0"]
    with pytest.raises(ValueError, match=r"teacher_feats lacks the levels \['0'\]"):
        LIAFDistiller(4, 6, STRIDES).stage1(t, good_boxes())


@pytest.mark.parametrize("side,channels", [("student_feats", (5, 6)), ("teacher_feats", (4, 5))])
def test_wrong_channels(distiller, side, channels):
    with pytest.raises(ValueError, match=rf"{side}\['0'\] has 5 channels, expected"):
        distiller(feats(channels[0]), feats(channels[1]), good_boxes())


def test_spatial_or_batch_mismatch(distiller):
    s = feats(4)
    s["1"] = torch.randn(2, 4, 5, 4)
    with pytest.raises(ValueError, match=r"student_feats\['1'\].*teacher_feats\['1'\].*differ"):
        distiller(s, feats(6), good_boxes())
    with pytest.raises(ValueError, match=r"student_feats\['0'\].*differ in batch"):
        distiller(feats(4, n=3), feats(6), good_boxes())


# -- construction --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [LIAFDistiller, FitNetDistiller])
def test_mismatched_channels_without_projector(cls):
    with pytest.raises(ValueError, match="projector=True"):
        cls(4, 6, STRIDES, projector=False)
    with pytest.raises(ValueError, match=r"channels differ at levels \{'1': \(4, 6\)\}"):
        cls({"0": 6, "1": 4}, 6, STRIDES, projector=False)
    cls(6, 6, STRIDES, projector=False)  # equal channels are fine


@pytest.mark.parametrize("cls", [LIAFDistiller, FitNetDistiller])
def test_bad_construction(cls):
    with pytest.raises(ValueError, match="strides"):
        cls(4, 6, {})
    with pytest.raises(ValueError, match=r"student_channels lacks the levels \['1'\]"):
        cls({"0": 4}, 6, STRIDES)
    with pytest.raises(ValueError, match=r"teacher_channels lacks the levels \['0'\]"):
        cls(4, {"1": 6}, STRIDES)


def test_empty_selector_set():
    with pytest.raises(ValueError, match="num_selectors=0 must be a positive int"):
        LIAFDistiller(4, 6, STRIDES, num_selectors=0)
    with pytest.raises(ValueError, match="num_selectors must be at least 1"):
        InstanceSelectors(0, 6)
    with pytest.raises(ValueError, match=r"E holds no selectors \(shape \[0, D\]\)"):
        diversity_loss(torch.zeros(0, 12))
    with pytest.raises(ValueError, match="channels must be at least 1"):
        InstanceSelectors(2, 0)
    with pytest.raises(ValueError, match="normalize must be"):
        InstanceSelectors(2, 3, normalize="images")


def test_diversity_loss_type():
    with pytest.raises(TypeError, match="E must be a torch.Tensor"):
        diversity_loss([[1.0, 2.0]])


# -- scores and stride ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n_scores", [0, 1, 3])
def test_scores_length_differs_from_boxes(n_scores):
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.tensor([[8.0, 8.0, 16.0, 16.0]])]
    with pytest.raises(ValueError, match=f"scores has {n_scores} entries but boxes hold 2 instances"):
        instance_mask(boxes, torch.ones(n_scores), (4, 4), 8.0)


@pytest.mark.parametrize("stride", [0.0, -8.0, math.nan])
def test_non_positive_stride(stride):
    with pytest.raises(ValueError, match="stride must be positive"):
        instance_mask(good_boxes(1), torch.ones(1), (4, 4), stride)
    with pytest.raises(ValueError, match="stride must be positive"):
        roi_instance_features(torch.randn(1, 3, 4, 4), good_boxes(1), stride)


def test_large_finite_values_are_accepted(distiller):
    """Finite features whose sum overflows float32 are still finite: no false alarm."""
    s, t = feats(4), feats(6)
    s["0"] = torch.full_like(s["0"], 1e37)  # 512 elements: the sum overflows
    t["0"] = torch.full_like(t["0"], -1e37)
    with torch.no_grad():
        distiller(s, t, good_boxes())  # must not raise (the loss itself may overflow)
    half = torch.full((1, 3, 8, 8), 6e4, dtype=torch.float16)
    roi_instance_features(half.float(), good_boxes(1), 8.0)
    from liaf_lab.utils.validation import check_tensor

    assert check_tensor("x", half) is half


# -- strides against the input size ---------------------------------------------------------------------
def test_spatial_mismatch_names_min_size(distiller):
    s = feats(4)
    s["0"] = torch.randn(2, 4, 10, 8)
    with pytest.raises(ValueError, match=r"differ in spatial size: .*min_size and max_size of teacher and student "
                                         r"must match"):
        distiller(s, feats(6), good_boxes())


def test_wrong_strides_for_the_input_size():
    """Features of a 64 x 64 input at strides 8, 16 checked against distillers built with other strides."""
    for name in ("liaf", "fitnet"):
        wrong = create_distiller(name, student_channels=4, teacher_channels=6, strides={"0": 16.0, "1": 32.0})
        with pytest.raises(ValueError, match=r"student_feats\['0'\] is 8x8 but stride 16 on the 64x64 input gives "
                                             r"4x4: the distiller's strides are wrong"):
            wrong(feats(4), feats(6), good_boxes(), image_size=(64, 64))
        wrong(feats(4), feats(6), good_boxes())  # without image_size there is nothing to check against
    right = LIAFDistiller(4, 6, STRIDES)
    with pytest.raises(ValueError, match=r"teacher_feats\['0'\] is 8x8 but stride 8 on the 32x64 input gives 4x8: "):
        right.stage1(feats(6), good_boxes(), image_size=(32, 64))
    with pytest.raises(ValueError, match=r"student_feats\['0'\] is 8x8 but stride 8 on the 76x64 input gives 10x8 "
                                         r"\(or 9x8\): "):
        right(feats(4), feats(6), good_boxes(), image_size=(76, 64))


@pytest.mark.parametrize("image_size", [(64, 64), (57, 64), (63, 60)], ids=["exact", "ceil", "floor-and-ceil"])
def test_strides_accept_ceil_and_floor(distiller, image_size):
    """57 / 8 -> 8 cells (ceil, as strided convs give), 63 / 16 -> 3 (floor) or 4 (ceil): both accepted."""
    s, t = feats(4), feats(6)
    distiller(s, t, good_boxes(), image_size=image_size)
    if isinstance(distiller, LIAFDistiller):
        distiller.stage1(t, good_boxes(), image_size=image_size)


@pytest.mark.parametrize("image_size", [(64,), (0, 64), (64.0, 64), "64x64", torch.tensor([64, 64])])
def test_bad_image_size(distiller, image_size):
    with pytest.raises(ValueError, match=r"image_size must be the padded input size \(H, W\), two positive ints"):
        distiller(feats(4), feats(6), good_boxes(), image_size=image_size)


@pytest.mark.parametrize("stage", ["distill", "stage1"])
def test_steps_pass_the_input_size(stage):
    """The training steps hand the batch's padded input size to the distiller, so wrong strides fail."""
    from liaf_lab import create_detector, fpn_strides
    from liaf_lab.engine.steps import DistillStep, Stage1Step

    small = dict(depth=18, width_mult=0.125, fpn_channels=16, min_size=64, max_size=64)
    student, teacher = create_detector("retinanet", 3, **small), create_detector("retinanet", 3, **small)
    distiller = LIAFDistiller(16, 16, fpn_strides(student), num_selectors=2)
    step = DistillStep(student, teacher, distiller) if stage == "distill" else Stage1Step(teacher, distiller)
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])}] * 2
    step(images, targets)  # the right strides pass
    distiller.strides["1"] = 8.0  # as if built for another backbone
    side = "student_feats" if stage == "distill" else "teacher_feats"
    with pytest.raises(ValueError, match=rf"{side}\['1'\] is 4x4 but stride 8 on the 64x64 input gives 8x8: "
                                         "the distiller's strides are wrong"):
        step(images, targets)


def test_distill_step_refuses_teacher_and_student_of_different_input_sizes():
    from liaf_lab import create_detector, fpn_strides
    from liaf_lab.engine.steps import DistillStep

    student = create_detector("fcos", 6, depth=18, width_mult=0.125, fpn_channels=16, min_size=64, max_size=64)
    teacher = create_detector("fcos", 6, depth=18, width_mult=0.125, fpn_channels=16, min_size=96, max_size=96)
    distiller = LIAFDistiller(16, 16, fpn_strides(student), num_selectors=2)
    with pytest.raises(ValueError, match=r"transforms differ in min_size \(student \(64,\), teacher \(96,\)\)"):
        DistillStep(student, teacher, distiller)
