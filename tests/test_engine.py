"""Engine: checkpoints, stage 1, COCO evaluation, end to end (resume and DDP: test_resume.py)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

from liaf_lab.utils.figures import plot_run_curves
from liaf_lab.data import CocoDetectionDataset, collate_fn, detection_transforms
from liaf_lab.distillers import LIAFDistiller
from liaf_lab.engine import (
    CheckpointError, TrainConfig, coco_metrics, evaluate_coco, inherit_neck_and_head, learn_stage1, stage1_stats, load_checkpoint,
    save_checkpoint, train_detector,
)
from liaf_lab.engine.schedule import lr_factor
from liaf_lab.models import create_detector, fpn_strides


def _dataset(root: Path, split: str, train: bool) -> CocoDetectionDataset:
    return CocoDetectionDataset(root / split, root / "annotations" / f"instances_{split}.json",
                                detection_transforms(train=train))


def _detector(num_classes: int, width: float = 0.125, fpn: int = 8) -> torch.nn.Module:
    return create_detector("retinanet", num_classes, depth=18, width_mult=width, fpn_channels=fpn,
                           min_size=64, max_size=64)


# -- checkpoints -----------------------------------------------------------------------------------
def test_checkpoint_round_trip_leaves_no_temporary_file(tmp_path):
    state = {"w": torch.arange(5.0), "iteration": 3, "nested": {"lr": 0.1}}
    save_checkpoint(tmp_path / "c.pt", state)
    save_checkpoint(tmp_path / "c.pt", {**state, "iteration": 4})
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["iteration"] == 4 and torch.equal(loaded["w"], state["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_truncated_missing_and_pickled_checkpoints_give_clear_errors(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"w": torch.randn(1000)})
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.pt is truncated or corrupt") as err:
        load_checkpoint(tmp_path / "trunc.pt")
    assert "previous" not in str(err.value)  # no advice to restart from a checkpoint that may not exist
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    # An arbitrary pickled object is refused by weights_only=True loading, and named as such.
    torch.save({"obj": pickle.loads(pickle.dumps(Path("x")))}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt is not a plain weights file") as err:
        load_checkpoint(tmp_path / "evil.pt")
    assert "weights_only=False" not in str(err.value) and "never unpickles" in str(err.value)


def test_load_module_state_names_the_file_and_what_it_should_hold(tmp_path):
    from liaf_lab.utils.checkpoint import load_module_state

    module = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match=r"sel.pt does not hold the selectors: missing \['bias'\]"):
        load_module_state(module, {"weight": torch.zeros(2, 3)}, tmp_path / "sel.pt", "the selectors")
    with pytest.raises(CheckpointError, match=r"shape of \['weight \(3, 3\) \(expected \(2, 3\)\)'\]"):
        load_module_state(module, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}, "sel.pt", "the selectors")
    with pytest.raises(CheckpointError, match="sel.pt is not a state dict of the selectors"):
        load_module_state(module, {"modules": {}}, "sel.pt", "the selectors")


def test_lr_schedule_warmup_step_cosine():
    assert lr_factor(0, 100, 10, "constant") == pytest.approx(0.1)
    assert lr_factor(50, 100, 10, "constant") == 1.0
    assert lr_factor(70, 100, 0, "step") == pytest.approx(0.1)
    assert lr_factor(95, 100, 0, "step") == pytest.approx(0.01)
    assert lr_factor(100, 100, 0, "cosine") == pytest.approx(0.0)
    assert lr_factor(50, 100, 0, "cosine") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 10, 0, "linear")


# -- stage 1 and training on real detectors ------------------------------------------------------------
def test_stage1_trains_only_the_selectors(tiny_data, tmp_path):
    train = _dataset(tiny_data, "train", train=False)
    nc = len(train.class_names) + 1
    torch.manual_seed(0)
    teacher = _detector(nc, width=0.25, fpn=16)
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller = LIAFDistiller(8, 16, fpn_strides(teacher), num_selectors=3)
    before = {k: v.clone() for k, v in distiller.state_dict().items()}
    cfg = TrainConfig(iterations=3, batch_size=2, optimizer="adam", lr=0.01, warmup=0, checkpoint_every=10)
    result = learn_stage1(teacher, distiller, train, cfg, out_dir=tmp_path, device="cpu")
    assert "diversity" in result.final_losses and "liaf_classification" in result.final_losses
    for k, v in teacher.state_dict().items():  # frozen, BatchNorm statistics included
        assert torch.equal(v, before_teacher[k]), k
    changed = {k for k, v in distiller.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"selectors.{lvl}.weight" for lvl in distiller.levels} | {"stage1_steps"}
    assert distiller.stage1_ready and int(distiller.stage1_steps) == 3
    # after stage 1: each selector's score entropy per image, averaged over the images with >= 2 boxes
    stats = json.loads((tmp_path / "stage1_stats.json").read_text())
    assert set(stats) == {f"selector_entropy_{lvl}" for lvl in distiller.levels}
    again = stage1_stats(teacher, distiller, train, device="cpu", batch_size=3)
    multi = sum(len(train[i][1]["boxes"]) >= 2 for i in range(len(train)))
    for name, entry in stats.items():
        assert len(entry["mean"]) == 3 and entry["images"] == [multi] * 3
        assert all(0 <= h <= 1 for h in entry["mean"])
        assert again[name]["mean"] == pytest.approx(entry["mean"])  # the batch size changes nothing


def test_training_lowers_the_loss_and_evaluation_reports_coco_metrics(tiny_data, tmp_path):
    train = _dataset(tiny_data, "train", train=False)
    val = _dataset(tiny_data, "val", train=False)
    torch.manual_seed(0)
    model = _detector(len(train.class_names) + 1, width=0.25, fpn=16)
    cfg = TrainConfig(iterations=30, batch_size=4, lr=0.05, warmup=0, schedule="constant", log_every=1,
                      checkpoint_every=100, eval_every=15)
    result = train_detector(model, Subset(train, range(4)), cfg, out_dir=tmp_path, device="cpu",  # overfit one batch
                            val_dataset=val)
    assert [e["iteration"] for e in result.evaluations] == [15]
    assert json.loads((tmp_path / "evaluations.jsonl").read_text())["iteration"] == 15
    assert not (tmp_path / "curves.png").exists()  # the engine draws nothing; the experiment layer does
    assert plot_run_curves(tmp_path) == [tmp_path / "curves.png"]
    assert (tmp_path / "curves.png").stat().st_size > 0
    losses = [float(r.split(",")[2]) for r in (tmp_path / "metrics.csv").read_text().splitlines()[1:]]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    metrics = evaluate_coco(model, val, collate_fn, batch_size=2, out_json=tmp_path / "eval.json")
    assert set(json.loads((tmp_path / "eval.json").read_text())) >= {"AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L",
                                                                      "AR100", "AR_S", "AR_M", "AR_L"}
    assert all(-1 <= metrics[k] <= 1 for k in ("AP", "AP50", "AR100"))


def test_coco_metrics_perfect_and_empty_predictions(tiny_data):
    val = _dataset(tiny_data, "val", train=False)
    gt = val.coco_gt()
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt.dataset["annotations"] if not a.get("iscrowd", 0)]
    assert coco_metrics(gt, perfect)["AP50"] == pytest.approx(1.0)
    assert coco_metrics(gt, [])["AP"] == 0.0


def test_detections_of_the_background_class_are_left_out(tiny_data):
    """torchvision's dense heads keep a logit for label 0 (background); a student may score it (a DeFeat
    student did on the bench set). It has no category: left out, as COCOeval would ignore it."""
    from liaf_lab.engine import predict_coco

    val = _dataset(tiny_data, "val", train=False)

    class Fixed(torch.nn.Module):
        def forward(self, images):
            box = torch.tensor([[1.0, 2.0, 11.0, 12.0]] * 2)
            return [{"boxes": box, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])} for _ in images]

    results = predict_coco(Fixed(), val, collate_fn, batch_size=2)
    assert len(results) == len(val) and {r["category_id"] for r in results} == {val.label_to_cat_id[1]}


def test_quick_demo_end_to_end(tiny_data, tmp_path):
    from liaf_lab.experiments.demo import run_demo

    overrides = [f"data.train_images='{tiny_data / 'train'}'",
                 f"data.train_ann='{tiny_data / 'annotations' / 'instances_train.json'}'",
                 f"data.val_images='{tiny_data / 'val'}'",
                 f"data.val_ann='{tiny_data / 'annotations' / 'instances_val.json'}'",
                 "input.min_size=64", "input.max_size=64"]
    results = run_demo(tmp_path, "tiny", seeds=(0,), overrides=overrides, device="cpu", teacher_weights=None,
                       quick=True)
    assert set(results["students"]) == {"none", "fitnet", "liaf"}
    report = (tmp_path / "report.md").read_text()
    assert "Student + LIAF-KD" in report and "| Teacher |" in report
    assert "## The measured answer: the shipped study" in report and "`data_samples/studies/tiny6`" in report
    assert "| liaf − none | 6 |" in report and "changed the 'tiny' preset (quick mode" in report
    assert (tmp_path / "ap.png").stat().st_size > 0 and (tmp_path / "losses_seed0.png").stat().st_size > 0
    # the demo is a small study: its runs, rows and report are those of a study folder, which resumes as one
    study = tmp_path / "study"
    assert (study / "runs" / "liaf" / "default" / "seed0" / "stage1" / "last.pt").exists()
    assert all((study / run / "curves.png").exists()
               for run in ("teacher", "runs/none/default/seed0", "runs/liaf/default/seed0/stage1"))
    rows = json.loads((study / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in rows] == [("none", 0), ("fitnet", 0), ("liaf", 0)]
    assert [r["AP"] for r in results["students"]["liaf"]] == [rows[2]["val_AP"]]
    assert "# Study report" in (study / "report.md").read_text()
    again = run_demo(tmp_path, "tiny", seeds=(0,), overrides=overrides, device="cpu", teacher_weights=None,
                     quick=True)
    assert again["students"] == results["students"]  # resumed: the finished runs are read back, not retrained
    from liaf_lab.experiments.config import resolve_config
    from liaf_lab.experiments.demo import export_checkpoints, load_demo_models

    written = export_checkpoints(tmp_path, tmp_path / "shipped")  # what data_samples/checkpoints holds
    assert sorted(p.name for p in written) == ["liaf_distiller.pt", "student_fitnet.pt", "student_liaf.pt",
                                               "student_none.pt", "teacher_tiny.pt"]
    models = load_demo_models(resolve_config("tiny", overrides), tmp_path / "shipped")
    assert models["distiller"].stage1_steps.item() == 2 and not models["liaf"].training


def test_inheritance_copies_matching_neck_and_head_only(tiny_data):
    nc = len(_dataset(tiny_data, "train", train=False).class_names) + 1
    torch.manual_seed(0)
    teacher = create_detector("fcos", nc, depth=34, width_mult=0.25, fpn_channels=16, min_size=64, max_size=64)

    same_neck = create_detector("fcos", nc, depth=18, width_mult=0.125, fpn_channels=16, min_size=64, max_size=64)
    copied = inherit_neck_and_head(same_neck, teacher)
    assert copied and all(k.startswith(("backbone.fpn.", "head.")) for k in copied)
    t_state, s_state = teacher.state_dict(), same_neck.state_dict()
    assert all(torch.equal(s_state[k], t_state[k]) for k in copied)
    # The FPN's input convs see different backbone widths, so they are not copied; the head is.
    assert any(k.startswith("head.") for k in copied)
    assert not any(k.startswith("backbone.body.") for k in copied)
    # Per tensor, as mmdetection's non-strict loading: a thinner neck keeps only the output biases.
    thin = create_detector("fcos", nc, depth=18, width_mult=0.125, fpn_channels=8, min_size=64, max_size=64)
    thin_copied = inherit_neck_and_head(thin, teacher)
    assert thin_copied and all(teacher.state_dict()[k].dim() == 1 for k in thin_copied)
    assert not any(k.startswith("backbone.fpn.") for k in thin_copied)


def test_a_no_kd_student_inherits_like_a_distilled_one(tiny_data, tmp_path):
    """``train_detector(inherit_from=teacher)`` = inherit, then train; a resumed run does not inherit again."""
    train = _dataset(tiny_data, "train", train=True)
    nc = len(train.class_names) + 1
    torch.manual_seed(0)
    teacher = create_detector("fcos", nc, depth=34, width_mult=0.25, fpn_channels=16, min_size=64, max_size=64)

    def make():
        return create_detector("fcos", nc, depth=18, width_mult=0.125, fpn_channels=16, min_size=64, max_size=64)

    cfg = TrainConfig(iterations=2, batch_size=2, warmup=0, checkpoint_every=1, log_every=1)
    torch.manual_seed(1)
    inherited = make()
    torch.manual_seed(1)
    by_hand, scratch = make(), None
    torch.manual_seed(1)
    scratch = make()
    train_detector(inherited, train, cfg, tmp_path / "a", inherit_from=teacher)
    inherit_neck_and_head(by_hand, teacher)
    train_detector(by_hand, train, cfg, tmp_path / "b")
    train_detector(scratch, train, cfg, tmp_path / "c")
    a, b, c = inherited.state_dict(), by_hand.state_dict(), scratch.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if k.startswith("head."))
    # resuming the finished run: the checkpoint's weights stand, nothing is copied over them
    torch.manual_seed(1)
    again = make()
    train_detector(again, train, cfg, tmp_path / "a", inherit_from=make())
    assert all(torch.equal(again.state_dict()[k], a[k]) for k in a)


def test_evaluation_does_not_draw_from_the_training_rng(tiny_data):
    val = _dataset(tiny_data, "val", train=False)
    model = _detector(len(val.class_names) + 1)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    evaluate_coco(model, val, collate_fn, batch_size=2)
    assert torch.equal(torch.rand(3), expected)


def test_paper_preset_builds_and_takes_a_distillation_step():
    """The paper preset (RetinaNet R101 teacher, R50 student, 256-ch FPN), shrunk only in input size."""
    from liaf_lab.experiments.builders import build_detector, build_distiller
    from liaf_lab.experiments.config import load_config
    from liaf_lab.engine.steps import DistillStep

    small = ["input.min_size=128", "input.max_size=128"]
    cfg = load_config("paper", small)
    assert (cfg["teacher"]["depth"], cfg["student"]["depth"], cfg["kd"]["liaf"]["num_selectors"]) == (101, 50, 6)
    torch.manual_seed(0)
    teacher, student = build_detector(cfg, "teacher", 81), build_detector(cfg, "student", 81)
    distiller = build_distiller("liaf", cfg, student)
    assert distiller.strides == {"0": 8.0, "1": 16.0, "2": 32.0, "p6": 64.0, "p7": 128.0}
    images = [torch.rand(3, 128, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 90.0, 100.0]]), "labels": torch.tensor([3])}]
    losses = DistillStep(student, teacher, distiller).train()(images, targets)
    assert all(torch.isfinite(v) for v in losses.values()) and "kd_liaf" in losses
