"""Launch the fused op a few times on one benchmark shape, for a profiler to pick one launch.

    ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
        -k regex:fused_qkv --launch-skip 2 -c 1 python3 benchmarks/ncu_one.py qwen3-next 65536

Options after T: ``hnd`` (HND caches), ``no-gate`` (the gated shape's call without its gate
output, what a compiled Qwen3-Next chain launches).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_op  # noqa: E402

name, t, opts = sys.argv[1], int(sys.argv[2]), set(sys.argv[3:])
inp, kw, _ = bench_op.make_inputs(name, t, "hnd" in opts)
for _ in range(4):
    bench_op.fused(*inp, **kw, opaque=False, return_gate="no-gate" not in opts)
torch.cuda.synchronize()
