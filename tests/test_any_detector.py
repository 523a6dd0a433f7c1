"""Any torchvision detector with an FPN: strides from shapes, training and distillation through the public
API, cross-architecture level matching, class-count checks and checkpoints that carry classes and architecture.

The ResNet-50 constructors take minutes per step on this CPU, so RetinaNet, FCOS, Faster R-CNN and Mask R-CNN
are built as those constructors build them, with torchvision's ``resnet_fpn_backbone`` on a ResNet-18;
``fasterrcnn_mobilenet_v3_large_fpn`` is the constructor itself.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Subset
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet, fasterrcnn_mobilenet_v3_large_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import liaf_lab as ll
from liaf_lab.utils.checkpoint import load_checkpoint
from liaf_lab.data import CocoDetectionDataset, detection_transforms, generate_scenes
from liaf_lab.engine.steps import DistillStep
from liaf_lab.models import (
    check_num_classes,
    create_detector,
    detector_adapter,
    detector_features,
    fpn_levels,
    load_detector_weights,
    match_levels,
    run_detector,
    save_detector,
    shared_strides,
)

SMALL = dict(min_size=64, max_size=64)
RCNN_SMALL = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
                  rpn_post_nms_top_n_test=50, box_batch_size_per_image=32)
P3P7 = {"0": 8.0, "1": 16.0, "2": 32.0, "p6": 64.0, "p7": 128.0}
P2P6 = {"0": 4.0, "1": 8.0, "2": 16.0, "3": 32.0, "pool": 64.0}
STEPS = ll.TrainConfig(iterations=2, batch_size=2, lr=0.01, warmup=0, checkpoint_every=100, log_every=1)


def r18_fpn(dense: bool) -> nn.Module:
    """torchvision's ResNet-FPN helper on a ResNet-18: P3-P7 as ``retinanet/fcos_resnet50_fpn``, else P2-P6."""
    extra = dict(returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)) if dense else {}
    return resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=nn.BatchNorm2d,
                               trainable_layers=5, **extra)


def build(name: str, num_classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if name == "retinanet":
        return RetinaNet(r18_fpn(True), num_classes, **SMALL)
    if name == "fcos":
        return FCOS(r18_fpn(True), num_classes, **SMALL)
    if name == "gfl":  # liaf_lab's own (torchvision has no GFL)
        return tiny("gfl", num_classes, seed)
    if name == "fasterrcnn":
        return FasterRCNN(r18_fpn(False), num_classes, **SMALL, **RCNN_SMALL)
    if name == "maskrcnn":
        return MaskRCNN(r18_fpn(False), num_classes, **SMALL, **RCNN_SMALL)
    return fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=num_classes,
                                             **SMALL, **RCNN_SMALL)


def tiny(arch: str, num_classes: int, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return create_detector(arch, num_classes, depth=18, **{"width_mult": 0.125, "fpn_channels": 16, **SMALL, **kwargs})


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> CocoDetectionDataset:
    root = tmp_path_factory.mktemp("shapes")
    generate_scenes(root, 4, (64, 64), seed=0, split="train")
    return CocoDetectionDataset(root / "train", root / "annotations" / "instances_train.json",
                                detection_transforms(train=False))


def batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 48, 64, generator=g)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 2.0, 60.0, 30.0]]), "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[10.0, 8.0, 50.0, 40.0]]), "labels": torch.tensor([2])}]
    return images, targets


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(module: nn.Module, before: dict[str, torch.Tensor], prefix: str = "") -> list[str]:
    """The parameters (not buffers) under ``prefix`` that differ from ``before``."""
    return [k for k, v in module.named_parameters() if k.startswith(prefix) and not torch.equal(v, before[k])]


# -- levels and strides from shapes ---------------------------------------------------------------------

def test_strides_come_from_feature_shapes_for_any_backbone():
    mobilenet = build("mobilenet", 3, 0).train()
    bn = mobilenet.backbone.body["0"][1]
    running = bn.running_mean.clone()
    assert ll.fpn_strides(mobilenet) == {"0": 32.0, "1": 32.0, "pool": 64.0}  # torchvision's MobileNetV3-FPN
    assert all(m.training for m in mobilenet.modules())  # the probe ran in eval mode, modes restored
    assert torch.equal(bn.running_mean, running)
    assert ll.fpn_strides(build("retinanet", 3, 0)) == P3P7
    assert ll.fpn_strides(build("fasterrcnn", 3, 0)) == P2P6

    # A backbone without an FPN (one tensor out, torchvision's convention) is level "0".
    body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, 2, 1))
    body.out_channels = 8
    plain = FasterRCNN(body, 4, rpn_anchor_generator=AnchorGenerator(((16,),), ((1.0,),)),
                       box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), **SMALL, **RCNN_SMALL)
    assert ll.fpn_strides(plain) == {"0": 8.0}
    images, targets = batch()
    out = run_detector(plain.train(), images, targets)
    assert list(out.features) == ["0"] and out.features["0"].shape == (2, 8, 8, 8)

    pooled = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1))
    with pytest.raises(ValueError, match=r"backbone level '0' is 1x1 cells for a 1024x1024 input"):
        ll.models.backbone_strides(pooled)
    with pytest.raises(ValueError, match=r"level '0' is not an \[N, C, H, W\] tensor"):
        fpn_levels(nn.Flatten(), torch.zeros(1, 3, 8, 8))


def test_detector_features_is_the_path_of_run_detector():
    model = build("mobilenet", 4, 0).eval()
    images, targets = batch()
    with torch.no_grad():
        image_list, resized, feats = detector_features(model, images, [dict(t) for t in targets])
        out = run_detector(model, images, targets)
    torch.testing.assert_close(image_list.tensors, out.image_list.tensors)
    torch.testing.assert_close(resized[1]["boxes"], out.targets[1]["boxes"])
    assert list(feats) == list(out.features) == ["0", "1", "pool"]
    for lvl in feats:
        torch.testing.assert_close(feats[lvl], out.features[lvl])


# -- every torchvision detector trains and distils through the public API -------------------------------

@pytest.mark.parametrize("name", ["retinanet", "fcos", "gfl", "fasterrcnn", "mobilenet", "maskrcnn"])
def test_train_and_distill_any_torchvision_detector(shapes, name):
    num_classes = len(shapes.class_names) + 1
    student, teacher = build(name, num_classes, 0), build(name, num_classes, 1)
    before = snapshot(student)
    result = ll.train_detector(student, shapes, STEPS, device="cpu")
    assert result.iterations == 2 and all(math.isfinite(v) for v in result.final_losses.values())
    assert changed(student, before, "backbone.body.")
    if name == "maskrcnn":  # the box part trains; the mask head gets no loss (documented)
        assert set(result.final_losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
        assert not changed(student, before, "roi_heads.mask_")
        assert changed(student, before, "roi_heads.box_")

    strides = ll.fpn_strides(student)
    channels = student.backbone.out_channels
    teacher_before = snapshot(teacher)
    for method in ll.list_distillers():  # every registered method, its stage 1 first where it has one
        options = {"liaf": {"num_selectors": 2}}.get(method, {})
        distiller = ll.create_distiller(method, student_channels=channels, teacher_channels=channels,
                                        strides=strides, **options)
        if not set(distiller.head_keys) <= set(detector_adapter(student).head_outputs):
            with pytest.raises(ValueError, match=f"distiller '{method}' reads the head outputs"):
                ll.distill(student, teacher, distiller, shapes, STEPS, device="cpu")
            continue
        if distiller.two_stage:
            ll.learn_stage1(teacher, distiller, shapes, ll.TrainConfig(iterations=1, batch_size=2, optimizer="adam"),
                            device="cpu")
        before = snapshot(student)
        result = ll.distill(student, teacher, distiller, shapes, STEPS, device="cpu")
        kd = sum(v for k, v in result.final_losses.items() if k.startswith("kd_"))
        assert result.iterations == 2 and 0 < kd < math.inf, method
        assert changed(student, before, "backbone.body.")
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())  # frozen, BN included


def test_mask_rcnn_box_losses_match_torchvision():
    """Mask R-CNN runs as its box part: the same box losses as torchvision's forward with masks."""
    model = build("maskrcnn", 4, 0).train()
    images, targets = batch()
    with_masks = []
    for img, t in zip(images, targets, strict=True):
        masks = torch.zeros(len(t["boxes"]), *img.shape[-2:], dtype=torch.uint8)
        for m, (x1, y1, x2, y2) in zip(masks, t["boxes"].int().tolist(), strict=True):
            m[y1:y2, x1:x2] = 1
        with_masks.append({**t, "masks": masks})
    torch.manual_seed(3)
    expected = model(images, with_masks)
    torch.manual_seed(3)
    losses = run_detector(model, images, targets).losses
    assert set(expected) - set(losses) == {"loss_mask"}
    for k, v in losses.items():
        torch.testing.assert_close(v, expected[k], msg=k)
    model.eval()
    with torch.no_grad():
        dets = run_detector(model, images).detections
    assert all(set(d) == {"boxes", "scores", "labels"} for d in dets)


# -- teacher and student of different architectures -------------------------------------------------------

def test_faster_rcnn_teacher_retinanet_student(shapes):
    num_classes = len(shapes.class_names) + 1
    teacher, student = tiny("fasterrcnn", num_classes, 1), tiny("retinanet", num_classes, 0, width_mult=0.0625)
    strides = shared_strides(student, teacher)
    assert strides == {"0": 8.0, "1": 16.0, "2": 32.0, "p6": 64.0}
    assert match_levels(strides, teacher) == {"0": "1", "1": "2", "2": "3", "p6": "pool"}
    assert match_levels(strides, student) == {lvl: lvl for lvl in strides}

    with pytest.raises(ValueError, match=r"distiller level\(s\) \['p7'\].*teacher levels \{'0': 4.0.*'pool': 64.0\}; "
                                         r"build the distiller with strides=\{'0': 8.0, '1': 16.0, '2': 32.0, "
                                         r"'p6': 64.0\}"):
        DistillStep(student, teacher, ll.create_distiller("fitnet", student_channels=16, teacher_channels=16,
                                                          strides=ll.fpn_strides(student)))
    with pytest.raises(ValueError, match=r"distiller levels \['0', '1', '2', '3', 'pool'\] are not student levels.*"
                                         r"strides=\{'0': 8.0"):
        DistillStep(student, teacher, ll.create_distiller("fitnet", student_channels=16, teacher_channels=16,
                                                          strides=ll.fpn_strides(teacher)))

    # The step hands the distiller the teacher level of each student level's stride.
    distiller = ll.create_distiller("fitnet", student_channels=16, teacher_channels=16, strides=strides)
    step = DistillStep(student, teacher, distiller).train()
    images, targets = batch()
    torch.manual_seed(0)
    losses = step(images, targets)
    torch.manual_seed(0)
    out = run_detector(student, images, targets)
    with torch.no_grad():
        t_feats = teacher.backbone(out.image_list.tensors)
    expected = distiller(dict(out.features), {s: t_feats[t] for s, t in match_levels(strides, teacher).items()},
                         [t["boxes"] for t in out.targets])
    torch.testing.assert_close(losses["kd_fitnet"], expected)

    # Stage 1 on the Faster R-CNN teacher with the student's levels, then stage 2, through the public API.
    liaf = ll.create_distiller("liaf", student_channels=8, teacher_channels=16, strides=strides, num_selectors=2)
    selectors = snapshot(liaf.selectors)
    ll.learn_stage1(teacher, liaf, shapes, ll.TrainConfig(iterations=2, batch_size=2, optimizer="adam",
                                                            warmup=0, checkpoint_every=100), device="cpu")
    assert changed(liaf.selectors, selectors)
    narrow = tiny("retinanet", num_classes, 2, width_mult=0.0625, fpn_channels=8)
    result = ll.distill(narrow, teacher, liaf, shapes, STEPS, device="cpu")
    assert result.final_losses["kd_liaf"] > 0


def test_mask_inspector_matches_levels_by_stride():
    import matplotlib

    matplotlib.use("Agg")
    from liaf_lab.analysis import MaskInspector

    teacher, student = tiny("fasterrcnn", 4, 1), tiny("retinanet", 4, 0)
    distiller = ll.create_distiller("liaf", student_channels=16, teacher_channels=16,
                                    strides=shared_strides(student, teacher), num_selectors=2)
    images, targets = batch()
    inspector = MaskInspector(images, targets, teacher, student, distiller, level="0")
    assert inspector.message is None, inspector.message


# -- class counts --------------------------------------------------------------------------------------------

def test_too_few_classes_fail_before_training(shapes, tmp_path):
    n = len(shapes.class_names)
    small, right = tiny("fasterrcnn", n, 0), tiny("retinanet", n + 1, 1)
    fix = rf"num_classes = len\(class_names\) \+ 1 = {n + 1}"
    with pytest.raises(ValueError, match=rf"the model \(FasterRCNN\) has num_classes={n} but {n} classes .*{fix}"):
        ll.train_detector(small, Subset(shapes, range(2)), STEPS, out_dir=tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=rf"the teacher \(FasterRCNN\) has num_classes={n}"):
        ll.distill(right, small, ll.create_distiller("fitnet", student_channels=16, teacher_channels=16,
                                                     strides={"0": 8.0}), shapes, STEPS, device="cpu")
    with pytest.raises(ValueError, match=rf"the student \(RetinaNet\) has num_classes=3.*{fix}"):
        check_num_classes({"student": tiny("retinanet", 3), "teacher": right}, shapes)
    check_num_classes(right, shapes)
    check_num_classes(tiny("fcos", n + 5), shapes)  # more outputs than labels is allowed (COCO's 91)


# -- checkpoints with classes and architecture -----------------------------------------------------------

def test_save_detector_round_trip_and_refusals(tmp_path):
    names = ["disc", "square", "ring"]
    model = tiny("fcos", 4)
    path = save_detector(tmp_path / "det.pt", model, names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det.pt"]  # atomic: no temporary file left
    saved = load_checkpoint(path)  # weights_only=True
    assert saved["meta"] == {"class_names": names, "arch": {
        "detector": "FCOS", "num_classes": 4, "fpn_channels": 16, "strides": P3P7,
        "parameters": sum(p.numel() for p in model.parameters())}}

    loaded = create_detector("fcos", 4, depth=18, width_mult=0.125, fpn_channels=16, weights_path=path,
                             class_names=names)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, msg=k)
    assert load_detector_weights(tiny("fcos", 4, 3), path) == names

    with pytest.raises(ValueError, match=r"det.pt' was trained on classes \['disc', 'square', 'ring'\], "
                                         r"but class_names is \['disc', 'square', 'cross'\]"):
        load_detector_weights(tiny("fcos", 4), path, ["disc", "square", "cross"])
    with pytest.raises(ValueError, match=r"det.pt' was saved from another architecture \(detector: file 'FCOS', "
                                         r"model 'RetinaNet'"):
        load_detector_weights(tiny("retinanet", 4), path)
    with pytest.raises(ValueError, match=r"num_classes: file 4, model 5"):
        load_detector_weights(tiny("fcos", 5), path)
    with pytest.raises(ValueError, match=r"fpn_channels: file 16, model 8"):
        load_detector_weights(tiny("fcos", 4, fpn_channels=8), path)
    with pytest.raises(ValueError, match=r"has num_classes=4 but 4 classes"):
        save_detector(tmp_path / "bad.pt", model, names + ["cross"])

    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    assert load_detector_weights(tiny("fcos", 4, 3), plain, class_names=names) is None


def test_shipped_plain_state_dicts_still_load():
    root = Path(__file__).resolve().parents[1] / "data_samples" / "checkpoints"
    teacher = create_detector("fcos", 6, depth=18, width_mult=0.375, fpn_channels=64, min_size=160, max_size=160,
                              weights_path=root / "teacher_tiny.pt")
    state = torch.load(root / "teacher_tiny.pt", weights_only=True)
    key = "head.classification_head.cls_logits.weight"
    torch.testing.assert_close(teacher.state_dict()[key], state[key].float())
    assert load_detector_weights(teacher, root / "teacher_tiny.pt") is None
