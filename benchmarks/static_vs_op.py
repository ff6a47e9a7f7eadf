"""The op against the pass compiled for one T (``dynamic=False``: Inductor's static-T launch,
which cannot pass the op's small-T register budget), side by side, CUDA-graph replays (GPU).

    python benchmarks/static_vs_op.py [--cases glm-4.5:64,96,128 qwen3-next:128,256,512]

Prints, per shape and T, the op and the static compiled module, each timed twice in
alternation (us).
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=["glm-4.5:64,96,128",
                                                   "qwen3-next:128,256,512"])
    a = ap.parse_args()
    torch._dynamo.config.recompile_limit = 64
    torch._inductor.config.fx_graph_cache = False
    static = torch.compile(bench_op.unfused, backend=fusion_pass.make_backend(), dynamic=False)
    print(f"# {torch.cuda.get_device_name()} NHD, us a call: op, static, op, static")
    for case in a.cases:
        name, tokens = case.split(":")
        for t in map(int, tokens.split(",")):
            inp, kw, _ = bench_op.make_inputs(name, t, False)
            op = lambda: bench_op.fused(*inp, **kw, opaque=False)  # noqa: E731
            st = lambda: static(*inp, **kw, opaque=False)  # noqa: E731
            st()
            times = [bench_op.bench(f, True) * 1e3 for f in (op, st, op, st)]
            print(f"{name:11} {t:6} " + " ".join(f"{x:7.2f}" for x in times), flush=True)


if __name__ == "__main__":
    main()
