"""Measure, for every trained run of some methods in a study, the share of its loss outside every box, and write it.

usage: python tools/background_shares.py STUDY_DIR --out FILE [--methods liaf ...] [--images 16] [--teacher PATH]

Issue 28 shows this share beside each method's and each LIAF-KD option's AP: under the literal mask most of LIAF-KD's
loss lies in background cells, and each option changes how much. Only methods whose loss splits into cells have it
(LIAF-KD and its readings, FitNet, MGD). Every run (each grid variant and seed the folder trained) is measured with its own trained student and distiller on the same first ``--images`` validation images with
boxes, with the study's teacher (`study_background_shares`). The file holds the rows, the background area of those
images (the share of a loss that weighted every cell alike) and where they came from; docs quote it through
``tools/quoted_numbers.py`` (kind ``shares``). Shipped (docs/results.md, docs/method.md) for bench_all, made with

    OMP_NUM_THREADS=1 python tools/background_shares.py runs/bench_all --methods liaf liaf_paper fitnet mgd \
        --out data_samples/studies/bench_all/background_shares.json

and for the LIAF-KD screen (``--methods liaf``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from liaf_lab.analysis import study_background_shares, summarise_background_shares
from liaf_lab.experiments.study import study_teacher
from liaf_lab.utils.atomic import read_json, write_json
from liaf_lab.utils.provenance import file_sha256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", default=["liaf"])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--teacher", type=Path)
    args = parser.parse_args()
    teacher = args.teacher or study_teacher(args.study)
    rows = []
    for method in args.methods:
        found, area = study_background_shares(args.study, method, args.images, teacher)
        rows += found
    source = {"study": str(args.study), "methods": args.methods, "images": args.images, "split": "val",
              "data_sha256": read_json(args.study / "study.json", "study record").get("inputs", {}).get("data"),
              "teacher_sha256": file_sha256(teacher),
              "command": "python tools/background_shares.py " + shlex.join(sys.argv[1:])}
    write_json(args.out, {"source": source, "area": area, "rows": rows})
    for entry in summarise_background_shares(rows):
        print(f"{entry['method']:12s} {entry['variant']:40s} {entry['seeds']:2d} runs  {entry['mean']:.1%} [{entry['low']:.1%}, {entry['high']:.1%}]")
    print(f"{'(a loss that weighted every cell alike)':53s}          {area:.1%}\nwrote {args.out}")


if __name__ == "__main__":
    main()
