"""GFL (liaf_lab/models/gfl.py) against literal, slow references written here as loops over locations and boxes.

The references follow mmdetection's GFL (``gfl_head.py``, ``gfocal_loss.py``, ``atss_assigner.py``) term
by term; the library's code is vectorised. Then: the detector through ``run_detector`` equals
``model(images, targets)``, gradients (gradcheck), a few training steps, the presets, bad input.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from liaf_lab.experiments.config import load_config
from liaf_lab.models import (
    create_detector,
    detector_adapter,
    detector_num_classes,
    fpn_strides,
    load_detector_weights,
    loss_on_features,
    run_detector,
    save_detector,
)
from liaf_lab.models.gfl import (
    GFL,
    GFLAnchorGenerator,
    atss_assign,
    distribution_focal_loss,
    integral_distances,
    mean_over_ranks,
    quality_focal_loss,
)
from references.gfl import ref_atss, ref_dfl, ref_gfl_loss, ref_integral, ref_iou, ref_qfl

NUM_CLASSES = 4  # 3 foreground classes + background
TINY = dict(depth=18, width_mult=0.125, fpn_channels=16, min_size=128, max_size=128)
STRIDES = (8, 16, 32)  # the loss and assignment tests use a 64 x 64 input: grids 8x8, 4x4, 2x2
SIZES = (24, 48, 96)
IMAGE = 64


# -- literal references ------------------------------------------------------------------------------------


# -- helpers -------------------------------------------------------------------------------------------------

def small_gfl(reg_max: int = 16, **kwargs) -> GFL:
    """A GFL on strides 8, 16, 32 (no backbone needed for its losses and post-processing)."""
    backbone = nn.Identity()
    backbone.out_channels = 8
    return GFL(backbone, NUM_CLASSES, anchor_generator=GFLAnchorGenerator(SIZES, STRIDES), reg_max=reg_max, **kwargs)


def grid_anchors(num_images: int = 2, dtype: torch.dtype = torch.float64) -> tuple[list[Tensor], list[int]]:
    """Anchors of a 64 x 64 input on STRIDES, and the count per level."""
    feats = [torch.zeros(num_images, 1, IMAGE // s, IMAGE // s, dtype=dtype) for s in STRIDES]
    images = ImageList(torch.zeros(num_images, 3, IMAGE, IMAGE), [(IMAGE, IMAGE)] * num_images)
    anchors = GFLAnchorGenerator(SIZES, STRIDES)(images, feats)
    return anchors, [f.shape[-2] * f.shape[-1] for f in feats]


def random_boxes(n: int, g: torch.Generator, low: float = -10.0, high: float = 74.0) -> Tensor:
    """``n`` boxes with corners in [low, high] (crossing the 64 px image's border), sides >= 4 px."""
    xy = low + torch.rand(n, 2, generator=g, dtype=torch.float64) * (high - low - 20)
    wh = 4 + torch.rand(n, 2, generator=g, dtype=torch.float64) * 30
    return torch.cat([xy, xy + wh], dim=1)


def tiny(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return create_detector("gfl", NUM_CLASSES, **{**TINY, "score_thresh": 0.0, **kwargs})


def batch(empty_second: bool = False) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Two images of different sizes with boxes in their pixels (the first crosses the right border)."""
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 128, generator=g), torch.rand(3, 64, 64, generator=g)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 80.0], [70.0, 5.0, 140.0, 40.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[4.0, 8.0, 30.0, 50.0]]), "labels": torch.tensor([2])},
    ]
    if empty_second:
        targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    return images, targets


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


# -- box coding, QFL, DFL ---------------------------------------------------------------------------------

@pytest.mark.parametrize("reg_max", [1, 4, 16])
def test_integral_decoding_matches_reference(reg_max):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4 * (reg_max + 1), generator=g, dtype=torch.float64) * 3
    got = integral_distances(logits, reg_max)
    for p in range(5):
        torch.testing.assert_close(got[p], torch.stack(ref_integral(logits[p], reg_max)))
    assert float(got.min()) >= 0 and float(got.max()) <= reg_max


def test_postprocess_decodes_centre_plus_expectation_times_stride():
    model = small_gfl(reg_max=4, score_thresh=0.5).eval()
    anchors, counts = grid_anchors(1)
    g = torch.Generator().manual_seed(2)
    cls = torch.full((1, sum(counts), NUM_CLASSES), -10.0, dtype=torch.float64)
    bbox = torch.randn(1, sum(counts), 4 * 5, generator=g, dtype=torch.float64)
    a = counts[0] + 5  # level 1 (stride 16), cell (1, 1): centre (16, 16)
    cls[0, a, 2] = 2.0
    split = {"cls_logits": list(cls.split(counts, dim=1)), "bbox_regression": list(bbox.split(counts, dim=1))}
    det = model.postprocess_detections(split, [list(anchors[0].split(counts))], [(IMAGE, IMAGE)])[0]
    d = [float(v) * 16 for v in ref_integral(bbox[0, a], 4)]
    expected = [max(0.0, 16 - d[0]), max(0.0, 16 - d[1]), min(64.0, 16 + d[2]), min(64.0, 16 + d[3])]
    assert det["labels"].tolist() == [2]
    torch.testing.assert_close(det["scores"], torch.sigmoid(torch.tensor([2.0], dtype=torch.float64)))
    torch.testing.assert_close(det["boxes"][0], torch.tensor(expected, dtype=torch.float64))


def test_anchors_lie_on_the_nominal_stride_grid():
    """P7 of a 160 px input: torchvision would space its 2 x 2 anchors by 160 // 2 = 80 px; GFL by 128."""
    model = create_detector("gfl", NUM_CLASSES, **{**TINY, "min_size": 160, "max_size": 160})
    out = run_detector(model.eval(), [torch.rand(3, 160, 160)])
    centres = (out.priors["p7"][:, :2] + out.priors["p7"][:, 2:]) / 2
    torch.testing.assert_close(centres, torch.tensor([[0.0, 0.0], [128.0, 0.0], [0.0, 128.0], [128.0, 128.0]]))
    assert out.priors["p7"].dtype == torch.float32
    # mmdetection's 8 x stride, scaled with min_size / 800 (as RetinaNet's anchors in create_detector)
    assert model.anchor_generator.sizes == ((13,), (26,), (51,), (102,), (205,))


@pytest.mark.parametrize("beta", [2.0, 1.5])
def test_quality_focal_loss_matches_reference(beta):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 3, generator=g, dtype=torch.float64) * 2
    quality = torch.zeros(6, 3, dtype=torch.float64)
    quality[1, 2], quality[4, 0] = 0.7, 0.05  # two positives; all else negative
    got = quality_focal_loss(logits, quality, beta)
    for a in range(6):
        for k in range(3):
            torch.testing.assert_close(got[a, k], ref_qfl(logits[a, k], float(quality[a, k]), beta))
    other = quality_focal_loss(logits, quality, 2.5 if beta == 2.0 else 2.0)
    assert not torch.allclose(got, other)  # the exponent matters


def test_distribution_focal_loss_matches_reference():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 8, generator=g, dtype=torch.float64)
    target = torch.tensor([0.0, 0.3, 3.5, 6.9, 7 - 0.1], dtype=torch.float64)
    got = distribution_focal_loss(logits, target)
    for m in range(5):
        torch.testing.assert_close(got[m], ref_dfl(logits[m], float(target[m])))
    # at an integer target only that bin counts: plain cross-entropy
    torch.testing.assert_close(got[0], -logits[0].log_softmax(0)[0])


def test_gradcheck_qfl_and_dfl():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    quality = torch.zeros(3, 4, dtype=torch.float64)
    quality[0, 1], quality[2, 3] = 0.6, 0.2
    assert torch.autograd.gradcheck(lambda x: quality_focal_loss(x, quality, 2.0), (logits,))
    bins = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0.2, 1.5, 2.99, 3.9], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: distribution_focal_loss(x, target), (bins,))


# -- ATSS ------------------------------------------------------------------------------------------------------

def test_atss_matches_reference_on_random_boxes_crossing_the_border():
    anchors, counts = grid_anchors(1)
    g = torch.Generator().manual_seed(6)
    for n in (1, 2, 5, 12):
        boxes = random_boxes(n, g)
        got = atss_assign(anchors[0], counts, boxes).tolist()
        assert got == ref_atss(anchors[0].tolist(), counts, boxes.tolist())
    assert any(v >= 0 for v in got)


def test_atss_without_boxes_and_with_boxes_outside_the_image():
    anchors, counts = grid_anchors(1)
    assert atss_assign(anchors[0], counts, torch.zeros(0, 4, dtype=torch.float64)).tolist() == [-1] * sum(counts)
    far = torch.tensor([[200.0, 200.0, 240.0, 250.0]], dtype=torch.float64)  # no anchor centre inside
    assert atss_assign(anchors[0], counts, far).tolist() == [-1] * sum(counts)
    assert ref_atss(anchors[0].tolist(), counts, far.tolist()) == [-1] * sum(counts)


def test_atss_one_box():
    anchors, counts = grid_anchors(1)
    box = torch.tensor([[20.0, 18.0, 44.0, 50.0]], dtype=torch.float64)
    got = atss_assign(anchors[0], counts, box)
    assert got.tolist() == ref_atss(anchors[0].tolist(), counts, box.tolist())
    positives = torch.where(got == 0)[0]
    assert len(positives) > 0
    centres = (anchors[0][positives, :2] + anchors[0][positives, 2:]) / 2
    assert torch.all((centres > box[0, :2]) & (centres < box[0, 2:]))  # centres inside the box


def test_atss_ties():
    anchors, counts = grid_anchors(1)
    # two identical boxes: every positive goes to the first
    twins = torch.tensor([[20.0, 18.0, 44.0, 50.0]] * 2, dtype=torch.float64)
    got = atss_assign(anchors[0], counts, twins)
    assert got.tolist() == ref_atss(anchors[0].tolist(), counts, twins.tolist())
    assert set(got.tolist()) == {-1, 0}
    # a box centred between anchors (equal distances): with one candidate per level the lower index wins
    between = torch.tensor([[4.0, 0.0, 20.0, 16.0]], dtype=torch.float64)  # centre (12, 8): anchors (8, 8) and (16, 8)
    got = atss_assign(anchors[0], counts, between, topk=1)
    assert got.tolist() == ref_atss(anchors[0].tolist(), counts, between.tolist(), topk=1)
    assert got[9] == 0 and got[10] == -1  # cells (1, 1) and (1, 2) of level 0
    # an anchor positive for two boxes goes to the one of higher IoU (ATSS treats each box on its own)
    nested = torch.tensor([[8.0, 8.0, 40.0, 40.0], [14.0, 14.0, 34.0, 34.0]], dtype=torch.float64)
    got = atss_assign(anchors[0], counts, nested)
    assert got.tolist() == ref_atss(anchors[0].tolist(), counts, nested.tolist())
    alone = [ref_atss(anchors[0].tolist(), counts, [box]) for box in nested.tolist()]
    both = [a for a in range(sum(counts)) if alone[0][a] == alone[1][a] == 0]
    assert both
    for a in both:
        ious = [ref_iou(anchors[0][a].tolist(), box) for box in nested.tolist()]
        assert got[a] == (0 if ious[0] >= ious[1] else 1)


# -- the loss ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reg_max", [3, 16])
@pytest.mark.parametrize("case", ["random", "one_box", "empty_image", "no_boxes", "low_scores"])
def test_loss_matches_reference(case, reg_max):
    model = small_gfl(reg_max)
    anchors, counts = grid_anchors(2)
    g = torch.Generator().manual_seed(7)
    boxes = {"random": [random_boxes(4, g), random_boxes(2, g)], "low_scores": [random_boxes(2, g)] * 2,
             "one_box": [torch.tensor([[5.0, 10.0, 60.0, 40.0]], dtype=torch.float64), random_boxes(1, g)],
             "empty_image": [random_boxes(3, g), torch.zeros(0, 4, dtype=torch.float64)],
             "no_boxes": [torch.zeros(0, 4, dtype=torch.float64)] * 2}[case]
    targets = [{"boxes": b, "labels": torch.randint(1, NUM_CLASSES, (len(b),), generator=g)} for b in boxes]
    offset = -6.0 if case == "low_scores" else 0.0  # the sum of the box-loss weights < 1: clamped to 1
    cls = (torch.randn(2, sum(counts), NUM_CLASSES, generator=g, dtype=torch.float64) * 2 + offset).requires_grad_()
    bbox = (torch.randn(2, sum(counts), 4 * (reg_max + 1), generator=g, dtype=torch.float64) * 2).requires_grad_()
    got = model.compute_loss(targets, {"cls_logits": cls, "bbox_regression": bbox}, anchors, counts)
    ref = ref_gfl_loss(cls, bbox, anchors[0], counts, STRIDES, targets, reg_max)
    assert_same(got, ref)
    if case == "no_boxes":
        assert got["bbox_regression"].item() == 0.0 and got["bbox_dfl"].item() == 0.0
    got_grads = torch.autograd.grad(sum(got.values()), (cls, bbox))
    ref_grads = torch.autograd.grad(sum(ref.values()), (cls, bbox), allow_unused=True)
    for a, b in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b)


def test_box_losses_are_weighted_by_the_detached_best_score():
    model = small_gfl(4)
    anchors, counts = grid_anchors(1)
    targets = [{"boxes": torch.tensor([[5.0, 10.0, 60.0, 40.0], [30.0, 30.0, 50.0, 62.0]], dtype=torch.float64),
                "labels": torch.tensor([1, 2])}]
    g = torch.Generator().manual_seed(8)
    cls = torch.randn(1, sum(counts), NUM_CLASSES, generator=g, dtype=torch.float64).requires_grad_()
    bbox = torch.randn(1, sum(counts), 20, generator=g, dtype=torch.float64)
    losses = model.compute_loss(targets, {"cls_logits": cls, "bbox_regression": bbox}, anchors, counts)
    assert not (losses["bbox_regression"] + losses["bbox_dfl"]).requires_grad  # the weights are detached
    raised = cls.detach().clone()
    raised[0, :, 3] = 3.0  # every location's best score rises (sum of weights > 1): the weighted mean changes
    again = model.compute_loss(targets, {"cls_logits": raised, "bbox_regression": bbox}, anchors, counts)
    assert not torch.allclose(again["bbox_regression"], losses["bbox_regression"])


def test_normaliser_over_a_one_rank_process_group(tmp_path):
    model = small_gfl(4)
    anchors, counts = grid_anchors(2)
    g = torch.Generator().manual_seed(9)
    targets = [{"boxes": random_boxes(3, g), "labels": torch.tensor([1, 2, 3])}] * 2
    head = {"cls_logits": torch.randn(2, sum(counts), NUM_CLASSES, generator=g, dtype=torch.float64),
            "bbox_regression": torch.randn(2, sum(counts), 20, generator=g, dtype=torch.float64)}
    alone = model.compute_loss(targets, head, anchors, counts)
    value = torch.tensor(3.0)
    assert mean_over_ranks(value) is value
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert_same(model.compute_loss(targets, head, anchors, counts), alone)
    finally:
        dist.destroy_process_group()


# -- the detector ------------------------------------------------------------------------------------------------

def test_factory_and_arch_plumbing(tmp_path):
    model = tiny()
    assert detector_adapter(model).arch == model.liaf_arch == "gfl" and detector_adapter("gfl") is detector_adapter(model)
    assert detector_adapter(model).head_outputs == ("cls_logits", "bbox_regression", "box_bins")  # box_bins: bbox_regression's bins
    assert list(fpn_strides(model).values()) == [8.0, 16.0, 32.0, 64.0, 128.0]
    assert detector_num_classes(model) == NUM_CLASSES
    assert model.head.classification_head.conv[1].num_groups == 16  # gcd(32, 16) for 16 FPN channels
    path = save_detector(tmp_path / "gfl.pt", model, ["a", "b", "c"])
    other = tiny(seed=1)
    assert load_detector_weights(other, path, ["a", "b", "c"]) == ["a", "b", "c"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[k], v, msg=k)
    with pytest.raises(ValueError, match="another architecture"):
        load_detector_weights(create_detector("fcos", NUM_CLASSES, **TINY), path)


def test_training_forward_matches_run_detector():
    model = tiny().train()
    for empty in (False, True):
        images, targets = batch(empty_second=empty)
        torch.manual_seed(3)
        expected = model(images, targets)
        torch.manual_seed(3)
        out = run_detector(model, images, targets)
        assert_same(out.losses, expected)
        assert set(expected) == {"classification", "bbox_regression", "bbox_dfl"}
        assert all(torch.isfinite(v) for v in expected.values())


def test_eval_detections_match_run_detector_and_head_outputs():
    model = tiny().eval()
    images, targets = batch()
    with torch.no_grad():
        expected = model(images)
        out = run_detector(model, images, targets)
        same = loss_on_features(model, out.image_list, out.targets, dict(out.features))
    assert sum(len(d["boxes"]) for d in expected) > 0
    for got, exp in zip(out.detections, expected, strict=True):
        assert_same(got, exp)
        assert float(got["boxes"][:, 2].max()) <= 128 and float(got["boxes"].min()) >= 0
    assert_same(same, out.losses)
    for lvl, f in out.features.items():
        h, w = f.shape[-2:]
        assert out.head_outputs[lvl]["cls_logits"].shape == (2, NUM_CLASSES, h, w)
        assert out.head_outputs[lvl]["bbox_regression"].shape == (2, 4 * 17, h, w)
        assert out.priors[lvl].shape == (h * w, 4)
    cls = model.head.classification_head
    torch.testing.assert_close(out.head_logits["1"], cls.cls_logits(cls.conv(out.features["1"])))


def test_tiny_gfl_trains():
    model = tiny(seed=2).train()
    images, targets = batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    totals = []
    for _ in range(10):
        loss = sum(run_detector(model, images, targets).losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    assert all(math.isfinite(t) for t in totals)
    assert totals[-1] < 0.98 * totals[0]  # about 0.93 x (seeds 0-2); early GFL moves slowly: box weights ~0.01


def test_autocast_losses_are_float32_and_finite():
    model = tiny().train()
    images, targets = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = run_detector(model, images, targets).losses
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_bad_input():
    images, targets = batch()
    with pytest.raises(ValueError, match="reg_max must be an int >= 1"):
        tiny(reg_max=0)
    with pytest.raises(ValueError, match="reg_max"):
        small_gfl(reg_max=2.5)
    model = tiny().train()
    bad = [targets[0], {"boxes": targets[1]["boxes"], "labels": torch.tensor([NUM_CLASSES])}]
    with pytest.raises(ValueError, match=rf"class id {NUM_CLASSES}, outside 0..{NUM_CLASSES - 1}"):
        run_detector(model, images, bad)
    with pytest.raises(ValueError, match=rf"class id {NUM_CLASSES}"):
        model(images, bad)
    with pytest.raises(ValueError, match="targets are required"):
        model(images)
    with pytest.raises(ValueError, match="positive width"):
        model(images, [targets[0], {"boxes": torch.tensor([[5.0, 5.0, 5.0, 9.0]]), "labels": torch.tensor([1])}])
    with pytest.raises(TypeError, match="GFLAnchorGenerator"):
        GFL(model.backbone, NUM_CLASSES, anchor_generator=AnchorGenerator(((8,),), ((1.0,),)))
    # boxes far outside the image and images without boxes: finite losses and gradients, never NaN
    odd = [{"boxes": torch.tensor([[-50.0, -40.0, -10.0, -5.0], [100.0, 80.0, 400.0, 300.0]]),
            "labels": torch.tensor([1, 2])},
           {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = run_detector(model, images, odd).losses
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# -- presets ----------------------------------------------------------------------------------------------------

def test_presets_load():
    tiny_cfg, tiny_base = load_config("gfl_tiny"), load_config("tiny")
    assert tiny_cfg["teacher"]["arch"] == tiny_cfg["student"]["arch"] == "gfl"
    def without(cfg, *tables):  # the config less the detectors and the given [kd.<m>] tables
        return {k: ({m: t for m, t in v.items() if m not in tables} if k == "kd" else v)
                for k, v in cfg.items() if k not in ("teacher", "student")}

    # tiny.toml's, but FGD and MasKD take gfl_coco's sources (FGD's GFL config, MasKD's RetinaNet one)
    assert without(tiny_cfg, "fgd", "maskd") == without(tiny_base, "fgd", "maskd")
    coco = load_config("gfl_coco")
    fgd, coco_fgd = tiny_cfg["kd"]["fgd"], coco["kd"]["fgd"]
    assert fgd["temperature"] == coco_fgd["temperature"] == 0.5
    ratios = [fgd[k] / coco_fgd[k] for k in ("alpha_fg", "beta_bg", "gamma_attention", "lambda_global")]
    assert max(ratios) == pytest.approx(min(ratios))  # one factor on the public GFL weights
    assert tiny_cfg["kd"]["maskd"]["custom_mask_warmup"] == round(7000 * 300 / 175_920)
    assert (coco["teacher"]["arch"], coco["teacher"]["depth"], coco["student"]["depth"]) == ("gfl", 101, 50)
    assert coco["kd"]["inherit"] is True
    assert (coco["distill"]["lr"], coco["distill"]["batch_size"], coco["distill"]["iterations"]) == (0.01, 16, 90000)
    kitti = load_config("gfl_kitti")
    assert kitti["data"]["kind"] == "kitti" and kitti["data"]["classes"] == ["Car", "Pedestrian", "Cyclist"]
    assert kitti["data"]["merge"] == {} and kitti["kd"]["inherit"] is True
    assert (kitti["input"]["min_size"], kitti["input"]["max_size"]) == (800, 1333)
    assert kitti["distill"]["lr"] == 0.02 and kitti["distill"]["warmup"] == 500
