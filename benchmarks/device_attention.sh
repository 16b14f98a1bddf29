#!/usr/bin/env bash
# The attention kernels on a GPU or TPU machine: the kernel tests compiled
# for the machine's chip (GLM_PALLAS_COMPILED=1: no interpreter), then
# benchmarks/attention.py with 'pallas', cuDNN and tokamax where present.
#
#   bash benchmarks/device_attention.sh        # from the repository root
#
# Runs glm from this tree with the machine's own python and JAX (no install):
# it builds a throw-away site folder where `glm`, `glm.data` and
# `glm.pallas_kernels` point into the tree, as setup.py maps them. Besides
# jax, flax, optax and orbax the tests need the pure-Python wheels of
# pytest and gin-config (pip install --no-deps them first where missing).
# Writes $OUT (default benchmarks/results): device_attention_tests.txt,
# attention_device.txt and attention_device.json.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/benchmarks/results}"
SITE="$(mktemp -d)/site"
mkdir -p "$SITE/glm" "$OUT"
for entry in "$ROOT"/glm/*; do ln -s "$entry" "$SITE/glm/"; done
ln -s "$ROOT/data" "$SITE/glm/data"
ln -s "$ROOT/pallas_kernels" "$SITE/glm/pallas_kernels"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
"$PY" -c 'import jax; print("devices:", jax.devices())'
GLM_PALLAS_COMPILED=1 "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_pallas_attention.py 2>&1 | tee "$OUT/device_attention_tests.txt"
"$PY" benchmarks/attention.py --out "$OUT/attention_device.json" \
  2>&1 | tee "$OUT/attention_device.txt"
