"""liaf_lab.distillers.ops: the three rules of which feature cells a box covers, on boxes worked by hand."""

from __future__ import annotations

import pytest
import torch

from liaf_lab.distillers.ops import box_cell_axes, box_cells


def _cells(box, rule, stride=4.0, size=(4, 5)):
    """The covered cells of one box as a sorted list of ``(h, w)``."""
    return sorted(map(tuple, box_cells(torch.tensor(box), stride, size, rule).nonzero().tolist()))


def test_a_box_covers_the_cells_each_rule_names():
    box = [4.0, 4.0, 12.0, 9.0]  # divided by the stride 4: (1, 1, 3, 2.25)
    # corner: y1 <= 4h < y2 -> h in {1, 2}; x1 <= 4w < x2 -> w in {1, 2}
    assert _cells(box, "corner") == [(1, 1), (1, 2), (2, 1), (2, 2)]
    # fgd: floor(1)..ceil(2.25) = 1..3 rows, 1..3 columns, inclusive
    assert _cells(box, "fgd") == [(h, w) for h in (1, 2, 3) for w in (1, 2, 3)]
    # defeat: floor -> (1, 1, 3, 2): rows 1 <= h < 2, columns 1 <= w < 3
    assert _cells(box, "defeat") == [(1, 1), (1, 2)]


def test_a_box_smaller_than_a_cell():
    box = [5.0, 5.0, 6.0, 6.0]  # inside cell (1, 1), touching no cell corner
    assert _cells(box, "corner") == []
    assert _cells(box, "fgd") == [(1, 1), (1, 2), (2, 1), (2, 2)]  # floor 1 .. ceil 1.5 = 2
    assert _cells(box, "defeat") == [(1, 1)]  # empty range: the cell (floor(y1), floor(x1))


def test_boxes_over_the_border_are_clipped_to_the_grid():
    box = [-6.0, 10.0, 30.0, 40.0]  # beyond the 4 x 5 grid (16 x 20 pixels) on three sides
    assert _cells(box, "corner") == [(h, w) for h in (3,) for w in range(5)]
    assert _cells(box, "fgd") == [(h, w) for h in (2, 3) for w in range(5)]
    assert _cells(box, "defeat") == [(h, w) for h in (2, 3) for w in range(5)]


def test_leading_dimensions_and_axes():
    boxes = torch.tensor([[[4.0, 4.0, 12.0, 9.0]], [[0.0, 0.0, 4.0, 4.0]]])  # [2, 1, 4]
    rows, cols = box_cell_axes(boxes, 4.0, (4, 5))
    assert rows.shape == (2, 1, 4) and cols.shape == (2, 1, 5)
    cells = box_cells(boxes, 4.0, (4, 5))
    assert cells.shape == (2, 1, 4, 5) and torch.equal(cells, rows[..., :, None] & cols[..., None, :])
    assert cells[1, 0].nonzero().tolist() == [[0, 0]]


def test_an_unknown_rule_is_a_clear_error():
    with pytest.raises(ValueError, match=r"rule must be 'corner', 'fgd' or 'defeat', got 'centre'"):
        box_cells(torch.zeros(1, 4), 4.0, (2, 2), "centre")
