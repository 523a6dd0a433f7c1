"""``liaf-lab`` in-process: wrong config values and options are one ``error:`` line and exit code 2."""

from pathlib import Path

import pytest

from liaf_lab.cli import main


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("override, message", [
    ("data.val_image=x", "unknown keys ['val_image']"),
    ("kd.liaf.loss_wieght=5", "unknown key kd.liaf.loss_wieght; the options of 'liaf' are ['loss_weight'"),
    ("student.min_sise=320", "unknown key student.min_sise; the keys of [student] are"),
    ("teacher.min_size=320", "teacher.min_size is now input.min_size"),
    ("train_teacher.iterations=abc", "[train_teacher] training option iterations='abc' must be a positive int"),
    ("train_teacher.iterations=0", "[train_teacher] training option iterations=0 must be a positive int"),
    ("kd.liaf.roi_size=7", "kd.liaf.roi_size=7 must be a list of two positive ints"),
    ("data.kind=kitti", "[data] with kind = 'kitti': missing keys ['root']"),
])
def test_config_errors_are_one_line(override, message, capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train-teacher", "--set", override, "--out", str(out)]) == 2
    assert message in _one_error_line(capsys)
    assert not out.exists()  # refused before anything ran


def test_unknown_section_is_one_line(capsys, tmp_path):
    assert main(["distill", "--method", "none", "--set", "distil.iterations=5", "--out", str(tmp_path)]) == 2
    assert "unknown section [distil]; the sections are ['data', 'input'" in _one_error_line(capsys)


def test_unknown_device_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the relative weights path resolves from the project root
    weights = "data_samples/checkpoints/teacher_tiny.pt"
    assert not Path(weights).exists()
    assert main(["evaluate", "--role", "teacher", "--weights", weights, "--device", "gpu"]) == 2
    assert _one_error_line(capsys) == "error: unknown device 'gpu'; use cpu, cuda, cuda:N or auto"


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="unknown key kd.liaf.loss_wieght"):
        main(["train-teacher", "--set", "kd.liaf.loss_wieght=5", "--out", str(tmp_path), "--debug"])


def test_help_lists_the_data_and_input_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in ("input.min_size", "input.max_size", "data.train_images", "data.val_ann", "data.root",
                "data.classes", "data.merge", "data.train_set", "data.test_set", "data.test_fraction", "data.test_ids",
                "data.skip_bad_images"):
        assert key in out


def test_a_custom_class_voc_dataset_trains_through_the_cli(tmp_path, capsys):
    """A labelling tool's VOC folder with its own classes: train, evaluate, and weights that carry the classes."""
    import torch
    from test_data import _voc_fixture

    objects = {f"img{i}": [("WBC", (2, 2, 18, 14), 0), ("RBC", (20, 10, 36, 28), 0)] for i in range(6)}
    root = _voc_fixture(tmp_path / "cells", objects, sets={"train": list(objects)[:4], "val": list(objects)[4:]})
    out = tmp_path / "teacher"
    sets = ["data.kind=voc", f"data.root='{root}'", "data.classes=['WBC', 'RBC']", "input.min_size=64",
            "train_teacher.iterations=1", "train_teacher.batch_size=2", "train_teacher.warmup=0",
            "train_teacher.eval_every=0"]
    assert main(["train-teacher", "--config", "tiny", "--device", "cpu", "--out", str(out),
                 *[a for s in sets for a in ("--set", s)]]) == 0
    saved = torch.load(out / "teacher.pt", weights_only=True)
    assert saved["meta"]["class_names"] == ["WBC", "RBC"] and (out / "eval.json").exists()
    assert (out / "curves.png").stat().st_size > 0
    # the same weights refused for a dataset with other classes
    other = [*sets[:2], "data.classes=['RBC', 'WBC']", *sets[3:]]
    assert main(["evaluate", "--config", "tiny", "--role", "teacher", "--weights", str(out / "teacher.pt"),
                 "--device", "cpu", *[a for s in other for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "teacher.pt" in err and "WBC" in err


TEACHER = "data_samples/checkpoints/teacher_tiny.pt"


@pytest.mark.parametrize("argv, message", [
    (["distill", "--method", "nope", "--teacher", TEACHER],
     "error: unknown distiller 'nope'; choose one of ['acam', 'bckd', 'crosskd', 'cwd', 'defeat', 'fgd', 'fgfi', "
     "'fitnet', 'gid', 'ima', 'ld', 'liaf', 'liaf_paper', 'maskd', 'mgd', 'pkd', 'samkd']"),
    (["learn-stage1", "--method", "fgd", "--teacher", TEACHER], "error: method 'fgd' has no stage 1 to learn"),
    (["distill", "--method", "mgd", "--teacher", TEACHER, "--stage1", TEACHER],
     "error: --stage1 is for two-stage methods; 'mgd' has no stage 1"),
    (["distill", "--method", "maskd", "--set", "kd.maskd.mask_ratio=0.5"],
     "error: config tiny: unknown key kd.maskd.mask_ratio; the options of 'maskd' are ['loss_weight'"),
    (["distill", "--method", "mgd"], "error: --teacher is required"),
    (["distill", "--method", "none", "--set", "kd.inherit=true"],
     ("error: --teacher is required (train one with `liaf-lab train-teacher`); with kd.inherit = true the no-KD "
      "student starts from its neck and head too")),
])
def test_method_errors_are_one_line(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    assert _one_error_line(capsys).startswith(message)
    assert not (tmp_path / "run").exists()


def test_help_lists_the_registered_methods(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert ("the registered distillers (acam, bckd, crosskd, cwd, defeat, fgd, fgfi, fitnet, gid, ima, ld, liaf, "
            "liaf_paper, maskd, mgd, pkd, samkd)"
            in " ".join(capsys.readouterr().out.split()))
