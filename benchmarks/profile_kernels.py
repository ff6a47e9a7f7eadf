"""Which kernels the op and the compiled module (+pass) run, and their device time (GPU).

    python benchmarks/profile_kernels.py [--shape qwen3-8b] [--tokens 16384] [--hnd]

Compiles the unfused chain with the pass as ``bench_op.py`` does (dynamic T: first called
at T=16, then at ``--tokens``), then profiles 20 calls of each with ``torch.profiler`` and
prints, per implementation, every CUDA kernel with its count and mean time: where the compiled
module's time goes beside the fused kernel.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_op  # noqa: E402
import fusion_pass  # noqa: E402


def kernels(fn, n: int = 20) -> list:
    """(name, count, mean us) of the CUDA kernels ``n`` calls of ``fn`` run, longest first."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    acc = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            acc[e.name][0] += 1
            acc[e.name][1] += e.device_time
    rows = [(name, c, us / c) for name, (c, us) in acc.items()]
    return sorted(rows, key=lambda r: -r[1] * r[2])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hnd", action="store_true")
    a = ap.parse_args()
    torch._inductor.config.fx_graph_cache = False
    with_pass = torch.compile(bench_op.unfused, backend=fusion_pass.make_backend())
    warm, kw, _ = bench_op.make_inputs(a.shape, 16, a.hnd)
    with_pass(*warm, **kw, opaque=False)  # the dynamic-T graph, as bench_op.py compiles it
    inp, kw, _ = bench_op.make_inputs(a.shape, a.tokens, a.hnd)
    print(f"# {torch.cuda.get_device_name()} {a.shape} T={a.tokens} "
          f"{'HND' if a.hnd else 'NHD'}: per call, 20 calls")
    for label, fn, extra in (("fused op", bench_op.fused, {}), ("+pass", with_pass, {})):
        print(f"{label}:")
        for name, count, us in kernels(lambda: fn(*inp, **kw, **extra, opaque=False)):
            print(f"  {us:9.2f} us x {count / 20:4.1f}  {name[:90]}")


if __name__ == "__main__":
    main()
