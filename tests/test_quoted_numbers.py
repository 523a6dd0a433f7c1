"""Every figure quoted in README.md, docs/ and the notebooks' text agrees with the shipped result it names."""

from __future__ import annotations

import importlib.util

import pytest

from liaf_lab.experiments.config import PROJECT_ROOT

spec = importlib.util.spec_from_file_location("quoted_numbers", PROJECT_ROOT / "tools" / "quoted_numbers.py")
quoted = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quoted)


def test_every_quoted_figure_is_generated_from_its_artefact():
    found = quoted.problems()
    assert not found, "\n".join(found)


def test_a_stale_span_and_a_hand_typed_figure_are_named_with_file_and_line():
    docs = [("docs/results.md", "intro\nLIAF-KD <!-- n:diff study=bench9 a=liaf b=none -->+9.99 [+0.1, +0.2]<!-- /n -->\n"
                                "and FitNet +1.63 by hand\n"),
            ("docs/method.md", "an interval [+0.10, +0.20] typed by hand\n```\n[+1.00, +2.00] in code\n```\n"),
            ("README.md", "## Archive: gone\nold +1.25\n## Next\nnew 2.5 and torch `2.13.0`\n")]
    found = quoted.problems(docs)
    assert any(f.startswith("docs/results.md:2: n:diff study=bench9 a=liaf b=none says '+9.99") and
               "'+2.57 [+0.15, +5.00]'" in f for f in found)
    assert any(f.startswith("docs/results.md:3: figure '+1.63' is typed by hand") for f in found)
    assert any(f.startswith("docs/method.md:1: figure '[+0.10, +0.20]'") for f in found)
    assert not any(f.startswith("docs/method.md:3") for f in found)  # code is exempt
    assert [f.split(" is typed")[0] for f in found if f.startswith("README")] == ["README.md:4: figure '2.5'"]


def test_spans_render_from_the_study_functions():
    assert quoted.render("diff", {"study": "bench9", "a": "fgfi", "b": "none"}) == "+5.00 [+3.06, +6.94]"
    assert quoted.render("count", {"study": "bench9", "pairwise": "1", "what": "size"}) == "78"
    assert quoted.render("verdict", {"study": "bench9", "a": "liaf", "b": "none"}) == "not distinguishable"
    rows = quoted._study("raccoon").rows
    assert quoted.render("runs", {"study": "raccoon"}) == str(len(rows))
    assert quoted.render("cpu_hours", {"study": "raccoon"}) == f"{sum(r['cpu_seconds'] for r in rows) / 3600:.2f}"
    with pytest.raises(quoted.QuoteError, match="study bench12 has rows without cpu_seconds"):
        quoted.render("cpu_hours", {"study": "bench12"})
    with pytest.raises(quoted.QuoteError, match="no shipped study 'nope'"):
        quoted.render("mean", {"study": "nope", "method": "liaf"})
    found = quoted.problems([("docs/x.md", "<!-- n:mean study=bench9 method=dino -->1<!-- /n -->")])
    assert found and "cannot compute n:mean" in found[0] and "no method 'dino'" in found[0]


def test_shipped_comparisons_are_what_the_shipped_rows_give():
    """``comparisons.json`` beside a shipped study's rows is the family its report computes (test, then val; a study
    without a test split: val; then a screen's own family)."""
    import json

    from liaf_lab import load_study_summary

    for folder in sorted((PROJECT_ROOT / "data_samples" / "studies").iterdir()):
        if (folder / "comparisons.json").is_file():
            study = load_study_summary(folder)
            also_val = (study.compare(pairwise=study.family.pairwise, versus=study.family.versus, split="val")
                        if study.split != "val" else [])  # the study's own family; a val-only study: once
            screen = study.screen() if study.grid_mode == "one_at_a_time" and study.grid else []
            rows = [c.as_row() for c in [*study.comparisons, *also_val, *screen]]
            assert json.loads((folder / "comparisons.json").read_text()) == json.loads(json.dumps(rows)), folder.name


def test_a_shipped_study_still_matches_its_preset_when_new_methods_add_tables():
    """bench9 ran before PKD, CWD, LD, BCKD and CrossKD existed: their ``[kd.*]`` tables, which none of its runs
    read, do not make it "another config"; a changed option of a method it ran does."""
    from liaf_lab import load_study_summary
    from liaf_lab.experiments.study import StudyError

    bench400 = ["distill.iterations=400", "distill.lr=0.02", "data.num_val=300", "data.num_test=300",
                "kd.maskd.custom_mask_warmup=11"]
    folder = PROJECT_ROOT / "data_samples" / "studies" / "bench9"
    assert load_study_summary(folder, config="bench", overrides=bench400).split == "test"
    with pytest.raises(StudyError, match="config.kd.fitnet.loss_weight"):
        load_study_summary(folder, config="bench", overrides=[*bench400, "kd.fitnet.loss_weight=0.3"])


def test_the_gfl_gap_block_in_docs_is_what_its_script_prints_from_the_shipped_rows():
    """docs/gfl.md quotes ``tools/gfl_gap.py``'s output (paired differences of the shipped gfl_gap study) verbatim."""
    spec = importlib.util.spec_from_file_location("gfl_gap", PROJECT_ROOT / "tools" / "gfl_gap.py")
    gfl_gap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gfl_gap)
    block = gfl_gap.report()
    assert "GFL - FCOS at 800" in block and "gap at 1600 - gap at 800" in block
    assert block in (PROJECT_ROOT / "docs" / "gfl.md").read_text()


def test_the_shares_table_summarises_each_variant_of_its_file(tmp_path, monkeypatch):
    import json

    rows = [{"method": "liaf", "variant": "default", "seed": s, "total": v} for s, v in ((0, 0.80), (1, 0.70))]
    rows += [{"method": "liaf", "variant": "kd.liaf.mask_scale=count", "seed": s, "total": v}
             for s, v in ((0, 0.25), (1, float("nan")))]
    rows.append({"method": "fitnet", "variant": "default", "seed": 0, "total": 0.5})
    (tmp_path / "screen").mkdir()
    (tmp_path / "screen" / "background_shares.json").write_text(json.dumps({"area": 0.9, "rows": rows}))
    monkeypatch.setattr(quoted, "STUDIES", tmp_path)
    assert quoted.render("shares", {"study": "screen"}).strip().splitlines()[2:] == [
        "| liaf | default | 2 | 75% [70%, 80%] |", "| liaf | kd.liaf.mask_scale=count | 2 | 25% [25%, 25%] |",
        "| fitnet | default | 1 | 50% [50%, 50%] |", "| (a loss that weighted every cell alike) | | | 90% |"]
    with pytest.raises(quoted.QuoteError, match="make it with tools/background_shares.py"):
        quoted.render("shares", {"study": "nope"})


def test_a_method_run_by_two_code_versions_is_compared_seed_by_seed(monkeypatch):
    from liaf_lab.experiments.verdicts import paired_interval

    class Fake:
        def __init__(self, rows):
            self.rows = rows

    def rows(aps):
        return [{"method": m, "variant": "default", "seed": s, "val_AP": ap / 100, "test_AP": ap / 100,
                 "cpu_seconds": ap} for m, by_seed in aps.items() for s, ap in by_seed.items()]

    studies = {"after": Fake(rows({"acam": {0: 30.0, 1: 31.5, 2: 29.0}, "none": {0: 20.0, 1: 21.0, 2: 22.0}})),
               "before": Fake(rows({"acam": {0: 30.5, 1: 31.0, 2: 28.0, 3: 40.0}, "none": {0: 20.0, 1: 21.0, 2: 22.5}}))}
    monkeypatch.setattr(quoted, "_study", studies.__getitem__)
    mean, low, high = paired_interval([30.0 - 30.5, 31.5 - 31.0, 29.0 - 28.0])
    args = {"study": "after", "before": "before", "method": "acam"}
    assert quoted.render("across", args) == f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"
    assert quoted.render("across", {**args, "what": "n"}) == "3"  # seed 3 ran only before
    assert "not distinguishable" in quoted.render("across", {**args, "what": "sentence"})
    assert quoted.render("same_ap", {**args, "method": "none"}) == "2 of 3"
    assert quoted.render("speed", args) == f"x{(30.5 + 31.0 + 28.0) / (30.0 + 31.5 + 29.0):.2f}"  # seed 3 left out
    with pytest.raises(quoted.QuoteError, match="share 0 seed"):
        quoted.render("across", {**args, "method": "liaf"})
