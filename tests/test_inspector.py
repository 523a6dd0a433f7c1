"""Tests of liaf_lab.analysis.MaskInspector: its views agree with the distiller (scores, masks, per-instance loss),
colour scales are fixed, views leave the live widget alone, every method with maps is shown, problems are messages."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from liaf_lab import LIAFDistiller  # noqa: E402
from liaf_lab.analysis import MaskInspector, figure_digest, kd_inputs_for  # noqa: E402
from liaf_lab.distillers import DeFeatDistiller, FGDDistiller, FitNetDistiller, KDInputs  # noqa: E402
from liaf_lab.experiments.toy import STRIDES, TinyPyramid  # noqa: E402

from test_analysis import BOXES, DENSE_STRIDES, IMAGE, LABELS, tiny_detector  # noqa: E402

NAMES = ["background", "disc", "square", "ring"]
# Disjoint boxes on cell corners of both levels (strides 8 and 16), so every box covers cells at every level.
BOX_SETS = [
    torch.tensor([[0.0, 0.0, 32.0, 16.0], [32.0, 16.0, 64.0, 48.0], [0.0, 32.0, 16.0, 64.0]]),
    torch.tensor([[16.0, 16.0, 48.0, 48.0]]),
    torch.tensor([[0.0, 32.0, 32.0, 64.0], [32.0, 0.0, 64.0, 32.0]]),
]
LABEL_SETS = [torch.tensor([1, 2, 3]), torch.tensor([2]), torch.tensor([3, 1])]


@pytest.fixture(scope="module")
def toy() -> dict:
    torch.manual_seed(0)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    targets = [{"boxes": b, "labels": lab} for b, lab in zip(BOX_SETS, LABEL_SETS, strict=True)]
    return {"images": images, "targets": targets, "distiller": LIAFDistiller(16, 32, STRIDES, num_selectors=3),
            "teacher": TinyPyramid(32).eval(), "student": TinyPyramid(16).eval()}


def inspector(toy: dict, **kwargs) -> MaskInspector:
    return MaskInspector(toy["images"], toy["targets"], toy["teacher"], toy["student"], toy["distiller"],
                         class_names=NAMES, **kwargs)


@contextmanager
def options(d: LIAFDistiller, mask_scale: str, mask_side: str, normalize: str) -> Iterator[None]:
    saved = d.mask_scale, d.mask_side, d.selectors["0"].normalize
    d.mask_scale, d.mask_side = mask_scale, mask_side
    for sel in d.selectors.values():
        sel.normalize = normalize
    try:
        yield
    finally:
        d.mask_scale, d.mask_side = saved[:2]
        for sel in d.selectors.values():
            sel.normalize = saved[2]


def region(box: Tensor, size: tuple[int, int], stride: float) -> Tensor:
    """Eq. 7's cells of a box, as ``instance_mask`` documents them: ``y1/stride <= h < y2/stride`` (same for w)."""
    hs, ws = torch.arange(size[0]) * stride, torch.arange(size[1]) * stride
    return ((hs >= box[1]) & (hs < box[3]))[:, None] & ((ws >= box[0]) & (ws < box[2]))[None, :]


# -- LIAF-KD: the view agrees with the distiller ----------------------------------------------------------
@pytest.mark.parametrize("opts", [("literal", "separate", "image"), ("count", "shared", "batch"),
                                  ("count", "separate", "image")])
def test_table_matches_the_distiller(toy: dict, opts: tuple[str, str, str]) -> None:
    d = toy["distiller"]
    insp = inspector(toy)
    mask_scale, mask_side, normalize = opts
    with torch.no_grad():
        t_all, s_all = toy["teacher"](toy["images"]), toy["student"](toy["images"])
    for level in STRIDES:
        batch_total = 0.0
        for index in range(3):
            view = insp.view(image=index, level=level, mask_scale=mask_scale, mask_side=mask_side, normalize=normalize)
            assert view.message is None, view.message
            batch = [0, 1, 2] if normalize == "batch" else [index]
            t, s, boxes = t_all[level][batch], s_all[level][batch], [BOX_SETS[j] for j in batch]
            with torch.no_grad(), options(d, *opts):
                a_t = d.instance_scores(level, t, boxes, per_selector=True)
                a_s = d.instance_scores(level, d.student_roi_input(level, s, None), boxes, per_selector=True)
                m_t, m_s = d.level_masks(level, s, t, boxes)
                loss = float(d.level_loss(level, s, t, boxes))
            pos = batch.index(index)
            start = sum(len(BOX_SETS[j]) for j in batch[:pos])
            assert [r["class"] for r in view.rows] == [NAMES[i] for i in LABEL_SETS[index]]
            for i, row in enumerate(view.rows):
                for k in range(3):
                    assert row[f"A^T E_{k + 1}"] == pytest.approx(float(a_t[k, start + i]), abs=1e-6)
                    assert row[f"A^S E_{k + 1}"] == pytest.approx(float(a_s[k, start + i]), abs=1e-6)
                assert row["A^T"] == pytest.approx(float(a_t[:, start + i].mean()), abs=1e-6)
                cells = region(BOX_SETS[index][i], tuple(t.shape[-2:]), STRIDES[level])
                assert row["cells"] == int(cells.sum()) > 0
                # the table's weights are the masks' values inside the (disjoint) boxes
                torch.testing.assert_close(m_t[pos, 0][cells], torch.full((row["cells"],), row["M^T"]))
                torch.testing.assert_close(m_s[pos, 0][cells], torch.full((row["cells"],), row["M^S"]))
            if mask_side == "shared":
                assert all(r["M^T"] == r["M^S"] for r in view.rows)
            if mask_scale == "count":  # an average instance keeps weight 1
                group = sum(len(BOX_SETS[j]) for j in batch)
                assert sum(r["M^T"] for r in view.rows) == pytest.approx(
                    group * sum(r["A^T"] for r in view.rows) if mask_side == "separate" else
                    group * sum((r["A^T"] + r["A^S"]) / 2 for r in view.rows), rel=1e-5)
            # the per-cell terms: the level's loss, and this image's cells (boxes + background)
            assert view.level_loss == pytest.approx(loss, rel=1e-5)
            image_part = sum(r["contribution"] for r in view.rows) + view.background
            if normalize == "image":
                assert image_part == pytest.approx(loss, rel=1e-5)
            batch_total += image_part
        if normalize == "batch":
            assert batch_total == pytest.approx(loss, rel=1e-5)


def test_colour_scale_is_fixed_per_option_and_level(toy: dict) -> None:
    d = toy["distiller"]
    insp = inspector(toy)
    with torch.no_grad():
        t_all, s_all = toy["teacher"](toy["images"]), toy["student"](toy["images"])
    for mask_scale in ("literal", "count"):
        for level in STRIDES:
            ranges = set()
            for index in range(3):
                view = insp.view(image=index, level=level, mask_scale=mask_scale)
                ranges.add(view.color_range["M"])
                for ax in view.figure.axes[1:3]:  # the drawn masks use the fixed range
                    assert (ax.images[-1].norm.vmin, ax.images[-1].norm.vmax) == view.color_range["M"]
            assert len(ranges) == 1, f"{mask_scale}: the colour range changes between images: {ranges}"
            (lo, hi), = ranges
            if mask_scale == "literal":  # the method's own range: scores are at most 1, the background is 1
                assert (lo, hi) == (0.0, 1.0)
            else:  # the largest count mask over all images at the level
                with torch.no_grad(), options(d, "count", "separate", "image"):
                    top = max(float(m.max()) for j in range(3)
                              for m in d.level_masks(level, s_all[level][j:j + 1], t_all[level][j:j + 1], [BOX_SETS[j]]))
                assert lo == 0.0 and hi == pytest.approx(top) and hi > 1.0


def test_views_leave_the_live_widget_alone(toy: dict) -> None:
    insp = inspector(toy)
    settings, shown = insp.settings, insp.current
    other = insp.view(image=1, level="1", mask_scale="count", selector=2)
    assert insp.settings == settings and insp.current is shown
    assert settings == {"method": "LIAF-KD", "image": 0, "level": "0", "selector": "mean", "mask_scale": "literal",
                        "mask_side": "separate", "normalize": "image"}
    # the controls set to the same setting show the same picture and table
    insp.image_slider.value, insp.level_dropdown.value = 1, "1"
    insp.mask_scale_toggle.value, insp.selector_dropdown.value = "count", 2
    assert figure_digest(insp.figure) == figure_digest(other.figure) and insp.instance_table() == other.rows
    assert inspector(toy).settings == settings  # a new inspector opens at its defaults
    with pytest.raises(ValueError, match=r"unknown settings \['side'\]"):
        insp.view(side="student")
    with pytest.raises(ValueError, match="image must be an index in 0..2"):
        insp.view(image=3)
    with pytest.raises(ValueError, match=r"selector must be one of \['mean', 0, 1, 2\] for LIAF-KD, got 3"):
        insp.view(selector=3)
    with pytest.raises(ValueError, match="mask_scale='sqrt' must be one of"):
        insp.view(mask_scale="sqrt")


def test_redraws_on_every_control(toy: dict) -> None:
    d = toy["distiller"]
    before = (d.mask_scale, d.mask_side, [s.normalize for s in d.selectors.values()])
    insp = inspector(toy)
    assert insp.message is None and isinstance(insp.figure, Figure)
    digest = figure_digest(insp.figure)
    changes = [("selector_dropdown", 1), ("level_dropdown", "1"), ("mask_scale_toggle", "count"),
               ("mask_side_toggle", "shared"), ("normalize_toggle", "batch"), ("image_slider", 1)]
    for name, value in changes:
        getattr(insp, name).value = value
        assert insp.message is None, insp.message
        new = figure_digest(insp.figure)
        assert new != digest, f"figure unchanged after {name} = {value!r}"
        digest = new
    assert (d.mask_scale, d.mask_side, [s.normalize for s in d.selectors.values()]) == before


def test_driving_the_controls_never_changes_the_distiller(toy: dict) -> None:
    d = toy["distiller"]
    state = {k: v.clone() for k, v in d.state_dict().items()}
    before = (d.options, d.mask_scale, d.mask_side, d.normalize, [s.normalize for s in d.selectors.values()], d.training)
    insp = inspector(toy)
    assert list(insp.option_toggles) == ["mask_scale", "mask_side", "normalize"]
    assert list(insp.selector_dropdown.options) == [("mean A", "mean"), ("selector E_1", 0), ("selector E_2", 1),
                                                    ("selector E_3", 2)]
    for toggle in insp.option_toggles.values():
        for value in (*toggle.options, toggle.options[0]):
            toggle.value = value
            insp.selector_dropdown.value = 1
            insp.level_dropdown.value = "1"
            assert insp.message is None, insp.message
    assert (d.options, d.mask_scale, d.mask_side, d.normalize, [s.normalize for s in d.selectors.values()],
            d.training) == before
    assert d.state_dict().keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in d.state_dict().items())
    # a view under other options is the view of a distiller built with them
    other = d.with_options(mask_scale="count", mask_side="shared")
    view = insp.view(mask_scale="count", mask_side="shared", normalize="image", selector=2)
    own = MaskInspector(toy["images"], toy["targets"], toy["teacher"], toy["student"], other, class_names=NAMES,
                        level="1").view(selector=2)
    assert own.settings == view.settings and own.rows == view.rows
    assert figure_digest(own.figure) == figure_digest(view.figure)


def test_class_names_side_by_side_masks_and_hover(toy: dict) -> None:
    view = inspector(toy).current
    bars, m_t, m_s = view.figure.axes[:3]
    assert [t.get_text() for t in bars.get_xticklabels()] == ["0 disc", "1 square", "2 ring"]
    assert bars.get_title() == "instance scores, mean A"
    assert (m_t.get_title(), m_s.get_title()) == ("M (teacher)", "M (student)")
    assert m_t.images and m_s.images
    html = view.html
    assert html.count("<tr title=") == 3 and "class='liaf-instances'" in html and "data:image/jpeg;base64," in html
    assert html.count("class='liaf-box'") == 6  # a hover region per box on both mask panels
    assert "title='0 disc\ncells: 8\nA^T E_1: " in html and "level loss (the sum of every cell's term, over this image)" in html


def test_vanishing_scores_are_explained() -> None:
    d = LIAFDistiller(16, 32, STRIDES, num_selectors=2)
    for sel in d.selectors.values():
        sel.weight.data.zero_()  # every instance scores alike: 1 / (instances in the softmax)
    corners = [(x, y) for x in range(0, 64, 16) for y in (0, 32)]
    boxes = torch.tensor([[x, y, x + 16.0, y + 32.0] for x, y in corners])  # 8 per image, 24 in all
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    insp = MaskInspector(images, [boxes] * 3, TinyPyramid(32).eval(), TinyPyramid(16).eval(), d)
    view = insp.view(normalize="batch")
    assert [r["A^T"] for r in view.rows] == pytest.approx([1 / 24] * 8)
    assert any("below 0.05" in n and "1/24 = 0.042" in n for n in view.notes), view.notes
    assert not any("below" in n for n in insp.view(normalize="image").notes)  # 1/8 each


# -- other methods ----------------------------------------------------------------------------------------
class BoxMaps(FitNetDistiller):
    """FitNet with made-up maps for the tests: ``box`` (1 in the teacher's boxes, 2 in the student's) and ``ramp``."""

    def compute_weight_maps(self, inputs: KDInputs) -> dict[str, dict[str, Tensor]]:
        maps: dict[str, dict[str, Tensor]] = {"box (teacher)": {}, "box (student)": {}, "ramp": {}}
        for lvl in self.levels:
            n, _, h, w = inputs.teacher_feats[lvl].shape
            inside = torch.stack([torch.stack([region(b, (h, w), self.strides[lvl]) for b in boxes]).any(0)
                                  if len(boxes) else torch.zeros(h, w, dtype=torch.bool) for boxes in inputs.boxes])
            maps["box (teacher)"][lvl] = inside.float()
            maps["box (student)"][lvl] = 2 * inside.float()
            maps["ramp"][lvl] = torch.arange(h * w, dtype=torch.float32).view(1, h, w).expand(n, h, w) / (h * w)
        return maps


def test_method_dropdown_shows_any_methods_maps(toy: dict) -> None:
    student = toy["student"]
    methods = {"boxes": (student, BoxMaps(16, 32, STRIDES)), "FitNet": (student, FitNetDistiller(16, 32, STRIDES)),
               "FGD": (student, FGDDistiller(16, 32, STRIDES)), "DeFeat": (student, DeFeatDistiller(16, 32, STRIDES))}
    insp = inspector(toy, methods=methods)
    assert insp.method_dropdown.options == ("LIAF-KD", "boxes", "FitNet", "FGD", "DeFeat")

    insp.method_dropdown.value = "boxes"
    assert insp.message is None, insp.message
    assert insp.score_controls.layout.display == "none"  # selectors and mask options are LIAF-KD's
    titles = [ax.get_title() for ax in insp.figure.axes if ax.get_visible() and ax.images]
    assert titles == ["box (teacher)", "box (student)", "ramp"]
    assert insp.current.color_range == {"box": (0.0, 2.0), "ramp": pytest.approx((0.0, 63 / 64))}  # level 0: 8x8
    for index in range(3):
        view = insp.view(image=index, level="1")
        assert view.color_range == {"box": (0.0, 2.0), "ramp": (0.0, 15 / 16)}  # fixed over images, per level
        for row, box in zip(view.rows, BOX_SETS[index], strict=True):
            cells = region(box, (4, 4), 16.0)
            ramp = (torch.arange(16, dtype=torch.float32).view(4, 4) / 16)[cells].mean()
            assert (row["box (teacher)"], row["box (student)"]) == (1.0, 2.0)
            assert row["ramp"] == pytest.approx(float(ramp)) and row["cells"] == int(cells.sum())
        assert "scores no instances" in view.notes[0] and view.html.count("<tr title=") == len(BOX_SETS[index])

    insp.method_dropdown.value = "FGD"
    assert insp.message is None, insp.message
    fgd = methods["FGD"][1]
    with torch.no_grad():
        maps = fgd.weight_maps(KDInputs(student(toy["images"][:1]), toy["teacher"](toy["images"][:1]), BOX_SETS[:1]))
    assert maps and {ax.get_title() for ax in insp.figure.axes if ax.get_visible() and ax.images} == set(maps)

    insp.method_dropdown.value = "FitNet"
    assert insp.figure is None and "FitNet weights every cell alike" in insp.message
    insp.method_dropdown.value = "DeFeat"  # feature sources give no head outputs or priors
    assert insp.figure is None and "needs ['head_outputs', 'priors']" in insp.message
    insp.method_dropdown.value = "LIAF-KD"
    assert insp.message is None and insp.score_controls.layout.display is None
    with pytest.raises(ValueError, match="the name of the distiller itself"):
        inspector(toy, methods={"LIAF-KD": (student, FitNetDistiller(16, 32, STRIDES))})
    with pytest.raises(ValueError, match="distils the levels"):
        inspector(toy, methods={"one level": (student, FitNetDistiller(16, 32, {"0": 8.0}))})


# -- problems are messages ----------------------------------------------------------------------------------
def test_problems_are_messages(toy: dict) -> None:
    d = toy["distiller"]
    targets = [dict(t) for t in toy["targets"]]
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    insp = MaskInspector(toy["images"], targets, toy["teacher"], toy["student"], d,
                         methods={"boxes": (toy["student"], BoxMaps(16, 32, STRIDES))})
    insp.image_slider.value = 1
    assert insp.figure is None and "image 1 has no boxes" in insp.message
    assert "Cannot show this view:" in insp.current.html
    insp.method_dropdown.value = "boxes"
    assert "image 1 has no boxes" in insp.message
    insp.image_slider.value = 0
    assert insp.message is None
    insp.method_dropdown.value = "LIAF-KD"
    insp.normalize_toggle.value = "batch"  # the empty image joins the batch softmax
    assert insp.message is None

    feats = [{"0": f} for f in toy["teacher"](toy["images"])["0"]]  # lacks level "1"
    insp = MaskInspector(toy["images"], targets, feats, toy["student"], d)
    assert insp.figure is None and "lacks the levels ['1']" in insp.message
    insp = MaskInspector(toy["images"], targets, nn.Conv2d(3, 32, 3), toy["student"], d)
    assert "not a dict of FPN levels" in insp.message
    with pytest.raises(ValueError, match="unknown FPN level"):
        MaskInspector(toy["images"], targets, toy["teacher"], toy["student"], d, level="p9")
    with pytest.raises(ValueError, match="targets has 2 entries"):
        MaskInspector(toy["images"], targets[:2], toy["teacher"], toy["student"], d)
    with pytest.raises(ValueError, match="must be a liaf_lab distiller"):
        MaskInspector(toy["images"], targets, toy["teacher"], toy["student"], nn.Identity())


# -- detectors: the inputs of a training step -----------------------------------------------------------------
def test_with_detectors_matches_a_training_step() -> None:
    teacher, student = tiny_detector("retinanet", 16), tiny_detector("retinanet", 8)
    d = LIAFDistiller(8, 16, DENSE_STRIDES, num_selectors=2)
    targets = [{"boxes": BOXES, "labels": LABELS}]
    insp = MaskInspector([IMAGE], targets, teacher, student, d, class_names=["bg", "car", "person"], level="1",
                         methods={"FGD": (student, FGDDistiller(8, 16, DENSE_STRIDES))})
    assert insp.message is None, insp.message
    digest = figure_digest(insp.figure)
    insp.level_dropdown.value = "p6"
    assert insp.message is None and figure_digest(insp.figure) != digest
    inputs = kd_inputs_for(student, teacher, d, [IMAGE], targets)
    with torch.no_grad():
        m_t, _ = d.level_masks("0", inputs.student_feats["0"], inputs.teacher_feats["0"], inputs.boxes)
    for row, box in zip(insp.view(level="0").rows, inputs.boxes[0], strict=True):
        cells = region(box, tuple(m_t.shape[-2:]), 8.0)
        torch.testing.assert_close(m_t[0, 0][cells], torch.full((int(cells.sum()),), row["M^T"]))
    assert [r["class"] for r in insp.current.rows] == ["car", "person"]
    view = insp.view(method="FGD")
    assert view.message is None and view.rows and view.figure is not None
    with pytest.raises(ValueError, match="has no 'labels'"):
        MaskInspector([IMAGE], [BOXES], teacher, student, d)


def test_the_inspector_is_a_view_over_the_protocol() -> None:
    """widgets.py imports no private helper of another module and nothing of a method's own module."""
    import ast
    from pathlib import Path

    import liaf_lab.analysis.widgets as widgets_module

    tree = ast.parse(Path(widgets_module.__file__).read_text())
    imports = [(node.module or "", alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               for alias in node.names]
    assert [name for _, name in imports if name.startswith("_")] == []
    assert [module for module, _ in imports if module.startswith("distillers.")] == []
