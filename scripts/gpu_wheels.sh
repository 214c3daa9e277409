#!/usr/bin/env bash
# Download the pinned wheels of requirements/gpu-wheels.txt for a GPU machine's Python (CPython 3.12,
# manylinux x86-64) into a folder (default .whl/, ignored by git), for scripts/gpu_check.sh to install
# there without network. Needs only pip and access to PyPI here.
#   bash scripts/gpu_wheels.sh [DIR] [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.whl}"
PYVER="${2:-3.12}"
mkdir -p "$DIR"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux_2_5_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PYVER" --implementation cp "${PLATFORMS[@]}" -d "$DIR" -r requirements/gpu-wheels.txt
echo "[gpu_wheels] $(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR"
