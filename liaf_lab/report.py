"""The demo's report: a Markdown table of COCO metrics (mean and spread over seeds) and figures."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .atomic import save_figure, write_text
from .distillers import BASELINE, method_label

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
    names = ["Teacher"] + [student_label(m) for m, rows in results["students"].items() if rows]
    series = [[results["teacher"]]] + [rows for rows in results["students"].values() if rows]
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
SHIPPED_STUDIES = {"tiny": "data_samples/studies/tiny6", "bench": "data_samples/studies/bench12"}


def shipped_study_section(config: str = "tiny", study: str | Path | None = None, changed: bool = False) -> list[str]:
    """The measured answer a one-seed demo cannot give: the shipped study of preset ``config`` (``SHIPPED_STUDIES``,
    or ``study``) with every pair of its methods compared and Holm-adjusted over that family, as Markdown lines (a line naming what is missing
    when no study of that preset ships or its folder is absent). ``changed``: the demo changed the preset (quick
    mode, overrides), which the section then says."""
    from .study_folders import StudyError
    from .study_report import comparisons_table, load_study_summary

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


def write_report(out: Path, results: dict[str, Any], cfg: dict[str, Any], config: str = "tiny",
                 changed: bool = False) -> Path:
    """Write ``report.md`` with the table and ``ap.png`` / ``losses_seed*.png`` beside it."""
    plot_ap(results, out / "ap.png")
    seeds = sorted({r["seed"] for rows in results["students"].values() for r in rows})
    figures = []
    for seed in seeds:
        runs = {student_label(m): out / f"seed{seed}" / m / "metrics.csv" for m in results["students"]}
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
        "![AP per model](ap.png)", "",
        *[f"![training loss]({name})" for name in figures], "",
        *shipped_study_section(config, changed=changed),
    ]
    path = out / "report.md"
    write_text(path, "\n".join(text))
    return path
