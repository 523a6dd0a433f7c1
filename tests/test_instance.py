"""liaf_lab.distillers.instance against the literal loop references in tests/references/liaf.py (Eq. 2, 3, 4, 6, 7)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers import random_boxes
from references.liaf import ref_diversity_loss, ref_instance_mask, ref_roi_features, ref_scores

from liaf_lab import InstanceSelectors, diversity_loss, instance_mask, roi_instance_features
from liaf_lab.distillers.instance import score_entropy, segment_softmax
from liaf_lab.distillers.ops import concat_boxes
from references.liaf import ref_entropy

PROPERTY = settings(max_examples=30, deadline=None)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def boxes_for(counts, image_size, seed=0, dtype=torch.float32, **kw):
    g = gen(seed)
    return [random_boxes(g, n, image_size, dtype=dtype, **kw) for n in counts]


# -- the references themselves, on cases small enough to work out by hand ------------------------------
def test_ref_instance_mask_hand_example():
    # stride 2 on a 4 x 5 map: box A covers rows 1..2 and columns 0..1; box B rows 2..3, column 1.
    boxes = [torch.tensor([[0.0, 2.0, 3.5, 6.0], [2.0, 4.0, 3.0, 100.0]])]
    scores = torch.tensor([0.5, 0.25])
    expected = torch.ones(4, 5)
    expected[1:3, 0:2] *= 0.5
    expected[2:4, 1:2] *= 0.25
    torch.testing.assert_close(ref_instance_mask(boxes, scores, (4, 5), 2.0)[0, 0], expected)
    torch.testing.assert_close(instance_mask(boxes, scores, (4, 5), 2.0)[0, 0], expected)


def test_ref_diversity_hand_examples():
    eye = torch.eye(3, dtype=torch.float64)
    assert float(ref_diversity_loss(eye)) == 0.0  # orthogonal selectors
    same = torch.ones(4, 5, dtype=torch.float64)
    assert float(ref_diversity_loss(same)) == pytest.approx(3.0)  # K - 1 for identical rows
    opposite = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)
    assert float(ref_diversity_loss(opposite)) == pytest.approx(-1.0)


def test_ref_scores_hand_example():
    roi = torch.tensor([0.0, math.log(3.0), 5.0]).view(3, 1, 1, 1)
    weight = torch.ones(1, 1)
    out = ref_scores(roi, torch.tensor([0, 0, 1]), weight)
    torch.testing.assert_close(out, torch.tensor([[0.25, 0.75, 1.0]]))


# -- Eq. 7: instance_mask -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stride", [8.0, 3.0, 2.5])
@pytest.mark.parametrize("counts", [(0,), (1,), (6,), (3, 0, 1), (0, 0), (5, 7)])
def test_instance_mask_matches_reference(counts, stride, dtype):
    size = (9, 11)
    boxes = boxes_for(counts, (size[0] * stride, size[1] * stride), seed=len(counts) + sum(counts), dtype=dtype)
    scores = torch.rand(sum(counts), generator=gen(1), dtype=dtype)
    got = instance_mask(boxes, scores, size, stride)
    assert got.shape == (len(counts), 1, *size)
    torch.testing.assert_close(got, ref_instance_mask(boxes, scores, size, stride))


def test_instance_mask_cell_boundaries_are_half_open():
    stride = 8.0
    # exactly on cell edges: rows 2, 3 and columns 1, 2, 3 (y2 / stride = 4 and x2 / stride = 4 excluded)
    boxes = [torch.tensor([[8.0, 16.0, 32.0, 32.0]])]
    mask = instance_mask(boxes, torch.tensor([0.5]), (6, 6), stride)[0, 0]
    expected = torch.ones(6, 6)
    expected[2:4, 1:4] = 0.5
    torch.testing.assert_close(mask, expected)
    # a cell counts when its index (its top-left corner) lies in the box: x1 = 7.9 does not add
    # column 0 (0 < 7.9 / 8), x2 = 32.1 adds column 4 (4 < 32.1 / 8)
    boxes = [torch.tensor([[7.9, 16.0, 32.1, 32.0]])]
    mask = instance_mask(boxes, torch.tensor([0.5]), (6, 6), stride)[0, 0]
    expected = torch.ones(6, 6)
    expected[2:4, 1:5] = 0.5
    torch.testing.assert_close(mask, expected)


def test_instance_mask_overlaps_multiply_and_border_boxes_clip():
    stride = 4.0
    boxes = [torch.tensor([
        [-10.0, -10.0, 8.0, 8.0],      # crosses the top-left border: cells (0..1, 0..1)
        [4.0, 4.0, 12.0, 12.0],        # overlaps the first at cell (1, 1)
        [12.0, 12.0, 1000.0, 1000.0],  # crosses the bottom-right border
        [5.0, 5.0, 5.0, 9.0],          # zero width: no cell
    ])]
    scores = torch.tensor([0.5, 0.2, 0.1, 0.3])
    mask = instance_mask(boxes, scores, (4, 4), stride)[0, 0]
    expected = torch.ones(4, 4)
    expected[0:2, 0:2] *= 0.5
    expected[1:3, 1:3] *= 0.2
    expected[3:, 3:] *= 0.1
    torch.testing.assert_close(mask, expected)
    assert mask[1, 1] == pytest.approx(0.1)
    torch.testing.assert_close(mask[None, None], ref_instance_mask(boxes, scores, (4, 4), stride))


def test_instance_mask_is_exact_for_tiny_coordinates():
    """The cell test is exact: a box edge a hair away from a cell corner decides, with no division."""
    tiny = 5e-324  # the smallest subnormal double; tiny / 4 underflows to 0
    boxes = [torch.tensor([[0.0, tiny, 1.0, 1.0], [0.0, 0.0, 1.0, tiny]], dtype=torch.float64)]
    mask = instance_mask(boxes, torch.tensor([0.5, 0.25], dtype=torch.float64), (2, 2), 4.0)[0, 0]
    # box 0 starts just after row 0's corner (0 < tiny), so it covers no cell; box 1 ends just after
    # it (0 < tiny), so it covers cell (0, 0)
    expected = torch.tensor([[0.25, 1.0], [1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(mask, expected)


def test_instance_mask_no_instances_is_all_ones():
    mask = instance_mask([torch.zeros(0, 4), torch.zeros(0, 4)], torch.zeros(0), (5, 7), 8.0)
    assert mask.shape == (2, 1, 5, 7)
    assert bool((mask == 1).all())


def test_instance_mask_gradcheck():
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 12.0], [8.0, 4.0, 30.0, 30.0]], dtype=torch.float64),
             torch.zeros(0, 4, dtype=torch.float64),
             torch.tensor([[3.0, 3.0, 15.0, 9.0]], dtype=torch.float64)]
    scores = torch.rand(3, dtype=torch.float64, generator=gen(3)).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: instance_mask(boxes, s, (5, 6), 4.0), (scores,))


# -- Eq. 2: RoI features ------------------------------------------------------------------------------
@pytest.mark.parametrize("counts", [(0, 0), (1, 0), (4, 2, 0), (7,)])
@pytest.mark.parametrize("stride", [8.0, 16.0])
def test_roi_instance_features_matches_reference(counts, stride):
    size = (10, 13)
    feats = torch.randn(len(counts), 5, *size, generator=gen(4), dtype=torch.float64)
    boxes = boxes_for(counts, (size[0] * stride, size[1] * stride), seed=5, dtype=torch.float64)
    got, index = roi_instance_features(feats, boxes, stride)
    want, want_index = ref_roi_features(feats, boxes, stride)
    assert got.shape == (sum(counts), 5, 7, 7)
    torch.testing.assert_close(got, want)
    assert index.tolist() == want_index.tolist()


def test_roi_instance_features_roi_size_and_sampling():
    feats = torch.randn(2, 3, 12, 12, generator=gen(6), dtype=torch.float64)
    boxes = boxes_for((2, 3), (48.0, 48.0), seed=7, dtype=torch.float64)
    got, _ = roi_instance_features(feats, boxes, 4.0, roi_size=(3, 5), sampling_ratio=1)
    want, _ = ref_roi_features(feats, boxes, 4.0, roi_size=(3, 5), sampling_ratio=1)
    torch.testing.assert_close(got, want)


# -- Eq. 3: selector scores ---------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", ["image", "batch"])
@pytest.mark.parametrize("index", [[0], [0, 0, 0], [0, 0, 2, 2, 2], [1, 1, 3], [0, 1, 1, 1, 2, 2, 2, 2]])
def test_selector_scores_match_reference(normalize, index):
    sel = InstanceSelectors(4, 3, (2, 2), normalize=normalize).double()
    with torch.no_grad():
        sel.weight.normal_(generator=gen(8))
    roi = torch.randn(len(index), 3, 2, 2, generator=gen(9), dtype=torch.float64)
    batch_index = torch.tensor(index)
    got = sel.scores(roi, batch_index)
    torch.testing.assert_close(got, ref_scores(roi, batch_index, sel.weight, per_image=normalize == "image"))
    torch.testing.assert_close(sel(roi, batch_index), got.mean(0))
    # the image count given by the caller (no device read) changes nothing, trailing empty images included
    for n in (max(index) + 1, max(index) + 3):
        torch.testing.assert_close(sel.scores(roi, batch_index, num_images=n, validate=False), got)


def test_selector_scores_single_instance_is_one_and_empty_is_empty():
    sel = InstanceSelectors(3, 2, (2, 2))
    roi = torch.randn(3, 2, 2, 2)
    out = sel.scores(roi, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(out, torch.ones(3, 3))
    assert sel.scores(torch.zeros(0, 2, 2, 2), torch.zeros(0, dtype=torch.long)).shape == (3, 0)


def test_selector_scores_are_stable_for_large_logits():
    sel = InstanceSelectors(2, 1, (1, 1))
    with torch.no_grad():
        sel.weight.fill_(1.0)
    roi = torch.tensor([1000.0, 999.0, -1000.0]).view(3, 1, 1, 1)
    out = sel.scores(roi, torch.tensor([0, 0, 1]))
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out[0], torch.tensor([1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1)), 1.0]))


def test_selector_scores_gradcheck():
    sel = InstanceSelectors(3, 2, (2, 2)).double()
    roi = torch.randn(5, 2, 2, 2, dtype=torch.float64, generator=gen(10), requires_grad=True)
    weight = torch.randn(3, 8, dtype=torch.float64, generator=gen(11), requires_grad=True)
    index = torch.tensor([0, 0, 1, 1, 1])
    assert torch.autograd.gradcheck(lambda r, w: sel.scores(r, index, w), (roi, weight))


def test_concat_boxes_orders_images():
    rois, index = concat_boxes([torch.ones(2, 4), torch.zeros(0, 4), 2 * torch.ones(1, 4)])
    assert index.tolist() == [0, 0, 2]
    assert rois[:, 0].tolist() == [1.0, 1.0, 2.0]
    rois, index = concat_boxes([])
    assert rois.shape == (0, 4) and index.shape == (0,)


# -- Eq. 4: diversity ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 5), (2, 3), (6, 12), (6, 1)])
def test_diversity_matches_reference(shape):
    E = torch.randn(*shape, generator=gen(12), dtype=torch.float64)
    torch.testing.assert_close(diversity_loss(E), ref_diversity_loss(E))


def test_diversity_of_zero_selectors_is_zero():
    assert float(diversity_loss(torch.zeros(3, 4))) == 0.0


def test_diversity_gradcheck():
    E = torch.randn(4, 6, dtype=torch.float64, generator=gen(13), requires_grad=True)
    assert torch.autograd.gradcheck(diversity_loss, (E,))
    E.grad = None
    diversity_loss(E).backward()
    E2 = E.detach().clone().requires_grad_()
    ref_diversity_loss(E2).backward()
    torch.testing.assert_close(E.grad, E2.grad)


# -- property tests -----------------------------------------------------------------------------------
counts_st = st.lists(st.integers(0, 4), min_size=1, max_size=3)


@PROPERTY
@given(counts=counts_st, k=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_property_per_image_scores_sum_to_one(counts, k, seed):
    index = torch.tensor([b for b, n in enumerate(counts) for _ in range(n)], dtype=torch.long)
    sel = InstanceSelectors(k, 2, (2, 2), init_std=3.0)
    roi = torch.randn(len(index), 2, 2, 2, generator=gen(seed)) * 3
    scores = sel.scores(roi, index)
    assert scores.shape == (k, len(index))
    assert bool((scores >= 0).all())
    for b, n in enumerate(counts):
        if n:
            sums = scores[:, index == b].sum(dim=1)
            torch.testing.assert_close(sums, torch.ones(k))


box_st = st.tuples(
    st.floats(-20, 60, allow_nan=False), st.floats(-20, 60, allow_nan=False),
    st.floats(0, 50, allow_nan=False), st.floats(0, 50, allow_nan=False),
).map(lambda t: (t[0], t[1], t[0] + t[2], t[1] + t[3]))


@PROPERTY
@given(
    image_boxes=st.lists(st.lists(box_st, max_size=4), min_size=1, max_size=3),
    stride=st.sampled_from([1.0, 4.0, 8.0, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_property_mask_is_one_outside_and_product_inside(image_boxes, stride, seed):
    size = (6, 7)
    boxes = [torch.tensor(b, dtype=torch.float64).view(-1, 4) for b in image_boxes]
    flat = [tuple(b) for bs in image_boxes for b in bs]
    scores = torch.rand(len(flat), generator=gen(seed), dtype=torch.float64) * 0.9 + 0.05
    mask = instance_mask(boxes, scores, size, stride)
    i = 0
    for b, bs in enumerate(image_boxes):
        expected = torch.ones(size, dtype=torch.float64)
        covered = torch.zeros(size, dtype=torch.bool)
        for x1, y1, x2, y2 in bs:
            # exact rational arithmetic: Eq. 7's region in the real numbers (a float division such as
            # 5e-324 / 4 underflows to 0 and would move a cell in or out)
            y1, y2, x1, x2, st_ = (Fraction(v) for v in (y1, y2, x1, x2, stride))
            rows = torch.tensor([y1 / st_ <= h < y2 / st_ for h in range(size[0])])
            cols = torch.tensor([x1 / st_ <= w < x2 / st_ for w in range(size[1])])
            inside = rows[:, None] & cols[None, :]
            expected = torch.where(inside, expected * scores[i], expected)
            covered |= inside
            i += 1
        assert bool((mask[b, 0][~covered] == 1).all())
        torch.testing.assert_close(mask[b, 0], expected)


@PROPERTY
@given(
    k=st.integers(1, 6), d=st.integers(1, 8), seed=st.integers(0, 2**16),
    scale=st.floats(1e-3, 1e3, allow_nan=False),
)
def test_property_diversity_bounded_scale_invariant_and_matches_reference(k, d, seed, scale):
    E = torch.randn(k, d, generator=gen(seed), dtype=torch.float64)
    value = diversity_loss(E)
    assert float(value) >= -1 - 1e-12
    assert float(value) <= k - 1 + 1e-12
    torch.testing.assert_close(diversity_loss(E * scale), value)
    torch.testing.assert_close(value, ref_diversity_loss(E))


def test_segment_softmax_ignores_empty_segments():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    out = segment_softmax(logits, torch.tensor([0, 2, 2]), 4)
    torch.testing.assert_close(out, torch.tensor([[1.0, 1 / (1 + math.e), 1 / (1 + math.exp(-1))]]))


# -- Eq. 3's temperature and the scores' entropy --------------------------------------------------------
@pytest.mark.parametrize("logit_scale", ["none", "sqrt_dim", "learned"])
def test_selector_logit_scale_matches_reference(logit_scale):
    sel = InstanceSelectors(4, 3, (2, 2), logit_scale=logit_scale).double()
    with torch.no_grad():
        sel.weight.normal_(generator=gen(8))
    roi = torch.randn(5, 3, 2, 2, generator=gen(9), dtype=torch.float64)
    index = torch.tensor([0, 0, 1, 1, 1])
    factor = {"none": 1.0, "sqrt_dim": 12 ** -0.5, "learned": 12 ** -0.5}[logit_scale]
    torch.testing.assert_close(sel.scores(roi, index), ref_scores(roi, index, sel.weight, factor=factor))
    if logit_scale != "none":  # the factor changes the scores
        assert not torch.allclose(sel.scores(roi, index), ref_scores(roi, index, sel.weight))
    if logit_scale == "learned":
        with torch.no_grad():
            sel.log_scale.fill_(1.5)
        torch.testing.assert_close(sel.scores(roi, index), ref_scores(roi, index, sel.weight, factor=math.exp(1.5)))
        assert torch.autograd.gradcheck(lambda s: sel.scores(roi, index, factor=s.exp()),
                                        (torch.tensor(0.3, dtype=torch.float64, requires_grad=True),))


def test_selector_logit_scale_is_checked():
    with pytest.raises(ValueError, match="logit_scale"):
        InstanceSelectors(2, 3, logit_scale="cosine")


@pytest.mark.parametrize("normalize", ["image", "batch"])
def test_score_entropy_matches_reference(normalize):
    sel = InstanceSelectors(3, 2, (2, 2), normalize=normalize).double()
    roi = torch.randn(7, 2, 2, 2, generator=gen(3), dtype=torch.float64) * 3
    index = torch.tensor([0, 0, 0, 2, 3, 3, 3])
    with torch.no_grad():
        scores = sel.scores(roi, index, num_images=5)
    got = score_entropy(scores, index, 5)
    want = ref_entropy(scores, index, 5)
    assert got.shape == (3, 5)
    assert torch.equal(got.isnan(), want.isnan())  # images 1 and 4 have no boxes, image 2 one
    torch.testing.assert_close(got.nan_to_num(-1), want.nan_to_num(-1))


def test_score_entropy_bounds():
    index = torch.tensor([0, 0, 0, 1, 1])
    uniform = torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.5, 0.5]])
    one_hot = torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(score_entropy(uniform, index, 2), torch.ones(1, 2))
    torch.testing.assert_close(score_entropy(one_hot, index, 2), torch.zeros(1, 2))
