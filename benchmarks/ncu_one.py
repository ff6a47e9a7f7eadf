"""Launch the fused op a few times on one benchmark shape, for a profiler to pick one launch.

    ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
        -k regex:fused_qkv --launch-skip 2 -c 1 python3 benchmarks/ncu_one.py qwen3-next 65536
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_op  # noqa: E402

name, t = sys.argv[1], int(sys.argv[2])
inp, kw, _ = bench_op.make_inputs(name, t, len(sys.argv) > 3 and sys.argv[3] == "hnd")
for _ in range(4):
    bench_op.fused(*inp, **kw, opaque=False)
torch.cuda.synchronize()
