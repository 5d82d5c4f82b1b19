#!/usr/bin/env bash
# Prepares the GPU run on this (networked, CPU) machine: everything the lent GPU machine lacks
# goes into benchmarks/gpu/carry/ (git-ignored), which the run tool carries with the working tree.
#   wheels/                 pure-Python wheels the GPU image lacks (ml-collections), for Python 3.12
#   gtsrb32_subset.npz      a class-stratified GTSRB subset (16,000 train / 3,000 test, ~44 MiB)
#   COMMIT                  the commit the numbers belong to
# Usage: bash benchmarks/gpu/prepare.sh [path/to/gtsrb32.npz]   (default ../shared/data/gtsrb32.npz)
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=${1:-../shared/data/gtsrb32.npz}
PY=${PYTHON:-.venv/bin/python}
CARRY=benchmarks/gpu/carry
mkdir -p "$CARRY/wheels"
# The image has jax, flax, optax, orbax, chex, absl, einops, sklearn, matplotlib, tqdm, safetensors,
# pyyaml; not ml-collections, tensorflow-datasets or grain (the project imports neither of the last two
# unless a tfds dataset or the streaming feed is asked for).
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 -d "$CARRY/wheels" "ml-collections==1.1.0"
[ -f "$CARRY/gtsrb32_subset.npz" ] || "$PY" -m benchmarks gtsrb-subset --src="$SRC" \
  --out="$CARRY/gtsrb32_subset.npz" --train=16000 --test=3000
git rev-parse HEAD > "$CARRY/COMMIT"
git status --short | grep -q . && echo "(uncommitted changes)" >> "$CARRY/COMMIT" || true
du -sh "$CARRY"
echo "the working tree that travels (tracked + untracked, not ignored) plus $CARRY must stay under 64 MiB:"
git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1
