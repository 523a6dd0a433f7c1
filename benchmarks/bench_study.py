"""A whole bench study, the code of another commit against this tree's, interleaved in one invocation.

    python benchmarks/bench_study.py                        # none, FitNet, LIAF-KD, seed 0, against 54a93ae
    python benchmarks/bench_study.py --seeds 0 1 --jobs 2 --repeats 2 --base 54a93ae

Each repeat runs ``liaf-lab study`` (the study's own code path: training, stage 1, evaluation on val and test) once
with the base commit's code (a git worktree of it, made on first use) and once with this tree's, in turn, with the
same arguments, each in a fresh output folder. It prints per method the summed seconds of its runs (each run's own
``seconds``, training and evaluation) for both and their ratio base / this tree, the median of the per-method
ratios, and the whole study's wall and CPU time (user + system of the process tree) and their ratios. Every
student is then compared tensor by tensor: a change of speed that changed a student is printed as such.

The issue this answers (23) asks for a median ratio of at least 2.0; docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "data_samples" / "checkpoints" / "teacher_tiny.pt"


def worktree(commit: str, where: Path) -> Path:
    """A checkout of ``commit`` at ``where`` (a git worktree, made once)."""
    if not (where / "liaf_lab").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), commit], check=True,
                       capture_output=True)
    return where


def run_study(tree: Path, out: Path, args: argparse.Namespace) -> tuple[float, float]:
    """Wall and CPU seconds of one ``liaf-lab study`` with ``tree``'s code."""
    cmd = [sys.executable, "-m", "liaf_lab.cli", "study", "--config", args.config, "--methods", *args.methods,
           "--seeds", *map(str, args.seeds), "--jobs", str(args.jobs), "--threads", str(args.threads),
           "--teacher", str(TEACHER), "--device", "cpu", "--out", str(out)]
    for override in args.set:
        cmd += ["--set", override]
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(args.threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"study with {tree} failed:\n{result.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def method_seconds(out: Path) -> dict[str, float]:
    """Summed ``seconds`` of each method's runs (results.json)."""
    totals: dict[str, float] = {}
    for row in json.loads((out / "results.json").read_text()):
        totals[row["method"]] = totals.get(row["method"], 0.0) + row["seconds"]
    return totals


def same_students(a: Path, b: Path) -> list[str]:
    """The run folders whose students differ between the studies ``a`` and ``b``."""
    differ = []
    for path in sorted(a.glob("runs/*/*/seed*/student.pt")):
        other = b / path.relative_to(a)
        x, y = (torch.load(p, map_location="cpu", weights_only=True) for p in (path, other))
        tensors = [k for k in x if torch.is_tensor(x[k])]
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in tensors):
            differ.append(str(path.parent.relative_to(a)))
    return differ


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="54a93ae", help="the commit to compare with (default: 54a93ae, before issue 23)")
    p.add_argument("--base-tree", type=Path, help="an existing checkout of --base (default: a worktree in the temp dir)")
    p.add_argument("--config", default="bench")
    p.add_argument("--methods", nargs="+", default=["none", "fitnet", "liaf"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for both")
    p.add_argument("--out", type=Path, help="where the studies go (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_study_"))
    base = args.base_tree or worktree(args.base, Path(tempfile.gettempdir()) / f"liaf_lab_{args.base}")
    trees = {"base": base, "new": ROOT}
    walls: dict[str, list[float]] = {"base": [], "new": []}
    cpus: dict[str, list[float]] = {"base": [], "new": []}
    methods: dict[str, dict[str, list[float]]] = {"base": {}, "new": {}}
    for r in range(args.repeats):
        for name in (("base", "new") if r % 2 == 0 else ("new", "base")):  # alternate who goes first
            folder = out / f"{name}{r}"
            wall, cpu = run_study(trees[name], folder, args)
            walls[name].append(wall)
            cpus[name].append(cpu)
            for m, sec in method_seconds(folder).items():
                methods[name].setdefault(m, []).append(sec)
            print(f"repeat {r} {name}: wall {wall:.0f} s, cpu {cpu:.0f} s", flush=True)
    print(f"\n{args.config}, methods {' '.join(args.methods)}, seeds {args.seeds}, jobs {args.jobs}, threads "
          f"{args.threads}, {args.repeats} repeat(s); base {args.base} against this tree")
    print(f"{'method':<10}{'base s':>10}{'new s':>10}{'ratio':>8}")
    ratios = {}
    for m in methods["base"]:
        b, n = statistics.median(methods["base"][m]), statistics.median(methods["new"][m])
        ratios[m] = b / n
        print(f"{m:<10}{b:>10.1f}{n:>10.1f}{ratios[m]:>8.2f}")
    median = statistics.median(ratios.values())
    wall_ratio = statistics.median(walls["base"]) / statistics.median(walls["new"])
    cpu_ratio = statistics.median(cpus["base"]) / statistics.median(cpus["new"])
    print(f"median of the per-method ratios: {median:.2f}")
    print(f"whole study: wall {statistics.median(walls['base']):.0f} s -> {statistics.median(walls['new']):.0f} s "
          f"(x{wall_ratio:.2f}), cpu {statistics.median(cpus['base']):.0f} s -> {statistics.median(cpus['new']):.0f} s "
          f"(x{cpu_ratio:.2f})")
    differ = [d for r in range(args.repeats) for d in same_students(out / f"base{r}", out / f"new{r}")]
    print("students bit-identical to the base's: " + ("yes, every run" if not differ else f"NO: {differ}"))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "methods": methods,
                                         "ratios": ratios, "median_ratio": median, "walls": walls, "cpus": cpus,
                                         "wall_ratio": wall_ratio, "cpu_ratio": cpu_ratio, "differ": differ},
                                        indent=1))


if __name__ == "__main__":
    main()
