"""Family-wise verdicts and fixed-width seeding: against literal references and by simulation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from liaf_lab.experiments.study import StudyError, run_study
from liaf_lab.experiments.report import Family, load_study_summary, plan_seeds, study_comparisons
from liaf_lab.experiments.verdicts import (PairedData, bootstrap_interval, compare_family, holm, paired_t_pvalue,
                               stein_sample_size)


def holm_reference(p: list[float]) -> list[float]:
    """Holm's adjusted p-values written as the definition: sort, multiply by (m - j + 1), running maximum, cap 1."""
    m = len(p)
    ranked = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    for position, i in enumerate(ranked):
        out[i] = min(1.0, max((m - j) * p[ranked[j]] for j in range(position + 1)))
    return out


def holm_rejects(p: list[float], alpha: float) -> set[int]:
    """Holm's step-down test: reject the smallest p-values while p_(j) <= alpha / (m - j + 1)."""
    m, rejected = len(p), set()
    for j, i in enumerate(sorted(range(m), key=lambda i: p[i])):
        if p[i] > alpha / (m - j):
            break
        rejected.add(i)
    return rejected


@pytest.mark.parametrize("p", [[0.01, 0.04, 0.03, 0.2], [0.5], [0.001, 0.001, 0.9, 0.04, 0.0125, 0.3],
                               [0.2, 0.2, 0.2], [0.0, 1.0, 0.049]])
def test_holm_matches_its_definition_and_the_step_down_test(p):
    adjusted = holm(p)
    assert adjusted == pytest.approx(holm_reference(p))
    for alpha in (0.01, 0.05, 0.1, 0.25):
        assert {i for i, a in enumerate(adjusted) if a <= alpha} == holm_rejects(p, alpha)


def test_paired_t_p_value_is_scipys_and_handles_degenerate_differences():
    diffs = [0.3, 1.1, -0.2, 0.8, 0.5]
    assert paired_t_pvalue(diffs) == pytest.approx(stats.ttest_1samp(diffs, 0.0).pvalue)
    assert paired_t_pvalue([0.4]) == 1.0
    assert paired_t_pvalue([0.5, 0.5, 0.5]) == 0.0 and paired_t_pvalue([0.0, 0.0]) == 1.0


def test_holm_controls_the_family_wise_error_where_per_comparison_intervals_do_not():
    """Twelve methods that do nothing, six seeds: some 95% interval excludes 0 in about 46% of studies."""
    rng = np.random.default_rng(0)
    studies, any_raw, any_holm = 2000, 0, 0
    for _ in range(studies):
        p = [paired_t_pvalue(list(rng.normal(0.0, 1.0, 6))) for _ in range(12)]
        any_raw += min(p) < 0.05
        any_holm += min(holm(p)) < 0.05
    assert 0.40 < any_raw / studies < 0.52
    assert any_holm / studies < 0.065


def test_stein_sample_size_is_the_two_stage_formula():
    pilot = [1.0, 2.0, 4.0, 0.5]
    s0 = float(np.std(pilot, ddof=1))
    expected = math.ceil((stats.t.ppf(0.975, 3) * s0 / 0.5) ** 2)
    assert stein_sample_size(pilot, 0.5) == expected
    assert stein_sample_size([1.0, 1.0, 1.0], 0.5) == 3  # no spread: the pilot is enough
    with pytest.raises(ValueError, match="at least 2 seeds"):
        stein_sample_size([1.0], 0.5)
    with pytest.raises(ValueError, match="half-width must be > 0"):
        stein_sample_size(pilot, 0.0)


def test_steins_fixed_width_interval_covers_and_meets_its_half_width():
    """Normal differences, pilot of 5: the interval mean_n +- t s0 / sqrt(n) covers the mean in >= 95% of
    studies and is never wider than D."""
    rng = np.random.default_rng(1)
    mu, sigma, d, n0, covered, reps = 0.7, 1.3, 0.6, 5, 0, 3000
    for rep in range(reps):
        pilot = list(rng.normal(mu, sigma, n0))
        n = stein_sample_size(pilot, d)
        diffs = pilot + list(rng.normal(mu, sigma, n - n0))
        half = stats.t.ppf(0.975, n0 - 1) * np.std(pilot, ddof=1) / math.sqrt(n)
        assert half <= d + 1e-12
        if rep < 20:  # the package's interval is this one
            (c,) = compare_family("f", "test", [PairedData("a", "b", list(range(n)), diffs, n0, d)])
            assert c.half_width == pytest.approx(half) and c.mean_diff == pytest.approx(np.mean(diffs))
        covered += abs(np.mean(diffs) - mu) <= half
    assert covered / reps > 0.94


def test_bootstrap_interval_reproduces_from_its_seed():
    diffs = [0.3, 1.1, -0.2, 0.8, 0.5, 1.4]
    assert bootstrap_interval(diffs, seed=3) == bootstrap_interval(diffs, seed=3)
    low, high = bootstrap_interval(diffs, seed=3)
    assert low < np.mean(diffs) < high
    assert bootstrap_interval([0.2], seed=0) == (-math.inf, math.inf)


def test_compare_family_corrects_over_its_members():
    pairs = [PairedData("a", "none", [0, 1, 2, 3], [1.0, 1.2, 0.9, 1.1]),
             PairedData("b", "none", [0, 1, 2, 3], [0.4, -0.3, 0.8, 0.2]),
             PairedData("c", "none", [0, 1, 2, 3], [0.6, 0.7, 0.3, 0.9])]
    comps = compare_family("methods", "test", pairs)
    raw = [stats.ttest_1samp(p.diffs, 0.0).pvalue for p in pairs]
    assert [c.p_value for c in comps] == pytest.approx(raw)
    assert [c.p_holm for c in comps] == pytest.approx(holm_reference(raw))
    assert [c.family_size for c in comps] == [3, 3, 3]
    assert [c.verdict for c in comps] == ["above" if p < 0.05 else "not distinguishable"
                                          for p in holm_reference(raw)]
    assert comps[0].win_fraction == 1.0 and comps[1].win_fraction == 0.75
    assert "over a family of 3 comparisons" in comps[1].sentence()
    (single,) = compare_family("methods", "test", pairs[:1])
    assert single.p_holm == single.p_value and "the only comparison of its family (no correction)" in single.sentence()


def _rows(effects: dict[str, float], seeds: list[int], noise: dict[int, float]) -> list[dict]:
    """Study rows with AP = 30% + the method's effect + a per-seed-and-method term (percent points)."""
    return [{"method": m, "seed": s, "variant": "default", "settings": "default",
             "val_AP": (30 + e + noise[s] * (i + 1)) / 100, "test_AP": (31 + e + noise[s] * (i + 1)) / 100}
            for i, (m, e) in enumerate(effects.items()) for s in seeds]


def test_the_family_pairwise_and_versus_and_the_verdict_sentences():
    rows = _rows({"none": 0, "fitnet": 0.5, "liaf": 2.0}, [0, 1, 2, 3], {0: 0.1, 1: -0.2, 2: 0.3, 3: 0.0})
    base = study_comparisons(rows, ["none", "fitnet", "liaf"], {}, "test")
    assert [(c.a, c.b) for c in base] == [("fitnet", "none"), ("liaf", "none")] and base[0].family_size == 2
    pairwise = study_comparisons(rows, ["none", "fitnet", "liaf"], {}, "test", Family(pairwise=True))
    assert [(c.a, c.b) for c in pairwise] == [("fitnet", "none"), ("liaf", "none"), ("liaf", "fitnet")]
    versus = study_comparisons(rows, ["none", "fitnet", "liaf"], {}, "test", Family(versus=("liaf",)))
    assert [(c.a, c.b) for c in versus] == [("fitnet", "none"), ("liaf", "none"), ("liaf", "fitnet")]
    liaf = pairwise[1]
    assert liaf.mean_diff == pytest.approx(2.0 + np.mean([0.2, -0.4, 0.6, 0.0])) and liaf.n == 4


def test_plan_seeds_gives_each_comparison_steins_number_within_the_budget():
    noise = {0: 0.4, 1: -0.5, 2: 0.6}
    rows = _rows({"none": 0, "fitnet": 0.5, "liaf": 2.0}, [0, 1, 2], noise)
    family = Family(target_half_width=0.5, max_seeds=8, pilot=(0, 1, 2))
    plan = plan_seeds(rows, ["none", "fitnet", "liaf"], {}, "product", family)
    need = {m: min(8, stein_sample_size([noise[s] * (k + 1) - noise[s] for s in (0, 1, 2)], 0.5))
            for k, m in ((1, "fitnet"), (2, "liaf"))}
    assert plan[("fitnet", "default")] == [0, 1, 2, 3, 4, 5, 6, 7][: need["fitnet"]]
    assert plan[("liaf", "default")] == [0, 1, 2, 3, 4, 5, 6, 7][: need["liaf"]]
    assert plan[("none", "default")] == plan[("liaf", "default")]  # the baseline serves the longest comparison


def test_a_fixed_width_study_runs_the_second_stage_and_reports_the_half_width(tmp_path, monkeypatch):
    import liaf_lab.experiments.study as study

    noise = {s: 0.5 * math.sin(3 * s + 1) for s in range(20)}
    trained = []

    def fake_run_one(out, config, overrides, run, teacher_path, device, threads, teacher_cache=False):
        trained.append((run.method, run.seed))
        (row,) = _rows({run.method: {"none": 0, "fitnet": 0.3, "liaf": 1.5}[run.method]}, [run.seed], noise)
        k = {"none": 0, "fitnet": 1, "liaf": 2}[run.method]
        row.update(test_AP=(31 + {"none": 0, "fitnet": 0.3, "liaf": 1.5}[run.method] + noise[run.seed] * (k + 1)) / 100,
                   val_AP=(30 + noise[run.seed] * (k + 1)) / 100, folder=run.folder, seconds=1.0)
        return row

    monkeypatch.setattr(study, "run_one", fake_run_one)
    monkeypatch.setattr(study, "_teacher", lambda *a, **k: "teacher.pt")
    monkeypatch.setattr(study, "_check_teacher", lambda *a, **k: None)
    monkeypatch.setattr(study, "_check_teacher_cache", lambda *a, **k: None)
    out = tmp_path / "s"
    result = run_study(out, "tiny", ["none", "fitnet", "liaf"], [0, 1, 2], device="cpu", target_half_width=0.4,
                       max_seeds=10)
    comps = json.loads((out / "comparisons.json").read_text())
    test = {(c["a"], c["b"]): c for c in comps if c["split"] == "test"}
    for method, k in (("fitnet", 1), ("liaf", 2)):
        n = min(10, stein_sample_size([noise[s] * k for s in (0, 1, 2)], 0.4))
        c = test[(method, "none")]
        assert c["n"] == n and c["seeds"] == list(range(n)) and c["pilot"] == 3
        assert c["half_width"] == pytest.approx(stats.t.ppf(0.975, 2) * np.std([noise[s] * k for s in (0, 1, 2)],
                                                                                  ddof=1) / math.sqrt(n))
    assert sorted({s for m, s in trained if m == "liaf"}) == list(range(test[("liaf", "none")]["n"]))
    stage2 = [s for _, s in trained[9:]]  # after the pilot's 9 runs, seed by seed (whole seeds if stopped)
    assert stage2 and stage2 == sorted(stage2)
    report = result.report.read_text()
    assert "Stein's two-stage rule for a half-width of 0.4 AP" in report and "half-width (target 0.4) | seeds used |" in report
    c = test[("liaf", "none")]
    assert f" {c['half_width']:.2f} | {', '.join(map(str, c['seeds']))} |" in report
    summary = load_study_summary(out)
    assert summary.family.target_half_width == 0.4 and summary.comparison("liaf", "none").n == test[("liaf", "none")]["n"]
    # read as a plain study (a labelled secondary analysis): every seed both ran, Student's t on their own spread
    ap = {(r["method"], r["seed"]): 100 * r["test_AP"] for r in summary.rows}
    seeds = sorted(s for (m, s) in ap if m == "fitnet")
    diffs = [ap[("fitnet", s)] - ap[("none", s)] for s in seeds]
    plain = {(c.a, c.b): c for c in summary.compare(fixed_width=False)}[("fitnet", "none")]
    assert plain.n == len(seeds) > 3 and plain.pilot is None
    assert plain.half_width == pytest.approx(stats.t.ppf(0.975, len(seeds) - 1) * np.std(diffs, ddof=1)
                                             / math.sqrt(len(seeds)))
    with pytest.raises(StudyError, match=r"family.target_half_width: 0.4 in the folder, 0.8 now"):
        run_study(out, "tiny", ["none", "fitnet", "liaf"], [0, 1, 2], device="cpu", target_half_width=0.8,
                  max_seeds=10)


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_half_width=0.0, max_seeds=5), "must be a finite number of AP points > 0, got 0.0"),
    (dict(target_half_width=-1.0, max_seeds=5), "> 0, got -1.0"),
    (dict(target_half_width=1.0), "--target-halfwidth needs --max-seeds"),
    (dict(max_seeds=5), "--max-seeds is the seed budget of --target-halfwidth"),
    (dict(target_half_width=1.0, max_seeds=1), "--max-seeds 1 is below the pilot's 2 seeds"),
    (dict(target_half_width=1.0, max_seeds=4, seeds=[0]), "the pilot \\(--seeds\\) needs at least 2 seeds"),
    (dict(target_half_width=1.0, max_seeds=4, grid={"kd.liaf.loss_weight": ["0.2"]}),
     "works without a grid or with a one-at-a-time screen"),
    (dict(versus=["fgd"]), "--versus fgd: not one of the study's KD methods"),
])
def test_bad_family_arguments_are_named(tmp_path, kwargs, message):
    kwargs = {"seeds": [0, 1], **kwargs}
    with pytest.raises(StudyError, match=message):
        run_study(tmp_path / "s", "tiny", ["none", "liaf"], device="cpu", **kwargs)
    assert not (tmp_path / "s").exists()


def test_the_cli_names_a_bad_family_argument_in_one_line(tmp_path, capsys):
    from liaf_lab.cli import main

    code = main(["study", "--config", "tiny", "--methods", "none", "liaf", "--seeds", "0", "1",
                 "--target-halfwidth", "-0.5", "--max-seeds", "4", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "error: --target-halfwidth must be a finite number of AP points > 0, got -0.5"


def test_the_demo_report_section_shows_its_preset_s_shipped_family_or_says_it_is_missing(tmp_path):
    from liaf_lab.experiments.report import SHIPPED_STUDIES, shipped_study_section

    for preset, study in SHIPPED_STUDIES.items():  # every preset's shipped study is there and matches its preset
        load_study_summary(study, config=preset)
        lines = shipped_study_section(preset)
        assert lines[0] == "## The measured answer: the shipped study" and f"`{study}`" in lines[2]
        assert any(line.startswith("- liaf is ") for line in lines)
    assert "changed the 'bench' preset" in shipped_study_section("bench", changed=True)[2]
    missing = shipped_study_section("tiny", study=tmp_path / "gone")
    assert "The shipped study is not available here" in missing[2] and "holds no study" in missing[2]
    assert "No study of the 'paper' preset ships" in shipped_study_section("paper")[2]


def test_a_pilot_too_small_for_its_family_is_warned_before_any_run():
    import warnings

    from liaf_lab.experiments.study import _check_family
    from liaf_lab.experiments.verdicts import separable_ratio

    assert separable_ratio(29, 3) == pytest.approx(stats.t.ppf(1 - 0.025 / 29, 2) / stats.t.ppf(0.975, 2))
    assert separable_ratio(1, 3) == pytest.approx(1.0)
    methods = ["none", "liaf", *[f"m{i}" for i in range(14)]]  # bench_all's family: 15 against none, 14 against liaf
    with pytest.warns(UserWarning, match=r"pilot of 3 seeds: Stein's test keeps 2 degrees of freedom, so over a "
                                         r"family of 29 comparisons .* 5\.6 times .*; a pilot of 5 seeds .* 2\.7"):
        _check_family(methods, [0, 1, 2], {}, "product", False, ["liaf"], 1.0, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_family(methods, [0, 1, 2, 3, 4, 5], {}, "product", False, ["liaf"], 1.0, 12)
        _check_family(["none", "liaf"], [0, 1, 2], {}, "product", False, [], 1.0, 12)


def test_a_screen_of_the_detector_compares_the_no_kd_variants_with_their_preset():
    """A one-at-a-time grid of a key that changes the no-KD student too (``student.num_groups``): its variants are
    compared with its own preset, in the screen's family, as every method's are."""
    from liaf_lab.experiments.report import screen_comparisons
    from liaf_lab.experiments.verdicts import paired_interval

    val = {("none", "default"): [30.0, 31.0, 29.5], ("none", "student.num_groups=8"): [31.0, 33.0, 30.0],
           ("liaf", "default"): [32.0, 32.5, 31.0], ("liaf", "student.num_groups=8"): [32.5, 34.0, 31.5]}
    rows = [{"method": m, "variant": v, "seed": s, "val_AP": ap / 100} for (m, v), aps in val.items()
            for s, ap in enumerate(aps)]
    found = {(c.a, c.b): c for c in screen_comparisons(rows, ["none", "liaf"])}
    assert set(found) == {("none [student.num_groups=8]", "none [default]"), ("liaf [student.num_groups=8]", "liaf [default]")}
    c = found[("none [student.num_groups=8]", "none [default]")]
    mean, low, high = paired_interval([1.0, 2.0, 0.5])
    assert (c.mean_diff, c.ci_low, c.ci_high) == pytest.approx((mean, low, high)) and c.family_size == 2


def test_a_p_value_is_never_written_onto_the_threshold_it_is_judged_by():
    from liaf_lab.experiments.verdicts import format_p

    assert [format_p(p) for p in (0.049965, 0.0499996, 0.0500004, 0.05, 0.0123456, 1.0, 0.000485)] == [
        "0.04997", "0.0499996", "0.05", "0.05", "0.0123", "1", "0.000485"]  # 0.05 and above: not below it


def test_a_study_counts_each_run_folder_once():
    """A screen repeats the no-KD run's row under every variant whose keys it ignores: one run, counted once."""
    from liaf_lab.experiments.report import distinct_runs

    rows = [{"folder": "runs/none/default/seed0", "variant": v, "seconds": 10} for v in ("default", "kd.liaf.x=1")]
    rows.append({"folder": "runs/liaf/kd.liaf.x=1/seed0", "variant": "kd.liaf.x=1", "seconds": 20})
    assert [r["seconds"] for r in distinct_runs(rows)] == [10, 20]
    assert len(distinct_runs([{"seconds": 1}, {"seconds": 1}])) == 2  # rows without a folder are runs of their own
