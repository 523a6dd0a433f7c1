"""The one report writer: a study's (per method mean AP ± std, and a family of paired comparisons with
Holm-adjusted verdicts; ``write_study_report``) and the demo's (a table of COCO metrics over seeds, figures, and the
shipped study's answer; ``write_report``).

``study_comparisons`` is the one place that turns a study's rows into comparisons (``liaf_lab.experiments.verdicts``):
the report, ``comparisons.csv``/``.json``, ``load_study_summary`` and the notebooks all call it.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ..utils.atomic import atomic_write, save_figure, write_json, write_text
from .config import ResolvedConfig, resolve_config
from ..distillers import BASELINE, method_label
from .study_folders import StudyError, read_differences, study_folder
from .verdicts import Comparison, PairedData, compare_family, format_p, paired_interval, stein_sample_size


@dataclass(frozen=True)
class Family:
    """Which comparisons a study makes, and how many seeds each gets.

    ``pairwise``: every pair of methods, not only each method against the baseline; ``versus``: methods
    every other method is also compared with. ``target_half_width`` (AP points) with ``max_seeds``:
    Stein's two-stage rule from the first ``len(pilot)`` seeds (``liaf_lab.experiments.verdicts``).
    """

    pairwise: bool = False
    versus: tuple[str, ...] = ()
    target_half_width: float | None = None
    max_seeds: int | None = None
    pilot: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"pairwise": self.pairwise, "versus": list(self.versus), "target_half_width": self.target_half_width,
                "max_seeds": self.max_seeds, "pilot": list(self.pilot)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Family:
        """Studies saved before families existed compare each method with the baseline."""
        d = d or {}
        return cls(bool(d.get("pairwise", False)), tuple(d.get("versus", ())), d.get("target_half_width"),
                   d.get("max_seeds"), tuple(d.get("pilot", ())))

    def pairs(self, methods: Sequence[str]) -> list[tuple[str, str]]:
        """``(a, b)`` for every comparison ``a - b`` of the family, in the order of ``methods``."""
        out = [(m, BASELINE) for m in methods if m != BASELINE]
        if self.pairwise:
            out += [(methods[j], methods[i]) for i in range(len(methods)) for j in range(i + 1, len(methods))
                    if BASELINE not in (methods[i], methods[j])]
        for ref in self.versus:
            out += [(ref, m) for m in methods if m not in (ref, BASELINE)
                    and (ref, m) not in out and (m, ref) not in out]
        return out

    def seeds_for(self, pilot_diffs: Sequence[float]) -> int:
        """Seeds a comparison gets: Stein's ``n`` from its pilot differences, capped by ``max_seeds``."""
        assert self.target_half_width is not None and self.max_seeds is not None
        return min(self.max_seeds, stein_sample_size(pilot_diffs, self.target_half_width))


def _pct(values: Sequence[float]) -> list[float]:
    return [100 * v for v in values]


def report_split(rows: list[dict[str, Any]]) -> str:
    """``"test"`` when every row has a test AP (the split results are reported on), else ``"val"``."""
    return "test" if rows and all("test_AP" in r for r in rows) else "val"


def seed_order(seeds: Sequence[int], family: Family) -> list[int]:
    """The order in which a comparison takes its seeds: a fixed-width study's pilot first, then ascending."""
    pilot = [s for s in family.pilot if s in seeds]
    return pilot + sorted(s for s in seeds if s not in pilot)


def extra_seeds(family: Family) -> list[int]:
    """The seeds a fixed-width study may add after its pilot: the next integers, up to ``max_seeds`` in all."""
    assert family.max_seeds is not None
    start = max(family.pilot) + 1
    return list(range(start, start + family.max_seeds - len(family.pilot)))


def _ap(rows: list[dict[str, Any]], split: str) -> dict[tuple[str, str], dict[int, float]]:
    """AP (%) on ``split`` by ``(method, variant)`` and seed."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    for r in rows:
        out.setdefault((r["method"], r["variant"]), {})[r["seed"]] = 100 * r[f"{split}_AP"]
    return out


def chosen_variants(rows: list[dict[str, Any]], methods: Sequence[str], grid: dict[str, list[str]]) -> dict[str, str]:
    """Per method, the grid variant with the best mean AP on ``val`` (the tuning split); without a grid, its one
    variant."""
    val = _ap(rows, "val")
    chosen = {}
    for method in methods:
        variants = sorted(v for (m, v) in val if m == method)
        chosen[method] = (max(variants, key=lambda v: statistics.fmean(val[(method, v)].values())) if grid
                          else variants[0])
    return chosen


def _paired(name_a: str, a: dict[int, float], name_b: str, b: dict[int, float], order: Sequence[int],
            family: Family, split: str) -> PairedData:
    """The differences ``a - b`` on their common seeds, in ``order``; a fixed-width family takes Stein's
    number of them (fewer while the study is unfinished)."""
    common = [s for s in order if s in a and s in b]
    pilot = None
    if family.target_half_width is not None:
        pilot = len(family.pilot)
        if common[:pilot] != list(family.pilot):
            raise StudyError(f"{name_a} − {name_b} on {split}: the pilot seeds {list(family.pilot)} are not all "
                             f"finished (have {common})")
        pilot_diffs = [a[s] - b[s] for s in common[:pilot]]
        common = common[: family.seeds_for(pilot_diffs)]
    return PairedData(name_a, name_b, common, [a[s] - b[s] for s in common], pilot, family.target_half_width)


def study_comparisons(rows: list[dict[str, Any]], methods: Sequence[str], grid: dict[str, list[str]], split: str,
                      family: Family = Family()) -> list[Comparison]:
    """The study's family of comparisons on ``split``: each method (at its variant chosen on ``val``) minus
    the baseline, plus every pair with ``family.pairwise`` and every method against ``family.versus``;
    one Holm correction over them all."""
    ap, chosen = _ap(rows, split), chosen_variants(rows, methods, grid)
    order = seed_order(sorted({r["seed"] for r in rows}), family)
    pairs = [_paired(a, ap[(a, chosen[a])], b, ap[(b, chosen[a] if b == BASELINE else chosen[b])], order, family,
                     split) for a, b in family.pairs(list(methods))]
    return compare_family("methods", split, pairs)


def distinct_runs(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run folder: a screen repeats the no-KD run's row under every variant whose keys it ignores (its
    ``folder`` is the same), which must count once in a study's runs and time."""
    seen: dict[Any, dict[str, Any]] = {}
    for i, row in enumerate(rows):
        seen.setdefault(row.get("folder", i), row)
    return list(seen.values())


def screen_comparisons(rows: list[dict[str, Any]], methods: Sequence[str], family: Family = Family()
                       ) -> list[Comparison]:
    """A one-at-a-time screen's own family, on ``val`` (the tuning split): every variant of a method minus
    the method's preset (``default``) on the same seeds, one Holm correction over all of them. The baseline's
    variants too, where a grid key changes it (e.g. ``student.num_groups``: a screen of the detector itself)."""
    ap = _ap(rows, "val")
    order = seed_order(sorted({r["seed"] for r in rows}), family)
    own = {(r["method"], r["variant"]) for r in rows if r.get("settings", r["variant"]) != "default"}
    pairs = []
    for method in methods:
        if (method, "default") not in ap:
            continue
        for (m, variant), values in sorted(ap.items()):
            if m == method and (m, variant) in own:  # not a variant whose runs are the preset's (kd.* for no KD)
                pairs.append(_paired(f"{method} [{variant}]", values, f"{method} [default]", ap[(method, "default")],
                                     order, family, "val"))
    return compare_family("screen", "val", pairs)


def plan_seeds(rows: list[dict[str, Any]], methods: Sequence[str], grid: dict[str, list[str]], grid_mode: str,
               family: Family) -> dict[tuple[str, str], list[int]]:
    """A fixed-width study's second stage, from the pilot's rows: the seeds each ``(method, variant)`` needs.

    Each comparison of the family (a screen's own family for a one-at-a-time grid) needs Stein's number of
    seeds, capped by ``max_seeds``; a method needs the most any of its comparisons does, and in a screen the
    baseline as many as any variant.
    """
    order = [*family.pilot, *extra_seeds(family)]
    if grid_mode == "one_at_a_time":
        keys = {f"{m} [{v}]": (m, v) for (m, v) in _ap(rows, "val")}
        named = [(keys[c.a], keys[c.b], c) for c in screen_comparisons(rows, methods, family)]
    else:
        chosen = chosen_variants(rows, methods, grid)
        named = [((c.a, chosen[c.a]), (c.b, chosen[c.a] if c.b == BASELINE else chosen[c.b]), c)
                 for c in study_comparisons(rows, methods, grid, report_split(rows), family)]
    need: dict[tuple[str, str], int] = {}
    for key_a, key_b, c in named:
        n = family.seeds_for(c.diffs[: len(family.pilot)])
        for key in (key_a, key_b):
            need[key] = max(need.get(key, 0), n)
    if grid_mode == "one_at_a_time":
        most = max(need.values(), default=len(family.pilot))
        need.update({(m, v): most for (m, v) in _ap(rows, "val") if m == BASELINE})
    return {key: order[:n] for key, n in need.items()}


def summarise(rows: list[dict[str, Any]], methods: Sequence[str], grid: dict[str, list[str]], split: str,
              family: Family = Family(), comparisons: Sequence[Comparison] | None = None) -> dict[str, Any]:
    """Per method: the variant chosen on ``val`` (best mean AP), and on ``split`` its AP per seed, mean, std
    and its comparison with the baseline (the paired differences, their 95% interval, p-value and
    Holm-adjusted p-value over the study's family: ``comparisons`` when already computed, as
    ``study_comparisons`` gives them)."""
    ap, chosen = _ap(rows, split), chosen_variants(rows, methods, grid)
    order = seed_order(sorted({r["seed"] for r in rows}), family)
    settings = {(r["method"], r["variant"]): r.get("settings", r["variant"]) for r in rows}
    if comparisons is None:
        comparisons = study_comparisons(rows, methods, grid, split, family)
    versus_baseline = {c.a: c for c in comparisons if c.b == BASELINE}
    summary: dict[str, Any] = {}
    for method in methods:
        values = ap[(method, chosen[method])]
        seeds = [s for s in order if s in values]
        entry: dict[str, Any] = {"variant": chosen[method], "settings": settings[(method, chosen[method])],
                                 "seeds": seeds, "AP": [values[s] for s in seeds]}
        entry.update(mean=statistics.fmean(entry["AP"]), std=statistics.stdev(entry["AP"]) if len(seeds) > 1 else 0.0)
        if method in versus_baseline:
            c = versus_baseline[method]
            entry.update({"paired_seeds": c.seeds, "diffs": c.diffs, "diff_mean": c.mean_diff, "ci_low": c.ci_low,
                          "ci_high": c.ci_high, "half_width": c.half_width, "p_value": c.p_value,
                          "p_holm": c.p_holm, "verdict": c.verdict})
        summary[method] = entry
    return summary


def _interval(entry: dict[str, Any]) -> str:
    if "diff_mean" not in entry:
        return "(baseline)"
    if math.isinf(entry["ci_high"]):
        return f"{entry['diff_mean']:+.2f} (one seed: no interval)"
    return f"{entry['diff_mean']:+.2f} [{entry['ci_low']:+.2f}, {entry['ci_high']:+.2f}]"


def study_figure(summary: dict[str, Any], split: str) -> Figure:
    """Per-seed AP of each method (points) with the mean and its 95% interval; paired differences beside,
    each method's marker filled where its Holm-adjusted verdict separates it from the baseline."""
    from .verdicts import t_quantile

    many = len(summary) > 6  # long lists of method names: wider, with slanted labels
    fig = Figure(figsize=(12, 4.2) if many else (9, 3.6))
    ticks = {"rotation": 45, "ha": "right"} if many else {}
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    names = list(summary)
    for i, name in enumerate(names):
        e = summary[name]
        ax.scatter([i] * len(e["AP"]), e["AP"], s=14, alpha=0.6, color=f"C{i}")
        n = len(e["AP"])
        if n > 1:
            half = t_quantile(n - 1) * e["std"] / math.sqrt(n)
            ax.errorbar([i + 0.15], [e["mean"]], yerr=[half], fmt="o", color="black", capsize=4)
    ax.set_xticks(range(len(names)), names, **ticks)
    ax.set_ylabel(f"AP on {split} (%)")
    ax.set_title("per seed; mean and 95% interval")
    others = [n for n in names if "diffs" in summary[n]]
    for i, name in enumerate(others):
        e = summary[name]
        bx.scatter([i] * len(e["diffs"]), e["diffs"], s=14, alpha=0.6, color=f"C{names.index(name)}")
        if not math.isinf(e["ci_high"]):
            err = [[e["diff_mean"] - e["ci_low"]], [e["ci_high"] - e["diff_mean"]]]
            separated = e["verdict"] in ("above", "below")
            bx.errorbar([i + 0.15], [e["diff_mean"]], yerr=err, fmt="o", color="black", capsize=4,
                        markerfacecolor="black" if separated else "white")
    bx.axhline(0, color="grey", lw=1)
    bx.set_xticks(range(len(others)), others, **ticks)
    bx.set_ylabel(f"AP - {BASELINE} AP, same seed")
    bx.set_title("paired difference, 95% t interval\n(filled: Holm-adjusted p < 0.05 over the family)")
    fig.tight_layout()
    return fig


def plot_study(summary: dict[str, Any], path: Path, split: str) -> Path:
    """``study_figure`` saved to ``path``."""
    save_figure(study_figure(summary, split), path, dpi=100)
    return path


def summary_table(summary: dict[str, Any]) -> list[str]:
    """The report's Markdown table, one row per method: seeds, AP, and the comparison with the baseline."""
    lines = [f"| method | settings | seeds | AP mean ± std | AP - {BASELINE} [95% CI] | p (Holm) | verdict |",
             "|---|---|---|---|---|---|---|"]
    for method, e in summary.items():
        p = format_p(e["p_holm"]) if "p_holm" in e else ""
        lines.append(f"| {method} | {e['settings']} | {len(e['AP'])} | {e['mean']:.2f} ± {e['std']:.2f} | "
                     f"{_interval(e)} | {p} | {e.get('verdict', '(baseline)')} |")
    return lines


def comparisons_table(comparisons: Sequence[Comparison]) -> list[str]:
    """A Markdown table of a family's comparisons, then one verdict sentence each."""
    if not comparisons:
        return []
    c0 = comparisons[0]
    fam = (f"The family `{c0.family}` on `{c0.split}` has {c0.family_size} comparison"
           + ("s; verdicts follow the Holm-adjusted p-value at 5%, which holds for the family as a whole."
              if c0.family_size > 1 else "; a family of one needs no correction."))
    fixed = c0.target_half_width is not None
    lines = [fam, "", "| a − b | seeds | mean [95% CI] | p | p (Holm) | verdict | bootstrap 95% | a above b |"
             + (f" half-width (target {c0.target_half_width}) | seeds used |" if fixed else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if fixed else "")]
    for c in comparisons:
        boot = "" if math.isinf(c.boot_high) else f"[{c.boot_low:+.2f}, {c.boot_high:+.2f}]"
        lines.append(f"| {c.a} − {c.b} | {c.n} | {c.interval()} | {format_p(c.p_value)} | {format_p(c.p_holm)} | {c.verdict} | "
                     f"{boot} | {c.win_fraction:.0%} |"
                     + (f" {c.half_width:.2f} | {', '.join(map(str, c.seeds))} |" if fixed else ""))
    return lines + ["", *[f"- {c.sentence()}" for c in comparisons]]


def write_comparisons(out: Path, comparisons: Sequence[Comparison]) -> None:
    """``comparisons.csv`` and ``comparisons.json`` in ``out``: one row per comparison (AP in percent)."""
    rows = [c.as_row() for c in comparisons]
    write_json(out / "comparisons.json", rows)
    fields = list(Comparison.__dataclass_fields__)
    with atomic_write(out / "comparisons.csv", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)


@dataclass
class StudySummary:
    """A study folder read back (``load_study_summary``): its ``rows`` (one per run), ``methods``,
    ``seeds``, ``grid``, the ``split`` the AP is reported on, the per-method ``summary``, the ``family`` of
    comparisons it declared and those ``comparisons``."""

    rows: list[dict[str, Any]]
    methods: list[str]
    seeds: list[int]
    grid: dict[str, list[str]]
    split: str
    summary: dict[str, Any]
    family: Family = field(default_factory=Family)
    comparisons: list[Comparison] = field(default_factory=list)
    grid_mode: str = "product"

    def table(self) -> str:
        """The Markdown tables and verdicts of the study's report."""
        return "\n".join([*summary_table(self.summary), "", *comparisons_table(self.comparisons)])

    def figure(self) -> Figure:
        """``study_figure`` of the summary."""
        return study_figure(self.summary, self.split)

    def compare(self, pairwise: bool = False, versus: Sequence[str] = (), split: str | None = None,
                methods: Sequence[str] | None = None, fixed_width: bool = True) -> list[Comparison]:
        """The comparisons of another family of this study's runs (Holm-corrected over that family).

        ``fixed_width=False`` reads a fixed-width study as a plain one: each comparison on every seed both methods
        ran, with Student's t on their own spread (``n - 1`` degrees of freedom) instead of Stein's interval on
        the pilot's. A secondary analysis, to be labelled as such: the study's plan is its fixed-width family."""
        methods = list(methods or self.methods)
        for name in [*methods, *versus]:
            self._check(name)
        family = (Family(pairwise, tuple(versus), self.family.target_half_width, self.family.max_seeds,
                         self.family.pilot) if fixed_width else Family(pairwise, tuple(versus)))
        return study_comparisons(self.rows, methods, self.grid, split or self.split, family)

    def screen(self, fixed_width: bool = True) -> list[Comparison]:
        """A one-at-a-time screen's own family on ``val``, as its report gives it (``screen_comparisons``: each value
        against its method's preset); ``fixed_width=False`` reads a fixed-width screen as a plain one (a secondary
        analysis, as in ``compare``). ``StudyError`` for a study that is not a screen."""
        if self.grid_mode != "one_at_a_time" or not self.grid:
            raise StudyError("the study is not a one-at-a-time screen (--one-at-a-time --grid ...): it has no screen "
                             "family; see compare()")
        return screen_comparisons(self.rows, self.methods, self.family if fixed_width else Family())

    def comparison(self, a: str, b: str) -> Comparison:
        """The comparison ``a - b`` of the study's own family (``StudyError`` if the family lacks it)."""
        for c in self.comparisons:
            if (c.a, c.b) == (a, b):
                return c
        raise StudyError(f"the study's family has no comparison {a} − {b}; it has "
                         f"{[f'{c.a} − {c.b}' for c in self.comparisons]} (see compare(pairwise=True))")

    def difference(self, a: str, b: str) -> tuple[float, float, float]:
        """AP of method ``a`` minus method ``b`` on ``split``, paired by seed: ``(mean, low, high)``, the
        per-comparison Student's t 95% interval (each method at its chosen variant; no family correction)."""
        for name in (a, b):
            self._check(name)
        ea, eb = self.summary[a], self.summary[b]
        pb = dict(zip(eb["seeds"], eb["AP"], strict=True))
        return paired_interval([x - pb[s] for s, x in zip(ea["seeds"], ea["AP"], strict=True) if s in pb])

    def _check(self, name: str) -> None:
        if name not in self.summary:
            raise StudyError(f"the study has no method {name!r}; it has {self.methods}")


def load_study_summary(study_dir: str | Path, config: str | Path | ResolvedConfig | None = None,
                       overrides: Sequence[str] = ()) -> StudySummary:
    """Read a study folder's ``study.json`` and ``results.json`` and summarise them as its report does.

    With ``config`` (a preset name or path, or a config already resolved, with ``overrides``), the study must have
    been run on that config (grid keys aside). Raises ``StudyError`` naming the problem: no study there, no finished
    rows yet, or a study of another config (the differing keys are listed).
    """
    from ..engine.run_folder import describe_differences, spec_differences

    out = study_folder(study_dir)
    spec = json.loads((out / "study.json").read_text())
    if config is not None:
        resolved = resolve_config(config, list(overrides))
        expected = json.loads(json.dumps(resolved, default=str))
        diffs = {k: v for k, v in read_differences(spec_differences({"config": spec["config"]}, {"config": expected}),
                                                   spec["methods"]).items()
                 if k.removeprefix("config.") not in spec["grid"]}
        if diffs:
            raise StudyError(f"{out} holds a study of another config than {resolved.source!r} "
                             f"({describe_differences(diffs)}; \"now\" is {resolved.source!r})")
    rows = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else []
    if not rows:
        raise StudyError(f"{out} has no results yet (results.json missing or empty): the study has not finished "
                         "a pass; re-run the same `liaf-lab study` command to resume it")
    methods = [m for m in spec["methods"] if any(r["method"] == m for r in rows)]
    seeds = sorted({r["seed"] for r in rows})
    split, family = report_split(rows), Family.from_dict(spec.get("family"))
    comparisons = study_comparisons(rows, methods, spec["grid"], split, family)
    return StudySummary(rows, methods, seeds, spec["grid"], split,
                        summarise(rows, methods, spec["grid"], split, family, comparisons), family, comparisons,
                        spec.get("grid_mode", "product"))


def write_study_report(out: Path, rows: list[dict[str, Any]], methods: Sequence[str], seeds: Sequence[int],
                       grid: dict[str, list[str]], seconds: float, grid_mode: str = "product",
                       family: Family = Family()) -> tuple[Path, dict[str, Any]]:
    """``results.csv``, ``results.json``, ``summary.json``, ``comparisons.csv``/``.json``, ``study.png`` and
    ``report.md`` in ``out``."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_write(out / "results.csv", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    write_json(out / "results.json", rows)
    split = report_split(rows)
    main = study_comparisons(rows, methods, grid, split, family)
    summary = summarise(rows, methods, grid, split, family, main)
    write_json(out / "summary.json", summary, default=str)
    tuning = study_comparisons(rows, methods, grid, "val", family) if split == "test" else []
    screen = screen_comparisons(rows, methods, family) if grid and grid_mode == "one_at_a_time" else []
    write_comparisons(out, [*main, *tuning, *screen])
    plot_study(summary, out / "study.png", split)
    runs = distinct_runs(rows)
    run_minutes = sum(r["seconds"] for r in runs if "seconds" in r) / 60
    timed = [r["cpu_seconds"] for r in runs if "cpu_seconds" in r]
    cpu = f", {sum(timed) / 3600:.2f} CPU-hours in the {len(timed)} runs that record it" if timed else ""
    lines = [
        "# Study report", "",
        f"Methods {list(methods)}, seeds {list(seeds)}, grid {grid or 'none'}"
        + (" (one value at a time)" if grid and grid_mode == "one_at_a_time" else "") + f"; {len(runs)} runs "
        f"({run_minutes:.1f} min of training and evaluation in the runs{cpu}, {seconds / 60:.1f} min for this "
        "call).", "",
        f"AP (COCO bbox, %) on the **{split}** split. Differences are paired by seed (same initial weights and "
        "batches); each interval is Student's t 95% for that comparison alone, and each verdict follows the "
        "Holm-adjusted p-value over the study's family of comparisons (`comparisons.csv`).",
    ]
    if family.target_half_width is not None:
        lines.append(f"Seeds were chosen by Stein's two-stage rule for a half-width of {family.target_half_width} AP "
                     f"(pilot seeds {list(family.pilot)}, at most {family.max_seeds} seeds): each interval is "
                     "mean ± t(pilot − 1) · s_pilot / √n, and the table gives the seeds and half-width each "
                     "comparison reached.")
    if grid:
        lines.append("Grid values were chosen per method by the best mean AP on the `val` split"
                     + (", and are reported on `test`." if split == "test" else
                        "; this config has no test split, so the AP below is that of the split they were tuned "
                        "on and is optimistic."))
    lines += ["", *summary_table(summary), "", *comparisons_table(main), "", "![study](study.png)", ""]
    if tuning:
        lines += ["## The same family on `val` (the tuning split)", "", *comparisons_table(tuning), ""]
    if grid:
        lines += _variant_table(rows, methods, split, grid_mode)
    if screen:
        lines += ["## The screen: each value against its method's preset", "", *comparisons_table(screen), ""]
    path = out / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path, summary


def _variant_table(rows: list[dict[str, Any]], methods: Sequence[str], split: str, grid_mode: str) -> list[str]:
    """Every grid variant on ``val`` against the baseline (and, in a screen, its method's preset): tuning
    information, per comparison, without family correction."""
    screen = grid_mode == "one_at_a_time"
    lines = ["## Every variant", "",
             f"The paired difference to `{BASELINE}` on `val` (the tuning split), Student's t 95% over the seeds"
             + (", and, one value at a time, to the same method's preset (`default`) of the same seed" if screen
                else "") + "; per comparison, without family correction (the screen's verdicts are below).",
             "", f"| method | variant | val AP | val AP - {BASELINE} [95% CI] | "
             + ("val AP - preset [95% CI] | " if screen else "") + (f"{split} AP |" if split != "val" else ""),
             "|---|---|---|---|" + ("---|" if screen else "") + ("---|" if split != "val" else "")]
    val = _ap(rows, "val")

    def paired(method: str, variant: str, other: str, other_variant: str) -> str:
        a, b = val[(method, variant)], val[(other, other_variant)]
        mean, low, high = paired_interval([a[s] - b[s] for s in sorted(a) if s in b])
        return _interval({"diff_mean": mean, "ci_low": low, "ci_high": high})

    for method in methods:
        for settings in sorted({r["settings"] for r in rows if r["method"] == method}):
            sel = [r for r in rows if r["method"] == method and r["settings"] == settings]
            variant = sel[0]["variant"]
            cells = [f"{statistics.fmean(_pct([r['val_AP'] for r in sel])):.2f}"]
            preset = settings == "default"
            if method == BASELINE:  # in a screen its own variants are measured against its preset
                cells.append("(baseline)" if preset or not screen else paired(method, variant, method, "default"))
            else:
                cells.append(paired(method, variant, BASELINE, variant))
            if screen:
                cells.append("(preset)" if preset else paired(method, variant, method, "default"))
            if split != "val":
                cells.append(f"{statistics.fmean(_pct([r['test_AP'] for r in sel])):.2f}")
            lines.append(f"| {method} | {settings} | " + " | ".join(cells) + " |")
    return lines + [""]


# -- the demo's report ------------------------------------------------------------------------------------------
COLUMNS = ["AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L", "AR100"]


def student_label(method: str) -> str:
    """``"Student (no KD)"``, ``"Student + LIAF-KD"``, ... from the registry's labels."""
    return "Student (no KD)" if method == BASELINE else f"Student + {method_label(method)}"


def _cell(values: list[float]) -> str:
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.1f}"
    return f"{statistics.fmean(pct):.1f} ± {statistics.stdev(pct):.1f}"


def metrics_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per model, COCO metrics in percent, ``mean ± std`` over seeds."""
    lines = ["| model | seeds | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    if results["teacher"] is not None:
        lines.append("| Teacher | - | " + " | ".join(_cell([results["teacher"][c]]) for c in COLUMNS) + " |")
    for method, rows in results["students"].items():
        if rows:
            lines.append(f"| {student_label(method)} | {len(rows)} | "
                         + " | ".join(_cell([r[c] for r in rows]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def _axes():
    """One axes on a figure built without pyplot (no global backend or figure state)."""
    fig = Figure(figsize=(7, 3.5))
    return fig, fig.add_subplot()


def _save(fig: Figure, ax, path: Path) -> Path:
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def plot_ap(results: dict[str, Any], path: Path) -> Path:
    """Bar chart of AP and AP50 per model with the seed-to-seed std as error bars."""
    teacher = [] if results["teacher"] is None else [("Teacher", [results["teacher"]])]
    names, series = zip(*teacher, *[(student_label(m), rows) for m, rows in results["students"].items() if rows],
                        strict=True)
    fig, ax = _axes()
    for j, metric in enumerate(["AP", "AP50"]):
        means = [statistics.fmean(100 * r[metric] for r in rows) for rows in series]
        stds = [statistics.stdev([100 * r[metric] for r in rows]) if len(rows) > 1 else 0 for rows in series]
        ax.bar([i + 0.4 * j for i in range(len(names))], means, 0.4, yerr=stds, capsize=3, label=metric)
    ax.set_xticks([i + 0.2 for i in range(len(names))], names, rotation=15)
    ax.set_ylabel("percent")
    return _save(fig, ax, path)


def plot_losses(runs: dict[str, Path], path: Path) -> Path:
    """Total training loss over iterations for several runs' ``metrics.csv``."""
    fig, ax = _axes()
    for name, csv_path in runs.items():
        if csv_path.exists():
            with csv_path.open() as f:
                rows = list(csv.DictReader(f))
            ax.plot([int(r["iteration"]) for r in rows], [float(r["loss"]) for r in rows], label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    return _save(fig, ax, path)


# The shipped study of each preset whose family-wise verdicts the demo's report shows (docs/results.md): the
# demo's own preset first, so that a newcomer's first table sits beside the measured answer on that recipe.
SHIPPED_STUDIES = {"tiny": "data_samples/studies/tiny6", "bench": "data_samples/studies/bench_all"}


def shipped_study_section(config: str = "tiny", study: str | Path | None = None, changed: bool = False) -> list[str]:
    """The measured answer a one-seed demo cannot give: the shipped study of preset ``config`` (``SHIPPED_STUDIES``,
    or ``study``) with every pair of its methods compared and Holm-adjusted over that family, as Markdown lines (a line naming what is missing
    when no study of that preset ships or its folder is absent). ``changed``: the demo changed the preset (quick
    mode, overrides), which the section then says."""
    from .study_folders import StudyError

    study = study if study is not None else SHIPPED_STUDIES.get(config)
    if study is None:
        return ["## The measured answer", "", f"(No study of the {config!r} preset ships with liaf_lab; "
                f"`liaf-lab study --config {config}` measures one. Shipped: {', '.join(SHIPPED_STUDIES.values())}.)", ""]
    try:
        summary = load_study_summary(study)
    except StudyError as err:
        return ["## The measured answer", "", f"(The shipped study is not available here: {err}.)", ""]
    note = (f" The demo above changed the {config!r} preset (quick mode or overrides); the study ran it as shipped."
            if changed else "")
    return ["## The measured answer: the shipped study", "",
            f"`{study}` ({len(summary.seeds)} paired seeds per method, every method on the same students and "
            f"batches; its recipe and caveats: docs/results.md). AP on the {summary.split} split, every pair of "
            f"methods in one family:{note}", "", *comparisons_table(summary.compare(pairwise=True)), ""]


def write_report(out: Path, results: dict[str, Any], cfg: dict[str, Any], study_dir: Path, config: str = "tiny",
                 changed: bool = False) -> Path:
    """The demo's ``report.md``, with ``ap.png`` / ``losses_seed*.png`` beside it: ``results`` (``run_demo``'s: the
    teacher's and each student's val metrics, each student row with its ``folder`` in the study ``study_dir``)."""
    plot_ap(results, out / "ap.png")
    seeds = sorted({r["seed"] for rows in results["students"].values() for r in rows})
    figures = []
    for seed in seeds:
        runs = {student_label(m): study_dir / r["folder"] / "metrics.csv"
                for m, rows in results["students"].items() for r in rows if r["seed"] == seed}
        figures.append(plot_losses(runs, out / f"losses_seed{seed}.png").name)
    t, s = cfg["teacher"], cfg["student"]
    text = [
        "# Demo report", "",
        f"Teacher: {t['arch']} ResNet-{t['depth']} x{t['width_mult']} FPN {t['fpn_channels']} "
        f"({results['teacher_source']}); student: {s['arch']} ResNet-{s['depth']} x{s['width_mult']} "
        f"FPN {s['fpn_channels']}; input {cfg['input']['min_size']} px; stage 2: {cfg['distill']['iterations']} iterations; "
        f"seeds {seeds}; {results['seconds'] / 60:.1f} min in all.", "",
        "COCO bbox metrics (pycocotools) on the validation split, in percent; `mean ± std` over seeds.", "",
        metrics_table(results), "",
        "What this can show: that the recipe runs end to end and roughly where each model lands. What it "
        f"cannot show: which method is better. With {len(seeds)} seed(s), a student's AP moves by several "
        "points with the seed alone, as much as the differences between methods here. `liaf-lab study` "
        "trains paired seeds (every method from the same initial weights and batches) and reports each "
        "method's difference to no KD with a 95% interval and a verdict corrected over the family of "
        "comparisons; the shipped study's answer is below.", "",
        f"The demo is that study on its own seeds: its runs, rows and paired comparisons are in "
        f"`{study_dir.name}/` (`{study_dir.name}/report.md`; intervals need two seeds or more).", "",
        "![AP per model](ap.png)", "",
        *[f"![training loss]({name})" for name in figures], "",
        *shipped_study_section(config, changed=changed),
    ]
    path = out / "report.md"
    write_text(path, "\n".join(text))
    return path
