"""Issue 27: nothing silently wrong, nothing wedged. Studies that know their inputs and survive damage, one folder
lock, workers that die with their parent, checkpoint recoveries, one-line errors, loaders that stay in their folder,
buffers in the divergence guard. Each test reproduces a case the issue reported."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import liaf_lab
import liaf_lab.utils.version
from liaf_lab.utils.atomic import DiskFullError, RecordError, write_json
from liaf_lab.utils.checkpoint import CheckpointError, load_checkpoint
from liaf_lab.cli import main
from liaf_lab.data import CocoDetectionDataset, DatasetWarning, VOCDataset
from liaf_lab.engine import TrainConfig, evaluate_coco, fit
from liaf_lab.engine.loop import NonFiniteError
from liaf_lab.distillers.instance import instance_mask
from liaf_lab.models import create_detector
from liaf_lab.utils.processes import FolderLock
from liaf_lab.experiments.study import Run, StudyError, run_one, run_study

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import _one_error_line  # noqa: E402
from test_data import _coco_fixture, _image, _voc_fixture, _voc_xml  # noqa: E402
from test_study import TEACHER  # noqa: E402
from toy_job import FlippedPoints, LinearStep, collate  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(Path(liaf_lab.__file__).parents[1]), "OMP_NUM_THREADS": "1"}


def _other_teacher(path: Path) -> Path:
    """The shipped teacher with one weight changed: another teacher of the same architecture."""
    state = load_checkpoint(TEACHER)  # a plain state dict
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key] + 1.0
    torch.save(state, path)
    return path


# -- studies know their inputs -----------------------------------------------------------------------------------
def test_a_study_refuses_another_teacher_other_data_or_version_and_redoes_damaged_runs(tmp_path, small,
                                                                                        monkeypatch):
    out = tmp_path / "study"
    kw = dict(config="bench", methods=["none", "fitnet"], seeds=[0], overrides=small, device="cpu")
    first = run_study(out, teacher_weights=str(TEACHER), **kw)
    record = json.loads((out / "study.json").read_text())["inputs"]
    assert record["teacher"]["sha256"] and set(record["data"]) == {"train", "val", "test"}
    assert record["version"] == liaf_lab.__version__
    run_record = json.loads((out / "runs/fitnet/default/seed0/record.json").read_text())["run_config"]["inputs"]
    assert run_record["teacher_sha256"] == record["teacher"]["sha256"] and run_record["data"] == record["data"]
    # another teacher: other weights at another path, the same weights at another path, or other weights in place
    other = _other_teacher(tmp_path / "other.pt")
    with pytest.raises(StudyError, match=r"another teacher \(inputs.teacher.path: .* inputs.teacher.sha256: "):
        run_study(out, teacher_weights=str(other), **kw)
    with pytest.raises(StudyError, match="another teacher"):  # extending it with a seed is refused too
        run_study(out, teacher_weights=str(other), **{**kw, "seeds": [0, 1]})
    assert not (out / "runs/fitnet/default/seed1").exists()
    moved = shutil.copy(TEACHER, tmp_path / "copy.pt")
    with pytest.raises(StudyError, match="inputs.teacher.path"):
        run_study(out, teacher_weights=str(moved), **kw)
    # other data as read (an annotation file changed under the same config)
    val_ann = next((tmp_path / "cache").glob("shapes-*/annotations/instances_val.json"))
    original = val_ann.read_text()
    data = json.loads(original)
    data["annotations"] = data["annotations"][1:]
    val_ann.write_text(json.dumps(data))
    with pytest.raises(StudyError, match=r"other inputs \(inputs.data.val: '[0-9a-f]+' in the folder"):
        run_study(out, teacher_weights=str(TEACHER), **kw)
    val_ann.write_text(original)
    monkeypatch.setattr(liaf_lab.utils.version, "__version__", "9.9.9")
    with pytest.raises(StudyError, match="inputs.version: '.*' in the folder, '9.9.9' now"):
        run_study(out, teacher_weights=str(TEACHER), **kw)
    monkeypatch.undo()
    # damaged runs: a 0-byte result (a kill before atomic writes), a deleted student: redone, same rows
    (out / "runs/none/default/seed0/result.json").write_text("")
    (out / "runs/fitnet/default/seed0/student.pt").unlink()
    with pytest.warns(UserWarning, match="is damaged") as warned:
        again = run_study(out, teacher_weights=str(TEACHER), **kw)
    assert len([w for w in warned if "is damaged" in str(w.message)]) == 2
    strip = [{k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds")} for r in first.rows]
    assert strip == [{k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds")} for r in again.rows]
    # a damaged study record is named
    (out / "study.json").write_text("")
    with pytest.raises(RecordError, match=f"study record {out / 'study.json'} is damaged"):
        run_study(out, teacher_weights=str(TEACHER), **kw)


def test_a_study_from_before_input_records_is_adopted_and_still_refuses_another_teacher(tmp_path, small):
    out = tmp_path / "study"
    kw = dict(config="bench", methods=["none", "fitnet"], seeds=[0], overrides=small, device="cpu")
    first = run_study(out, teacher_weights=str(TEACHER), **kw)
    study = json.loads((out / "study.json").read_text())  # make it a folder of the previous version
    del study["inputs"]
    (out / "study.json").write_text(json.dumps(study))
    for run in (out / "runs").glob("*/*/seed0"):
        (run / "record.json").unlink()
        record = json.loads((run / "run.json").read_text())
        del record["spec"]["config"]["inputs"]
        (run / "run.json").write_text(json.dumps(record))
    moved = shutil.copy(TEACHER, tmp_path / "copy.pt")
    with pytest.warns(UserWarning, match="predates input records"):
        with pytest.raises(StudyError, match=r"another teacher \(inputs.teacher.path: '.*teacher_tiny.pt' in the "
                                             r"folder, '.*copy.pt' now"):
            run_study(out, teacher_weights=moved, **kw)
    (out / "study.json").write_text(json.dumps(study))
    with pytest.raises(StudyError, match=r"runs/fitnet/default/seed0 finished with another configuration .*"
                                         r"config.teacher: '.*teacher_tiny.pt' in the folder, '.*copy.pt' now"):
        run_one(str(out), "bench", small, Run((), 0, "fitnet"), moved, "cpu", 1)  # each run checks it too
    with pytest.warns(UserWarning, match="predates input records"):
        again = run_study(out, teacher_weights=str(TEACHER), **kw)
    assert again.rows == first.rows  # adopted as they were, not trained again
    assert (out / "runs/fitnet/default/seed0/record.json").exists()


def test_a_bad_teacher_is_found_before_any_run_trains(tmp_path, small):
    text = tmp_path / "teacher.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match=f"checkpoint {text} is not a plain weights file .* or it is damaged"):
        run_study(tmp_path / "s", "bench", ["none", "fitnet"], [0], overrides=small, device="cpu",
                  teacher_weights=str(text))
    assert not (tmp_path / "s" / "runs").exists()


# -- one process per study folder; workers die with their parent ----------------------------------------------
def test_a_second_study_on_a_folder_is_refused_with_the_holders_pid(tmp_path, small):
    out = tmp_path / "s"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from liaf_lab.utils.processes import FolderLock
        with FolderLock({str(out)!r}):
            print("locked", flush=True)
            time.sleep(60)
        """)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StudyError, match=f"is in use by process {holder.pid} "):
            run_study(out, "bench", ["none"], [0], overrides=small, device="cpu")
    finally:
        holder.kill()
        holder.wait()
    with FolderLock(out):  # released by the kill: the OS drops the lock of a dead process
        pass


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, counts as dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_study_workers_stop_when_the_study_process_is_killed(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import os, time
        from liaf_lab.experiments.executors import local_pool
        pool = local_pool(1)
        print(pool.submit(os.getpid).result(), flush=True)
        pool.submit(time.sleep, 120)
        time.sleep(120)
        """)], env=ENV, stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    assert _alive(worker)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = _alive(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive, "the worker outlived its killed parent"


# -- atomic writes ----------------------------------------------------------------------------------------------
def test_a_write_killed_midway_leaves_the_previous_file(tmp_path):
    path = tmp_path / "result.json"
    write_json(path, {"AP": 0.5})
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal
        from liaf_lab.utils.atomic import atomic_write
        with atomic_write({str(path)!r}) as f:
            f.write('{{"AP": 0.')
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        """)], env=ENV)
    assert killed.returncode == -signal.SIGKILL
    assert json.loads(path.read_text()) == {"AP": 0.5}


# -- checkpoints: recoveries and one-line errors ----------------------------------------------------------------
def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(iterations=3, batch_size=4, lr=0.05, warmup=0, schedule="constant", grad_clip=None,
                                 log_every=1, checkpoint_every=1, seed=0), **kw})


def _fit(out: Path, cfg: TrainConfig, step: nn.Module | None = None, modules: dict | None = None):
    torch.manual_seed(0)  # the same initial weights for every run
    step = step if step is not None else LinearStep()
    return fit(step, modules or {"linear": step.linear}, FlippedPoints(), collate, cfg, out_dir=out, device="cpu")


@pytest.mark.parametrize("damage", [
    "hello world\n".encode(),  # arbitrary bytes: torch's weights-only unpickler raised a KeyError
    "a plain state dict",  # loads, but is no run checkpoint
])
def test_last_pt_damaged_in_any_way_falls_back_to_last_prev_pt(tmp_path, damage):
    _fit(tmp_path / "a", _cfg())
    _fit(tmp_path / "b", _cfg())
    if isinstance(damage, bytes):
        (tmp_path / "b" / "last.pt").write_bytes(damage)
    else:
        torch.save(LinearStep().state_dict(), tmp_path / "b" / "last.pt")
    with pytest.warns(UserWarning, match="resuming from the previous checkpoint"):
        assert _fit(tmp_path / "b", _cfg()).iterations == 3
    a, b = (load_checkpoint(tmp_path / x / "last.pt")["modules"]["linear"] for x in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)  # iteration 3 redone from last.prev.pt: the same run


def test_a_full_disk_during_a_checkpoint_write_names_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_save, saves = torch.save, {"n": 0}

    class FullDisk(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    def filling_save(obj, f, *args, **kwargs):
        saves["n"] += 1
        real_save(obj, FullDisk() if saves["n"] == 3 else f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", filling_save)
    with pytest.raises(DiskFullError) as info:
        _fit(tmp_path, _cfg())
    assert str(info.value) == (f"no space left writing {tmp_path / 'last.pt'} at iteration 3; the last good "
                               f"checkpoint is iteration 2 ({tmp_path / 'last.pt'}), which a rerun resumes from")
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 2  # the previous checkpoints survive
    assert load_checkpoint(tmp_path / "last.prev.pt")["iteration"] == 1
    assert not list(tmp_path.glob(".*.tmp"))
    assert isinstance(info.value, OSError)  # a user error of the CLI (USER_ERRORS): one line, exit 2


@pytest.fixture(scope="module")
def bad_weights(tmp_path_factory) -> dict[str, Path]:
    """Files given as --weights: a text file, and plain state dicts of another architecture."""
    root = tmp_path_factory.mktemp("weights")
    state = load_checkpoint(TEACHER)  # a plain state dict
    key = next(k for k, v in state.items() if v.dim() == 4)
    files = {"text": root / "teacher.txt"}
    files["text"].write_text("a text file\n")
    for name, bad in {"missing": {k: v for k, v in state.items() if k != key},
                      "extra": {**state, "extra.weight": torch.zeros(1)},
                      "shape": {**state, key: torch.zeros(1, *state[key].shape[1:])}}.items():
        files[name] = root / f"{name}.pt"
        torch.save(bad, files[name])
    return files


@pytest.mark.parametrize("kind, message", [
    ("text", "expected a file written by torch.save"),
    ("missing", "does not hold the weights of this "),
    ("extra", "unexpected ['extra.weight']"), ("shape", "shape of"),
])
def test_bad_weights_files_are_one_line_errors(kind, message, bad_weights, capsys):
    assert main(["evaluate", "--role", "teacher", "--weights", str(bad_weights[kind])]) == 2
    line = _one_error_line(capsys)
    assert str(bad_weights[kind]) in line and message in line


def test_a_text_file_as_teacher_is_a_one_line_error(tmp_path, bad_weights, capsys):
    assert main(["distill", "--method", "fitnet", "--teacher", str(bad_weights["text"]), "--out",
                 str(tmp_path)]) == 2
    assert str(bad_weights["text"]) in _one_error_line(capsys)


def test_new_schedule_extends_a_finished_cli_run(tmp_path, capsys):
    args = ["distill", "--method", "none", "--set", "distill.batch_size=2", "--set", "distill.warmup=0", "--out",
            str(tmp_path)]
    assert main([*args, "--set", "distill.iterations=2"]) == 0
    capsys.readouterr()
    assert main([*args, "--set", "distill.iterations=3"]) == 2  # without the flag: refused, naming the key
    assert "distill.iterations: 2 in the folder, 3 now" in _one_error_line(capsys)
    assert main([*args, "--set", "distill.iterations=3", "--new-schedule"]) == 0
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 3
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["schedule_changes"][0]["changed"]["train.iterations"] == [2, 3]


def test_an_empty_image_file_is_a_one_line_error(tmp_path, capsys):
    image_dir, ann_file = _coco_fixture(tmp_path)
    (image_dir / "a.png").write_bytes(b"")
    assert main(["evaluate", "--weights", str(TEACHER), "--role", "teacher", "--set", f"data.val_images='{image_dir}'",
                 "--set", f"data.val_ann='{ann_file}'", "--set", f"data.train_images='{image_dir}'",
                 "--set", f"data.train_ann='{ann_file}'"]) == 2
    line = _one_error_line(capsys)
    assert f"cannot read image {image_dir / 'a.png'} (image id 10" in line


def test_size_and_stride_are_checked_even_without_validation():
    boxes = [torch.tensor([[0.0, 0, 4, 4]])]
    with pytest.raises(ValueError, match=r"size must be a feature grid \(H, W\) of two non-negative ints, got \(-2, 4\)"):
        instance_mask(boxes, torch.ones(1), (-2, 4), 8.0, validate=False)
    with pytest.raises(ValueError, match="stride must be positive"):
        instance_mask(boxes, torch.ones(1), (2, 4), -8.0, validate=False)


# -- loaders ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("escape", ["../outside/x.png", "ABSOLUTE"])
def test_coco_images_outside_the_image_folder_need_explicit_permission(tmp_path, escape):
    _image(tmp_path / "outside" / "x.png", 40, 30)
    name = str(tmp_path / "outside" / "x.png") if escape == "ABSOLUTE" else escape
    image_dir, ann_file = _coco_fixture(tmp_path, [])
    data = json.loads(ann_file.read_text())
    data["images"][0]["file_name"] = name
    ann_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"image {name!r} .*image id 10.* lies outside the image folder {image_dir}"):
        CocoDetectionDataset(image_dir, ann_file)
    with pytest.warns(DatasetWarning):  # no annotations
        ds = CocoDetectionDataset(image_dir, ann_file, allow_outside_images=True)
    assert ds.records[0].path == image_dir / name


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    image_dir, ann_file = _coco_fixture(tmp_path)
    values = np.full((30, 40), 32768, dtype=np.uint16)  # half of full scale
    Image.fromarray(values).save(image_dir / "a.png")
    assert Image.open(image_dir / "a.png").mode.startswith("I")
    image, _ = CocoDetectionDataset(image_dir, ann_file)[0]
    assert torch.allclose(image, torch.full_like(image, 128 / 255))  # PIL's convert("RGB") made it 255: white
    Image.fromarray(np.zeros((30, 40), dtype=np.float32)).save(image_dir / "b.tiff")
    data = json.loads(ann_file.read_text())
    data["images"][1]["file_name"] = "b.tiff"
    ann_file.write_text(json.dumps(data))
    with pytest.raises(OSError, match="b.tiff .*32-bit float pixels have no known range"):
        CocoDetectionDataset(image_dir, ann_file)


def test_an_image_of_extreme_aspect_ratio_is_named_before_evaluation(tmp_path):
    image_dir, ann_file = _coco_fixture(tmp_path, [])
    _image(image_dir / "a.png", 10000, 10)
    data = json.loads(ann_file.read_text())
    data["images"][0].update(width=10000, height=10)
    ann_file.write_text(json.dumps(data))
    with pytest.warns(DatasetWarning):
        ds = CocoDetectionDataset(image_dir, ann_file)
    model = create_detector("retinanet", 3, depth=18, width_mult=0.125, fpn_channels=16, min_size=64, max_size=107).eval()
    with pytest.raises(ValueError, match=r"image .*a.png \(image id 10\) is 10000x10: the model resizes it to a "
                                         r"shorter side of 0 px .* less than its finest feature stride 8"):
        evaluate_coco(model, ds)


def test_one_file_under_two_image_ids_is_an_error(tmp_path):
    image_dir, ann_file = _coco_fixture(tmp_path)
    data = json.loads(ann_file.read_text())
    data["images"][1].update(file_name="a.png", width=40, height=30)
    ann_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"image file .*a.png is listed under image ids 10, 11"):
        CocoDetectionDataset(image_dir, ann_file)


def test_voc_declared_classes_that_never_occur_and_empty_names(tmp_path):
    root = _voc_fixture(tmp_path / "a", {"x": [("dog", (1, 1, 20, 15), 0)]})
    with pytest.warns(DatasetWarning, match=r"classes \['cat'\] of .*train.txt occur in none of its 1 images"):
        VOCDataset(root, classes=["dog", "cat"])
    root = _voc_fixture(tmp_path / "b", {"x": [("dog", (1, 1, 20, 15), 0)]})
    (root / "Annotations" / "x.xml").write_text(_voc_xml([(" ", (1, 1, 20, 15), 0)]))
    with pytest.raises(ValueError, match=r"x.xml: object 1 has an empty or missing <name>"):
        VOCDataset(root)


# -- the divergence guard watches buffers -------------------------------------------------------------------------
class ExplodingBatchNorm(LinearStep):
    """Small weights, but BatchNorm statistics of inputs scaled by 1e6 (as a run at lr 1e3 gave)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(4)

    def forward(self, xs, targets):
        pred = self.linear(self.norm(1e6 * torch.stack(xs))).squeeze(1)
        return {"mse": ((pred - torch.stack([t["y"] for t in targets])) ** 2).mean()}


def test_diverged_batchnorm_statistics_stop_the_run(tmp_path):
    step = ExplodingBatchNorm()
    with pytest.raises(NonFiniteError, match="the weights diverged .* parameters and buffers"):
        _fit(tmp_path, _cfg(), step=step, modules={"linear": step.linear, "norm": step.norm})
    assert not (tmp_path / "last.pt").exists()


def test_a_damaged_optimizer_state_falls_back_to_last_prev_pt(tmp_path):
    """A checkpoint whose modules are whole but whose optimizer state does not fit the run (a momentum of another
    shape, a missing parameter) is damaged like any other: the run resumes from last.prev.pt, bit for bit."""
    _fit(tmp_path / "a", _cfg())
    for name, damage in (("b", "shape"), ("c", "count")):
        _fit(tmp_path / name, _cfg())
        state = load_checkpoint(tmp_path / name / "last.pt")
        momenta = state["optimizer"]["state"]
        if damage == "shape":
            first = next(iter(momenta))
            momenta[first] = {k: torch.zeros(7) if isinstance(v, torch.Tensor) else v for k, v in momenta[first].items()}
        else:
            state["optimizer"]["param_groups"][0]["params"] = state["optimizer"]["param_groups"][0]["params"][:-1]
        torch.save(state, tmp_path / name / "last.pt")
        with pytest.warns(UserWarning, match="optimizer state .*resuming from the previous checkpoint"):
            assert _fit(tmp_path / name, _cfg()).iterations == 3
        a, b = (load_checkpoint(tmp_path / x / "last.pt")["modules"]["linear"] for x in ("a", name))
        assert all(torch.equal(a[k], b[k]) for k in a)
