"""The op at one ptxas register budget after another, side by side (GPU, CUDA graphs).

    python benchmarks/regs_waves.py [--cases glm-4.5:256,qwen3-8b:256] [--budgets none,32,40]
    python benchmarks/regs_waves.py --cases glm-4.5:128@1.8.4   # a forced tile (BT.BH.W...)

A register budget sets how many programs a multiprocessor holds at once, so whether a grid
runs in one wave or spills a partial second one.  Each case prints the median us a launch per
budget (rounds alternate), the registers ptxas used, and the waves at that occupancy; every
budget's Q output is checked against the first's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("FUSED_QKV_NATIVE", "0")

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from arg_cost import recorded_launch  # noqa: E402
from bench_op import bench, make_inputs  # noqa: E402

from kernels import triton_kernel as tk  # noqa: E402


def waves(grid: int, warps: int, regs: int, sms: int) -> float:
    """Grid over what the SMs hold at once under ``regs`` registers a thread (64K registers,
    64 warps, 32 programs an SM; registers are allocated 8 a thread at a time)."""
    per_warp = -(-regs // 8) * 8 * 32
    progs = min(65536 // (per_warp * warps), 64 // warps, 32)
    return grid / (progs * sms)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="glm-4.5:128,glm-4.5:256,glm-4.5:512,qwen3-8b:256,"
                    "qwen3-next:256")
    ap.add_argument("--budgets", default="none,32,40,64")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    budgets = [None if b == "none" else int(b) for b in a.budgets.split(",")]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  triton "
          f"{triton.__version__}  CUDA-graph replays, us a launch (median of rounds)\n")
    print("| shape | T | grid x warps | " + " | ".join(
        f"budget {b or 'none'}: us (regs, waves)" for b in budgets) + " |")
    print("|---|---:|---|" + "---:|" * len(budgets))
    for case in a.cases.split(","):
        case, _, tile = case.partition("@")
        shape, t = case.split(":")
        inp, kw, _ = make_inputs(shape, int(t), False)
        tk.set_block_override(tuple(int(x) for x in tile.split(".")) if tile else None)
        try:
            grid, params, opts = recorded_launch(inp, dict(kw, opaque=False))
        finally:
            tk.set_block_override(None)
        q = params["q_out"]
        calls, outs, regs = [], [], []
        for b in budgets:
            o = dict(opts, maxnreg=b) if b is not None else {
                k: v for k, v in opts.items() if k != "maxnreg"}
            calls.append(lambda o=o: tk.fused_qkv_kernel[grid](**params, **o))
            q.fill_(float("nan"))
            kern = calls[-1]()
            torch.cuda.synchronize()
            outs.append(q.clone())
            regs.append(kern.n_regs)
        same = all(torch.equal(x, outs[0]) for x in outs)
        times = [[] for _ in budgets]
        for _ in range(a.rounds):
            for i, c in enumerate(calls):
                times[i].append(bench(c, graph=True) * 1e3)
        w = opts["num_warps"]
        cells = [f"{statistics.median(ts):.2f} ({r}, {waves(grid[0], w, r, sms):.2f})"
                 for ts, r in zip(times, regs)]
        name = f"{t} @{tile}" if tile else t
        print(f"| {shape} | {name} | {grid[0]} x {w} | " + " | ".join(cells)
              + f" |{'' if same else ' Q differs!'}", flush=True)


if __name__ == "__main__":
    main()
