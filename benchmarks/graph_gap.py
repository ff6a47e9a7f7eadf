"""Why the compiled module (+pass) takes longer in ``bench_op.py``'s CUDA-graph timing than
its kernel does (GPU).

    python benchmarks/graph_gap.py [--shape glm-4.5] [--tokens 65536] [--impls op,+pass,op]

For the op, ``+pass`` (dynamic T, as ``bench_op.py`` compiles it) and ``static`` (``+pass``
compiled for this T only: a trampoline without the T switch), in the order ``--impls`` gives
(by default the op again last: drift), of one shape and T: the memory a capture of ``do_bench_cudagraph``'s
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
    ap.add_argument("--impls", default="op,+pass,static,op",
                    help="what to time, in this order (repeats allowed)")
    a = ap.parse_args()
    torch._inductor.config.fx_graph_cache = False
    with_pass = torch.compile(bench_op.unfused, backend=fusion_pass.make_backend())
    warm, kw, _ = bench_op.make_inputs(a.shape, 16, False)
    with_pass(*warm, **kw, opaque=False)  # the dynamic-T graph, as bench_op.py compiles it
    # the same for this T only: no T switch in the trampoline, a third of its code
    static = torch.compile(bench_op.unfused, backend=fusion_pass.make_backend(), dynamic=False)
    inp, kw, _ = bench_op.make_inputs(a.shape, a.tokens, False)
    print(f"# {torch.cuda.get_device_name()} {a.shape} T={a.tokens} NHD, us a call")
    print(f"{'impl':8} {'bench_op':>9} {'1-call graph':>12} {'no graph':>9} {'capture MiB':>11}")
    impls = {"op": bench_op.fused, "+pass": with_pass, "static": static}
    for label in a.impls.split(","):
        fn = impls[label]
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
