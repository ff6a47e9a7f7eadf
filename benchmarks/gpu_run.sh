#!/usr/bin/env bash
# One device call: GPU tests, tuning sweep, launch profile, benchmark; logs under $OUT.
#   TESTS="tests/..." (default: all; "none": skip)   BENCH="--quick ..." (unset: no benchmark)
#   FUZZ_GPU_EXAMPLES=40 (default here; the tests' own default is 400)
#   TUNE="--tokens ..." (unset: no sweep; "--variants [--no-gate] ...": rope paths / gate-less)
#   PROFILE=1 (host-overhead profile)   HF=1 (Hugging Face model tests, ~7 min; HF_TIMEOUT=540)
#   LAUNCH_CHECK=1 (Inductor-launch check table, ~1 min; LAUNCH_CHECK="--forms all --budget 0": every form)
#   FLOORS="1,16,64,256" (the op beside its floors, ~30 s)   STRIDED=1 (strided_read.py, ~20 s)
#   NCU="qwen3-next 65536 no-gate" (Nsight Compute of one launch: speed of light, memory, stalls;
#     ";" between runs, "pass" for the compiled module; NCU_METRICS="a,b" adds metrics,
#     NCU_SECTIONS="--section X" replaces the sections, NCU_CACHE=all flushes caches first)
#   INDEX32="1,64,4096,65536" (the op with int64 offsets, then the default int32 ones where they fit, at these T, NHD, ~2 min)
#   PROFILE_KERNELS="glm-4.5:65536 qwen3-8b:16384" (profile_kernels.py: op vs +pass kernels, grid, registers, ~25 s each)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
TESTS=${TESTS:-tests}
# the fuzzers' GPU examples (their own default, 400, takes most of a 10-minute call)
export FUZZ_GPU_EXAMPLES=${FUZZ_GPU_EXAMPLES:-40}
if [ "$TESTS" != "none" ]; then
  timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -m gpu -p no:cacheprovider $TESTS -rf 2>&1 \
    | tail -${TEST_TAIL:-30} | tee "$OUT/gpu_tests.txt"
fi
if [ -n "${HF:-}" ]; then
  timeout ${HF_TIMEOUT:-540} python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_models_hf.py \
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
if [ -n "${FLOORS:-}" ]; then
  timeout 200 python3 benchmarks/bench_op.py --floors "$FLOORS" 2>&1 | grep -v "^W1\|^  warn" \
    | tee "$OUT/floors.txt"
fi
if [ -n "${STRIDED:-}" ]; then
  timeout 120 python3 benchmarks/strided_read.py 2>&1 | tee "$OUT/strided_read.txt"
fi
if [ -n "${INDEX32:-}" ]; then
  for flag in --int64 ""; do
    echo "# bench_op.py $flag" | tee -a "$OUT/index32.txt"
    timeout 200 python3 benchmarks/bench_op.py --tokens "$INDEX32" --layouts NHD $flag 2>&1 \
      | grep -v "^W1\|^  warn" | tee -a "$OUT/index32.txt"
  done
fi
for sk in ${PROFILE_KERNELS:-}; do
  timeout 90 python3 benchmarks/profile_kernels.py --shape "${sk%%:*}" --tokens "${sk##*:}" 2>&1 \
    | grep -v "^W1\|^  warn\|UserWarning\|_warn_once" | tee -a "$OUT/profile_kernels.txt"
done
if [ -n "${NCU:-}" ]; then
  # several ";"-separated runs (e.g. "glm-4.5 256; glm-4.5 256 pass"), one file each
  i=0; IFS=';' read -ra NCU_RUNS <<< "$NCU"
  for run in "${NCU_RUNS[@]}"; do
    timeout 300 ncu --clock-control none --cache-control ${NCU_CACHE:-none} \
      --profile-from-start off ${NCU_METRICS:+--metrics $NCU_METRICS} \
      ${NCU_SECTIONS:---section SpeedOfLight --section MemoryWorkloadAnalysis \
      --section WarpStateStats --section Occupancy --section LaunchStats \
      --section SchedulerStats} -k regex:fused_qkv --launch-skip 2 -c 1 \
      python3 benchmarks/ncu_one.py $run > "$OUT/ncu-$i.txt" 2>&1
    grep -v "^W1\|^  warn" "$OUT/ncu-$i.txt" | tail -${NCU_TAIL:-120}; i=$((i + 1))
  done
fi
