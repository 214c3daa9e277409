#!/usr/bin/env bash
# The GPU readiness check (benchmarks/gpu_check.py): on a CUDA machine without network, install the wheels
# of requirements/gpu-wheels.txt (fetched beforehand with scripts/gpu_wheels.sh), run the gpu tests, a short
# DRPO fit of a tiny Qwen2.5-VL policy in bf16, an FSDP run, and throughput for growing policy sizes, in
# under 8 minutes; results (gpu_check.{json,md,log}) go to OUT. Without CUDA it is a dry run of its plumbing.
#   bash scripts/gpu_check.sh OUT [--wheels DIR] [--workdir DIR] [--budget-s 450] [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
