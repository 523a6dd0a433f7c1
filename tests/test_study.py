"""The study runner: paired rows, resume without redoing runs, --jobs without changing results, refusals."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

import liaf_lab.engine
from liaf_lab.experiments.config import PROJECT_ROOT, load_config
from liaf_lab.experiments.study import Run, StudyError, _open_study, _study_spec, grid_variants, parse_grid, run_study
from liaf_lab.experiments.verdicts import Comparison, paired_interval

TEACHER = str(PROJECT_ROOT / "data_samples" / "checkpoints" / "teacher_tiny.pt")


def test_paired_interval_is_students_t():
    mean, low, high = paired_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, 2 df) from tables, sd = 1
    assert mean == 2.0 and low == pytest.approx(2 - half) and high == pytest.approx(2 + half)
    assert paired_interval([0.7]) == (0.7, -math.inf, math.inf)
    c = Comparison("methods", "liaf", "none", "test", 3, [0, 1, 2], 2.0, low, high, half, 0.04, 0.12, 3,
                   "not distinguishable", 1.0, 3.0, 1.0)
    assert c.sentence() == ("liaf is not distinguishable from none with 3 seeds: +2.00 [-0.48, +4.48] "
                            "(Holm-adjusted p = 0.12 over a family of 3 comparisons).")
    c = Comparison("methods", "liaf", "none", "test", 3, [0, 1, 2], 2.0, 0.5, 3.5, 1.5, 0.01, 0.01, 1,
                   "above", 1.0, 3.0, 1.0)
    assert c.sentence() == ("liaf is above none with 3 seeds: +2.00 [+0.50, +3.50] (the only comparison of its "
                            "family (no correction)).")


def test_study_pairs_runs_resumes_without_retraining_and_reports(tmp_path, small, monkeypatch):
    out = tmp_path / "study"
    grid = parse_grid(["kd.liaf.loss_weight=0.1,0.2"])
    result = run_study(out, "bench", ["none", "liaf"], [0, 1], grid, small, device="cpu", teacher_weights=TEACHER)
    assert len(result.rows) == 8  # 2 variants x 2 seeds x 2 methods
    assert len(list(out.rglob("result.json"))) == 6  # the no-KD runs serve both KD variants
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {"val_AP", "test_AP", "test_AP50", "test_AR100", "seconds"} <= rows[0].keys()
    report = (out / "report.md").read_text()
    assert "Student's t 95%" in report and "chosen per method by the best mean AP on the `val` split" in report
    assert "- liaf is " in report and "The family `methods` on `test` has 1 comparison" in report
    assert (out / "study.png").stat().st_size > 0
    comparisons = json.loads((out / "comparisons.json").read_text())
    assert [(c["a"], c["b"], c["split"]) for c in comparisons] == [("liaf", "none", "test"), ("liaf", "none", "val")]
    with (out / "comparisons.csv").open() as f:
        assert {"a", "b", "split", "n", "mean_diff", "ci_low", "ci_high", "p_value", "p_holm",
                "verdict"} <= set(next(csv.DictReader(f)))
    liaf_run = out / "runs" / "liaf" / "kd.liaf.loss_weight=0.2" / "seed1"
    assert (liaf_run / "stage1" / "last.pt").exists()
    assert (liaf_run / "curves.png").exists() and (liaf_run / "stage1" / "curves.png").exists()
    # every method of one seed starts from the same student weights (paired comparison)
    none = json.loads((out / "runs/none/default/seed0/run.json").read_text())["spec"]["config"]["config"]
    assert none["student"] == json.loads((out / "runs/liaf/kd.liaf.loss_weight=0.1/seed0/run.json").read_text()
                                         )["spec"]["config"]["config"]["student"]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(liaf_lab.engine, "train_detector", no_training)
    monkeypatch.setattr(liaf_lab.engine, "distill", no_training)
    again = run_study(out, "bench", ["none", "liaf"], [0, 1], grid, small, device="cpu", teacher_weights=TEACHER)
    assert again.rows == result.rows


def test_jobs_do_not_change_any_result(tmp_path, small):
    kw = dict(config="bench", methods=["none", "fitnet"], seeds=[0], overrides=small, device="cpu",
              teacher_weights=TEACHER)
    one = run_study(tmp_path / "one", jobs=1, **kw)
    two = run_study(tmp_path / "two", jobs=2, **kw)
    strip = [{k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds")} for r in one.rows]
    assert strip == [{k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds")} for r in two.rows]
    for method in ("none", "fitnet"):
        rel = f"runs/{method}/default/seed0/student.pt"
        a = torch.load(tmp_path / "one" / rel, weights_only=True)["model"]
        b = torch.load(tmp_path / "two" / rel, weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_study_reads_its_config_once_and_passes_it_down(tmp_path, small, monkeypatch):
    """A study (its runs in this process: jobs=1) reads its preset once: the grid's variants, the teacher's checks
    and every run derive from that ``ResolvedConfig``; the builders never load one. Each run's ``run.json`` holds
    what loading the preset with the run's overrides gives."""
    import inspect
    import tomllib

    import liaf_lab.experiments.config as config
    from liaf_lab.experiments.config import method_config

    callers = []
    for module, name in ((config, "load_config"), (tomllib, "loads")):
        def counted(*args, _original=getattr(module, name), _name=name, **kwargs):
            callers.append((_name, [(Path(f.filename).name, f.function) for f in inspect.stack()[1:]]))
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    grid = parse_grid(["kd.fitnet.loss_weight=1.0,2.0"])
    result = run_study(tmp_path / "s", "bench", ["none", "fitnet"], [0], grid, small, device="cpu",
                       teacher_weights=TEACHER)
    assert len(result.rows) == 4  # 2 variants x (none, fitnet); the no-KD run serves both
    assert [name for name, _ in callers] == ["load_config", "loads"]
    assert [f for _, f in callers[0][1][:3]] == ["resolve_config", "_check_arguments", "run_study"]
    assert not any(file == "builders.py" for _, stack in callers for file, _ in stack)
    monkeypatch.undo()
    for run in (Run(v, 0, m) for v in grid_variants(grid) for m in ("none", "fitnet")):
        saved = json.loads((tmp_path / "s" / run.folder / "run.json").read_text())["spec"]["config"]["config"]
        assert saved == json.loads(json.dumps(method_config(load_config("bench", [*small, *run.relevant]),
                                                            run.method)))


@pytest.mark.parametrize("seeds, methods, grid, message", [
    ([], ["none"], {}, "--seeds is empty"),
    ([0, 1, 0], ["none"], {}, r"--seeds repeats \[0\]"),
    ([0], ["none", "nope"], {}, r"--methods nope: unknown distiller 'nope'; choose one of \['acam', 'bckd', 'crosskd', 'cwd', 'defeat', "),
    ([0], ["none"], {"kd.liaf.loss_wieght": ["1"]}, "unknown key kd.liaf.loss_wieght"),
    ([0], ["none"], {"kd.liaf.roi_size": ["7"]}, "kd.liaf.roi_size=7 must be"),
])
def test_bad_study_arguments_are_named(tmp_path, small, seeds, methods, grid, message):
    with pytest.raises(ValueError, match=message):
        run_study(tmp_path / "s", "bench", methods, seeds, grid, small, device="cpu", teacher_weights=TEACHER)
    assert not (tmp_path / "s").exists()


def test_grid_syntax_is_checked():
    assert parse_grid(["kd.liaf.mask_scale=literal,count"]) == {"kd.liaf.mask_scale": ["literal", "count"]}
    with pytest.raises(StudyError, match="must look like section.key=value1,value2"):
        parse_grid(["mask_scale=literal"])


def _spec(small: list[str], *changes: str, threads: int = 1) -> dict:
    """The study record of the bench preset with ``small`` and ``changes``, without a grid."""
    return _study_spec(load_config("bench", [*small, *changes]), {}, threads=threads)


def test_a_study_folder_refuses_another_config_or_thread_count(tmp_path, small):
    out = tmp_path / "s"
    _open_study(out, _spec(small), ["none"], [0])
    with pytest.raises(StudyError, match=r"config.distill.iterations: 2 in the folder, 3 now"):
        _open_study(out, _spec(small, "distill.iterations=3"), ["none"], [0])
    with pytest.raises(StudyError, match="was run with 1 threads per run and this call uses 2"):
        _open_study(out, _spec(small, threads=2), ["none"], [0])
    # more seeds and methods with the same config extend the study
    _open_study(out, _spec(small), ["fitnet"], [1])
    saved = json.loads((out / "study.json").read_text())
    assert saved["methods"] == ["none", "fitnet"] and saved["seeds"] == [0, 1]
    # options of a method no saved run reads (a method new to the folder) change no saved run ...
    _open_study(out, _spec(small, "kd.mgd.alpha=0.5"), ["mgd"], [0])
    assert json.loads((out / "study.json").read_text())["methods"] == ["none", "fitnet", "mgd"]
    # a variant's runs read its method's table: once liaf_paper ran, [kd.liaf] binds the folder
    _open_study(out, _spec(small, "kd.mgd.alpha=0.5"), ["liaf_paper"], [0])
    with pytest.raises(StudyError, match="config.kd.liaf.loss_weight"):
        _open_study(out, _spec(small, "kd.mgd.alpha=0.5", "kd.liaf.loss_weight=0.3"), ["none"], [0])
    # ... but those of a method that ran, or the options every method shares, do
    for changed, key in (("kd.fitnet.loss_weight=0.3", "config.kd.fitnet.loss_weight"),
                         ("kd.mgd.alpha=0.25", "config.kd.mgd.alpha"), ("kd.inherit=true", "config.kd.inherit")):
        with pytest.raises(StudyError, match=key):
            _open_study(out, _spec(small, "kd.mgd.alpha=0.5", changed), ["none"], [0])


def test_one_at_a_time_screen_runs_each_value_alone_and_refuses_another_mode(tmp_path, small, monkeypatch):
    grid = parse_grid(["kd.liaf.mask_scale=count", "kd.liaf.loss_weight=0.2,0.05"])
    assert grid_variants(grid, "one_at_a_time") == [(), ("kd.liaf.mask_scale=count",), ("kd.liaf.loss_weight=0.2",),
                                                    ("kd.liaf.loss_weight=0.05",)]
    assert len(grid_variants(grid)) == 2  # the product: count with each loss weight
    # a variant reads its method's table; a no-KD run reads none; other methods' tables never matter
    variant = ("kd.liaf.loss_weight=0.2", "kd.fitnet.loss_weight=0.3", "distill.lr=0.01")
    assert Run(variant, 0, "liaf_paper").relevant == ("kd.liaf.loss_weight=0.2", "distill.lr=0.01")
    assert Run(variant, 0, "none").relevant == ("distill.lr=0.01",)
    with pytest.raises(StudyError, match="grid mode 'all' is not one of"):
        grid_variants(grid, "all")
    out = tmp_path / "screen"
    small_grid = {"kd.liaf.mask_scale": ["count"]}
    result = run_study(out, "bench", ["none", "liaf"], [0, 1], small_grid, small, device="cpu",
                       teacher_weights=TEACHER, grid_mode="one_at_a_time")
    assert sorted({r["settings"] for r in result.rows if r["method"] == "liaf"}) == ["default",
                                                                                      "kd.liaf.mask_scale=count"]
    assert len(list(out.rglob("result.json"))) == 6  # 2 no-KD runs + 2 variants x 2 seeds
    report = (out / "report.md").read_text()
    assert "(one value at a time)" in report and "| liaf | kd.liaf.mask_scale=count |" in report
    base = {r["seed"]: r["val_AP"] for r in result.rows if r["method"] == "none"}
    count = [100 * (r["val_AP"] - base[r["seed"]]) for r in result.rows if r["settings"] == "kd.liaf.mask_scale=count"]
    mean, low, high = paired_interval(count)
    preset = {r["seed"]: r["val_AP"] for r in result.rows if r["method"] == "liaf" and r["settings"] == "default"}
    vs_preset = paired_interval([100 * (r["val_AP"] - preset[r["seed"]]) for r in result.rows
                                 if r["settings"] == "kd.liaf.mask_scale=count"])
    row = next(line for line in report.splitlines() if line.startswith("| liaf | kd.liaf.mask_scale=count |"))
    assert f"| {mean:+.2f} [{low:+.2f}, {high:+.2f}] | {vs_preset[0]:+.2f} [{vs_preset[1]:+.2f}, {vs_preset[2]:+.2f}] |" in row
    assert "| liaf | default |" in report and "(preset)" in report
    with pytest.raises(StudyError, match="grid_mode"):
        run_study(out, "bench", ["none", "liaf"], [0, 1], small_grid, small, device="cpu", teacher_weights=TEACHER)
    _check_background_shares_of_each_variant(out)
    from liaf_lab import load_study_summary
    from liaf_lab.experiments.report import StudySummary

    screen = load_study_summary(out).screen()  # the screen's family read back, as docs quote it
    assert [(c.a, c.b, c.split) for c in screen] == [("liaf [kd.liaf.mask_scale=count]", "liaf [default]", "val")]
    assert f"| liaf [kd.liaf.mask_scale=count] − liaf [default] | 2 | {screen[0].interval()} |" in report
    with pytest.raises(StudyError, match="not a one-at-a-time screen"):
        StudySummary([], ["none"], [0], {}, "test", {}).screen()


def _check_background_shares_of_each_variant(out: Path) -> None:
    """``study_background_shares``: one row per trained run, each measured with that run's own trained distiller
    (its variant's options) on the study's first validation images with boxes and the study's teacher."""
    from liaf_lab.analysis import background_area, background_share, kd_inputs_for, study_background_shares
    from liaf_lab.experiments.builders import build_datasets, build_detector
    from liaf_lab.experiments.study import load_study_run, study_teacher

    rows, area = study_background_shares(out, "liaf", images=3)
    assert {r["method"] for r in rows} == {"liaf"} and [(r["variant"], r["seed"]) for r in rows] == [("default", 0), ("default", 1),
                                                         ("kd.liaf.mask_scale=count", 0), ("kd.liaf.mask_scale=count", 1)]
    assert study_teacher(out) == Path(TEACHER)
    run = load_study_run(out, "liaf", 1, "kd.liaf.mask_scale=count")
    assert run.distiller.mask_scale == "count"
    _, val = build_datasets(run.config)
    samples = [val[i] for i in range(len(val)) if len(val.records[i].boxes) > 0][:3]
    teacher = build_detector(run.config, "teacher", len(run.class_names) + 1, weights_path=TEACHER,
                             class_names=run.class_names).eval()
    inputs = kd_inputs_for(run.student, teacher, run.distiller, [s[0] for s in samples], [s[1] for s in samples], 1)
    assert rows[3] == {"method": "liaf", "variant": "kd.liaf.mask_scale=count", "seed": 1,
                       **background_share(run.distiller, inputs)}
    assert area == background_area(inputs, run.distiller.strides) and 0 < area < 1
    assert all(0 <= r["total"] <= 1 for r in rows)
    with pytest.raises(StudyError, match="no finished 'fitnet' run"):
        study_background_shares(out, "fitnet")


def test_a_study_without_distillation_trains_no_teacher(tmp_path, small, monkeypatch):
    import liaf_lab.experiments.study as study

    def no_teacher(*args, **kwargs):
        raise AssertionError("a teacher was trained or loaded for a study of no-KD students")

    monkeypatch.setattr(study, "_teacher", no_teacher)
    result = run_study(tmp_path / "s", "bench", ["none"], [0], overrides=small, device="cpu")
    assert [r["method"] for r in result.rows] == ["none"] and not (tmp_path / "s" / "teacher").exists()


def test_the_no_kd_control_inherits_when_the_students_do(tmp_path, small):
    """With ``kd.inherit`` every student, the no-KD one too, starts from the teacher's neck and head."""
    assert Run(("kd.inherit=true",), 0, "none").relevant == ("kd.inherit=true",)
    out = tmp_path / "s"
    run_study(out, "bench", ["none"], [0], overrides=[*small, "kd.inherit=true"], device="cpu",
              teacher_weights=TEACHER)
    run = json.loads((out / "runs" / "none" / "default" / "seed0" / "run.json").read_text())
    assert run["spec"]["config"]["teacher"] == TEACHER and run["spec"]["config"]["config"]["kd"]["inherit"] is True


def test_finished_runs_load_back_for_analysis(tmp_path, small, monkeypatch):
    from liaf_lab import load_study_run, load_study_summary
    from liaf_lab.utils.checkpoint import load_checkpoint

    out = tmp_path / "study"
    monkeypatch.chdir(PROJECT_ROOT)  # the teacher named relatively resolves to the same absolute path as TEACHER
    run_study(out, "bench", ["none", "liaf"], [0, 1], None, small, device="cpu",
              teacher_weights="data_samples/checkpoints/teacher_tiny.pt")
    run_study(out, "bench", ["none", "liaf"], [0, 1], None, small, device="cpu", teacher_weights=TEACHER)  # resumes
    study = load_study_summary(out, config="bench", overrides=small)
    report = (out / "report.md").read_text()
    assert study.methods == ["none", "liaf"] and study.seeds == [0, 1] and study.split == "test"
    assert all(line in report for line in study.table().splitlines() if line)
    mean, low, high = study.difference("liaf", "none")
    entry = study.summary["liaf"]
    assert (mean, low, high) == pytest.approx((entry["diff_mean"], entry["ci_low"], entry["ci_high"]))
    run = load_study_run(out, "liaf", 1)
    saved = load_checkpoint(out / "runs/liaf/default/seed1/student.pt")["model"]
    assert all(torch.equal(v, saved[k]) for k, v in run.student.state_dict().items())
    last = load_checkpoint(out / "runs/liaf/default/seed1/last.pt")["modules"]["distiller"]
    assert all(torch.equal(v, last[k]) for k, v in run.distiller.state_dict().items())
    assert run.result["test_AP"] == study.rows[[r["folder"] for r in study.rows].index(run.result["folder"])]["test_AP"]
    assert load_study_run(out, "none", 0).distiller is None
    with pytest.raises(StudyError, match="has no finished run liaf/default/seed7; it has"):
        load_study_run(out, "liaf", 7)
    with pytest.raises(StudyError, match="holds no study"):
        load_study_summary(tmp_path / "empty")
    with pytest.raises(StudyError, match="another config than 'tiny'"):
        load_study_summary(out, config="tiny")
    with pytest.raises(StudyError, match="no method 'fgd'"):
        study.difference("fgd", "none")


def _tiny_run(root, kind: str, *split_keys: str) -> list[str]:
    """The tiny preset on a tiny VOC- or KITTI-layout folder: 64 px, 2 iterations (``split_keys`` add a test split).

    Splits of two images or more: at 64 px FCOS's last level is 1 x 1, which GroupNorm refuses for one image.
    """
    return [f"data.kind={kind}", f"data.root='{root}'", *split_keys, "input.min_size=64", "input.max_size=64",
            "distill.iterations=2", "distill.batch_size=2", "distill.warmup=1", "distill.eval_every=0"]


@pytest.mark.parametrize("kind", ["voc", "kitti"])
def test_studies_on_voc_and_kitti_tune_on_val_and_report_on_test(tmp_path, kind):
    from test_data import _kitti_fixture, _voc_fixture

    if kind == "voc":
        objects = {f"img{i}": [("WBC", (2, 2, 18, 14), 0), ("RBC", (20, 10, 36, 28), 0)] for i in range(8)}
        stems = list(objects)
        root = _voc_fixture(tmp_path / "data", objects, sets={"train": stems[:4], "val": stems[4:6],
                                                              "test": stems[6:]})
        overrides = _tiny_run(root, kind, "data.test_set=test")
    else:
        labels = {f"{i:06d}": [("Car", (2, 2, 18, 14)), ("Pedestrian", (20, 10, 36, 28))] for i in range(10)}
        overrides = _tiny_run(_kitti_fixture(tmp_path / "data", labels), kind, "data.test_fraction=0.2")  # 6/2/2
    out = tmp_path / "study"
    result = run_study(out, "tiny", ["none"], [0], parse_grid(["distill.lr=0.01,0.02"]), overrides, device="cpu")
    assert len(result.rows) == 2 and all({"val_AP", "test_AP", "test_AP50"} <= r.keys() for r in result.rows)
    report = (out / "report.md").read_text()
    assert "on the **test** split" in report and "reported on `test`" in report


def test_a_voc_test_set_overlapping_train_stops_a_study_before_anything_trains(tmp_path, monkeypatch):
    from test_data import _voc_fixture

    objects = {f"img{i}": [("WBC", (2, 2, 18, 14), 0)] for i in range(4)}
    root = _voc_fixture(tmp_path / "data", objects, sets={"train": ["img0", "img1", "img2"], "val": ["img3"],
                                                          "test": ["img2", "img1"]})

    def no_training(*args, **kwargs):
        raise AssertionError("a student was trained on a config whose test set overlaps train")

    monkeypatch.setattr(liaf_lab.engine, "train_student", no_training)
    with pytest.raises(ValueError, match=r"the train and test image sets \('train', 'test'\) of .* share 2 images: "
                                         r"img1, img2;"):
        run_study(tmp_path / "study", "tiny", ["none"], [0], None, _tiny_run(root, "voc", "data.test_set=test"),
                  device="cpu")


def test_a_study_folder_refuses_a_machine_with_other_cpu_kernels(tmp_path, small, monkeypatch):
    """The same seed and thread count train other students with other CPU kernels (AVX2 against AVX512): measured,
    docs/results.md. A study records the kernels it ran with and refuses a machine that uses others."""
    import liaf_lab.engine.seeding as seeding

    out = tmp_path / "s"
    _open_study(out, _spec(small), ["none"], [0])
    recorded = json.loads((out / "study.json").read_text())["environment"]["cpu_capability"]
    assert recorded == torch.backends.cpu.get_cpu_capability()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "OTHER")
    with pytest.raises(StudyError, match=f"run on a CPU with {recorded} kernels and this machine uses OTHER"):
        _open_study(out, _spec(small), ["none"], [0])
    assert seeding.environment_info()["cpu_capability"] == "OTHER"


def test_the_study_teacher_is_trained_once_in_its_run_folder(tmp_path):
    from liaf_lab.experiments.demo import QUICK
    from liaf_lab.experiments.study import _teacher

    teacher = tmp_path / "teacher" / "teacher.pt"
    assert _teacher(tmp_path, load_config("tiny", QUICK), "cpu", 1, None) == str(teacher)
    assert (tmp_path / "teacher" / "curves.png").stat().st_size > 0
    written = teacher.stat().st_mtime_ns
    assert _teacher(tmp_path, load_config("tiny", QUICK), "cpu", 1, None) == str(teacher)  # found, not trained again
    assert teacher.stat().st_mtime_ns == written


def test_report_only_reports_the_seeds_whose_runs_all_finished_and_trains_nothing(tmp_path, small, monkeypatch,
                                                                                  capsys):
    from liaf_lab.cli import main as cli_main
    from liaf_lab.experiments.study import report_finished

    out = tmp_path / "study"
    full = run_study(out, "bench", ["none", "fitnet"], [0, 1], None, small, device="cpu", teacher_weights=TEACHER)
    (out / "runs" / "fitnet" / "default" / "seed1" / "result.json").unlink()  # seed 1 is not finished whole
    for name in ("results.json", "report.md"):
        (out / name).unlink()

    def no_training(*args, **kwargs):
        raise AssertionError("--report-only trained a run")

    monkeypatch.setattr(liaf_lab.engine, "train_detector", no_training)
    monkeypatch.setattr(liaf_lab.engine, "distill", no_training)
    result = report_finished(out)
    assert [(r["method"], r["seed"]) for r in result.rows] == [("none", 0), ("fitnet", 0)]
    assert [r["test_AP"] for r in result.rows] == [r["test_AP"] for r in full.rows if r["seed"] == 0]
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(result.rows))
    assert "seeds [0]" in (out / "report.md").read_text()
    assert cli_main(["study", "--out", str(out), "--report-only"]) == 0
    assert "# Study report" in capsys.readouterr().out
    for row in (out / "runs").rglob("result.json"):
        row.unlink()
    with pytest.raises(StudyError, match="no seed whose runs have all finished"):
        report_finished(out)


def test_a_study_resumes_from_its_shipped_artefact_and_trains_only_what_it_lacks(tmp_path, small, monkeypatch):
    import shutil

    from liaf_lab.experiments.study import load_study_run, loadable_runs, report_finished

    full = run_study(tmp_path / "first", "bench", ["none", "fitnet"], [0, 1], None, small, device="cpu",
                     teacher_weights=TEACHER)
    assert all(len(r["student_sha256"]) == 64 for r in full.rows)
    shipped = tmp_path / "shipped"  # what is committed of a stopped study: its record and its seed-0 rows
    shipped.mkdir()
    shutil.copy(tmp_path / "first" / "study.json", shipped)
    (shipped / "results.json").write_text(json.dumps([r for r in full.rows if r["seed"] == 0]))
    trained = []
    real = liaf_lab.engine.train_student
    monkeypatch.setattr(liaf_lab.engine, "train_student",
                        lambda student, teacher, distiller, train, cfg, folder, *a, **k:
                        trained.append(Path(folder).relative_to(tmp_path / "again").as_posix())
                        or real(student, teacher, distiller, train, cfg, folder, *a, **k))
    again = run_study(tmp_path / "again", "bench", ["none", "fitnet"], [0, 1], None, small, device="cpu",
                      teacher_weights=TEACHER, resume_from=shipped)
    assert sorted(trained) == ["runs/fitnet/default/seed1", "runs/none/default/seed1"]
    key = [(r["method"], r["seed"], r["test_AP"], r["student_sha256"]) for r in full.rows]
    assert [(r["method"], r["seed"], r["test_AP"], r["student_sha256"]) for r in again.rows] == key
    assert [(r["method"], r["seed"]) for r in report_finished(tmp_path / "again").rows] == [
        (r["method"], r["seed"]) for r in full.rows]
    with pytest.raises(StudyError, match=r"adopted from .*shipped: it has its row, not its weights"):
        load_study_run(tmp_path / "again", "fitnet", 0)
    assert load_study_run(tmp_path / "again", "fitnet", 1).result["test_AP"] == full.rows[3]["test_AP"]
    assert loadable_runs(tmp_path / "again", "fitnet") == [("default", 1)]
    with pytest.raises(StudyError, match=r"shipped holds a study of another configuration .*distill.iterations"):
        run_study(tmp_path / "other", "bench", ["none", "fitnet"], [0, 1], None, [*small, "distill.iterations=3"],
                  device="cpu", teacher_weights=TEACHER, resume_from=shipped)
    (shipped / "results.json").unlink()
    with pytest.raises(StudyError, match="holds no results.json: it is not a shipped study"):
        run_study(tmp_path / "other", "bench", ["none", "fitnet"], [0, 1], None, small, device="cpu",
                  teacher_weights=TEACHER, resume_from=shipped)


def test_a_study_finds_its_teacher_by_content_when_its_recorded_path_is_gone(tmp_path):
    from liaf_lab.experiments.study import study_teacher
    from liaf_lab.utils.provenance import file_sha256

    folder = tmp_path / "study"
    folder.mkdir()
    record = {"inputs": {"teacher": {"path": str(tmp_path / "gone.pt"), "sha256": file_sha256(TEACHER)}}}
    (folder / "study.json").write_text(json.dumps(record))
    assert study_teacher(folder) == Path(TEACHER)
    record["inputs"]["teacher"]["sha256"] = "0" * 64
    (folder / "study.json").write_text(json.dumps(record))
    with pytest.raises(StudyError, match=r"gone\.pt\) is gone and no shipped checkpoint has its sha256"):
        study_teacher(folder)
    (folder / "study.json").write_text(json.dumps({"inputs": {}}))
    with pytest.raises(StudyError, match="records no teacher"):
        study_teacher(folder)
