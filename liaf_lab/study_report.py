"""A study's report: per method mean AP ± std and the paired difference to the baseline with its 95% interval."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .atomic import atomic_write, save_figure, write_json, write_text
from .study import BASELINE, StudyError, paired_interval, study_folder


def _pct(values: Sequence[float]) -> list[float]:
    return [100 * v for v in values]


def summarise(rows: list[dict[str, Any]], methods: Sequence[str], grid: dict[str, list[str]],
              split: str) -> dict[str, Any]:
    """Per method: the variant chosen on ``val`` (best mean AP), and on ``split`` its AP per seed, mean, std
    and the paired difference to the baseline of the same seed with its Student's t 95% interval."""
    by = {(r["method"], r["variant"], r["seed"]): r for r in rows}
    variants = sorted({r["variant"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    summary: dict[str, Any] = {}
    for method in methods:
        def val_mean(v: str) -> float:
            return statistics.fmean(by[(method, v, s)]["val_AP"] for s in seeds)

        chosen = max(variants, key=val_mean) if grid else variants[0]
        ap = [100 * by[(method, chosen, s)][f"{split}_AP"] for s in seeds]
        entry: dict[str, Any] = {"variant": chosen, "settings": by[(method, chosen, seeds[0])]["settings"],
                                 "seeds": seeds, "AP": ap, "mean": statistics.fmean(ap),
                                 "std": statistics.stdev(ap) if len(ap) > 1 else 0.0}
        if method != BASELINE:
            diffs = [a - 100 * by[(BASELINE, chosen, s)][f"{split}_AP"] for a, s in zip(ap, seeds)]
            mean, low, high = paired_interval(diffs)
            entry.update({"diffs": diffs, "diff_mean": mean, "ci_low": low, "ci_high": high,
                          "half_width": (high - low) / 2})
        summary[method] = entry
    return summary


def verdict(method: str, entry: dict[str, Any]) -> str:
    """A plain sentence on the paired difference: distinguishable from the baseline or not."""
    n = len(entry["seeds"])
    if n < 2:
        return f"{method}: one seed gives no interval; nothing can be said about the difference."
    if entry["ci_low"] <= 0 <= entry["ci_high"]:
        return f"{method}: not distinguishable from the baseline with {n} seeds."
    side = "above" if entry["diff_mean"] > 0 else "below"
    return f"{method}: {side} the baseline with {n} seeds (the 95% interval excludes 0)."


def _interval(entry: dict[str, Any]) -> str:
    if "diff_mean" not in entry:
        return "(baseline)"
    if math.isinf(entry["ci_high"]):
        return f"{entry['diff_mean']:+.2f} (one seed: no interval)"
    return f"{entry['diff_mean']:+.2f} [{entry['ci_low']:+.2f}, {entry['ci_high']:+.2f}]"


def study_figure(summary: dict[str, Any], split: str) -> Figure:
    """Per-seed AP of each method (points) with the mean and its 95% interval; paired differences beside."""
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
            from scipy import stats

            half = stats.t.ppf(0.975, n - 1) * e["std"] / math.sqrt(n)
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
            bx.errorbar([i + 0.15], [e["diff_mean"]], yerr=err, fmt="o", color="black", capsize=4)
    bx.axhline(0, color="grey", lw=1)
    bx.set_xticks(range(len(others)), others, **ticks)
    bx.set_ylabel(f"AP - {BASELINE} AP, same seed")
    bx.set_title("paired difference; 95% t interval")
    fig.tight_layout()
    return fig


def plot_study(summary: dict[str, Any], path: Path, split: str) -> Path:
    """``study_figure`` saved to ``path``."""
    save_figure(study_figure(summary, split), path, dpi=100)
    return path


def summary_table(summary: dict[str, Any]) -> list[str]:
    """The report's Markdown table (one row per method) and a verdict sentence per KD method."""
    lines = [f"| method | settings | seeds | AP mean ± std | AP - {BASELINE} [95% CI] |", "|---|---|---|---|---|"]
    for method, e in summary.items():
        lines.append(f"| {method} | {e['settings']} | {len(e['AP'])} | {e['mean']:.2f} ± {e['std']:.2f} | "
                     f"{_interval(e)} |")
    return lines + ["", *[f"- {verdict(m, e)}" for m, e in summary.items() if m != BASELINE]]


@dataclass
class StudySummary:
    """A study folder read back (``load_study_summary``): its ``rows`` (one per run), ``methods``,
    ``seeds``, ``grid``, the ``split`` the AP is reported on and the per-method ``summary``."""

    rows: list[dict[str, Any]]
    methods: list[str]
    seeds: list[int]
    grid: dict[str, list[str]]
    split: str
    summary: dict[str, Any]

    def table(self) -> str:
        """The Markdown table and verdicts of the study's report."""
        return "\n".join(summary_table(self.summary))

    def figure(self) -> Figure:
        """``study_figure`` of the summary."""
        return study_figure(self.summary, self.split)

    def difference(self, a: str, b: str) -> tuple[float, float, float]:
        """AP of method ``a`` minus method ``b`` on ``split``, paired by seed: ``(mean, low, high)``, the
        Student's t 95% interval (each method at its chosen variant)."""
        for name in (a, b):
            if name not in self.summary:
                raise StudyError(f"the study has no method {name!r}; it has {self.methods}")
        ea, eb = self.summary[a], self.summary[b]
        return paired_interval([x - y for x, y in zip(ea["AP"], eb["AP"])])


def load_study_summary(study_dir: str | Path, config: str | None = None,
                       overrides: Sequence[str] = ()) -> StudySummary:
    """Read a study folder's ``study.json`` and ``results.json`` and summarise them as its report does.

    With ``config`` (a preset name or path, with ``overrides``), the study must have been run on that
    config (grid keys aside). Raises ``StudyError`` naming the problem: no study there, no finished rows yet, or a
    study of another config (the differing keys are listed).
    """
    from .config import load_config
    from .engine.loop import describe_differences, spec_differences

    out = study_folder(study_dir)
    spec = json.loads((out / "study.json").read_text())
    if config is not None:
        expected = json.loads(json.dumps(load_config(config, list(overrides)), default=str))
        diffs = {k: v for k, v in spec_differences({"config": spec["config"]}, {"config": expected}).items()
                 if k.removeprefix("config.") not in spec["grid"]}
        if diffs:
            raise StudyError(f"{out} holds a study of another config than {config!r} "
                             f"({describe_differences(diffs)}; \"now\" is {config!r})")
    rows = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else []
    if not rows:
        raise StudyError(f"{out} has no results yet (results.json missing or empty): the study has not finished "
                         "a pass; re-run the same `liaf-lab study` command to resume it")
    methods = [m for m in spec["methods"] if any(r["method"] == m for r in rows)]
    seeds = sorted({r["seed"] for r in rows})
    split = "test" if all("test_AP" in r for r in rows) else "val"
    return StudySummary(rows, methods, seeds, spec["grid"], split, summarise(rows, methods, spec["grid"], split))


def write_study_report(out: Path, rows: list[dict[str, Any]], methods: Sequence[str], seeds: Sequence[int],
                       grid: dict[str, list[str]], seconds: float,
                       grid_mode: str = "product") -> tuple[Path, dict[str, Any]]:
    """``results.csv``, ``results.json``, ``study.png`` and ``report.md`` in ``out``."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_write(out / "results.csv", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    write_json(out / "results.json", rows)
    split = "test" if all("test_AP" in r for r in rows) else "val"
    summary = summarise(rows, methods, grid, split)
    write_json(out / "summary.json", summary, default=str)
    plot_study(summary, out / "study.png", split)
    run_minutes = sum(r["seconds"] for r in rows if "seconds" in r) / 60
    lines = [
        "# Study report", "",
        f"Methods {list(methods)}, seeds {list(seeds)}, grid {grid or 'none'}"
        + (" (one value at a time)" if grid and grid_mode == "one_at_a_time" else "") + f"; {len(rows)} runs "
        f"({run_minutes:.1f} min of training and evaluation in the runs, {seconds / 60:.1f} min for this call).", "",
        f"AP (COCO bbox, %) on the **{split}** split. The difference to `{BASELINE}` is paired by seed "
        "(same initial weights and batches); its interval is Student's t 95% over the seeds.",
    ]
    if grid:
        lines.append("Grid values were chosen per method by the best mean AP on the `val` split"
                     + (", and are reported on `test`." if split == "test" else
                        "; this config has no test split, so the AP below is that of the split they were tuned "
                        "on and is optimistic."))
    lines += ["", *summary_table(summary), "", "![study](study.png)", ""]
    if grid:
        screen = grid_mode == "one_at_a_time"
        lines += ["## Every variant", "",
                  f"The paired difference to `{BASELINE}` on `val` (the tuning split), Student's t 95% over the seeds"
                  + (", and, one value at a time, to the same method's preset (`default`) of the same seed." if screen
                     else "."),
                  "", f"| method | variant | val AP | val AP - {BASELINE} [95% CI] | "
                  + ("val AP - preset [95% CI] | " if screen else "") + (f"{split} AP |" if split != "val" else ""),
                  "|---|---|---|---|" + ("---|" if screen else "") + ("---|" if split != "val" else "")]
        val_ap = {(r["method"], r["variant"], r["seed"]): 100 * r["val_AP"] for r in rows}

        def paired(sel: list[dict[str, Any]], method: str, variant: str | None) -> str:
            """``sel`` minus ``method``'s runs of the same seed, of ``variant`` (``None``: each row's own)."""
            diffs = [val_ap[(r["method"], r["variant"], r["seed"])] - val_ap[(method, variant or r["variant"], r["seed"])]
                     for r in sel]
            mean, low, high = paired_interval(diffs)
            return _interval({"diff_mean": mean, "ci_low": low, "ci_high": high})

        for method in methods:
            for variant in sorted({r["settings"] for r in rows if r["method"] == method}):
                sel = [r for r in rows if r["method"] == method and r["settings"] == variant]
                cells = [f"{statistics.fmean(_pct([r['val_AP'] for r in sel])):.2f}"]
                cells.append("(baseline)" if method == BASELINE else paired(sel, BASELINE, None))
                if screen:
                    cells.append("(preset)" if variant == "default" or method == BASELINE
                                 else paired(sel, method, "default"))
                if split != "val":
                    cells.append(f"{statistics.fmean(_pct([r['test_AP'] for r in sel])):.2f}")
                lines.append(f"| {method} | {variant} | " + " | ".join(cells) + " |")
    path = out / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path, summary
