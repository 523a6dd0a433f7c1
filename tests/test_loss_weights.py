"""The protocol's ``loss_weights`` (what a method weights, per level and per instance) and the measurement built
on it, ``analysis.background_share``: against literal references, for every method, without changing the distiller."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import IMAGE, SIZES, STRIDES, make_boxes, make_feats
from references.common import ref_background_share
from references.liaf import ref_level_mse, ref_liaf_sides

from liaf_lab import FitNetDistiller, LIAFDistiller, create_distiller, list_distillers
from liaf_lab.analysis import background_area, background_share, box_regions
from liaf_lab.distillers import FGDDistiller, KDInputs, LossWeights

OPTION_SETS = [{}, {"mask_scale": "count"}, {"mask_scale": "count", "mask_side": "shared", "normalize": "batch"},
               {"mask_side": "shared"}]


def liaf_inputs(seed: int = 0) -> tuple[LIAFDistiller, KDInputs]:
    torch.manual_seed(seed)
    d = LIAFDistiller(6, 8, STRIDES, num_selectors=3)
    with torch.no_grad():
        for sel in d.selectors.values():
            sel.weight.mul_(30)  # scores far from uniform
    boxes = [b.float() for b in make_boxes([3, 2], seed)]
    inputs = KDInputs(make_feats(6, 2, seed + 1, dtype=torch.float32), make_feats(8, 2, seed + 2, dtype=torch.float32),
                      boxes)
    return d, inputs


def fitnet_inputs(seed: int = 0) -> tuple[FitNetDistiller, KDInputs]:
    torch.manual_seed(seed)
    boxes = [b.float() for b in make_boxes([2, 3], seed)]
    return FitNetDistiller(6, 8, STRIDES), KDInputs(make_feats(6, 2, seed + 1, dtype=torch.float32),
                                                    make_feats(8, 2, seed + 2, dtype=torch.float32), boxes)


def ref_sides(d: LIAFDistiller, inputs: KDInputs, options: dict) -> dict:
    o = d.options.to_dict() | options
    with torch.no_grad():
        return ref_liaf_sides(inputs.student_feats, inputs.teacher_feats, inputs.boxes, d.strides,
                              {lvl: s.weight for lvl, s in d.selectors.items()}, d.projectors, o["mask_scale"],
                              o["mask_side"], o["normalize"] == "image")


# -- the measurement against its literal reference ------------------------------------------------------
@pytest.mark.parametrize("options", OPTION_SETS)
def test_liaf_background_share_matches_the_literal_reference(options: dict) -> None:
    d, inputs = liaf_inputs()
    before = {k: v.clone() for k, v in d.state_dict().items()}, d.options
    share = background_share(d, inputs, **options)
    expected = ref_background_share(ref_sides(d, inputs, options), inputs.boxes, d.strides)
    assert share == pytest.approx(expected, rel=1e-4)
    assert all(0.0 <= v <= 1.0 for v in share.values())
    # the options apply to the measurement only
    assert d.options == before[1] and (d.mask_scale, d.mask_side, d.normalize) == ("literal", "separate", "image")
    assert all(torch.equal(v, before[0][k]) for k, v in d.state_dict().items())
    assert all(s.normalize == "image" for s in d.selectors.values())


def test_fitnet_background_share_matches_the_literal_reference() -> None:
    d, inputs = fitnet_inputs()
    with torch.no_grad():
        sides = {lvl: (inputs.teacher_feats[lvl], d.projectors[lvl](inputs.student_feats[lvl])) for lvl in d.levels}
    expected = ref_background_share(sides, inputs.boxes, d.strides)
    share = background_share(d, inputs)
    assert share == pytest.approx(expected, rel=1e-4)
    assert all(0.0 <= v <= 1.0 for v in share.values())


def test_fitnet_share_is_the_background_area_when_features_differ_uniformly() -> None:
    d = FitNetDistiller(8, 8, STRIDES, projector=False)
    teacher = make_feats(8, 2, 3, dtype=torch.float32)
    student = {lvl: t + 0.5 for lvl, t in teacher.items()}  # every cell's term the same
    boxes = [b.float() for b in make_boxes([3, 1], 4)]
    share = background_share(d, KDInputs(student, teacher, boxes))
    area = {}
    for lvl, stride in STRIDES.items():
        inside = torch.stack([box_regions(b, SIZES[lvl], stride).any(0) for b in boxes])
        area[lvl] = float((~inside).float().mean())
        assert 0.0 < area[lvl] < 1.0 and share[lvl] == pytest.approx(area[lvl], rel=1e-5)
    # every level's loss is the same (0.5 ** 2), so the total is the mean of the levels' fractions
    assert share["total"] == pytest.approx(sum(area.values()) / len(area), rel=1e-5)
    # no boxes: all background; a box over the whole image: none
    assert background_share(d, KDInputs(student, teacher, [torch.zeros(0, 4)] * 2))["total"] == pytest.approx(1.0)
    whole = [torch.tensor([[0.0, 0.0, IMAGE[1], IMAGE[0]]])] * 2
    assert background_share(d, KDInputs(student, teacher, whole))["total"] == 0.0
    assert math.isnan(background_share(d, KDInputs(teacher, teacher, boxes))["total"])  # no loss at all


def test_a_method_without_a_per_cell_loss_has_no_share() -> None:
    d = FGDDistiller(6, 8, STRIDES)
    _, inputs = fitnet_inputs()
    with pytest.raises(ValueError, match="FGD's loss does not split into cells"):
        background_share(d, inputs)


# -- the hook -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", OPTION_SETS)
def test_liaf_loss_weights_are_the_losses_own(options: dict) -> None:
    d, inputs = liaf_inputs(1)
    weights = d.loss_weights(inputs, **options)
    sides = ref_sides(d, inputs, options)
    other = create_distiller("liaf", 6, 8, STRIDES, **(d.options.to_dict() | options))
    other.load_state_dict(d.state_dict())
    with torch.no_grad():
        maps = other.weight_maps(inputs)
    assert set(weights.maps) == {"M (teacher)", "M (student)"}
    for lvl in d.levels:
        # the cells sum to Eq. 9 (the literal reference, and the distiller's level_loss under these options)
        torch.testing.assert_close(weights.cells[lvl].sum(), ref_level_mse(*sides[lvl]), rtol=1e-5, atol=1e-7)
        with torch.no_grad():
            loss = other.level_loss(lvl, inputs.student_feats[lvl], inputs.teacher_feats[lvl], inputs.boxes)
        torch.testing.assert_close(weights.cells[lvl].sum(), loss, rtol=1e-5, atol=1e-7)
        for name in maps:
            torch.testing.assert_close(weights.maps[name][lvl], maps[name][lvl])
        instances = {c: v[lvl] for c, v in weights.instances.items()}
        assert list(instances) == ["A^T E_1", "A^T E_2", "A^T E_3", "A^T", "A^S E_1", "A^S E_2", "A^S E_3", "A^S",
                                   "M^T", "M^S"]
        assert all(v.shape == (5,) for v in instances.values())
        for side in "TS":
            mean = torch.stack([instances[f"A^{side} E_{k}"] for k in (1, 2, 3)]).mean(0)
            torch.testing.assert_close(instances[f"A^{side}"], mean)
    assert list(weights.bars) == ["mean", 0, 1, 2] and weights.bars[1][1:] == ("A^T E_2", "A^S E_2")
    assert weights.color_range == ({} if options.get("mask_scale") == "count" else {"M": (0.0, 1.0)})
    assert set(weights.columns) == set(weights.instances)


def test_every_method_gives_loss_weights() -> None:
    """Every registered method that needs only features and boxes: maps on each level's grid, its own per-cell
    loss where it has one, and the same maps as ``weight_maps`` (or one uniform map)."""
    _, inputs = fitnet_inputs(2)
    labels = [torch.ones(len(b), dtype=torch.int64) for b in inputs.boxes]
    inputs = KDInputs(inputs.student_feats, inputs.teacher_feats, inputs.boxes, labels, image_size=(32, 40))
    with_cells = []
    for method in list_distillers():
        d = create_distiller(method, 6, 8, STRIDES)
        if d.needs - {"generator"}:
            continue
        torch.manual_seed(0)
        weights = d.loss_weights(inputs)
        torch.manual_seed(0)
        with torch.no_grad():
            maps = d.weight_maps(inputs)
        assert isinstance(weights, LossWeights) and weights.maps, method
        assert list(weights.maps) == (list(maps) or ["uniform"]), method
        for name, levels in weights.maps.items():
            for lvl in d.levels:
                assert levels[lvl].shape == (2, *SIZES[lvl]), (method, name, lvl)
        if weights.cells is not None:  # the cells sum to the loss
            with_cells.append(method)
            torch.manual_seed(0)
            terms = d.loss_terms(inputs)
            total = sum(c.sum() for c in weights.cells.values())
            factor = d.alpha if method == "mgd" else d.loss_weight
            torch.testing.assert_close(factor * total, terms[d.method_name], rtol=1e-5, atol=1e-7)
            assert all(0.0 <= v <= 1.0 for v in background_share(d, inputs).values()), method
    assert with_cells == ["fitnet", "liaf", "liaf_paper", "maskd", "mgd", "pkd"]


def test_with_options_is_a_copy() -> None:
    d, inputs = liaf_inputs(2)
    d.eval()
    state = torch.random.get_rng_state()
    other = d.with_options(mask_scale="count", normalize="batch")
    assert torch.equal(torch.random.get_rng_state(), state)  # building it draws nothing from torch's generator
    assert type(other) is LIAFDistiller and not other.training
    assert (other.mask_scale, other.selectors["p3"].normalize) == ("count", "batch")
    assert (d.mask_scale, d.selectors["p3"].normalize) == ("literal", "image")
    assert all(torch.equal(v, d.state_dict()[k]) for k, v in other.state_dict().items())
    assert not d.per_image(normalize="batch") and d.per_image() and other.per_image(normalize="image")
    double = d.double().with_options(mask_side="shared")  # the weights keep their dtype, bit for bit
    assert all(v.dtype == d.state_dict()[k].dtype and torch.equal(v, d.state_dict()[k])
               for k, v in double.state_dict().items())
    with pytest.raises(ValueError, match="mask_scale='sqrt' must be one of"):
        d.loss_weights(inputs, mask_scale="sqrt")
    with pytest.raises(ValueError, match="unknown distiller 'liaf' option 'mask'"):
        d.with_options(mask="count")


def test_background_area_is_the_share_of_all_cells_in_no_box_by_a_literal_loop() -> None:
    teacher = make_feats(8, 2, 3, dtype=torch.float32)
    boxes = [b.float() for b in make_boxes([3, 1], 4)]
    outside = total = 0
    for lvl, feats in teacher.items():
        stride = STRIDES[lvl]
        for image_boxes in boxes:
            for h in range(feats.shape[-2]):
                for w in range(feats.shape[-1]):  # the corner rule: the cell's top-left corner lies in a box
                    covered = any(x1 <= w * stride < x2 and y1 <= h * stride < y2
                                  for x1, y1, x2, y2 in image_boxes.tolist())
                    outside += not covered
                    total += 1
    assert background_area(KDInputs(teacher, teacher, boxes), STRIDES) == pytest.approx(outside / total)
