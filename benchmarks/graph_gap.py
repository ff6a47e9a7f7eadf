"""Why the compiled module (+pass) takes longer in ``bench_op.py``'s CUDA-graph timing than
its kernel does (GPU).

    python benchmarks/graph_gap.py [--shape glm-4.5] [--tokens 65536]

For the op and ``+pass`` of one shape and T: the memory a capture of ``do_bench_cudagraph``'s
kind (many calls in one graph) holds, and the time per call of (a) that timing, (b) one call
captured in a graph and replayed, (c) plain launches (``do_bench``, no graph).  A capture
holding much more memory for ``+pass`` would mean each captured call writes fresh memory (on
the H200 it did not: BENCHMARKS.md, "Eleventh session").
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_op  # noqa: E402
import fusion_pass  # noqa: E402


def one_call_graph_ms(fn, reps: int = 50) -> float:
    """Median ms of replays of a graph holding one call."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="glm-4.5")
    ap.add_argument("--tokens", type=int, default=65536)
    a = ap.parse_args()
    torch._inductor.config.fx_graph_cache = False
    with_pass = torch.compile(bench_op.unfused, backend=fusion_pass.make_backend())
    warm, kw, _ = bench_op.make_inputs(a.shape, 16, False)
    with_pass(*warm, **kw, opaque=False)  # the dynamic-T graph, as bench_op.py compiles it
    inp, kw, _ = bench_op.make_inputs(a.shape, a.tokens, False)
    print(f"# {torch.cuda.get_device_name()} {a.shape} T={a.tokens} NHD, us a call")
    print(f"{'impl':8} {'bench_op':>9} {'1-call graph':>12} {'no graph':>9} {'capture MiB':>11}")
    for label, fn in (("op", bench_op.fused), ("+pass", with_pass)):
        call = lambda: fn(*inp, **kw, opaque=False)  # noqa: E731
        call()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        many = bench_op.bench(call, True) * 1e3
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        one = one_call_graph_ms(call) * 1e3
        plain = bench_op.bench(call, False) * 1e3
        print(f"{label:8} {many:9.2f} {one:12.2f} {plain:9.2f} {peak:11.0f}", flush=True)


if __name__ == "__main__":
    main()
