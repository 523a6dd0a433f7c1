"""Data layer: the shapes generator, COCO/KITTI/VOC loaders on tiny fixtures, transforms, bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator

from liaf_lab.experiments.builders import build_datasets, build_test_dataset
from liaf_lab.experiments.config import load_config, resolve_path
from liaf_lab.data import (
    SHAPE_CLASSES, VOC_CLASSES, CocoDetectionDataset, DatasetWarning, KittiDataset, VOCDataset,
    check_same_classes, collate_fn, detection_transforms, generate_scenes,
)
from liaf_lab.data.common import BoxSanitizer
from liaf_lab.data.kitti import kitti_splits
from liaf_lab.engine import coco_metrics, evaluate_coco
from liaf_lab.data.transforms import Compose, RandomHorizontalFlip, Resize, ToDtype, ToImage

SAMPLE = Path(__file__).resolve().parents[1] / "data_samples" / "shapes"


def _image(path: Path, width: int = 40, height: int = 30, value: int = 60) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (value, value, value)).save(path)


# ---------------------------------------------------------------- generator


def test_generator_is_deterministic_by_seed(tmp_path):
    a = generate_scenes(tmp_path / "a", 5, seed=0)
    b = generate_scenes(tmp_path / "b", 5, seed=0)
    c = generate_scenes(tmp_path / "c", 5, seed=1)
    prefix = generate_scenes(tmp_path / "p", 3, seed=0)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    names = sorted(p.name for p in (tmp_path / "a" / "train").iterdir())
    assert names == [f"{i:06d}.jpg" for i in range(1, 6)]
    for name in names:
        assert (tmp_path / "a/train" / name).read_bytes() == (tmp_path / "b/train" / name).read_bytes()
        assert (tmp_path / "a/train" / name).read_bytes() != (tmp_path / "c/train" / name).read_bytes()
    for name in names[:3]:  # image i depends only on (seed, split, i)
        assert (tmp_path / "p/train" / name).read_bytes() == (tmp_path / "a/train" / name).read_bytes()
    val = json.loads(generate_scenes(tmp_path / "a", 3, seed=0, split="val").read_text())
    assert val["annotations"] != json.loads(prefix.read_text())["annotations"]


def test_generator_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        generate_scenes(tmp_path, 2, image_size=(16, 160))


def test_shipped_sample_is_reproducible(tmp_path):
    shipped = json.loads((SAMPLE / "annotations" / "instances_train.json").read_text())
    fresh = json.loads(generate_scenes(tmp_path, 4, seed=0, split="train").read_text())

    def key(data):
        return [(a["image_id"], a["category_id"], a["bbox"], a["iscrowd"]) for a in data["annotations"]
                if a["image_id"] <= 4]

    assert key(fresh) == key(shipped)


@pytest.mark.parametrize("split, num_images", [("train", 160), ("val", 48)])
def test_shipped_sample_annotations_are_sane(split, num_images):
    data = json.loads((SAMPLE / "annotations" / f"instances_{split}.json").read_text())
    assert len(data["images"]) == num_images
    assert [c["name"] for c in data["categories"]] == list(SHAPE_CLASSES)
    for im in data["images"]:
        assert (SAMPLE / split / im["file_name"]).is_file()
        assert (im["height"], im["width"]) == (160, 160)
    anns = data["annotations"]
    boxes = np.array([a["bbox"] for a in anns])
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] > 0).all()
    assert (boxes[:, 0] + boxes[:, 2] <= 160).all() and (boxes[:, 1] + boxes[:, 3] <= 160).all()
    assert {a["category_id"] for a in anns} == set(range(1, 6))
    side = boxes[:, 2:].max(axis=1)
    assert side.min() < 10 and side.max() > 120 and 15 <= np.median(side) <= 80
    visible = np.array([a["visible"] for a in anns])
    crowd = np.array([a["iscrowd"] for a in anns], dtype=bool)
    assert ((visible < 0.9) & ~crowd).mean() > 0.15  # partly occluded but labeled
    assert crowd.any() and (crowd == (visible < 0.3)).all()
    assert np.ptp([a["contrast"] for a in anns]) > 0.3 and np.mean([a["blur"] > 0 for a in anns]) > 0.2
    per_image = np.bincount([a["image_id"] for a in anns], minlength=num_images + 1)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 6


def test_shipped_sample_loads_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)
        ds = CocoDetectionDataset(SAMPLE / "val", SAMPLE / "annotations" / "instances_val.json")
    image, target = ds[0]
    assert image.shape == (3, 160, 160) and ds.class_names == list(SHAPE_CLASSES)
    assert int(target["labels"].min()) >= 1 and int(target["labels"].max()) <= 5


# ---------------------------------------------------------------- COCO


def _coco_fixture(tmp_path: Path, annotations: list[dict] | None = None, **extra) -> tuple[Path, Path]:
    image_dir = tmp_path / "images"
    for name, (w, h) in {"a.png": (40, 30), "b.png": (50, 20), "empty.png": (20, 20)}.items():
        _image(image_dir / name, w, h)
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [2, 3, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [20, 10, 8, 8], "iscrowd": 0},
            {"id": 3, "image_id": 11, "category_id": 7, "bbox": [0, 0, 30, 10], "iscrowd": 1},
            {"id": 4, "image_id": 11, "category_id": 3, "bbox": [5, 5, 4, 4]},
        ]
    data = {
        "images": [{"id": 10, "file_name": "a.png", "width": 40, "height": 30},
                   {"id": 11, "file_name": "b.png", "width": 50, "height": 20},
                   {"id": 12, "file_name": "empty.png", "width": 20, "height": 20}],
        "annotations": annotations,
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        **extra,
    }
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(data))
    return image_dir, ann_file


def test_coco_loader(tmp_path):
    image_dir, ann_file = _coco_fixture(tmp_path)
    ds = CocoDetectionDataset(image_dir, ann_file)
    assert len(ds) == 3 and ds.class_names == ["cat", "dog"] and ds.label_to_cat_id == {1: 3, 2: 7}
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 30, 40)
    assert 0 <= float(image.min()) and float(image.max()) <= 1
    assert target["image_id"] == 10 and target["orig_size"] == (30, 40)
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 3, 12, 8], [20, 10, 28, 18]]))
    assert target["labels"].tolist() == [2, 1] and target["labels"].dtype == torch.int64
    assert target["ignore_boxes"].shape == (0, 4)
    _, target = ds[1]
    torch.testing.assert_close(target["ignore_boxes"], torch.tensor([[0.0, 0, 30, 10]]))
    assert target["labels"].tolist() == [1]
    _, target = ds[2]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    gt = ds.coco_gt()
    assert sorted(gt.getImgIds()) == [10, 11, 12] and len(gt.getAnnIds()) == 4


def test_coco_bad_input(tmp_path):
    image_dir, ann_file = _coco_fixture(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CocoDetectionDataset(image_dir, tmp_path / "missing.json")
    (image_dir / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"b\.png.*image id 11"):
        CocoDetectionDataset(image_dir, ann_file)
    ann_file.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"malformed JSON in .*instances\.json"):
        CocoDetectionDataset(image_dir, ann_file)
    ann_file.write_text('{"images": []}')
    with pytest.raises(ValueError, match="not a COCO detection file"):
        CocoDetectionDataset(image_dir, ann_file)


def test_coco_unknown_category_and_orphan(tmp_path):
    bad = [{"id": 5, "image_id": 10, "category_id": 99, "bbox": [1, 1, 2, 2]}]
    with pytest.raises(ValueError, match=r"instances\.json: annotation id 5 \(image id 10, a\.png\) has unknown "
                                         r"category_id 99; categories are \[3, 7\]"):
        CocoDetectionDataset(*_coco_fixture(tmp_path, bad))
    orphan = [{"id": 6, "image_id": 42, "category_id": 3, "bbox": [1, 1, 2, 2]}]
    with pytest.raises(ValueError, match="annotation id 6 refers to image id 42"):
        CocoDetectionDataset(*_coco_fixture(tmp_path, orphan))
    malformed = [{"id": 7, "image_id": 10, "category_id": 3, "bbox": [1, 1, 2]}]
    with pytest.raises(ValueError, match=r"annotation id 7 .*bbox"):
        CocoDetectionDataset(*_coco_fixture(tmp_path, malformed))


def test_coco_clips_and_drops_with_one_warning_each(tmp_path):
    anns = [
        {"id": 1, "image_id": 10, "category_id": 3, "bbox": [-5, 2, 10, 5]},  # clipped
        {"id": 2, "image_id": 10, "category_id": 3, "bbox": [35, 25, 10, 10]},  # clipped
        {"id": 3, "image_id": 11, "category_id": 7, "bbox": [45, 0, 20, 5]},  # clipped
        {"id": 4, "image_id": 11, "category_id": 7, "bbox": [4, 4, 0, 3]},  # degenerate
        {"id": 5, "image_id": 12, "category_id": 7, "bbox": [30, 2, 5, 5]},  # outside: degenerate
    ]
    with pytest.warns(DatasetWarning) as record:
        ds = CocoDetectionDataset(*_coco_fixture(tmp_path, anns))
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert "clipped 3 boxes" in messages[0] and "instances.json" in messages[0]
    assert messages[0].endswith("instances.json: annotation id 1 (image id 10, a.png), annotation id 2 (image id 10, "
                                "a.png), annotation id 3 (image id 11, b.png)")
    assert "dropped 2 degenerate boxes" in messages[1]
    assert messages[1].endswith("annotation id 4 (image id 11, b.png), annotation id 5 (image id 12, empty.png)")
    torch.testing.assert_close(ds[0][1]["boxes"], torch.tensor([[0.0, 2, 5, 7], [35, 25, 40, 30]]))
    assert ds[1][1]["boxes"].shape == (1, 4) and ds[2][1]["boxes"].shape == (0, 4)


def test_image_size_mismatch_is_reported_at_load(tmp_path):
    image_dir, ann_file = _coco_fixture(tmp_path)
    _image(image_dir / "a.png", 41, 30)
    with pytest.raises(ValueError, match=r"a\.png is 41x30 but its annotation \(image id 10 in .*instances\.json\) "
                                         r"says 40x30"):
        CocoDetectionDataset(image_dir, ann_file)


def _edit_coco(ann_file: Path, edit) -> Path:
    """Apply ``edit(data)`` to the COCO JSON at ``ann_file`` in place."""
    data = json.loads(ann_file.read_text())
    edit(data)
    ann_file.write_text(json.dumps(data))
    return ann_file


def test_coco_duplicated_ids_are_errors_naming_file_and_ids(tmp_path):
    image_dir, ann_file = _coco_fixture(tmp_path)
    _edit_coco(ann_file, lambda d: d["images"].append({"id": 11, "file_name": "a.png", "width": 40, "height": 30}))
    with pytest.raises(ValueError, match=r"instances\.json: duplicated image ids 11$"):
        CocoDetectionDataset(image_dir, ann_file)
    anns = [{"id": i, "image_id": 10, "category_id": 3, "bbox": [1, 1, 4, 4]} for i in (1, 2, 1, 5, 2)]
    with pytest.raises(ValueError, match=r"instances\.json: duplicated annotation ids 1, 2$"):
        CocoDetectionDataset(*_coco_fixture(tmp_path, anns))
    with pytest.raises(ValueError, match=r"instances\.json: duplicated category ids 3$"):
        CocoDetectionDataset(*_coco_fixture(tmp_path, categories=[{"id": 3, "name": "cat"}, {"id": 3, "name": "x"}]))


def test_coco_empty_annotation_list_warns(tmp_path):
    with pytest.warns(DatasetWarning, match=r"instances\.json has no annotations"):
        ds = CocoDetectionDataset(*_coco_fixture(tmp_path, []))
    assert len(ds) == 3 and all(len(r.boxes) == 0 for r in ds.records)


@pytest.mark.parametrize("edit, error, message", [
    (lambda d: d["images"][0].update(width="wide"), TypeError, r"image id 10: width must be a number, got 'wide'"),
    (lambda d: d["images"][1].update(height=20.5), ValueError, r"image id 11: height must be a positive whole"),
    (lambda d: d["images"][0].update(id="10"), TypeError, r"image entry .*'a\.png'.*: id must be an integer, got '10'"),
    (lambda d: d["images"][0].pop("file_name"), ValueError, r"image id 10 has no 'file_name'"),
    (lambda d: d["annotations"][1]["bbox"].__setitem__(2, "8"), TypeError,
     r"annotation id 2 \(image id 10, a\.png\): bbox must be a number, got '8'"),
    (lambda d: d["annotations"][0].update(image_id="10"), TypeError,
     r"annotation id 1: image_id must be an integer, got '10'"),
    (lambda d: d["annotations"][2].update(category_id="7"), TypeError,
     r"annotation id 3 \(image id 11, b\.png\): category_id must be an integer, got '7'"),
    (lambda d: d["annotations"][2].update(iscrowd="yes"), ValueError,
     r"annotation id 3 \(image id 11, b\.png\): iscrowd must be 0 or 1, got 'yes'"),
    (lambda d: d["annotations"][3].update(area="big"), TypeError,
     r"annotation id 4 \(image id 11, b\.png\): area must be a number, got 'big'"),
    (lambda d: d["annotations"][3].pop("id"), ValueError, r"annotation entry .* has no 'id'"),
    (lambda d: d["annotations"].append(7), TypeError, r"annotations\[4\] must be an object, got 7"),
])
def test_coco_type_errors_name_file_and_record(tmp_path, edit, error, message):
    image_dir, ann_file = _coco_fixture(tmp_path)
    _edit_coco(ann_file, edit)
    with pytest.raises(error, match=r"instances\.json(: | has | is )?.*" + message):
        CocoDetectionDataset(image_dir, ann_file)


def test_non_finite_boxes_are_dropped_not_repaired(tmp_path):
    anns = [
        {"id": 1, "image_id": 10, "category_id": 3, "bbox": [2, 3, float("inf"), 5]},  # would clip to a real box
        {"id": 2, "image_id": 10, "category_id": 3, "bbox": [float("nan"), 3, 4, 5]},
        {"id": 3, "image_id": 11, "category_id": 7, "bbox": [1, 1, 5, 5]},
    ]
    with pytest.warns(DatasetWarning) as record:
        ds = CocoDetectionDataset(*_coco_fixture(tmp_path, anns))
    assert [str(w.message).split(" in ")[0] for w in record] == [
        "dropped 2 boxes with non-finite coordinates (inf or NaN)", f"classes ['cat'] of {tmp_path / 'instances.json'} occur"]
    message = str(record[0].message)
    assert "instances.json: annotation id 1 (image id 10, a.png), annotation id 2 (image id 10, a.png)" in message
    assert ds.records[0].boxes.shape == (0, 4) and len(ds.records[1].boxes) == 1
    sanitize = BoxSanitizer(Path("x.json"))
    boxes, keep = sanitize(np.array([[0, 0, np.inf, 5], [-np.inf, 0, 5, 5], [0, 0, 5, 5]], np.float32), 40, 30,
                           ["r0", "r1", "r2"])
    assert keep.tolist() == [False, False, True] and sanitize.nonfinite == ["r0", "r1"]
    assert sanitize.clipped == [] and sanitize.dropped == []


def test_warnings_name_a_few_records_then_a_count(tmp_path):
    anns = [{"id": i, "image_id": 10, "category_id": 3, "bbox": [30, 2, 20, 5]} for i in range(1, 8)]
    with pytest.warns(DatasetWarning, match=r"clipped 7 boxes .* in .*instances\.json: annotation id 1 \(image id "
                                            r"10, a\.png\), .*annotation id 5 \(image id 10, a\.png\) and 2 more$"):
        CocoDetectionDataset(*_coco_fixture(tmp_path, anns))


class _Oracle(torch.nn.Module):
    """Detects exactly the ground truth of ``dataset``, image by image in dataset order."""

    def __init__(self, dataset: CocoDetectionDataset) -> None:
        super().__init__()
        self.targets = iter([dataset[i][1] for i in range(len(dataset))])

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        targets = [next(self.targets) for _ in images]
        return [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))} for t in targets]


def test_coco_without_area_and_iscrowd_evaluates_from_the_sanitised_records(tmp_path):
    anns = [
        {"id": 1, "image_id": 10, "category_id": 7, "bbox": [2, 3, 10, 5]},
        {"id": 2, "image_id": 10, "category_id": 3, "bbox": [30, 10, 20, 8]},  # clipped to x <= 40
        {"id": 3, "image_id": 11, "category_id": 3, "bbox": [5, 5, 4, 4], "area": 9.5},
        {"id": 4, "image_id": 11, "category_id": 7, "bbox": [4, 4, 0, 3]},  # degenerate: dropped
    ]
    with pytest.warns(DatasetWarning):
        ds = CocoDetectionDataset(*_coco_fixture(tmp_path, anns))
    gt = ds.coco_gt()
    assert gt.getCatIds() == [3, 7] and [c["name"] for c in gt.loadCats([3, 7])] == ["cat", "dog"]
    assert sorted((a["image_id"], a["category_id"], a["bbox"][2], a["area"]) for a in gt.dataset["annotations"]) == [
        (10, 3, 10.0, 80.0), (10, 7, 10.0, 50.0), (11, 3, 4.0, 9.5)]  # file area kept, box area where absent
    metrics = evaluate_coco(_Oracle(ds), ds, collate_fn, batch_size=2)
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["AP"] == pytest.approx(1.0)
    assert metrics["num_detections"] == 3
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt.dataset["annotations"]]
    swapped = [dict(r, category_id=10 - r["category_id"]) for r in perfect]  # 3 <-> 7
    assert coco_metrics(gt, perfect)["AP50"] == pytest.approx(1.0) and coco_metrics(gt, swapped)["AP50"] == 0.0


def _noise_jpeg(path: Path, width: int = 40, height: int = 30, keep: float = 1.0) -> None:
    """A random-noise JPEG at ``path``, cut to its first ``keep`` fraction of bytes."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=95)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_truncated_image_fails_naming_file_or_is_skipped(tmp_path):
    image_dir, ann_file = _coco_fixture(tmp_path)
    _noise_jpeg(image_dir / "bad.jpg", keep=0.6)
    _edit_coco(ann_file, lambda d: d["images"][1].update(file_name="bad.jpg", width=40, height=30))
    ds = CocoDetectionDataset(image_dir, ann_file)  # the header reads fine
    loader = DataLoader(ds, batch_size=1, collate_fn=collate_fn)
    with pytest.raises(OSError, match=r"cannot decode image .*images/bad\.jpg \(image id 11\): image file is "
                                      r"truncated.*skip_bad_images=True"):
        list(loader)
    with pytest.warns(DatasetWarning, match=r"skipped 1 missing or undecodable images \(skip_bad_images=True\) in "
                                            r".*instances\.json: bad\.jpg \(image id 11 in .*instances\.json\)$"):
        ds = CocoDetectionDataset(image_dir, ann_file, skip_bad_images=True)
    assert [r.image_id for r in ds.records] == [10, 12] and sorted(ds.coco_gt().getImgIds()) == [10, 12]
    assert len(list(DataLoader(ds, batch_size=1, collate_fn=collate_fn))) == 2


def test_unreadable_or_missing_images_fail_at_load_or_are_skipped(tmp_path):
    image_dir, ann_file = _coco_fixture(tmp_path)
    (image_dir / "b.png").write_bytes(b"not an image")
    with pytest.raises(OSError, match=r"cannot read image .*images/b\.png \(image id 11 in .*instances\.json\): "
                                      r"cannot identify image file"):
        CocoDetectionDataset(image_dir, ann_file)
    (image_dir / "empty.png").unlink()
    with pytest.warns(DatasetWarning, match=r"skipped 2 .*: b\.png \(image id 11 .*\), empty\.png \(image id 12 "):
        ds = CocoDetectionDataset(image_dir, ann_file, skip_bad_images=True)
    assert len(ds) == 1
    with pytest.raises(TypeError, match="skip_bad_images must be True or False, got 'yes'"):
        CocoDetectionDataset(image_dir, ann_file, skip_bad_images="yes")


# ---------------------------------------------------------------- KITTI


def _kitti_line(name: str, box: tuple[float, float, float, float]) -> str:
    return f"{name} 0.00 0 -1.57 {box[0]:.2f} {box[1]:.2f} {box[2]:.2f} {box[3]:.2f} 1.5 1.6 3.9 1.0 1.7 20.0 -1.5"


KITTI_LABELS = {
    "000000": [("Car", (1, 2, 20, 15)), ("Van", (22, 3, 35, 18)), ("DontCare", (0, 20, 10, 29))],
    "000001": [("Pedestrian", (5, 5, 9, 20)), ("Person_sitting", (12, 10, 16, 20)), ("Truck", (20, 2, 39, 25))],
    "000002": [],
    "000003": [("Cyclist", (3, 4, 12, 22)), ("Tram", (15, 1, 39, 20)), ("Misc", (2, 2, 4, 4))],
    "000004": [("Car", (10, 10, 20, 20))],
}


def _kitti_fixture(root: Path, labels: dict[str, list] = KITTI_LABELS) -> Path:
    for stem, objects in labels.items():
        _image(root / "image_2" / f"{stem}.png")
        (root / "label_2").mkdir(parents=True, exist_ok=True)
        (root / "label_2" / f"{stem}.txt").write_text("".join(_kitti_line(n, b) + "\n" for n, b in objects))
    return root


def test_kitti_loader_classes_merge_ignore_and_split(tmp_path):
    root = _kitti_fixture(tmp_path)
    train, val = KittiDataset(root, split="train"), KittiDataset(root, split="val")
    assert len(train) == 4 and len(val) == 1 and len(KittiDataset(root, split="all")) == 5
    assert train.class_names == ["Car", "Pedestrian", "Cyclist"] and train.label_to_cat_id == {1: 1, 2: 2, 3: 3}
    _, t0 = train[0]
    assert t0["labels"].tolist() == [1, 1]  # Van merged into Car
    torch.testing.assert_close(t0["boxes"], torch.tensor([[1.0, 2, 20, 15], [22, 3, 35, 18]]))
    torch.testing.assert_close(t0["ignore_boxes"], torch.tensor([[0.0, 20, 10, 29]]))
    _, t1 = train[1]
    assert t1["labels"].tolist() == [2, 2] and t1["ignore_boxes"].shape == (1, 4)  # Person_sitting, Truck
    _, t2 = train[2]
    assert t2["boxes"].shape == (0, 4) and t2["ignore_boxes"].shape == (0, 4)
    _, t3 = train[3]
    assert t3["labels"].tolist() == [3] and t3["ignore_boxes"].shape == (2, 4) and t3["image_id"] == 3
    assert val[0][1]["image_id"] == 4 and val[0][1]["orig_size"] == (30, 40)
    gt = train.coco_gt()
    assert len(gt.getAnnIds(iscrowd=False)) == 5
    crowd = gt.loadAnns(gt.getAnnIds(imgIds=[0], iscrowd=True))
    crowd = [a for a in crowd if a["iscrowd"]]
    assert sorted(a["category_id"] for a in crowd) == [1, 2, 3]  # DontCare ignores every class


def test_kitti_options(tmp_path):
    root = _kitti_fixture(tmp_path)
    ds = KittiDataset(root, ids=["000001", "000004"], classes=("Car", "Pedestrian"), merge={})
    assert len(ds) == 2 and ds.class_names == ["Car", "Pedestrian"]
    assert ds[0][1]["labels"].tolist() == [2] and ds[0][1]["ignore_boxes"].shape == (2, 4)
    with pytest.raises(ValueError, match="'Bus' is not a KITTI type"):
        KittiDataset(root, classes=("Car", "Bus"))
    with pytest.raises(ValueError, match="merge targets must be kept classes"):
        KittiDataset(root, classes=("Car",), merge={"Person_sitting": "Pedestrian"})
    with pytest.raises(ValueError, match="split must be"):
        KittiDataset(root, split="test")
    with pytest.raises(FileNotFoundError, match=r"000009\.png"):
        KittiDataset(root, ids=["000009"])


def test_kitti_bad_input(tmp_path):
    root = _kitti_fixture(tmp_path)
    with pytest.raises(FileNotFoundError, match="image_2"):
        KittiDataset(tmp_path / "nowhere")
    label = root / "label_2" / "000001.txt"
    label.write_text(_kitti_line("Car", (1, 1, 5, 5)) + "\n" + _kitti_line("Bus", (1, 1, 5, 5)) + "\n")
    with pytest.raises(ValueError, match=r"000001\.txt line 2: unknown class 'Bus'"):
        KittiDataset(root)
    label.write_text("Car 0 0 1 2 3\n")
    with pytest.raises(ValueError, match=r"000001\.txt line 1: expected 15 KITTI fields, got 6"):
        KittiDataset(root)
    label.write_text(_kitti_line("Car", (1, 1, 5, 5)).replace("5.00", "x", 1) + "\n")
    with pytest.raises(ValueError, match=r"000001\.txt line 1: bad box"):
        KittiDataset(root)
    label.unlink()
    with pytest.raises(FileNotFoundError, match=r"label file .*000001\.txt not found"):
        KittiDataset(root)


def test_kitti_clips_and_drops(tmp_path):
    labels = {"000000": [("Car", (-3, 2, 50, 15)), ("Car", (5, 5, 5, 9)), ("DontCare", (30, 25, 45, 35))]}
    root = _kitti_fixture(tmp_path, labels)
    with pytest.warns(DatasetWarning) as record:
        ds = KittiDataset(root, split="all")
    messages = [str(w.message) for w in record]
    assert len(messages) == 2 and "clipped 2 boxes" in messages[0] and "label_2" in messages[0]
    assert "000000.txt line 1, 000000.txt line 3" in messages[0]
    assert "dropped 1 degenerate boxes" in messages[1] and "000000.txt line 2" in messages[1]
    torch.testing.assert_close(ds[0][1]["boxes"], torch.tensor([[0.0, 2, 40, 15]]))
    torch.testing.assert_close(ds[0][1]["ignore_boxes"], torch.tensor([[30.0, 25, 40, 30]]))


# ---------------------------------------------------------------- VOC


def _voc_xml(objects: list[tuple[str, tuple[int, int, int, int], int]]) -> str:
    body = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d in objects
    )
    return f"<annotation><size><width>40</width><height>30</height><depth>3</depth></size>{body}</annotation>"


VOC_OBJECTS = {
    "2007_000001": [("dog", (1, 1, 20, 15), 0), ("person", (21, 5, 30, 30), 1)],
    "2007_000002": [],
    "2007_000003": [("tvmonitor", (5, 6, 40, 30), 0), ("cat", (2, 2, 6, 6), 0)],
}


def _voc_fixture(root: Path, objects: dict[str, list] = VOC_OBJECTS, sets: dict[str, list[str]] | None = None) -> Path:
    """A VOC-layout folder; ``sets`` maps image-set names to stems (default: ``train`` holds every image)."""
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for stem, objs in objects.items():
        _image(root / "JPEGImages" / f"{stem}.jpg")
        (root / "Annotations" / f"{stem}.xml").write_text(_voc_xml(objs))
    for name, stems in (sets or {"train": list(objects)}).items():
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{stem}\n" for stem in stems))
    return root


def test_voc_loader(tmp_path):
    ds = VOCDataset(_voc_fixture(tmp_path), classes=VOC_CLASSES)
    assert len(ds) == 3 and ds.class_names == list(VOC_CLASSES) and len(ds.label_to_cat_id) == 20
    _, t = ds[0]
    assert t["labels"].tolist() == [VOC_CLASSES.index("dog") + 1]
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.0, 0, 20, 15]]))  # 1-based -> continuous
    torch.testing.assert_close(t["ignore_boxes"], torch.tensor([[20.0, 4, 30, 30]]))  # difficult
    assert ds[1][1]["boxes"].shape == (0, 4)
    assert ds[2][1]["labels"].tolist() == [20, 8] and ds[2][1]["image_id"] == 2
    gt = ds.coco_gt()
    crowd = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=[0])) if a["iscrowd"]]
    assert [a["category_id"] for a in crowd] == [VOC_CLASSES.index("person") + 1]  # class-specific ignore


def test_voc_bad_input(tmp_path):
    root = _voc_fixture(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"ImageSets.*val\.txt"):
        VOCDataset(root, image_set="val")
    xml = root / "Annotations" / "2007_000003.xml"
    xml.write_text(_voc_xml([("cat", (1, 1, 5, 5), 0), ("unicorn", (1, 1, 5, 5), 0)]))
    with pytest.raises(ValueError, match=r"2007_000003\.xml: object 2 has unknown class 'unicorn'; "
                                         r"classes are \['aeroplane', .*'tvmonitor'\]"):
        VOCDataset(root, classes=VOC_CLASSES)
    xml.write_text("<annotation><object><name>cat</name></annotation>")
    with pytest.raises(ValueError, match=r"malformed XML in .*2007_000003\.xml"):
        VOCDataset(root)
    xml.write_text("<annotation><object><name>cat</name><bndbox><xmin>1</xmin></bndbox></object></annotation>")
    with pytest.raises(ValueError, match=r"2007_000003\.xml: object 1 \(cat\) needs numeric bndbox"):
        VOCDataset(root)
    xml.unlink()
    with pytest.raises(FileNotFoundError, match=r"annotation file .*2007_000003\.xml not found"):
        VOCDataset(root)
    (root / "JPEGImages" / "2007_000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"2007_000002\.jpg not found \(id '2007_000002'"):
        VOCDataset(root)


BLOOD = {  # a custom dataset in VOC layout (BCCD-like)
    "img1": [("WBC", (3, 3, 20, 20), 0), ("RBC", (22, 4, 30, 12), 0)],
    "img2": [("RBC", (1, 1, 9, 9), 0), ("Platelets", (30, 20, 34, 24), 1)],
    "img3": [("RBC", (5, 5, 15, 15), 0)],
}


def test_voc_layout_with_custom_classes(tmp_path):
    root = _voc_fixture(tmp_path, BLOOD)
    ds = VOCDataset(root)  # discovered from the XML files, sorted
    assert ds.class_names == ["Platelets", "RBC", "WBC"] and ds.label_to_cat_id == {1: 1, 2: 2, 3: 3}
    assert ds[0][1]["labels"].tolist() == [3, 2] and ds[1][1]["labels"].tolist() == [2]
    torch.testing.assert_close(ds[1][1]["ignore_boxes"], torch.tensor([[29.0, 19, 34, 24]]))  # difficult
    ds = VOCDataset(root, classes=["WBC", "RBC", "Platelets"])
    assert ds.class_names == ["WBC", "RBC", "Platelets"] and ds[0][1]["labels"].tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"img1\.xml: object 2 has unknown class 'RBC'; classes are \['WBC', "
                                         r"'Platelets'\]"):
        VOCDataset(root, classes=["WBC", "Platelets"])
    with pytest.raises(TypeError, match=r"classes must be a list of class names, got 'WBC'"):
        VOCDataset(root, classes="WBC")
    with pytest.raises(ValueError, match=r"classes \['RBC'\] appear more than once"):
        VOCDataset(root, classes=["RBC", "WBC", "RBC"])
    _voc_fixture(tmp_path / "empty", {"img1": []})
    with pytest.raises(ValueError, match=r"no <object> in the annotation files of .*train\.txt; pass classes="):
        VOCDataset(tmp_path / "empty")


def test_voc_zero_size_and_clipped_boxes_are_reported_by_file_and_object(tmp_path):
    objects = {"a": [("cat", (5, 5, 5, 9), 0), ("cat", (2, 2, 8, 8), 0)], "b": [("dog", (30, 4, 45, 12), 0)]}
    with pytest.warns(DatasetWarning) as record:
        ds = VOCDataset(_voc_fixture(tmp_path, objects))
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert messages[0].startswith("clipped 1 boxes") and messages[0].endswith("Annotations: b.xml object 1 (dog)")
    assert messages[1].startswith("dropped 1 degenerate boxes") and messages[1].endswith("a.xml object 1 (cat)")
    torch.testing.assert_close(ds[0][1]["boxes"], torch.tensor([[1.0, 1, 8, 8]]))  # no 1-pixel box from (5, 5, 5, 9)
    torch.testing.assert_close(ds[1][1]["boxes"], torch.tensor([[29.0, 3, 40, 12]]))


def test_check_same_classes(tmp_path):
    root = _voc_fixture(tmp_path, BLOOD)
    a, b = VOCDataset(root), VOCDataset(root, classes=["WBC", "RBC", "Platelets"])
    check_same_classes(a, VOCDataset(root, classes=["Platelets", "RBC", "WBC"]))
    with pytest.raises(ValueError, match=r"different classes .*train \['Platelets', 'RBC', 'WBC'\], "
                                         r"val \['WBC', 'RBC', 'Platelets'\]"):
        check_same_classes(a, b)


def test_build_datasets_passes_classes_and_checks_them(tmp_path):
    root = _voc_fixture(tmp_path / "voc", BLOOD, sets={"train": ["img1", "img2"], "val": ["img3"]})
    cfg = {"data": {"kind": "voc", "root": str(root)}}
    train, val = build_datasets(cfg)
    assert train.class_names == val.class_names == ["Platelets", "RBC", "WBC"]  # val (RBC only) takes train's
    cfg["data"]["classes"] = ["WBC", "RBC", "Platelets"]
    train, val = build_datasets(cfg)
    assert train.class_names == val.class_names == ["WBC", "RBC", "Platelets"] and len(val) == 1
    cfg["data"].update(train_set="val", val_set="train", classes=["RBC"])
    with pytest.raises(ValueError, match=r"img1\.xml: object 1 has unknown class 'WBC'; classes are \['RBC'\]"):
        build_datasets(cfg)
    coco = {"kind": "coco", "train_images": "x", "train_ann": "y", "val_images": "x", "classes": ["a"]}
    with pytest.raises(ValueError, match=r"kind = 'coco': missing keys \['val_ann'\], unknown keys \['classes'\]"):
        build_datasets({"data": coco})
    kitti = _kitti_fixture(tmp_path / "kitti")
    train, val = build_datasets({"data": {"kind": "kitti", "root": str(kitti), "classes": ["Car", "Cyclist"]}})
    assert train.class_names == val.class_names == ["Car", "Cyclist"]
    assert train[1][1]["labels"].tolist() == [] and train[1][1]["ignore_boxes"].shape == (3, 4)  # pedestrians ignored


# ---------------------------------------------------------------- held-out test splits


def test_kitti_test_split_rule():
    ids = [f"{i:06d}" for i in range(10)]
    plain = kitti_splits(ids[::-1])  # unchanged without a test split: the sorted ids split 8:2
    assert plain == {"all": ids, "train": ids[:8], "val": ids[8:]}
    held = kitti_splits(ids, test_fraction=0.2)  # the last 20%, then 8:2 of the other eight
    assert held["test"] == ids[8:] and held["train"] == ids[:6] and held["val"] == ids[6:8]
    listed = kitti_splits(ids, test_ids=["000007", "000002"])
    assert listed["test"] == ["000002", "000007"] and listed["val"] == ["000008", "000009"]
    assert listed["train"] == ["000000", "000001", "000003", "000004", "000005", "000006"]
    for splits in (held, listed):
        assert sorted(splits["train"] + splits["val"] + splits["test"]) == ids


@pytest.mark.parametrize("options, message", [
    ({"test_fraction": 1.0}, r"^test_fraction=1.0 must be between 0 and 1, exclusive"),
    ({"test_fraction": 0}, r"^test_fraction=0 must be between 0 and 1, exclusive"),
    ({"test_fraction": -0.2}, r"^test_fraction=-0.2 must be between 0 and 1"),
    ({"test_fraction": 0.2, "test_ids": ["000001"]}, r"^test_fraction and test_ids are both set"),
    ({"test_ids": ["000001", "000042", "x"]}, r"^test_ids names 2 ids with no image in image_2/: '000042', 'x'$"),
    ({"test_ids": ["000001", "000001"]}, r"^test_ids repeats 1 ids: '000001'$"),
    ({"test_fraction": 0.04}, r"leaves test empty \(train 8, val 2, test 0\); hold out more ids$"),
    ({"test_fraction": 0.95}, r"leaves train and val empty \(train 0, val 0, test 10\); hold out fewer ids$"),
])
def test_kitti_bad_test_splits_are_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message) as err:
        kitti_splits([f"{i:06d}" for i in range(10)], **options)
    assert "\n" not in str(err.value)


def test_kitti_test_split_through_the_dataset_and_the_config(tmp_path):
    root = _kitti_fixture(tmp_path)
    test = KittiDataset(root, split="test", test_ids=["000001"])
    assert [t["image_id"] for _, t in test] == [1]
    with pytest.raises(ValueError, match=r"split must be one of \['all', 'train', 'val'\], got 'test' \(a test "
                                         r"split needs test_fraction or test_ids\)"):
        KittiDataset(root, split="test")
    with pytest.raises(ValueError, match="ids loads the given images: give it without test_fraction"):
        KittiDataset(root, ids=["000001"], test_fraction=0.2)
    cfg = {"data": {"kind": "kitti", "root": str(root)}}
    assert build_test_dataset(cfg) is None  # no test split unless asked
    cfg["data"]["test_fraction"] = 0.2  # 5 ids: test the last one, then 3 train and 1 val
    (train, val), test = build_datasets(cfg), build_test_dataset(cfg)
    ids = [[t["image_id"] for _, t in ds] for ds in (train, val, test)]
    assert ids == [[0, 1, 2], [3], [4]] and test.class_names == train.class_names
    cfg["data"] = {"kind": "kitti", "root": str(root), "test_ids": ["000042"]}
    with pytest.raises(ValueError, match=r"test_ids names 1 ids with no image in image_2/: '000042'"):
        build_datasets(cfg)  # before anything trains
    with pytest.raises(ValueError, match=r"data.test_fraction=1.5 must be between 0 and 1, exclusive"):
        build_datasets({"data": {"kind": "kitti", "root": str(root), "test_fraction": 1.5}})


def test_voc_test_set_takes_train_classes_and_overlaps_are_errors_naming_the_images(tmp_path):
    objects = {f"img{i}": [("RBC", (2, 2, 9, 9), 0)] for i in range(12)}
    objects["img0"] = [("WBC", (3, 3, 20, 20), 0)]
    stems = list(objects)
    root = _voc_fixture(tmp_path, objects, sets={"train": stems[:6], "val": stems[6:9], "test": stems[9:],
                                                 "trainval": stems[:9]})
    cfg = {"data": {"kind": "voc", "root": str(root)}}
    assert build_test_dataset(cfg) is None
    cfg["data"]["test_set"] = "test"
    (train, val), test = build_datasets(cfg), build_test_dataset(cfg)
    assert (len(train), len(val), len(test)) == (6, 3, 3)
    assert test.class_names == train.class_names == ["RBC", "WBC"]  # the test set alone holds only RBC
    assert build_test_dataset(cfg, ["WBC", "RBC"]).class_names == ["WBC", "RBC"]  # the caller's train classes
    cfg["data"]["test_set"] = "trainval"
    with pytest.raises(ValueError, match=r"^the train and test image sets \('train', 'trainval'\) of .* share 6 "
                                         r"images: img0, img1, img2, img3, img4 and 1 more; .*make the lists "
                                         r"disjoint$"):
        build_datasets(cfg)  # raised when the datasets are built, before anything trains
    with pytest.raises(ValueError, match=r"the train and test image sets"):
        build_test_dataset(cfg)
    cfg["data"].update(train_set="train", val_set="trainval", test_set="test")
    with pytest.raises(ValueError, match=r"^the train and val image sets \('train', 'trainval'\) .* share 6 images"):
        build_datasets(cfg)
    cfg["data"].update(val_set="val", test_set="absent")
    with pytest.raises(FileNotFoundError, match=r"ImageSets.*absent\.txt not found"):
        build_datasets(cfg)



def test_raccoon_preset_loads_its_fixed_splits():
    cfg = load_config("raccoon")
    try:
        resolve_path(cfg["data"]["root"])
    except FileNotFoundError:
        pytest.skip("the Raccoon dataset is not at ../shared/data/raccoon beside the checkout")
    (train, val), test = build_datasets(cfg), build_test_dataset(cfg)
    assert (len(train), len(val), len(test)) == (140, 30, 30)
    assert train.class_names == val.class_names == test.class_names == ["raccoon"]


# ---------------------------------------------------------------- transforms and collation


def _marked_sample() -> tuple[Image.Image, dict]:
    """A 100x50 black image with a white box at (10, 5)-(30, 25) and that box as target."""
    pixels = np.zeros((50, 100, 3), dtype=np.uint8)
    pixels[5:25, 10:30] = 255
    target = {"boxes": tv_tensors.BoundingBoxes([[10.0, 5, 30, 25]], format="XYXY", canvas_size=(50, 100)),
              "labels": torch.tensor([1]), "image_id": 3, "orig_size": (50, 100),
              "ignore_boxes": tv_tensors.BoundingBoxes([[0.0, 0, 10, 10]], format="XYXY", canvas_size=(50, 100))}
    return Image.fromarray(pixels), target


def test_flip_and_resize_match_hand_computation():
    image, target = _marked_sample()
    tf = Compose([ToImage(), RandomHorizontalFlip(p=1.0), Resize(25), ToDtype(torch.float32, scale=True)])
    out, t = tf(image, target)
    # flip: x -> 100 - x gives (70, 5, 90, 25); resize shorter side 50 -> 25 halves everything
    assert out.shape == (3, 25, 50)
    torch.testing.assert_close(t["boxes"].as_subclass(torch.Tensor), torch.tensor([[35.0, 2.5, 45, 12.5]]))
    torch.testing.assert_close(t["ignore_boxes"].as_subclass(torch.Tensor), torch.tensor([[45.0, 0, 50, 5]]))
    assert float(out[:, 4:11, 37:44].min()) > 0.9 and float(out[:, 15:, :].max()) < 0.1
    assert t["labels"].tolist() == [1] and t["image_id"] == 3 and t["orig_size"] == (50, 100)


def test_detection_transforms_keep_boxes_on_the_object():
    torch.manual_seed(0)
    image, target = _marked_sample()
    seen = set()
    for _ in range(12):
        out, t = detection_transforms(train=True, size=25)(image, target)
        x1, y1, x2, y2 = t["boxes"][0].tolist()
        seen.add(round(x1))
        assert (round(x1), y1, round(x2), y2) in {(5, 2.5, 15, 12.5), (35, 2.5, 45, 12.5)}
        inner = out[:, int(y1) + 1:int(y2) - 1, round(x1) + 1:round(x2) - 1]
        assert float(inner.min()) > 0.9
    assert seen == {5, 35}  # both flipped and unflipped were drawn
    out, t = detection_transforms(train=False)(image, target)
    assert out.dtype == torch.float32 and out.shape == (3, 50, 100) and float(out.max()) == 1.0
    torch.testing.assert_close(t["boxes"].as_subclass(torch.Tensor), torch.tensor([[10.0, 5, 30, 25]]))
    out, _ = detection_transforms(train=False, normalize=True)(image, target)
    torch.testing.assert_close(out[:, 0, 0], -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225]))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(*[st.floats(-20, 120, allow_nan=False)] * 4), max_size=6), st.integers(10, 60))
def test_flip_resize_property(rows, size):
    boxes = torch.tensor([[min(a, c), min(b, d), max(a, c), max(b, d)] for a, b, c, d in rows]).reshape(-1, 4)
    boxes = boxes.clamp(min=0).clamp(max=torch.tensor([100.0, 50, 100, 50]))
    target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(50, 100))}
    tf = Compose([ToImage(), RandomHorizontalFlip(p=1.0), Resize(size)])
    out, t = tf(Image.new("RGB", (100, 50)), target)
    sy, sx = out.shape[-2] / 50, out.shape[-1] / 100
    expected = torch.stack([(100 - boxes[:, 2]) * sx, boxes[:, 1] * sy, (100 - boxes[:, 0]) * sx, boxes[:, 3] * sy], 1)
    torch.testing.assert_close(t["boxes"].as_subclass(torch.Tensor), expected, atol=1e-4, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(*[st.floats(-1e3, 1e3, allow_nan=False)] * 4), max_size=8))
def test_sanitizer_property(rows):
    boxes = np.asarray(rows, dtype=np.float32).reshape(-1, 4)
    sanitize = BoxSanitizer(Path("x.json"))
    clipped, keep = sanitize(boxes, 40, 30, [f"r{i}" for i in range(len(boxes))])
    assert (clipped[:, 0::2] >= 0).all() and (clipped[:, 0::2] <= 40).all()
    assert (clipped[:, 1::2] >= 0).all() and (clipped[:, 1::2] <= 30).all()
    area_ok = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    assert (keep == area_ok).all() and len(sanitize.dropped) == int((~keep).sum())


def test_collate_and_empty_image_trains_a_detector(tmp_path):
    ds = CocoDetectionDataset(*_coco_fixture(tmp_path), transforms=detection_transforms(train=True))
    images, targets = collate_fn([ds[2], ds[0]])
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == 2
    assert targets[0]["boxes"].shape == (0, 4) and targets[1]["image_id"] == 10
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 4, 1), torch.nn.ReLU())
    backbone.out_channels = 8
    anchors = AnchorGenerator(sizes=((8, 16),), aspect_ratios=((1.0,),))
    model = RetinaNet(backbone, num_classes=3, anchor_generator=anchors, min_size=32, max_size=64)
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    losses = model(images[:1], targets[:1])  # only the empty image
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
