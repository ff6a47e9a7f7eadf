"""Print the constexprs and signature Inductor compiles the fused trampoline with (GPU).

    python benchmarks/inductor_constexprs.py [--shape glm-4.5] [--tokens 256]

Compiles ``bench_op.unfused`` with the pass as ``bench_op.py`` does (dynamic T, first at
T=16), in-process, and prints what ``triton.compile`` receives for
``fused_qkv_inductor_kernel``: to compare Inductor's launch with a direct one.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_op  # noqa: E402
import fusion_pass  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="glm-4.5")
    ap.add_argument("--tokens", type=int, default=256)
    a = ap.parse_args()
    torch._inductor.config.fx_graph_cache = False
    torch._inductor.config.compile_threads = 1
    real = triton.compile

    def spy(src, *args, **kw):
        fn = getattr(src, "fn", None)
        if fn is not None and "fused_qkv" in getattr(fn, "__name__", ""):
            print(f"## {fn.__name__}\nconstants: {getattr(src, 'constants', None)}\n"
                  f"signature: {src.signature}\nattrs: {src.attrs}\noptions: {kw}\n")
        return real(src, *args, **kw)

    triton.compile = spy
    f = torch.compile(bench_op.unfused, backend=fusion_pass.make_backend())
    for t in (16, a.tokens):
        inp, kw, _ = bench_op.make_inputs(a.shape, t, False)
        f(*inp, **kw, opaque=False)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
