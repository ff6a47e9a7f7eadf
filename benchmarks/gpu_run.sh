#!/usr/bin/env bash
# One device call: GPU tests, tuning sweep, launch profile, benchmark; logs under $OUT.
#   TESTS="tests/..." (default: all; "none": skip)   BENCH="--quick ..." (unset: no benchmark)
#   TUNE="--tokens ..." (unset: no sweep; "--variants [--no-gate] ...": rope paths / gate-less)
#   PROFILE=1 (host-overhead profile)   HF=1 (Hugging Face model tests, ~5 min)
#   LAUNCH_CHECK=1 (Inductor-launch check table, ~1 min; LAUNCH_CHECK="--forms all --budget 0": every form)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
TESTS=${TESTS:-tests}
if [ "$TESTS" != "none" ]; then
  timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -m gpu -p no:cacheprovider $TESTS -rf 2>&1 \
    | tail -${TEST_TAIL:-30} | tee "$OUT/gpu_tests.txt"
fi
if [ -n "${HF:-}" ]; then
  timeout 400 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_models_hf.py \
    -rf > "$OUT/hf_models.txt" 2>&1; tail -3 "$OUT/hf_models.txt"
fi
if [ -n "${LAUNCH_CHECK:-}" ]; then
  [ "$LAUNCH_CHECK" = 1 ] && LAUNCH_CHECK=""
  timeout 300 python3 benchmarks/check_inductor_launch.py --mode cuda $LAUNCH_CHECK 2>&1 \
    | grep -v "^W1\|^  warn" | tee "$OUT/check_inductor_launch.txt"
fi
if [ -n "${PROFILE:-}" ]; then
  timeout 120 python3 benchmarks/profile_launch.py 2>&1 | tee "$OUT/profile_launch.txt"
fi
if [ -n "${TUNE:-}" ]; then
  timeout ${TUNE_TIMEOUT:-300} python3 benchmarks/tune_kernel.py $TUNE 2>&1 \
    | grep -v "^W1\|^  warn" | tee "$OUT/tune.txt"
fi
if [ -n "${BENCH:-}" ]; then
  python3 benchmarks/bench_op.py $BENCH --csv "$OUT/bench_op.csv" 2>&1 | grep -v "^W1\|^  warn" \
    | tee "$OUT/bench_op.txt"
fi
