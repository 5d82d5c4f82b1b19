#!/usr/bin/env bash
# The GPU run on the lent machine (prepare.sh filled benchmarks/gpu/carry first):
#   bash benchmarks/gpu/run.sh "$OUT"  [extra options of python -m benchmarks gpu]
# Installs the carried wheels with --no-deps into a scratch folder, puts it and the source tree
# on PYTHONPATH (the project itself needs no install), and runs every part under its time cap.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: run.sh OUT_DIR [options]}; shift
PY=${PYTHON:-python3}
SITE=/tmp/backdoor_jax_site
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
  benchmarks/gpu/carry/wheels/*.whl || exit 1
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >> "$OUT/log.txt" 2>&1
exec "$PY" -m benchmarks gpu --out="$OUT" "$@"
