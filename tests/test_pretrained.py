"""torchvision's pretrained weights in ``create_detector`` (``weights``, ``weights_backbone``), offline.

The "pretrained" files are randomly initialised torchvision models saved to a temporary folder (nothing is
downloaded), without ``num_batches_tracked`` as torchvision's published (FrozenBatchNorm) files are.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models import detection

from liaf_lab.experiments.builders import build_detector, dataset_category_ids
from liaf_lab.experiments.config import load_config
from liaf_lab.models import create_detector, detector_adapter

BUILDERS = {"retinanet": detection.retinanet_resnet50_fpn, "fcos": detection.fcos_resnet50_fpn,
            "fasterrcnn": detection.fasterrcnn_resnet50_fpn}
COCO = torchvision.models._meta._COCO_CATEGORIES
# A COCO subset as liaf_lab's loader numbers it: labels 1..3 are the category ids 1, 3, 18 (sorted by id).
IDS = [1, 3, 18]
NAMES = [COCO[i] for i in IDS]  # person, car, dog


def _published(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
    """arch -> (file, state dict) of a random torchvision COCO detector (91 classes)."""
    folder = tmp_path_factory.mktemp("weights")
    files = {}
    for arch, build in BUILDERS.items():
        torch.manual_seed(0)
        state = _published(build(weights=None, weights_backbone=None, num_classes=91))
        torch.save(state, folder / f"{arch}.pth")
        files[arch] = (str(folder / f"{arch}.pth"), state)
    return files


def _rows(arch: str, key: str, classes: list[int], file_rows: int) -> list[int]:
    """The file's rows of a class-dependent tensor that hold ``classes`` (per anchor, or 4 per class)."""
    layout = detector_adapter(arch).pretrained_class_keys[key]
    if layout == "boxes":
        return [4 * c + j for c in classes for j in range(4)]
    anchors = file_rows // 91
    return [a * 91 + c for a in range(anchors) for c in classes]


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_coco_weights_kept_and_remapped_by_category_id(arch, coco_files):
    path, state = coco_files[arch]
    model = create_detector(arch, len(IDS) + 1, depth=50, weights=path, category_ids=IDS, class_names=NAMES)
    (report,) = model.liaf_weights
    mine = model.state_dict()
    assert sorted(report.remapped) == sorted(detector_adapter(arch).pretrained_class_keys) and not report.reinitialised
    assert set(report.kept) == {k for k in state if k not in detector_adapter(arch).pretrained_class_keys}
    for key in report.kept:
        assert torch.equal(mine[key], state[key]), key
    for key in report.remapped:  # label l of the model is category IDS[l - 1] of the file; row 0 is background
        expected = state[key][_rows(arch, key, [0, *IDS], state[key].shape[0])]
        assert torch.equal(mine[key], expected), key


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_other_classes_reinitialise_the_class_layers(arch, coco_files):
    path, state = coco_files[arch]
    model = create_detector(arch, 5, depth=50, weights=path)
    (report,) = model.liaf_weights
    assert sorted(report.reinitialised) == sorted(detector_adapter(arch).pretrained_class_keys) and not report.remapped
    assert all(model.state_dict()[k].shape != state[k].shape for k in report.reinitialised)
    assert torch.equal(model.state_dict()["backbone.body.layer4.2.conv3.weight"],
                       state["backbone.body.layer4.2.conv3.weight"])
    assert "re-initialised" in report.summary()


def test_a_coco_format_dataset_of_other_classes_is_not_remapped(coco_files):
    path, _ = coco_files["retinanet"]
    model = create_detector("retinanet", 4, depth=50, weights=path, category_ids=[1, 2, 3],
                            class_names=["cat", "boat", "kite"])  # ids 1..3 but not COCO's classes
    assert model.liaf_weights[0].reinitialised and "not COCO's" in model.liaf_weights[0].note


def test_weights_of_another_model_name_both_and_the_keys(coco_files):
    path, _ = coco_files["retinanet"]
    with pytest.raises(ValueError, match=r"RetinaNet-style detector on a ResNet-50.*FCOS on a ResNet-50.*file keys"):
        create_detector("fcos", 5, depth=50, weights=path)
    with pytest.raises(ValueError, match=r"ResNet-50.*RetinaNet on a ResNet-101.*layer3\.6"):
        create_detector("retinanet", 5, depth=101, weights=path)


def test_enum_name_reads_torch_cache_without_download(coco_files, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    name = "RetinaNet_ResNet50_FPN_Weights.COCO_V1"
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "retinanet_resnet50_fpn_coco-eeacb38b.pth"
    with pytest.raises(FileNotFoundError, match=f"place https://.* at {cached}"):
        create_detector("retinanet", 4, depth=50, weights=name)
    cached.parent.mkdir(parents=True)
    cached.symlink_to(coco_files["retinanet"][0])
    model = create_detector("retinanet", 4, depth=50, weights=name, category_ids=IDS, class_names=NAMES)
    assert model.liaf_weights[0].remapped and model.liaf_weights[0].source == name
    with pytest.raises(ValueError, match="torchvision has no weights named"):
        create_detector("retinanet", 4, depth=50, weights="RetinaNet_ResNet50_FPN_Weights.NOPE")


def test_imagenet_backbone(tmp_path):
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, tmp_path / "r18.pth")
    model = create_detector("fasterrcnn", 4, depth=18, weights_backbone=tmp_path / "r18.pth")
    (report,) = model.liaf_weights
    body = model.backbone.body.state_dict()
    assert report.target == "backbone" and report.ignored == ["fc.bias", "fc.weight"]
    assert set(report.kept) == set(body) and all(torch.equal(body[k], state[k]) for k in body)
    with pytest.raises(ValueError, match=r"backbone on a ResNet-18.*ResNet-34 backbone"):
        create_detector("retinanet", 4, depth=34, weights_backbone=tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="not both"):
        create_detector("retinanet", 4, depth=18, weights_backbone=tmp_path / "r18.pth", weights=tmp_path / "r18.pth")


def test_gfl_has_no_torchvision_detector_weights(coco_files):
    with pytest.raises(ValueError, match="torchvision has no 'gfl' detector weights.*weights_backbone"):
        create_detector("gfl", 4, depth=50, weights=coco_files["retinanet"][0])


def test_unknown_keyword_is_refused_with_the_accepted_list():
    with pytest.raises(TypeError, match=r"unknown keyword arguments \['weigths'\].*'weights'.*'score_thresh'"):
        create_detector("retinanet", 4, depth=18, width_mult=0.125, fpn_channels=16, weigths="coco.pth")
    with pytest.raises(FileNotFoundError, match="coco.pth"):  # torchvision's spelling: no longer swallowed
        create_detector("retinanet", 4, depth=18, width_mult=0.125, fpn_channels=16, weights="coco.pth")


def test_config_keys_and_build_detector(tmp_path):
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    cfg = load_config("tiny", ["student.depth=18", "student.width_mult=1.0", "student.fpn_channels=16",
                               f"student.weights_backbone={tmp_path / 'r18.pth'}", "student.frozen_bn=true"])
    student = build_detector(cfg, "student", 4)
    assert student.liaf_weights[0].target == "backbone" and "weights_backbone" not in student.liaf_config
    with pytest.raises(ValueError, match="student.weights=3 must be a string"):
        load_config("tiny", ["student.weights=3"])


def test_dataset_category_ids(tmp_path):
    class Fake:
        class_names = ["person", "dog"]
        label_to_cat_id = {1: 1, 2: 18}

    assert dataset_category_ids(Fake()) == [1, 18]
    assert dataset_category_ids(object()) is None
