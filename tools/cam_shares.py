"""Measure the Grad-CAM share inside the ground-truth boxes for a study's students and write it as a small file.

usage: python tools/cam_shares.py STUDY_DIR --out FILE [--methods none fitnet liaf] [--seeds 0 1 ...]
                                  [--images 24] [--teacher PATH]

Notebook 03 reads the file (`read_cam_shares`), so it shows the measurement over seeds from a fresh clone, where
the study's checkpoints (hundreds of MB) are not. Every student of the study folder's finished runs for the given
methods and seeds explains the same ground-truth instances of the first ``--images`` validation images with boxes
of the study's own config (`cam_shares`); the teacher (``--teacher``, default the study's, found by its sha256 among
the shipped checkpoints when its recorded path is gone) is measured once. Shipped:
data_samples/studies/tiny6/cam_shares.json, made from the study of docs/results.md ("The demo's recipe") with

    OMP_NUM_THREADS=1 python tools/cam_shares.py runs/tiny6 --out data_samples/studies/tiny6/cam_shares.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from liaf_lab import load_study_run
from liaf_lab.experiments.study import study_teacher
from liaf_lab.analysis import cam_shares, write_cam_shares
from liaf_lab.experiments.builders import build_datasets, build_detector
from liaf_lab.distillers import BASELINE, method_label
from liaf_lab.utils.provenance import file_sha256

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", default=["none", "fitnet", "liaf"])
    parser.add_argument("--seeds", nargs="+", type=int, help="default: every seed the study finished")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--teacher")
    args = parser.parse_args()
    spec = json.loads((args.study / "study.json").read_text())
    seeds = args.seeds or sorted({r["seed"] for r in json.loads((args.study / "results.json").read_text())})
    runs = {method: [load_study_run(args.study, method, seed) for seed in seeds] for method in args.methods}
    cfg = runs[args.methods[0]][0].config
    _, val = build_datasets(cfg)
    samples = [val[i] for i in range(len(val)) if len(val.records[i].boxes) > 0][:args.images]
    teacher_path = Path(args.teacher) if args.teacher else study_teacher(args.study)
    teacher = build_detector(cfg, "teacher", len(val.class_names) + 1, weights_path=teacher_path,
                             class_names=val.class_names).eval()
    models = {"teacher": [teacher]}
    models.update({("no KD" if m == BASELINE else method_label(m)): [r.student for r in runs[m]] for m in args.methods})
    rows = cam_shares(models, samples)
    for row in rows:  # the study's seed numbers, not the position in the list
        row["seed"] = 0 if row["model"] == "teacher" else seeds[row["seed"]]
    source = {"study": str(args.study), "data_sha256": spec.get("inputs", {}).get("data"),
              "methods": args.methods, "seeds": seeds, "images": len(samples), "split": "val",
              "teacher_sha256": file_sha256(teacher_path),
              "command": "python tools/cam_shares.py " + shlex.join(sys.argv[1:])}
    print(write_cam_shares(args.out, rows, source))


if __name__ == "__main__":
    main()
