#!/usr/bin/env bash
# One device call: GPU tests, then the benchmark; logs under $OUT.
#   TESTS="tests/..." (default: all), BENCH="--quick ..." (unset: no benchmark)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
TESTS=${TESTS:-tests}
if [ "$TESTS" != "none" ]; then
  timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -m gpu -p no:cacheprovider $TESTS -rf 2>&1 \
    | tail -${TEST_TAIL:-30} | tee "$OUT/gpu_tests.txt"
fi
if [ -n "${BENCH:-}" ]; then
  python3 benchmarks/bench_op.py $BENCH --csv "$OUT/bench_op.csv" 2>&1 | grep -v "^W1\|^  warn" \
    | tee "$OUT/bench_op.txt"
fi
