"""The GFL-gap study's paired differences, from its shipped rows (``data_samples/studies/gfl_gap/results.json``).

    python tools/gfl_gap.py            # prints the block docs/gfl.md quotes (tests/test_quoted_numbers.py checks it)

The study (``liaf-lab study --config bench --methods none --grid student.arch=fcos,gfl --grid
distill.iterations=800,1600``, docs/gfl.md) trains no-KD students of both detectors at two schedule lengths on the
same seeds. Its family: GFL - FCOS at each length, each detector's 1600 - 800, and the change of the gap, each a
paired Student's t 95% interval over the seeds, Holm-adjusted over the family (``liaf_lab.experiments.verdicts``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from liaf_lab.experiments.verdicts import holm, paired_interval, paired_t_pvalue  # noqa: E402

STUDY = ROOT / "data_samples" / "studies" / "gfl_gap"
ARCHS, LENGTHS = ("gfl", "fcos"), (800, 1600)


def _ap(rows: list[dict], split: str) -> dict[tuple[str, int], dict[int, float]]:
    """AP (%) on ``split`` by (detector, iterations) and seed."""
    out: dict[tuple[str, int], dict[int, float]] = {}
    for r in rows:
        settings = dict(part.split("=") for part in r["variant"].split(","))
        key = (settings["student.arch"], int(settings["distill.iterations"]))
        out.setdefault(key, {})[r["seed"]] = 100 * r[f"{split}_AP"]
    return out


def report(folder: Path = STUDY) -> str:
    """The study's per-variant means and its family of paired differences on test and val, as text."""
    rows = json.loads((folder / "results.json").read_text())
    lines = []
    for split in ("test", "val"):
        ap = _ap(rows, split)
        seeds = sorted(set.intersection(*(set(v) for v in ap.values())))
        lines.append(f"{split} AP (%), seeds {seeds}:")
        for key in [(a, n) for n in LENGTHS for a in ARCHS]:
            lines.append(f"  {key[0]:<5}{key[1]:>5} it: " + " / ".join(f"{ap[key][s]:.2f}" for s in seeds))

        def diff(a: tuple, b: tuple) -> list[float]:
            return [ap[a][s] - ap[b][s] for s in seeds]

        family = {f"GFL - FCOS at {n}": diff(("gfl", n), ("fcos", n)) for n in LENGTHS}
        family.update({f"{a.upper()} 1600 - 800": diff((a, 1600), (a, 800)) for a in ARCHS})
        family["gap at 1600 - gap at 800"] = [x - y for x, y in zip(family["GFL - FCOS at 1600"],
                                                                     family["GFL - FCOS at 800"], strict=True)]
        adjusted = holm([paired_t_pvalue(d) for d in family.values()])
        for (name, d), p in zip(family.items(), adjusted, strict=True):
            mean, lo, hi = paired_interval(d)
            lines.append(f"  {name:<26} {mean:+6.2f} [{lo:+.2f}, {hi:+.2f}]  Holm p = {p:.3g}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(Path(sys.argv[1]) if len(sys.argv) > 1 else STUDY))
