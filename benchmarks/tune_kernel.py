"""Sweep the kernel's tile shape (BLOCK_T, BLOCK_H, num_warps) per model shape and T.

One device call prints, for each shape and T, the heuristic's time and the best swept
configuration, as a fraction of the HBM floor.  Use it to retune ``_pick_blocks``.

    python benchmarks/tune_kernel.py [--tokens 1,64,1024,16384]
"""
import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_op  # noqa: E402
from kernels import triton_kernel  # noqa: E402

CONFIGS = [(bt, bh, w) for bt, bh, w in itertools.product((1, 2, 4, 8), (1, 2, 4, 8, 16, 32),
                                                           (2, 4, 8))
           if 256 <= bt * bh * 128 <= 16384]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,64,1024,16384")
    ap.add_argument("--shapes", default=",".join(bench_op.SHAPES))
    a = ap.parse_args()
    bw = bench_op.copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()} copy {bw / 1e12:.2f} TB/s; "
          f"{len(CONFIGS)} configs (BLOCK_T, BLOCK_H, warps)")
    for name in a.shapes.split(","):
        for t in map(int, a.tokens.split(",")):
            inp, kw, cbytes = bench_op.make_inputs(name, t, False)
            graph = t <= 4096
            call = lambda: bench_op.fused(*inp, **kw, opaque=False)  # noqa: E731
            triton_kernel.set_block_override(None)
            base = bench_op.bench(call, graph) * 1e3
            best = (base, None)
            for cfg in CONFIGS:
                triton_kernel.set_block_override(cfg)
                try:
                    us = bench_op.bench(call, graph) * 1e3
                except Exception as e:  # a config the compiler rejects
                    print(f"  {cfg} failed: {type(e).__name__}")
                    continue
                best = min(best, (us, cfg), key=lambda x: x[0])
            triton_kernel.set_block_override(None)
            floor = bench_op.floor_bytes(t, kw["hq"], kw["hkv"], kw["d"], kw["r"], kw["gated"],
                                         cbytes) / bw * 1e6
            print(f"{name:11} T={t:6}: heuristic {base:8.2f} us ({floor / base:5.1%}), "
                  f"best {best[0]:8.2f} us ({floor / best[0]:5.1%}) at {best[1]}", flush=True)


if __name__ == "__main__":
    main()
