"""``weight_maps`` (what each method's loss weights or masks, per level) against the methods' literal, loop-by-loop
references (``tests/references/``), and ``plot_weight_maps``."""

from __future__ import annotations

import math

import pytest
import references.acam
import references.defeat
import references.fgd
import references.fgfi
import references.gid
import references.ima
import references.maskd
import references.mgd
import references.samkd
import test_acam
import test_defeat
import test_fgd
import test_fgfi
import test_gid
import test_ima
import test_maskd
import test_mgd
import test_samkd
import torch
from helpers import SIZES, STRIDES, gen, make_boxes, make_feats
from references.liaf import ref_instance_mask, ref_level_scores
from torch import Tensor

from liaf_lab.analysis import plot_weight_maps, weight_map_summary
from liaf_lab.distillers import KDInputs, create_distiller
from liaf_lab.distillers.liaf import LIAFDistiller

F64 = torch.float64


def check_layout(maps: dict[str, dict[str, Tensor]], names: list[str], levels: dict[str, list[str]] | list[str],
                 sizes: dict[str, tuple[int, int]], n: int) -> None:
    """The documented names in order, each with its levels, every map ``[n, H_l, W_l]`` float without gradient."""
    assert list(maps) == names
    for name in names:
        expected = levels[name] if isinstance(levels, dict) else levels
        assert list(maps[name]) == expected, name
        for lvl in expected:
            m = maps[name][lvl]
            assert m.shape == (n, *sizes[lvl]) and m.is_floating_point() and not m.requires_grad, (name, lvl)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# -- the protocol's default -----------------------------------------------------------------------------
def test_fitnet_has_no_maps_and_every_call_checks_its_inputs_first():
    d = create_distiller("fitnet", 3, 4, STRIDES)
    s, t, boxes = make_feats(3, 2, 1), make_feats(4, 2, 2), make_boxes((2, 1))
    assert d.weight_maps(KDInputs(s, t, boxes)) == {}
    with pytest.raises(ValueError, match=r"student_feats\['p3'\] has 5 channels, expected 3"):
        d.weight_maps(KDInputs(make_feats(5, 2, 1), t, boxes))
    with pytest.raises(ValueError, match=r"distiller 'fgfi' needs \['priors'\]"):
        create_distiller("fgfi", 3, 4, STRIDES).weight_maps(KDInputs(s, t, boxes))


# -- LIAF-KD -------------------------------------------------------------------------------------------
def test_liaf_maps_are_eq7_masks_from_each_side_s_scores():
    torch.manual_seed(0)
    d = LIAFDistiller(3, 4, STRIDES, num_selectors=3).double()
    with torch.no_grad():
        for sel in d.selectors.values():
            sel.weight.copy_(torch.randn(sel.weight.shape, generator=gen(5), dtype=F64) * 0.1)
    s, t, boxes = make_feats(3, 2, 1), make_feats(4, 2, 2), make_boxes((3, 2), seed=3)
    maps = d.weight_maps(KDInputs(s, t, boxes))
    check_layout(maps, ["M (teacher)", "M (student)"], list(STRIDES), SIZES, 2)
    for lvl, stride in STRIDES.items():
        weight = d.selectors[lvl].weight
        a_t = ref_level_scores(t[lvl], boxes, stride, weight)
        a_s = ref_level_scores(d.projectors[lvl](s[lvl]), boxes, stride, weight)  # channels differ: f_phi(F^S)
        torch.testing.assert_close(maps["M (teacher)"][lvl], ref_instance_mask(boxes, a_t, SIZES[lvl], stride)[:, 0])
        torch.testing.assert_close(maps["M (student)"][lvl], ref_instance_mask(boxes, a_s, SIZES[lvl], stride)[:, 0])
    assert not torch.allclose(maps["M (teacher)"]["p3"], maps["M (student)"]["p3"])


# -- MasKD ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight_mask", [True, False])
@pytest.mark.parametrize("custom", [False, True], ids=["before-warmup", "after-warmup"])
def test_maskd_maps_are_the_token_masks_and_the_cell_weight_of_the_loss(custom, weight_mask):
    d = test_maskd.make_maskd(2, weight_mask=weight_mask, custom_mask_warmup=3, loss_weight=0.7).eval()
    d.kd_steps.fill_(3 if custom else 2)
    s, t, boxes = make_feats(2, 2, 1), make_feats(test_maskd.TEACHER_C, 2, 2), make_boxes((2, 1), seed=3)
    maps = d.weight_maps(KDInputs(s, t, boxes))
    tokens = [f"token {k + 1}" for k in range(test_maskd.TOKENS)]
    check_layout(maps, [*tokens, "cell weight"], list(STRIDES), SIZES, 2)
    assert int(d.kd_steps) == (3 if custom else 2)  # inspecting does not advance the warm-up
    want_loss = 0
    for lvl in d.levels:
        module, aligned = d.mask_modules[lvl], d.projectors[lvl](s[lvl])
        masks = references.maskd.ref_masks(module.mask_token, t[lvl])
        if custom:  # after the warm-up: the teacher's masks times the student's
            masks = masks * references.maskd.ref_masks(module.mask_token, aligned)
        p = references.maskd.ref_weights(module.prob, t[lvl]) if weight_mask else None
        n_img, n_tok, height, width = masks.shape
        weight = torch.zeros(n_img, height, width, dtype=F64)
        for n in range(n_img):
            for k in range(n_tok):
                p_k = p[n, k] if p is not None else 1 / n_tok
                total = sum(masks[n, k, h, w] for h in range(height) for w in range(width))
                for h in range(height):
                    for w in range(width):
                        weight[n, h, w] += p_k * masks[n, k, h, w] ** 2 / total
        for k, name in enumerate(tokens):
            torch.testing.assert_close(maps[name][lvl], masks[:, k])
        torch.testing.assert_close(maps["cell weight"][lvl], weight)
        # the level's loss: each cell's channel-mean squared error times its weight, summed, mean over images
        want_loss = want_loss + (weight * (aligned - t[lvl]).square().mean(dim=1)).sum() / n_img
    torch.testing.assert_close(d.loss_terms(KDInputs(s, t, boxes))["maskd"], 0.7 * want_loss)


# -- FGD -----------------------------------------------------------------------------------------------
def test_fgd_maps_are_its_fore_and_background_masks_and_both_spatial_attentions():
    d = test_fgd.make_fgd(3)
    s, t, boxes = make_feats(3, 2, 1), make_feats(test_fgd.TEACHER_C, 2, 2), test_fgd.make_boxes((3, 2), seed=3)
    maps = d.weight_maps(KDInputs(s, t, boxes))
    check_layout(maps, ["foreground mask", "background mask", "spatial attention (teacher)",
                        "spatial attention (student)"], list(STRIDES), SIZES, 2)
    for lvl, stride in STRIDES.items():
        fg, bg = references.fgd.ref_masks(boxes, stride, SIZES[lvl])
        torch.testing.assert_close(maps["foreground mask"][lvl], torch.tensor(fg, dtype=F64))
        torch.testing.assert_close(maps["background mask"][lvl], torch.tensor(bg, dtype=F64))
        torch.testing.assert_close(maps["spatial attention (teacher)"][lvl], references.fgd.ref_attention(t[lvl], 0.7)[0])
        student = references.fgd.ref_attention(d.projectors[lvl](s[lvl]), 0.7)[0]
        torch.testing.assert_close(maps["spatial attention (student)"][lvl], student)


# -- MGD -----------------------------------------------------------------------------------------------
def test_mgd_keep_mask_is_the_mask_the_loss_draws_from_the_same_generator():
    d = test_mgd.make_mgd(2, lambda_mask=0.5, alpha=0.3)
    s, t, boxes = make_feats(2, 2, 1), make_feats(test_mgd.TEACHER_C, 2, 2), make_boxes((1, 1))
    maps = d.weight_maps(KDInputs(s, t, boxes, generator=gen(7)))
    check_layout(maps, ["keep mask"], list(STRIDES), SIZES, 2)
    g = gen(7)  # Eq. 2 literally: r ~ U[0, 1) per image and cell, level by level; dropped where r > 1 - lambda
    for lvl in d.levels:
        r = torch.rand((2, 1, *SIZES[lvl]), generator=g, dtype=F64)[:, 0]
        want = torch.tensor([[[0.0 if float(v) > 0.5 else 1.0 for v in row] for row in img] for img in r], dtype=F64)
        assert torch.equal(maps["keep mask"][lvl], want)
    # the loss with a generator in the same state used exactly this mask
    want_loss = 0
    for lvl in d.levels:
        masked = references.mgd.ref_align(s[lvl], d.align[lvl]) * maps["keep mask"][lvl][:, None]
        want_loss = want_loss + (references.mgd.ref_generation(masked, d.generation[lvl]) - t[lvl]).square().sum() / 2
    torch.testing.assert_close(d.loss_terms(KDInputs(s, t, boxes, generator=gen(7)))["mgd"], 0.3 * want_loss)
    other = d.weight_maps(KDInputs(s, t, boxes, generator=gen(8)))["keep mask"]["p3"]
    assert not torch.equal(other, maps["keep mask"]["p3"])


# -- ACAM-KD -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_elements", [2**20, 200], ids=["one-block", "many-blocks"])
def test_acam_maps_are_eq5_spatial_masks(max_elements):
    d = test_acam.make_acam(3, max_attention_elements=max_elements)
    s, t, boxes = test_acam.inputs()
    maps = d.weight_maps(KDInputs(s, t, boxes))
    check_layout(maps, [f"spatial mask {m + 1}" for m in range(test_acam.MASKS)], list(STRIDES), SIZES, 2)
    for lvl in d.levels:
        aligned = references.acam.ref_align(s[lvl], d.projectors[lvl])
        for n in range(2):
            _, spatial, _ = references.acam.ref_image(aligned[n], t[lvl][n], d.masking[lvl], d.channel_units, d.detach)
            for m, want in enumerate(spatial):
                torch.testing.assert_close(maps[f"spatial mask {m + 1}"][lvl][n].flatten(), want)


# -- SAMKD ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [test_samkd.ODD, {"p3": (8, 10), "p4": (3, 5)}], ids=["overlapping-cells", "small-level"])
@pytest.mark.parametrize("norm", ["mean", "softmax"])
def test_samkd_maps_are_eq1_attention_and_eq3_mask_per_pyramid_cell(sizes, norm):
    d = test_samkd.make_samkd(3, spatial_norm=norm, omega_s=1.0)
    s, t, sh, th, boxes = test_samkd.case(3, sizes)
    maps = d.weight_maps(test_samkd.inputs_of(s, t, sh, th, boxes))
    want = references.samkd.ref_samkd_maps(d, t)
    names = [f"spatial {kind} {n}x{n}" for n in (1, 2, 4) for kind in ("attention", "mask")]
    levels = {name: ["p3"] if name.endswith("4x4") and sizes["p4"][0] < 4 else ["p3", "p4"] for name in names}
    check_layout(maps, names, levels, sizes, 2)
    for name, per_level in want.items():
        for lvl, value in per_level.items():
            torch.testing.assert_close(maps[name][lvl], value, msg=lambda m, name=name, lvl=lvl: f"{name} {lvl}: {m}")
    mask = maps["spatial mask 2x2"]["p3"]
    assert bool((mask == 0).any()) and bool((mask == 1).any())  # the threshold splits the cells


# -- GID -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, options", [("anchors", {}), ("points", {"roi_level": "prior", "nms_iou": 0.5})],
                         ids=["anchors-size-rule", "points-prior-level"])
def test_gid_maps_are_the_selected_instances_and_the_response_mask(kind, options):
    d = test_gid.make_gid(3, **options)
    inputs = test_gid.make_inputs(3, kind, counts=(1, 2), requires_grad=False)
    maps = d.weight_maps(inputs)
    check_layout(maps, ["selected instances", "response mask"], list(STRIDES), SIZES, 2)
    priors, selected = references.gid.ref_priors(d, inputs), references.gid.ref_select(d, inputs)
    chosen = {lvl: torch.zeros(2, *SIZES[lvl], dtype=F64) for lvl in d.levels}
    response = {lvl: torch.zeros(2, *SIZES[lvl], dtype=F64) for lvl in d.levels}
    per_cell = {lvl: inputs.priors[lvl].shape[0] // (SIZES[lvl][0] * SIZES[lvl][1]) for lvl in d.levels}
    for b, keep in enumerate(selected):
        for q in keep:  # the GI score over the GI box, on the level the instance is pooled from
            p = priors[q]
            lvl = d.levels[references.gid.ref_level(d, p)]
            i, j = p["cell"]
            t = inputs.teacher_head[p["lvl"]]["cls_logits"][b, :, i, j].tolist()
            s = inputs.student_head[p["lvl"]]["cls_logits"][b, :, i, j].tolist()
            score = max(abs(sigmoid(t[c]) - sigmoid(s[c])) for c in p["channels"])
            x1, y1, x2, y2 = p["box"]
            stride = d.strides[lvl]
            for h in range(SIZES[lvl][0]):
                for w in range(SIZES[lvl][1]):
                    if y1 <= h * stride < y2 and x1 <= w * stride < x2:
                        chosen[lvl][b, h, w] = max(float(chosen[lvl][b, h, w]), score)
        for p in priors:  # a prior is in the GI mask when it matches a kept instance
            if any(references.gid.ref_iou(p["box"], priors[q]["box"]) >= d.response_iou for q in keep):
                response[p["lvl"]][b, p["cell"][0], p["cell"][1]] += 1 / per_cell[p["lvl"]]
    for lvl in d.levels:
        torch.testing.assert_close(maps["selected instances"][lvl], chosen[lvl])
        torch.testing.assert_close(maps["response mask"][lvl], response[lvl])
    assert sum(float(m.max()) for m in maps["selected instances"].values()) > 0


# -- FGFI and DeFeat -----------------------------------------------------------------------------------
def test_fgfi_map_is_the_imitation_mask():
    d = test_fgfi.make_fgfi(3)
    s, t = make_feats(3, 2, 1), make_feats(test_fgfi.TEACHER_C, 2, 2)
    boxes, priors = test_fgfi.make_boxes((3, 1), seed=3), test_fgfi.anchors(STRIDES)
    maps = d.weight_maps(KDInputs(s, t, boxes, priors=priors))
    check_layout(maps, ["imitation mask"], list(STRIDES), SIZES, 2)
    want = references.fgfi.ref_masks(priors, boxes, d.strides, d.psi, d.point_prior_scale, d.iou_max)
    for lvl in d.levels:
        torch.testing.assert_close(maps["imitation mask"][lvl], torch.tensor(want[lvl], dtype=F64))
    assert float(maps["imitation mask"]["p3"].sum()) > 0


@pytest.mark.parametrize("box_levels", ["scale", "all"])
def test_defeat_maps_are_the_object_mask_and_its_complement(box_levels):
    d = test_defeat.make_defeat(3, box_levels=box_levels)
    inputs = test_defeat.make_inputs(3, (3, 2))  # student features and logits with gradient
    maps = d.weight_maps(inputs)
    check_layout(maps, ["object mask", "background mask"], list(STRIDES), SIZES, 2)
    want = references.defeat.ref_masks(inputs.boxes, d.strides, box_levels)
    for lvl in d.levels:
        torch.testing.assert_close(maps["object mask"][lvl], torch.tensor(want[lvl], dtype=F64))
        torch.testing.assert_close(maps["background mask"][lvl], 1 - torch.tensor(want[lvl], dtype=F64))


# -- IMA -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("instance", ["image", "box"])
def test_ima_maps_are_the_keep_mask_and_the_scale_deflation(instance):
    d = test_ima.make_ima(2, instance=instance, alpha=3.0, mask_ratio=0.4)
    s, t, boxes = make_feats(2, 2, 1), make_feats(test_ima.TEACHER_C, 2, 2), test_ima.EDGE_BOXES
    maps = d.weight_maps(KDInputs(s, t, boxes, generator=gen(7)))
    check_layout(maps, ["keep mask", "scale deflation"], list(STRIDES), SIZES, 2)
    g = gen(7)
    for lvl, stride in STRIDES.items():
        height, width = SIZES[lvl]
        r = torch.rand((2, 1, height, width), generator=g, dtype=F64)[:, 0]
        assert torch.equal(maps["keep mask"][lvl], (r <= 0.6).to(F64))
        a = references.ima.ref_align(s[lvl], d.projectors[lvl]).detach()
        for n in range(2):  # gamma of the instance each cell belongs to (smallest covering box, else the image)
            instances = [[(h, w) for h in range(height) for w in range(width)]]
            if instance == "box":
                instances += [references.ima.ref_box_cells(box, stride, height, width) for box in boxes[n]]
            gammas = [sigmoid(3.0 * references.ima.ref_cosine(a[n], t[lvl][n], cells)) if cells else None
                      for cells in instances]
            for h in range(height):
                for w in range(width):
                    owner = references.ima.ref_owner(instances, h, w)
                    assert math.isclose(float(maps["scale deflation"][lvl][n, h, w]), gammas[owner], rel_tol=1e-9)
    if instance == "box":  # the boxes give their cells their own gamma
        assert len(torch.unique(maps["scale deflation"]["p3"][0])) > 1
    plain = test_ima.make_ima(2, scale_deflation=False, mask_ratio=0.4).weight_maps(KDInputs(s, t, boxes, generator=gen(7)))
    assert list(plain) == ["keep mask"] and torch.equal(plain["keep mask"]["p3"], maps["keep mask"]["p3"])


# -- combinations --------------------------------------------------------------------------------------
def test_a_combination_gives_each_part_s_maps_under_its_prefixed_names_in_draw_order():
    torch.manual_seed(0)
    both = create_distiller("liaf+mgd+ima", 2, 3, STRIDES, ima={"instance": "box"}).double()
    s, t, boxes = make_feats(2, 2, 1), make_feats(3, 2, 2), make_boxes((2, 1), seed=3)
    maps = both.weight_maps(KDInputs(s, t, boxes, generator=gen(7)))
    assert list(maps) == ["liaf_M (teacher)", "liaf_M (student)", "mgd_keep mask", "ima_keep mask",
                          "ima_scale deflation"]
    g = gen(7)  # the parts one after the other on one generator: the draws of the combined loss
    for name, part in both.parts.items():
        for key, per_level in part.weight_maps(KDInputs(s, t, boxes, generator=g)).items():
            assert list(maps[f"{name}_{key}"]) == list(per_level)
            for lvl, value in per_level.items():
                assert torch.equal(maps[f"{name}_{key}"][lvl], value), (name, key, lvl)
    assert not torch.equal(maps["mgd_keep mask"]["p3"], maps["ima_keep mask"]["p3"])


# -- plot_weight_maps ----------------------------------------------------------------------------------
CLASS_NAMES = ["background", "disc", "ring", "cross"]


def plot_case(counts=(2, 1)):
    """Two images at twice the size the detector saw (32 x 40, 24 x 40), FGD's maps on them."""
    d = test_fgd.make_fgd(3)
    s, t = make_feats(3, 2, 1), make_feats(test_fgd.TEACHER_C, 2, 2)
    boxes = test_fgd.make_boxes(counts, seed=3)
    labels = [torch.arange(1, len(b) + 1) for b in boxes]
    inputs = KDInputs(s, t, boxes, labels, image_size=(32, 40), image_sizes=[(32, 40), (24, 40)])
    images = [torch.rand(3, 64, 80, generator=gen(11)), torch.rand(3, 48, 80, generator=gen(12))]
    return images, inputs, d.weight_maps(inputs), d.strides


def test_plot_weight_maps_draws_images_boxes_and_one_scale_per_map():
    images, inputs, maps, strides = plot_case()
    fig = plot_weight_maps(images, inputs, maps, strides, level="p4", class_names=CLASS_NAMES, title="FGD")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2 * 4  # rows: images, columns: maps
    assert [ax.get_title() for ax in panels[:4]] == list(maps)
    assert "FGD: level p4 (4x5, stride 8)" in fig.get_suptitle()
    assert [ax.images[0].get_array().shape[:2] for ax in (panels[0], panels[4])] == [(32, 40), (24, 40)]  # resized
    assert {"disc", "ring"} <= {text.get_text() for text in panels[0].texts}
    for j, name in enumerate(maps):  # one scale for both images: the map's range over them
        share = [name] if "attention" not in name else [n for n in maps if "attention" in n]  # the pair shares
        lo = min(float(maps[n]["p4"].min()) for n in share)
        hi = max(float(maps[n]["p4"].max()) for n in share)
        for ax in (panels[j], panels[4 + j]):
            norm = ax.images[-1].norm
            assert (norm.vmin, norm.vmax) == pytest.approx((lo, hi)), name
        assert (panels[j].images[-1].get_array() == maps[name]["p4"][0].float().numpy()).all()
    assert len(fig.axes) - len(panels) == 3  # colour bars: fg, bg, and one for the attention pair


def test_plot_weight_maps_can_share_one_fixed_scale_and_labels_its_colour_bars():
    images, inputs, maps, strides = plot_case()
    ranged = plot_weight_maps(images, inputs, maps, strides, level="p4")
    assert {ax.get_xlabel() for ax in ranged.axes if not ax.images} == {"weight (range over the images)"}
    fixed = plot_weight_maps(images, inputs, maps, strides, level="p4", limits=(0.0, 1.0))
    panels = [ax for ax in fixed.axes if ax.images]
    assert {(ax.images[-1].norm.vmin, ax.images[-1].norm.vmax) for ax in panels} == {(0.0, 1.0)}
    assert {ax.get_xlabel() for ax in fixed.axes if not ax.images} == {"weight (shared scale)"}
    with pytest.raises(ValueError, match="low < high"):
        plot_weight_maps(images, inputs, maps, strides, level="p4", limits=(1.0, 1.0))


def test_weight_map_summary_gives_each_map_s_range_and_share_of_positive_cells():
    _, _, maps, _ = plot_case()
    rows = weight_map_summary(maps, "p4")
    assert [r["map"] for r in rows] == list(maps)
    for row in rows:
        cells = maps[row["map"]]["p4"].float()
        assert (row["min"], row["max"]) == pytest.approx((float(cells.min()), float(cells.max())))
        assert row["mean"] == pytest.approx(float(cells.sum() / cells.numel()))
        assert row["cells > 0"] == pytest.approx(sum(float(v) > 0 for v in cells.flatten()) / cells.numel())
    with pytest.raises(ValueError, match="no map has level"):
        weight_map_summary(maps, "p9")


def test_plot_weight_maps_puts_each_pair_side_by_side_and_keeps_a_given_order():
    images, inputs, maps, strides = plot_case()
    mixed = {"b (student)": maps["spatial attention (student)"], "a": maps["foreground mask"],
             "b (teacher)": maps["spatial attention (teacher)"]}
    titles = [ax.get_title() for ax in plot_weight_maps(images, inputs, mixed, strides).axes[:3]]
    assert titles == ["b (teacher)", "b (student)", "a"]
    fig = plot_weight_maps(images, inputs, mixed, strides, names=["a", "b (student)"])
    assert [ax.get_title() for ax in fig.axes[:2]] == ["a", "b (student)"]
    assert "level p3 (8x10, stride 4)" in fig.get_suptitle()  # the first level by default


def test_plot_weight_maps_bad_input_is_a_clear_error():
    images, inputs, maps, strides = plot_case()
    fitnet = create_distiller("fitnet", 3, 4, STRIDES).weight_maps(inputs)
    with pytest.raises(ValueError, match=r"^there are no weight maps to plot: the method weights every cell alike"):
        plot_weight_maps(images, inputs, fitnet, strides)
    with pytest.raises(ValueError, match=r"^unknown weight map\(s\) \['nope'\]; the maps are \['foreground mask'"):
        plot_weight_maps(images, inputs, maps, strides, names=["nope"])
    with pytest.raises(ValueError, match=r"^unknown FPN level\(s\) \['p9'\] for the weight maps"):
        plot_weight_maps(images, inputs, maps, strides, level="p9")
    partial = {"a": {"p3": maps["foreground mask"]["p3"]}, "b": maps["background mask"]}
    with pytest.raises(ValueError, match=r"^the maps \['a'\] have no level 'p4'"):
        plot_weight_maps(images, inputs, partial, strides, level="p4", names=["b", "a"])
    with pytest.raises(ValueError, match=r"^got 1 images for inputs of 2"):
        plot_weight_maps(images[:1], inputs, maps, strides)
    with pytest.raises(ValueError, match=r"must be \[2, H, W\] \(one map per image\), got \(1, 8, 10\)"):
        plot_weight_maps(images, inputs, {"a": {"p3": maps["foreground mask"]["p3"][:1]}}, strides)
    images, inputs, maps, strides = plot_case(counts=(2, 0))
    with pytest.raises(ValueError, match=r"^images \[1\] have no ground-truth boxes"):
        plot_weight_maps(images, inputs, maps, strides)
