"""Programmatic dependent launch (PDL) for the eager op: what it saves in a CUDA graph.

    python benchmarks/pdl_bench.py [--tokens 1,16,64,256] [--shapes qwen3-8b,...]

Per shape and T, PDL off then on (``triton_kernel._PDL``), all CUDA-graph replays:
- ``op``: the op alone, replayed back to back (what ``bench_op.py``'s ``fused`` column times);
  with PDL each launch overlaps the previous one's tail, so this is the best case;
- ``gemm+op``: a decode layer's projection ``x @ W_qkv`` (cuBLAS, written into the buffer the
  op reads) then the op, four layers a graph; ``op in chain`` is that time less the GEMMs
  alone: what the op adds after a kernel that does not trigger its dependents early.
Outputs with PDL on must equal those with it off (checked per row).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_op  # noqa: E402
from kernels import triton_kernel  # noqa: E402

HIDDEN = {"qwen3-8b": 4096, "qwen3-next": 2048, "glm-4.5": 5120}
LAYERS = 4


def run(name: str, t: int, pdl: bool) -> tuple:
    triton_kernel._PDL = pdl
    torch.manual_seed(0)
    inp, kw, _ = bench_op.make_inputs(name, t, False)
    qkv = inp[0]
    x = torch.randn(t, HIDDEN[name], device="cuda", dtype=torch.bfloat16)
    w = torch.randn(HIDDEN[name], qkv.shape[1], device="cuda", dtype=torch.bfloat16) * 0.02

    def op():
        return bench_op.fused(*inp, **kw, opaque=False)

    def gemms():
        for _ in range(LAYERS):
            torch.matmul(x, w, out=qkv)

    def chain():
        for _ in range(LAYERS):
            torch.matmul(x, w, out=qkv)
            op()

    alone = bench_op.bench(op, True) * 1e3
    g = bench_op.bench(gemms, True) * 1e3 / LAYERS
    c = bench_op.bench(chain, True) * 1e3 / LAYERS
    torch.matmul(x, w, out=qkv)
    q, gate = op()
    outs = [q, inp[5], inp[6]] + ([gate] if gate is not None else [])
    return alone, g, c, [o.view(torch.uint8).cpu() for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,16,64,256")
    ap.add_argument("--shapes", default=",".join(bench_op.SHAPES))
    a = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | "
          f"PDL usable: {triton_kernel._pdl_ok(torch.device('cuda'))}")
    print(f"{'shape':11} {'T':>6} | {'op':>6} {'op PDL':>6} | {'gemm':>6} | "
          f"{'op in chain':>11} {'PDL':>6} | same")
    for name in a.shapes.split(","):
        for t in map(int, a.tokens.split(",")):
            off = run(name, t, False)
            on = run(name, t, True)
            same = all(torch.equal(x, y) for x, y in zip(off[3], on[3]))
            print(f"{name:11} {t:>6} | {off[0]:6.2f} {on[0]:6.2f} | {off[1]:6.2f} | "
                  f"{off[2] - off[1]:11.2f} {on[2] - on[1]:6.2f} | {same}", flush=True)
    triton_kernel._PDL = False


if __name__ == "__main__":
    main()
