"""Launch the fused op a few times on one benchmark shape, for a profiler to pick one launch.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \
        --section MemoryWorkloadAnalysis -k regex:fused_qkv --launch-skip 2 -c 1 \
        python3 benchmarks/ncu_one.py qwen3-next 65536

Options after T: ``hnd`` (HND caches), ``no-gate`` (the gated shape's call without its gate
output, what a compiled Qwen3-Next chain launches), ``pass`` (the unfused chain compiled with
the pass, as ``bench_op.py``'s ``+pass``: its dynamic-T graph, first called at T = 16, so
Inductor's own generated code launches the kernel).  Only the four launches at T are inside
the profiled range (``cudaProfilerStart``/``Stop``), so compiling and warming up stay out of
``--launch-skip``'s count.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_op  # noqa: E402

name, t, opts = sys.argv[1], int(sys.argv[2]), set(sys.argv[3:])
inp, kw, _ = bench_op.make_inputs(name, t, "hnd" in opts)
if "pass" in opts:
    import fusion_pass  # noqa: E402

    fn = torch.compile(bench_op.unfused, backend=fusion_pass.make_backend())
    warm, wkw, _ = bench_op.make_inputs(name, 16, "hnd" in opts)
    fn(*warm, **wkw, opaque=False)  # the dynamic-T graph, as bench_op.py compiles it
    extra = {}
else:
    fn = bench_op.fused
    extra = {"return_gate": "no-gate" not in opts}
fn(*inp, **kw, **extra, opaque=False)  # compile / remember outside the profiled range
torch.cuda.synchronize()
torch.cuda.profiler.start()
for _ in range(4):
    fn(*inp, **kw, **extra, opaque=False)
torch.cuda.synchronize()
torch.cuda.profiler.stop()
