#!/usr/bin/env bash
# The GPU check in one command (issue 29): `agl bench gpu` on the first CUDA device, one process tree,
# at most ~8 min on one H100; writes results/bench_gpu.json and results/bench_gpu.png.
# Run it with a time limit that leaves room for a rerun, e.g.  timeout 540 bash scripts/gpu_check.sh
# Without CUDA it prints one line and exits 0.  CPU check of the command itself:  bash scripts/gpu_check.sh --device cpu --quick
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export AGL_OFFLINE="${AGL_OFFLINE:-1}"   # no model hub at run time: MobileNetV2 from its offline package, others at random init
exec "$PY" -m agl.cli bench gpu --out "${OUT:-results}" "$@"
