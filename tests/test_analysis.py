"""Tests of liaf_lab.analysis: figures, CAMs (hooks released), efficiency, score history (MaskInspector:
test_inspector.py)."""

from __future__ import annotations

import csv
import math
from collections import OrderedDict

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import nn  # noqa: E402
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet  # noqa: E402
from torchvision.models.detection.backbone_utils import BackboneWithFPN  # noqa: E402
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7  # noqa: E402

from liaf_lab import LIAFDistiller  # noqa: E402
from liaf_lab.analysis import (  # noqa: E402
    DetectorCAM,
    ScoreHistory,
    compare_cams,
    count_flops,
    count_parameters,
    detector_cam,
    draw_boxes,
    efficiency_table,
    format_table,
    kd_step_overhead,
    latency_noise,
    machine_description,
    measure_latency,
    peak_memory,
    plot_detections,
    plot_efficiency,
    plot_instance_scores,
    plot_masks,
    plot_training_curves,
    size_table,
)
from liaf_lab.analysis.efficiency import _iqr  # noqa: E402
from liaf_lab.analysis.viz import new_figure  # noqa: E402
from liaf_lab.experiments.toy import STRIDES, TinyPyramid, make_batch  # noqa: E402

DENSE_STRIDES = {"0": 8.0, "1": 16.0, "2": 32.0, "p6": 64.0, "p7": 128.0}


def tiny_backbone(width: int, two_stage: bool = False) -> BackboneWithFPN:
    """A 4-stage conv body (strides 4, 8, 16, 32) with an FPN of ``width`` channels."""
    def block(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU())

    body = nn.Sequential(OrderedDict(
        stem=block(3, 4, 4), c3=block(4, 8, 2), c4=block(8, 8, 2), c5=block(8, 16, 2)))
    if two_stage:
        return BackboneWithFPN(body, {"stem": "0", "c3": "1", "c4": "2", "c5": "3"}, [4, 8, 8, 16], width,
                               extra_blocks=LastLevelMaxPool())
    return BackboneWithFPN(body, {"c3": "0", "c4": "1", "c5": "2"}, [8, 8, 16], width,
                           extra_blocks=LastLevelP6P7(width, width))


def tiny_detector(arch: str, width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"min_size": 96, "max_size": 128}
    if arch == "retinanet":
        return RetinaNet(tiny_backbone(width), num_classes=4, **kwargs)
    if arch == "fcos":
        return FCOS(tiny_backbone(64), num_classes=4, **kwargs)  # GroupNorm(32) needs 2+ values per group on 1x1 P7
    return FasterRCNN(tiny_backbone(width, two_stage=True), num_classes=4, rpn_pre_nms_top_n_test=50,
                      rpn_post_nms_top_n_test=20, representation_size=32, **kwargs)


@pytest.fixture(scope="module")
def detectors() -> dict[str, nn.Module]:
    return {arch: tiny_detector(arch) for arch in ("retinanet", "fcos", "fasterrcnn")}


@pytest.fixture(scope="module")
def toy() -> dict:
    torch.manual_seed(0)
    images, boxes = make_batch(3, 64, torch.Generator().manual_seed(0))
    distiller = LIAFDistiller(16, 32, STRIDES, num_selectors=3)
    return {"images": images, "boxes": boxes, "distiller": distiller,
            "teacher": TinyPyramid(32).eval(), "student": TinyPyramid(16).eval()}


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())


IMAGE = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(1))
BOXES = torch.tensor([[10.0, 10.0, 60.0, 50.0], [70.0, 40.0, 120.0, 90.0]])
LABELS = torch.tensor([1, 2])


# -- viz ----------------------------------------------------------------------------------------
def test_draw_boxes_colours_by_score_with_colorbar() -> None:
    fig, axes = new_figure(1)
    mappable = draw_boxes(axes[0, 0], IMAGE, BOXES, LABELS, torch.tensor([0.2, 0.8]), ["bg", "car", "person"])
    assert mappable is not None and mappable.norm.vmax == pytest.approx(0.8)
    assert len(axes[0, 0].patches) == 2 and len(fig.axes) == 2  # image axes + colorbar


def test_plot_instance_scores_mean_and_per_selector() -> None:
    fig = plot_instance_scores({"teacher": torch.rand(3), "student": torch.rand(3)})
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    fig = plot_instance_scores({"teacher": torch.rand(6, 4), "student": torch.rand(6, 4)})
    assert sum(ax.get_visible() for ax in fig.axes) == 7  # 6 selectors + mean
    with pytest.raises(ValueError, match="no instances"):
        plot_instance_scores(torch.zeros(6, 0))
    with pytest.raises(ValueError, match="same shape"):
        plot_instance_scores({"teacher": torch.rand(3), "student": torch.rand(4)})


def test_plot_masks_levels_and_errors(toy: dict) -> None:
    d = toy["distiller"]
    masks = d.masks(toy["student"](toy["images"]), toy["teacher"](toy["images"]), toy["boxes"])
    per_image = {lvl: m_t[0] for lvl, (m_t, _) in masks.items()}  # [1, H, W]
    fig = plot_masks(toy["images"][0], per_image, toy["boxes"][0], strides=STRIDES)
    assert len(fig.axes) == 3  # two levels + colorbar
    with pytest.raises(ValueError, match="unknown FPN level"):
        plot_masks(toy["images"][0], per_image, levels=["p9"])
    with pytest.raises(ValueError, match="non-empty"):
        plot_masks(toy["images"][0], {})


def test_plot_detections_gt_beside_models() -> None:
    det = {"boxes": BOXES + 2, "labels": LABELS, "scores": torch.tensor([0.9, 0.1])}
    fig = plot_detections(IMAGE, {"boxes": BOXES, "labels": LABELS}, {"baseline": det, "LIAF-KD": det},
                          ["bg", "car", "person"], score_threshold=0.5)
    assert len(fig.axes) == 3
    assert len(fig.axes[0].patches) == 2 and len(fig.axes[1].patches) == 1  # the 0.1 detection is hidden
    fig = plot_detections(IMAGE, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}, {})
    assert len(fig.axes) == 1
    with pytest.raises(ValueError, match="lacks the keys"):
        plot_detections(IMAGE, {"boxes": BOXES, "labels": LABELS}, {"m": {"boxes": BOXES, "labels": LABELS}})


def test_plot_training_curves_from_csv(tmp_path) -> None:
    path = tmp_path / "log.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["iteration", "loss", "loss_distill", "mAP", "lr"])
        writer.writeheader()
        for i in range(10):
            writer.writerow({"iteration": i, "loss": 1 / (i + 1), "loss_distill": 0.1, "lr": 0.01,
                             "mAP": 0.1 * i if i % 5 == 4 else ""})
    fig = plot_training_curves(path)
    losses, metrics = fig.axes
    assert [line.get_label() for line in losses.lines] == ["loss", "loss_distill"]
    assert [line.get_label() for line in metrics.lines] == ["mAP"] and len(metrics.lines[0].get_xdata()) == 2
    with pytest.raises(ValueError, match="does not exist"):
        plot_training_curves(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="no loss or metric"):
        plot_training_curves([{"iteration": 1, "lr": 0.1}])


def test_bad_image_is_rejected() -> None:
    fig, axes = new_figure(1)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        draw_boxes(axes[0, 0], torch.rand(1, 8, 8), BOXES)
    with pytest.raises(ValueError, match="degenerate"):
        draw_boxes(axes[0, 0], IMAGE, torch.tensor([[10.0, 10.0, 5.0, 20.0]]))


# -- CAM ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["retinanet", "fcos", "fasterrcnn"])
@pytest.mark.parametrize("method", ["gradcam", "eigencam"])
def test_detector_cam_in_range_and_hooks_released(detectors: dict, arch: str, method: str) -> None:
    model = detectors[arch].train()
    flags = [p.requires_grad for p in model.parameters()]
    heat = detector_cam(model, IMAGE, method, BOXES, LABELS)
    assert heat.shape == (96, 128) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1
    if method == "eigencam":
        assert heat.max() == pytest.approx(1.0, abs=1e-4)
    assert no_hooks(model)
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("arch", ["retinanet", "fasterrcnn"])
def test_gradcam_depends_on_target_and_works_without_targets(detectors: dict, arch: str) -> None:
    model = detectors[arch]
    with DetectorCAM(model, "gradcam") as cam:
        own = cam(IMAGE)  # the model's detections (or the whole image)
        first = cam(IMAGE, BOXES[:1], LABELS[:1])
        second = cam(IMAGE, BOXES[1:], LABELS[1:])
        any_class = cam(IMAGE, BOXES)
    for heat in (own, first, second, any_class):
        assert np.isfinite(heat).all() and 0 <= heat.min() <= heat.max() <= 1
    assert not np.allclose(first, second)
    assert no_hooks(model) and no_hooks(cam.wrapper)


def test_cam_hooks_released_after_exception(detectors: dict) -> None:
    model = detectors["retinanet"]
    cam = DetectorCAM(model, "gradcam")
    with pytest.raises(ValueError, match="outside -1..3"):
        with cam:
            assert not no_hooks(cam.wrapper)  # the package's hooks sit on the wrapper's tap
            cam(IMAGE, BOXES, torch.tensor([1, 7]))
    assert no_hooks(cam.wrapper) and no_hooks(model)
    assert all(p.requires_grad for p in model.parameters())

    def broken(_images: torch.Tensor) -> None:
        raise IndexError("backbone failed")  # the package alone would swallow IndexError

    cam = DetectorCAM(model, "eigencam")
    with pytest.raises(IndexError, match="backbone failed"):
        with cam:
            cam.wrapper.model.backbone.forward = broken
            try:
                cam(IMAGE)
            finally:
                del cam.wrapper.model.backbone.forward
    assert no_hooks(cam.wrapper) and no_hooks(model)
    with pytest.raises(RuntimeError, match="context manager"):
        cam(IMAGE)


def test_cam_bad_inputs(detectors: dict) -> None:
    with pytest.raises(ValueError, match="no transform or backbone"):
        detector_cam(nn.Conv2d(3, 4, 3), IMAGE)
    with pytest.raises(ValueError, match="method"):
        detector_cam(detectors["retinanet"], IMAGE, method="scorecam")
    with pytest.raises(ValueError, match="target_boxes is empty"):
        detector_cam(detectors["retinanet"], IMAGE, target_boxes=torch.zeros(0, 4))
    with pytest.raises(ValueError, match="2 entries"):
        detector_cam(detectors["fcos"], IMAGE, target_boxes=BOXES[:1], target_labels=LABELS)


def test_compare_cams_side_by_side(detectors: dict) -> None:
    fig = compare_cams({"teacher": detectors["retinanet"], "student": detectors["fcos"]}, IMAGE,
                       target_boxes=BOXES, target_labels=LABELS)
    image_ax, teacher_ax, student_ax, colorbar = fig.axes  # one colour bar for the [0, 1]-scaled maps
    assert colorbar.get_ylabel() == "gradcam (each map scaled to [0, 1])"
    assert "inside boxes" in teacher_ax.get_title() and len(student_ax.patches) == len(BOXES)  # GT boxes drawn
    assert all(no_hooks(m) for m in detectors.values())


# -- efficiency ----------------------------------------------------------------------------------
def test_flops_match_hand_count() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    hand = 2 * 3 * 8 * 9 * 16 * 16 + 2 * (8 * 16 * 16) * 10
    assert count_flops(net, torch.rand(1, 3, 16, 16)) == hand
    assert count_parameters(net) == (3 * 8 * 9 + 8) + (8 * 16 * 16 * 10 + 10)
    net[0].requires_grad_(False)
    assert count_parameters(net, trainable_only=True) == 8 * 16 * 16 * 10 + 10


def test_latency_memory_and_tables(detectors: dict) -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).train()
    lat = measure_latency(net, torch.rand(2, 3, 32, 32), warmup=1, repeats=3)
    assert lat["median_ms"] > 0 and lat["fps"] == pytest.approx(2000 / lat["median_ms"])
    assert 0 <= lat["iqr_ms"] <= lat["median_ms"] * 100
    assert _iqr([5.0, 1.0, 3.0, 2.0, 4.0]) == 2.0 and _iqr([7.0]) == 0.0  # inclusive quartiles 2 and 4
    assert net.training  # mode restored
    assert peak_memory(lambda: torch.ones(4 * 2**20).sum()) >= 8  # 16 MiB tensor, allow slack
    rows = efficiency_table({"retinanet": detectors["retinanet"], "conv": net}, (64, 64), warmup=1, repeats=2)
    assert [r["name"] for r in rows] == ["retinanet", "conv"]
    for r in rows:
        assert r["params_M"] > 0 and r["GFLOPs"] > 0 and r["latency_ms"] > 0 and r["FPS"] > 0
        assert math.isfinite(r["peak_mem_MiB"]) and r["peak_mem_MiB"] >= 0
    table = format_table(rows)
    assert table.splitlines()[0] == "| name | params_M | GFLOPs | latency_ms | latency_iqr_ms | FPS | peak_mem_MiB |"
    assert len(table.splitlines()) == 4
    steps = kd_step_overhead({"base": lambda: torch.ones(64, 64) @ torch.ones(64, 64),
                              "kd": lambda: [torch.ones(64, 64) @ torch.ones(64, 64) for _ in range(4)]},
                             repeats=3, warmup=1)
    assert steps[0]["ratio"] == 1.0 and steps[1]["median_ms"] > 0
    with pytest.raises(ValueError, match="empty"):
        efficiency_table({}, 64)
    with pytest.raises(ValueError, match="rows is empty"):
        format_table([])


def test_size_table_latency_noise_and_efficiency_plot(detectors: dict) -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    models = {"retinanet": detectors["retinanet"], "conv": net}
    sizes = size_table(models, (64, 64))
    full = efficiency_table(models, (64, 64), warmup=0, repeats=1)
    assert [{k: r[k] for k in ("name", "params_M", "GFLOPs")} for r in full] == sizes  # the same columns, one code
    assert sizes[1]["GFLOPs"] == 2 * 3 * 8 * 9 * 64 * 64 / 1e9
    with pytest.raises(ValueError, match="empty"):
        size_table({}, 64)
    rows = [{"name": "a", "latency_ms": 10.0, "latency_iqr_ms": 1.0}, {"name": "b", "latency_ms": 10.5, "latency_iqr_ms": 2.0}]
    noise = latency_noise(rows)
    assert noise["span_ms"] == 0.5 and noise["iqr_ms"] == 1.0 and noise["within_noise"] and "within" in noise["text"]
    rows[1]["latency_ms"] = 12.0
    assert not latency_noise(rows)["within_noise"] and "load changed" in latency_noise(rows)["text"]
    with pytest.raises(ValueError, match="at least 2"):
        latency_noise(rows[:1])
    assert "torch thread" in machine_description() and torch.__version__ in machine_description()
    steps = [{"name": "conv", "median_ms": 4.0, "iqr_ms": 1.0, "ratio": 1.0},
             {"name": "kd", "median_ms": 8.0, "iqr_ms": 2.0, "ratio": 2.0}]
    fig = plot_efficiency(full, steps, batch_size=4)
    axes = fig.axes
    assert len(axes) == 5 and axes[-1].get_title() == "training step (ms, batch 4)"
    conv_colour = axes[0].patches[1].get_facecolor()  # "conv" is the second model: one colour in every panel
    assert axes[-1].patches[0].get_facecolor() == conv_colour != axes[-1].patches[1].get_facecolor()
    assert [t.get_text() for t in axes[-1].texts] == ["1.00x", "2.00x"]
    assert len(axes[2].lines) > 0  # the latency panel draws its interquartile ranges
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_efficiency([])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_paths() -> None:
    model = tiny_detector("retinanet").cuda()
    lat = measure_latency(model, [IMAGE], warmup=1, repeats=2)
    assert lat["median_ms"] > 0
    assert peak_memory(lambda: torch.ones(2**20, device="cuda").sum(), "cuda") >= 4
    heat = detector_cam(model, IMAGE, "gradcam", BOXES, LABELS)
    assert np.isfinite(heat).all() and 0 <= heat.min() <= heat.max() <= 1 and no_hooks(model)


# -- score history --------------------------------------------------------------------------------
def test_score_history_round_trip_and_plot(toy: dict, tmp_path) -> None:
    d, images, boxes = toy["distiller"], toy["images"], toy["boxes"]
    teacher_feats = toy["teacher"](images)
    history = ScoreHistory()
    for it in (0, 10, 20):
        history.record(it, d, toy["student"](images), teacher_feats, boxes)
    num_inst = sum(len(b) for b in boxes)
    records = history.to_records()
    assert len(records) == 3 * len(STRIDES) * 2 * num_inst
    for r in records:
        assert 0 <= r["mean"] <= 1 and len(r["selectors"]) == 3
        assert r["mean"] == pytest.approx(sum(r["selectors"]) / 3)
    path = tmp_path / "scores.json"
    history.save_json(path)
    loaded = ScoreHistory.load_json(path)
    assert loaded.to_records() == records and loaded.instances == history.instances
    fig = loaded.plot(instance=0, level="1", selector=2)
    assert len(fig.axes[0].lines) == 2 and list(fig.axes[0].lines[0].get_xdata()) == [0, 10, 20]
    with pytest.raises(ValueError, match="unknown FPN level"):
        loaded.plot(level="p9")
    with pytest.raises(ValueError, match="out of range"):
        loaded.plot(instance=num_inst)
    with pytest.raises(ValueError, match="same fixed images"):
        history.record(30, d, toy["student"](images[:2]), {k: v[:2] for k, v in teacher_feats.items()}, boxes[:2])
    with pytest.raises(ValueError, match="empty"):
        ScoreHistory().plot()
    with pytest.raises(ValueError, match="not a ScoreHistory"):
        (tmp_path / "x.json").write_text("[]")
        ScoreHistory.load_json(tmp_path / "x.json")
