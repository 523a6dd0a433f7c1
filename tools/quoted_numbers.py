"""Every figure quoted in README.md, docs/ and the notebooks' text, generated from a shipped result file.

A quoted figure sits between two HTML comments (invisible once rendered) that say how to compute it::

    LIAF-KD − no KD <!-- n:diff study=bench12 a=liaf b=none -->+0.79 [+0.34, +1.24]<!-- /n -->

``python tools/quoted_numbers.py`` checks that every such span holds what its artefact gives today, and
that no figure is typed by hand where none may be (README.md and docs/results.md outside archive
sections; study intervals anywhere in docs/ and the notebooks' Markdown). ``--write`` regenerates the
spans in place. Studies are read from ``data_samples/studies/<name>/`` (``study.json`` and
``results.json``, shipped) with ``liaf_lab.load_study_summary``, the function the reports use.

Kinds (``key=value`` arguments; ``split`` defaults to the study's report split; ``pairwise=1`` or
``versus=m`` choose the family a comparison is corrected over, default each method against ``none``; ``screen=1``
the family of a one-at-a-time screen on ``val``, each value against its method's preset, a comparison named by
``method=M variant=V`` instead of ``a`` and ``b`` (``variant=kd.liaf.mask_scale=count``); ``plain=1``
reads a fixed-width study as a plain one, every seed and Student's t: ``StudySummary.compare(fixed_width=False)``):

- ``methods study=S``: the per-method Markdown table; ``family study=S``: the family's comparison table.
- ``diff``, ``p``, ``p_holm``, ``verdict``, ``wins``, ``n``, ``halfwidth``, ``sentence`` ``study=S a=A b=B``: one
  comparison (``sentence``: its verdict as the report writes it).
- ``mean``, ``aps``, ``seeds`` ``study=S method=M``: a method's AP mean ± std, per-seed APs, seed count;
  ``ap study=S method=M seed=N``: one run's AP.
- ``count study=S what=excludes0|separated|size``: comparisons of the family whose 95% interval
  excludes 0, whose Holm verdict separates them, or how many there are.
- ``minutes study=S``: minutes of run time of the study's runs; ``cpu_hours study=S``: their CPU time (each run's
  process); ``runs study=S``: how many runs (a screen's no-KD row repeated under several variants counts once).
- ``shares study=S``: the table of ``S``'s ``background_shares.json`` (``tools/background_shares.py``): per method
  and grid variant, the share of the method's loss outside every box, mean [lowest, highest] over its runs.
- ``across study=A before=B method=M``: the same method and seeds run by two code versions (``B`` the study of the
  code before a change, ``A`` after it): ``A − B``'s paired interval over the seeds both have, one comparison
  (``what=sentence`` its verdict, ``what=n`` its seeds); ``same_ap study=A before=B method=M``: how many of those
  runs have the same val and test AP in both, "k of n"; ``speed study=A before=B method=M``: ``B``'s CPU time of
  those runs over ``A``'s, "x1.20" (above 1: ``A`` is cheaper).
- ``distillers``: the registered method names; ``params config=C role=R``: a detector's parameters (M).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ROOT / "data_samples" / "studies"
SPAN = re.compile(r"<!-- n:(?P<kind>\w+)(?P<args>(?: [\w.]+=[^ >]+)*) -->(?P<text>.*?)<!-- /n -->", re.S)
ARCHIVE_BLOCK = re.compile(r"<!-- archive:.*?-->.*?<!-- /archive -->", re.S)
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)
DECIMAL = re.compile(r"(?<![\w.])[+−-]?\d+\.\d+(?![\w.]*\d)")
INTERVAL = re.compile(r"\[\s*[+−-]?\d+\.\d+,\s*[+−-]?\d+\.\d+\s*\]")
STRICT = ("README.md", "docs/results.md")  # no hand-typed decimal figure at all outside archives


class QuoteError(ValueError):
    """A span that cannot be computed (unknown kind, study, method or comparison)."""


@functools.lru_cache(maxsize=None)
def _study(name: str):
    from liaf_lab import load_study_summary

    folder = STUDIES / name
    if not (folder / "results.json").is_file():
        raise QuoteError(f"no shipped study {name!r} (expected {folder}/study.json and results.json)")
    return load_study_summary(folder)


@functools.lru_cache(maxsize=None)
def _family(name: str, split: str, pairwise: bool, versus: tuple[str, ...], fixed_width: bool = True,
            screen: bool = False):
    if screen:
        return _study(name).screen(fixed_width=fixed_width)
    return _study(name).compare(pairwise=pairwise, versus=versus, split=split or None, fixed_width=fixed_width)


def _runs(name: str) -> list[dict]:
    from liaf_lab.experiments.report import distinct_runs

    return distinct_runs(_study(name).rows)


def _comparisons(args: dict[str, str]):
    return _family(args["study"], args.get("split", ""), args.get("pairwise") == "1",
                   tuple(v for v in args.get("versus", "").split(",") if v), args.get("plain") != "1",
                   args.get("screen") == "1")


def _comparison(args: dict[str, str]):
    if args.get("screen") == "1":
        args = {**args, "a": f"{args['method']} [{args['variant']}]", "b": f"{args['method']} [default]"}
    for c in _comparisons(args):
        if (c.a, c.b) == (args["a"], args["b"]):
            return c
    raise QuoteError(f"study {args['study']} has no comparison {args['a']} − {args['b']} in that family")


def _entry(args: dict[str, str]) -> dict:
    study = _study(args["study"])
    if "split" in args and args["split"] != study.split:
        from liaf_lab.experiments.report import summarise

        return summarise(study.rows, study.methods, study.grid, args["split"], study.family)[args["method"]]
    if args["method"] not in study.summary:
        raise QuoteError(f"study {args['study']} has no method {args['method']!r}")
    return study.summary[args["method"]]


def render(kind: str, args: dict[str, str]) -> str:
    """The text a span of ``kind`` with ``args`` holds."""
    from liaf_lab.experiments.report import comparisons_table, summary_table
    from liaf_lab.experiments.verdicts import format_p

    if kind == "methods":
        return "\n" + "\n".join(summary_table(_study(args["study"]).summary)) + "\n"
    if kind == "family":
        return "\n" + "\n".join(comparisons_table(_comparisons(args))) + "\n"
    if kind in ("diff", "p", "p_holm", "verdict", "wins", "n", "halfwidth", "sentence"):
        c = _comparison(args)
        return {"diff": c.interval, "sentence": c.sentence, "p": lambda: format_p(c.p_value),
                "p_holm": lambda: format_p(c.p_holm),
                "verdict": lambda: c.verdict, "wins": lambda: f"{round(c.win_fraction * c.n)} of {c.n}",
                "n": lambda: str(c.n), "halfwidth": lambda: f"{c.half_width:.2f}"}[kind]()
    if kind == "mean":
        e = _entry(args)
        return f"{e['mean']:.2f} ± {e['std']:.2f}"
    if kind == "ap":
        entry = _entry(args)
        if int(args["seed"]) not in entry["seeds"]:
            raise QuoteError(f"study {args['study']} has no seed {args['seed']} of {args['method']}")
        return f"{entry['AP'][entry['seeds'].index(int(args['seed']))]:.2f}"
    if kind == "aps":
        return " / ".join(f"{v:.2f}" for v in _entry(args)["AP"])
    if kind == "seeds":
        return str(len(_entry(args)["AP"]))
    if kind == "count":
        comps = _comparisons(args)
        what = args["what"]
        if what == "size":
            return str(len(comps))
        if what == "excludes0":
            return str(sum(not c.ci_low <= 0 <= c.ci_high for c in comps))
        if what == "separated":
            return str(sum(c.verdict in ("above", "below") for c in comps))
        raise QuoteError(f"count what={what!r} is not excludes0, separated or size")
    if kind == "minutes":
        return f"{sum(r.get('seconds', 0) for r in _runs(args['study'])) / 60:.1f}"
    if kind == "cpu_hours":
        rows = _runs(args["study"])
        if not all("cpu_seconds" in r for r in rows):
            raise QuoteError(f"study {args['study']} has rows without cpu_seconds")
        return f"{sum(r['cpu_seconds'] for r in rows) / 3600:.2f}"
    if kind == "runs":
        return str(len(_runs(args["study"])))
    if kind == "across":
        c = _across(args)
        return {"sentence": c.sentence, "n": lambda: str(c.n)}.get(args.get("what", ""), c.interval)()
    if kind == "same_ap":
        after, before = _paired_rows(args)
        same = sum(after[s]["val_AP"] == before[s]["val_AP"] and after[s]["test_AP"] == before[s]["test_AP"]
                   for s in after)
        return f"{same} of {len(after)}"
    if kind == "speed":
        after, before = _paired_rows(args)
        if not all("cpu_seconds" in r for r in [*after.values(), *before.values()]):
            raise QuoteError(f"studies {args['study']} and {args['before']} have rows without cpu_seconds")
        return f"x{sum(r['cpu_seconds'] for r in before.values()) / sum(r['cpu_seconds'] for r in after.values()):.2f}"
    if kind == "shares":
        return "\n" + "\n".join(_shares_table(args["study"])) + "\n"
    if kind == "distillers":
        from liaf_lab import list_distillers

        return ", ".join(f"`{n}`" for n in list_distillers())
    if kind == "params":
        return f"{_params(args['config'], args['role']) / 1e6:.2f} M"
    raise QuoteError(f"unknown kind {kind!r}")


def _paired_rows(args: dict[str, str]) -> tuple[dict[int, dict], dict[int, dict]]:
    """The default-variant rows of ``method`` in ``study`` and in ``before``, by seed, over the seeds both have."""
    def rows(name: str) -> dict[int, dict]:
        return {r["seed"]: r for r in _study(name).rows if r["method"] == args["method"] and r["variant"] == "default"}

    after, before = rows(args["study"]), rows(args["before"])
    seeds = sorted(set(after) & set(before))
    if len(seeds) < 2:
        raise QuoteError(f"studies {args['study']} and {args['before']} share {len(seeds)} seed(s) of "
                         f"{args['method']}; a paired comparison needs 2")
    return {s: after[s] for s in seeds}, {s: before[s] for s in seeds}


def _across(args: dict[str, str]):
    from liaf_lab.experiments.verdicts import PairedData, compare_family

    split = args.get("split", "test")
    after, before = _paired_rows(args)
    diffs = [100 * (after[s][f"{split}_AP"] - before[s][f"{split}_AP"]) for s in after]
    pair = PairedData(f"{args['method']} ({args['study']})", f"{args['method']} ({args['before']})", list(after), diffs)
    return compare_family("code change", split, [pair])[0]


def _shares_table(name: str) -> list[str]:
    from liaf_lab.analysis import summarise_background_shares

    path = STUDIES / name / "background_shares.json"
    if not path.is_file():
        raise QuoteError(f"no {path}: make it with tools/background_shares.py")
    data = json.loads(path.read_text())
    lines = ["| method | variant | runs | share of the loss outside every box: mean [lowest, highest] |",
             "|---|---|---:|---|"]
    lines += [f"| {e['method']} | {e['variant']} | {e['seeds']} | {e['mean']:.0%} [{e['low']:.0%}, {e['high']:.0%}] |"
              for e in summarise_background_shares(data["rows"])]
    return [*lines, f"| (a loss that weighted every cell alike) | | | {data['area']:.0%} |"]


@functools.lru_cache(maxsize=None)
def _params(config: str, role: str) -> int:
    from liaf_lab.experiments.builders import build_detector
    from liaf_lab.experiments.config import load_config

    model = build_detector(load_config(config), role, 6)  # the bench and tiny presets have 5 classes
    return sum(p.numel() for p in model.parameters())


def _parse_args(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split())


def texts() -> list[tuple[str, str]]:
    """``(name, text)`` of every checked document: README.md, docs/*.md, and each notebook's Markdown cells
    (named ``notebooks/X.ipynb#cell``)."""
    out = [("README.md", (ROOT / "README.md").read_text())]
    out += [(f"docs/{p.name}", p.read_text()) for p in sorted((ROOT / "docs").glob("*.md"))]
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        out += [(f"notebooks/{nb.name}#{i}", "".join(c["source"])) for i, c in enumerate(cells)
                if c["cell_type"] == "markdown"]
    return out


def regenerate(text: str) -> str:
    """``text`` with every span's content recomputed."""
    return SPAN.sub(lambda m: f"<!-- n:{m['kind']}{m['args']} -->{render(m['kind'], _parse_args(m['args']))}"
                              "<!-- /n -->", text)


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _blank(text: str, pattern: re.Pattern) -> str:
    """``text`` with ``pattern``'s matches replaced by spaces (newlines kept, so line numbers hold)."""
    return pattern.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def _archive_sections(text: str) -> str:
    """Blank the sections whose heading says "Archive" (to the next heading of the same or a higher level)."""
    lines, out, level = text.split("\n"), [], None
    for line in lines:
        heading = re.match(r"(#+) ", line)
        if heading and level is not None and len(heading.group(1)) <= level:
            level = None
        if heading and "Archive" in line:
            level = len(heading.group(1))
        out.append(" " * len(line) if level is not None else line)
    return "\n".join(out)


def problems(docs: list[tuple[str, str]] | None = None) -> list[str]:
    """``file:line: what`` for each span of ``docs`` (default: ``texts()``) that differs from its artefact,
    and each hand-typed figure."""
    found = []
    for name, text in texts() if docs is None else docs:
        for m in SPAN.finditer(text):
            try:
                want = render(m["kind"], _parse_args(m["args"]))
            except (QuoteError, KeyError) as err:
                found.append(f"{name}:{_line(text, m.start())}: cannot compute n:{m['kind']}{m['args']}: {err}")
                continue
            if m["text"] != want:
                found.append(f"{name}:{_line(text, m.start())}: n:{m['kind']}{m['args']} says {m['text'].strip()!r}, "
                             f"its artefact gives {want.strip()!r} (run python tools/quoted_numbers.py --write)")
        bare = _archive_sections(_blank(_blank(_blank(text, SPAN), ARCHIVE_BLOCK), CODE))
        bare = re.sub(r"<!--.*?-->|\]\([^)]*\)", lambda m: " " * len(m.group(0)), bare, flags=re.S)
        pattern = DECIMAL if name in STRICT else INTERVAL
        for m in pattern.finditer(bare):
            found.append(f"{name}:{_line(bare, m.start())}: figure {m.group(0)!r} is typed by hand: generate it from "
                         "a shipped result (a <!-- n:... --> span) or move it to an archive section")
    return found


def write() -> int:
    """Regenerate every span in place; returns the number of files changed."""
    changed = 0
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        if (new := regenerate(text)) != text:
            path.write_text(new)
            changed += 1
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        raw = nb.read_text()
        data = json.loads(raw)
        edited = False
        for cell in data["cells"]:
            if cell["cell_type"] == "markdown":
                text = "".join(cell["source"])
                if (new := regenerate(text)) != text:
                    cell["source"], edited = new.splitlines(keepends=True), True
        if edited:
            nb.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
            changed += 1
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="regenerate the spans in place, then check")
    args = parser.parse_args(argv)
    if args.write:
        print(f"{write()} file(s) regenerated")
    found = problems()
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
