"""Backbones, detector factory and the single-pass ``run_detector`` (checked against torchvision's forward)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from liaf_lab.models import (
    ADAPTERS,
    ScaledResNet,
    count_parameters,
    create_detector,
    default_anchor_sizes,
    detector_adapter,
    detector_num_classes,
    fpn_strides,
    loss_on_features,
    resnet_fpn,
    run_detector,
)
from liaf_lab.models.adapter import flat_outputs

ARCHS = ["retinanet", "fcos", "fasterrcnn"]
NUM_CLASSES = 4  # 3 foreground classes + background
TINY = dict(width_mult=0.125, fpn_channels=16, min_size=128, max_size=128)
# Keep every candidate so that eval-mode comparisons are not trivially empty for an untrained model.
NO_THRESH = {"retinanet": dict(score_thresh=0.0), "fcos": dict(score_thresh=0.0),
             "fasterrcnn": dict(box_score_thresh=0.0)}


def tiny(arch: str, depth: int = 18, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return create_detector(arch, NUM_CLASSES, depth=depth, **{**TINY, **NO_THRESH[arch], **kwargs})


def batch(empty_second: bool = False) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two images of different sizes (both resized to a 128 px longer side) with boxes in their pixels."""
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 128, generator=g), torch.rand(3, 64, 64, generator=g)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 80.0], [70.0, 5.0, 120.0, 40.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[4.0, 8.0, 30.0, 50.0]]), "labels": torch.tensor([2])},
    ]
    if empty_second:
        targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    return images, targets


def assert_same_losses(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


# -- backbones ---------------------------------------------------------------------------------------

def test_scaled_resnet_widths_and_norm():
    net = ScaledResNet(50, width_mult=0.25)
    assert net.stage_channels == [64, 128, 256, 512]
    assert net.conv1.out_channels == 16
    assert net(torch.rand(1, 3, 64, 64)).shape == (1, 512)
    frozen = resnet_fpn(18, 0.125, 16, frozen_bn=True)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    with pytest.raises(ValueError, match="depth"):
        ScaledResNet(42)
    with pytest.raises(ValueError, match="returned_layers"):
        resnet_fpn(18, returned_layers=(3, 2))


@pytest.mark.parametrize("extra, levels", [("p6p7", ["0", "1", "2", "p6", "p7"]),
                                           ("pool", ["0", "1", "2", "3", "pool"])])
def test_resnet_fpn_levels_and_shapes(extra, levels):
    backbone = resnet_fpn(18, 0.125, 16, extra=extra)
    feats = backbone(torch.rand(1, 3, 160, 96))
    assert list(feats) == levels
    first = 8 if extra == "p6p7" else 4
    for i, (lvl, f) in enumerate(feats.items()):
        stride = first * 2**i
        assert f.shape == (1, 16, math.ceil(160 / stride), math.ceil(96 / stride)), lvl


# -- factory -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("arch", ARCHS)
def test_factory_builds_and_runs(arch, depth):
    model = tiny(arch, depth)
    assert model.liaf_arch == arch
    images, targets = batch()
    model.train()
    losses = run_detector(model, images, targets).losses
    assert losses and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        dets = run_detector(model, images).detections
    assert len(dets) == 2 and all(set(d) == {"boxes", "scores", "labels"} for d in dets)
    # boxes are back in original image pixels
    assert all(float(d["boxes"][:, 2].max()) <= img.shape[-1] for d, img in zip(dets, images, strict=True) if len(d["boxes"]))


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_count_scales_with_width(arch):
    small = create_detector(arch, NUM_CLASSES, depth=18, width_mult=0.125, fpn_channels=16)
    wide = create_detector(arch, NUM_CLASSES, depth=18, width_mult=0.25, fpn_channels=16)
    deep = create_detector(arch, NUM_CLASSES, depth=50, width_mult=0.125, fpn_channels=16)
    assert count_parameters(small) < count_parameters(wide)
    assert count_parameters(small) < count_parameters(deep)
    for p in small.backbone.body.parameters():
        p.requires_grad_(False)
    assert count_parameters(small, trainable_only=True) < count_parameters(small)


def test_strides_and_anchor_defaults():
    for arch in ("retinanet", "fcos"):
        assert list(fpn_strides(tiny(arch)).values()) == [8.0, 16.0, 32.0, 64.0, 128.0]
    assert list(fpn_strides(tiny("fasterrcnn"), (160, 160)).values()) == [4.0, 8.0, 16.0, 32.0, 64.0]
    p3p7 = [8, 16, 32, 64, 128]
    assert default_anchor_sizes("retinanet", p3p7, 800) == (32, 64, 128, 256, 512)  # torchvision's defaults
    assert default_anchor_sizes("retinanet", p3p7, 160) == (8, 16, 32, 64, 128)
    assert default_anchor_sizes("fasterrcnn", [4, 8, 16, 32, 64], 800) == (32, 64, 128, 256, 512)
    assert default_anchor_sizes("fcos", p3p7, 160) == tuple(p3p7)
    model = tiny("retinanet", anchor_sizes=[10, 20, 40, 80, 160])
    assert model.anchor_generator.sizes[0][0] == 10
    with pytest.raises(ValueError, match="one positive size per FPN level"):
        tiny("retinanet", anchor_sizes=[8, 16])
    with pytest.raises(ValueError, match="foreground classes"):
        create_detector("fcos", 1)
    with pytest.raises(ValueError, match="arch"):
        create_detector("yolo", 3)


def test_weights_round_trip_and_errors(tmp_path):
    model = tiny("retinanet")
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    loaded = create_detector("retinanet", NUM_CLASSES, depth=18, **TINY, weights_path=path)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, msg=k)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_detector("retinanet", NUM_CLASSES, depth=18, **TINY, weights_path=tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot be loaded"):
        create_detector("retinanet", NUM_CLASSES, depth=18, **TINY, weights_path=corrupt)
    with pytest.raises(ValueError, match="does not hold the weights of this FCOS: missing"):  # another arch's
        create_detector("fcos", NUM_CLASSES, depth=18, **TINY, weights_path=path)


# -- run_detector against torchvision ----------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_losses_match_torchvision_train_mode(arch):
    model = tiny(arch).train()
    images, targets = batch()
    torch.manual_seed(3)
    expected = model(images, targets)
    torch.manual_seed(3)
    out = run_detector(model, images, targets)
    assert_same_losses(out.losses, expected)
    assert out.detections is None


@pytest.mark.parametrize("arch", ARCHS)
def test_detections_match_torchvision_eval_mode(arch):
    model = tiny(arch).eval()
    images, _ = batch()
    with torch.no_grad():
        expected = model(images)
        out = run_detector(model, images)
    assert out.losses == {} and out.targets is None
    assert sum(len(d["boxes"]) for d in expected) > 0
    for got, exp in zip(out.detections, expected, strict=True):
        assert set(got) == set(exp)
        for k in exp:
            torch.testing.assert_close(got[k], exp[k], msg=k)


@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_features_targets_and_head_logits(arch):
    model = tiny(arch).eval()
    images, targets = batch()
    with torch.no_grad():
        out = run_detector(model, images, targets)
    assert out.losses and out.detections is not None  # eval mode + targets: both
    assert list(out.features) == list(out.strides)
    h, w = out.image_list.tensors.shape[-2:]
    for lvl, f in out.features.items():
        assert f.shape[:2] == (2, 16)
        assert f.shape[-2:] == (math.ceil(h / out.strides[lvl]), math.ceil(w / out.strides[lvl]))
    # targets are in resized-input pixels: image 1 (64 px) is scaled by 2
    torch.testing.assert_close(out.targets[1]["boxes"], targets[1]["boxes"] * 2)
    num_anchors = {"retinanet": 9, "fcos": 1, "fasterrcnn": 3}[arch]
    channels = num_anchors if arch == "fasterrcnn" else num_anchors * NUM_CLASSES
    for lvl, f in out.features.items():
        assert out.head_logits[lvl].shape == (2, channels, *f.shape[-2:])
    # the logits are the classification conv's own output, level by level
    lvl = list(out.features)[1]
    with torch.no_grad():
        if arch == "fasterrcnn":
            direct = model.rpn.head([out.features[lvl]])[0][0]
        else:
            cls = model.head.classification_head
            direct = cls.cls_logits(cls.conv(out.features[lvl]))
    torch.testing.assert_close(out.head_logits[lvl], direct)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_on_features(arch):
    model = tiny(arch).eval()  # a frozen teacher: BatchNorm on running statistics
    images, targets = batch()
    with torch.no_grad():
        torch.manual_seed(5)
        out = run_detector(model, images, targets)
        torch.manual_seed(5)
        same = loss_on_features(model, out.image_list, out.targets, dict(out.features))
        zeros = {k: torch.zeros_like(v) for k, v in out.features.items()}
        zeroed = loss_on_features(model, out.image_list, out.targets, zeros)
    assert_same_losses(same, out.losses)
    assert any(not torch.equal(zeroed[k], out.losses[k]) for k in out.losses)  # tiny at init, but real
    # features_fn sees the transformed targets and its features feed the heads
    seen = {}

    def halve(feats, tgts):
        seen["boxes"] = [t["boxes"] for t in tgts]
        return {k: v * 0.5 for k, v in feats.items()}

    with torch.no_grad():
        torch.manual_seed(5)
        replaced = run_detector(model, images, targets, features_fn=halve)
        torch.manual_seed(5)
        direct = loss_on_features(model, out.image_list, out.targets, {k: v * 0.5 for k, v in out.features.items()})
    assert_same_losses(replaced.losses, direct)
    torch.testing.assert_close(seen["boxes"][1], out.targets[1]["boxes"])
    torch.testing.assert_close(replaced.features["0"], out.features["0"])  # features are the unreplaced ones


def test_stage1_gradient_reaches_replacement_only():
    """Frozen teacher in eval mode, a learnable per-level scale in features_fn: only the scale gets gradient."""
    model = tiny("retinanet").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    scale = nn.Parameter(torch.ones(()))
    images, targets = batch()
    out = run_detector(model, images, targets, features_fn=lambda f, t: {k: v.detach() * scale for k, v in f.items()})
    sum(out.losses.values()).backward()
    assert scale.grad is not None and torch.isfinite(scale.grad)


@pytest.mark.parametrize("arch", ARCHS)
def test_image_without_boxes(arch):
    model = tiny(arch).train()
    images, targets = batch(empty_second=True)
    torch.manual_seed(0)
    losses = run_detector(model, images, targets).losses
    assert all(torch.isfinite(v) for v in losses.values())
    torch.manual_seed(0)
    assert_same_losses(losses, model(images, targets))


@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_each_registered_family_gives_what_its_adapter_says(arch):
    """The registry's adapters: found by model and by name, and ``run_detector`` gives exactly the adapter's head
    outputs; the prior scores flatten back to one row per prior (``flat_outputs`` inverts ``run_heads``'s
    per-level layout), per class unless the family classifies boxes; the class count is the model's."""
    torch.manual_seed(0)
    model = create_detector(arch, NUM_CLASSES, depth=18, **TINY).eval()
    adapter = detector_adapter(model)
    assert adapter is detector_adapter(arch) and adapter.arch == arch and model.liaf_arch == arch
    assert isinstance(model, adapter.model_class) and detector_num_classes(model) == NUM_CLASSES
    images, targets = batch()
    with torch.no_grad():
        out = run_detector(model, images, targets)
    assert all(tuple(o) == adapter.head_outputs for o in out.head_outputs.values())
    scores = flat_outputs({lvl: o[adapter.prior_scores] for lvl, o in out.head_outputs.items()}, out.priors)
    assert scores.shape[:2] == (len(images), sum(p.shape[0] for p in out.priors.values()))
    with torch.no_grad():
        boxes = adapter.box_class_logits(model, out.features, out.image_list.image_sizes,
                                         [t["boxes"] for t in out.targets])
    if boxes is None:  # dense: one logit per class and prior, the label indexes it
        assert scores.shape[-1] == NUM_CLASSES and adapter.foreground_from == 0
    else:  # class-agnostic prior scores; the boxes' class logits (logit 0: background)
        assert scores.shape[-1] == 1 and adapter.foreground_from == 1
        assert [b.shape for b in boxes] == [(len(t["boxes"]), NUM_CLASSES) for t in targets]
    with pytest.raises(ValueError, match="arch must be one of"):
        detector_adapter("yolo")


def test_errors():
    images, targets = batch()
    with pytest.raises(TypeError, match="registered family .RetinaNet, FCOS, FasterRCNN, GFL.*got Linear"):
        run_detector(nn.Linear(2, 2), images)
    model = tiny("fcos").train()
    with pytest.raises(ValueError, match="targets are required in train mode"):
        run_detector(model, images)
    with pytest.raises(ValueError, match="one dict per image"):
        run_detector(model, images, targets[:1])
    with pytest.raises(ValueError, match="labels"):
        run_detector(model, images, [{"boxes": t["boxes"], "labels": t["labels"].float()} for t in targets])
    flat = [dict(targets[0]), targets[1]]
    flat[0]["boxes"] = torch.tensor([[10.0, 10.0, 10.0, 30.0], [1.0, 1.0, 5.0, 5.0]])
    with pytest.raises(ValueError, match="no positive width"):
        run_detector(model, images, flat)
    with pytest.raises(ValueError, match="FPN levels"):
        run_detector(model, images, targets, features_fn=lambda f, t: {"0": f["0"]})
    with pytest.raises(TypeError, match="images"):
        run_detector(model, torch.rand(2, 3, 64, 64), targets)


@pytest.mark.parametrize("arch", ARCHS)
def test_runs_under_autocast(arch):
    """Mixed precision through the device-agnostic autocast API (bfloat16 on the CPU here)."""
    model = tiny(arch).train()
    images, targets = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run_detector(model, images, targets)
    assert out.features["0"].dtype == torch.bfloat16
    assert all(torch.isfinite(v) for v in out.losses.values())
