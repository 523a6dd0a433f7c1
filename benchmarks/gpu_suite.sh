#!/usr/bin/env bash
# Every GPU check of liaf_lab in one command (<= 10 minutes on one GPU); see benchmarks/gpu_suite.py.
#   benchmarks/gpu_suite.sh                        # CUDA: writes runs/gpu_suite/summary.json and summary.md
#   benchmarks/gpu_suite.sh --device cpu --smoke   # CPU smoke run (tiny sizes, seconds)
# Any other option goes to gpu_suite.py (--out DIR, --skip SECTION..., --repeats N, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" benchmarks/gpu_suite.py "$@"
