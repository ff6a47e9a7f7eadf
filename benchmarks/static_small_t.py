"""Inductor's launch of a static small T against the op's (GPU, CUDA-graph replays).

    python benchmarks/static_small_t.py [--shapes ...] [--tokens 1,16,64]

The op passes ptxas a register budget at small T (``triton_kernel._EARLY_MAX_REGS``), which
keeps every load before the norm's reduction.  Inductor's launches cannot pass it; a graph
compiled for a static T (a T = 1 decode graph, a size vLLM compiles for) then gets a kernel
ptxas holds to 32 registers, with loads sunk after the shuffles.  A dynamic-T kernel gets
its registers from its large-T branch.  Times, side by side, us a launch:

- ``op``: the op's launch (budget as it passes it), ``op/none``: the same without the budget;
- ``static``: the trampoline as the pass builds it for this static T (T = 1 a constant);
- ``donor``: the trampoline with launch()'s tile below a large-T branch that never runs at
  this T, T not specialised (what gives the registers).
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("FUSED_QKV_NATIVE", "0")

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from arg_cost import recorded_launch, side_by_side  # noqa: E402
from bench_op import make_inputs  # noqa: E402

from fusion_pass import inductor_launch as il  # noqa: E402
from kernels import triton_kernel as tk  # noqa: E402

DONOR = triton.jit(do_not_specialize=["T"])(il.fused_qkv_inductor_kernel.fn)


def trampoline_kwargs(params: dict, switch: int) -> dict:
    """The trampoline's arguments for the op's recorded launch ``params`` (its tile below
    ``switch``; the caches as their own bases; eps and the weight offset as fp32 bits, as
    ``inductor_launch.kernel_kwargs`` passes them)."""
    kw = {k: v for k, v in params.items() if k not in ("k_cache", "v_cache", "PDL")}
    kw.update(k_base=params["k_cache"], v_base=params["v_cache"], V_IN_K_BASE=False,
              CACHE_FP8=0, SWITCH_T=switch, BIG_BLOCK_T=2, BIG_INT32_BELOW=1 << 20,
              WIDE_BLOCK_T=params["BLOCK_T"], K_OFF=0, V_OFF=0,
              eps=il.f32_bits(params["eps"]), w_off=il.f32_bits(params["w_off"]))
    return kw


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen3-8b,glm-4.5,qwen3-next")
    ap.add_argument("--tokens", default="1,16,64")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  triton "
          f"{triton.__version__}  CUDA-graph replays, us a launch, median of {a.repeats}\n")
    print("| shape | T | op | op/none | static | donor | regs op/none/static/donor | ok |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for shape in a.shapes.split(","):
        for t in map(int, a.tokens.split(",")):
            inp, kw, _ = make_inputs(shape, t, False)
            grid, params, opts = recorded_launch(inp, dict(kw, opaque=False))
            none = {k: v for k, v in opts.items() if k != "maxnreg"}
            static, donor = trampoline_kwargs(params, 0), trampoline_kwargs(params, 1024)
            calls = {
                "op": lambda: tk.fused_qkv_kernel[grid](**params, **opts),
                "op/none": lambda: tk.fused_qkv_kernel[grid](**params, **none),
                "static": lambda: il.fused_qkv_inductor_kernel[grid](**static, **none),
                "donor": lambda: DONOR[grid](**donor, **none),
            }
            m, regs, ok = side_by_side(calls, params["q_out"], a.repeats)
            print(f"| {shape} | {t} | {m['op']:.2f} | {m['op/none']:.2f} | {m['static']:.2f} "
                  f"| {m['donor']:.2f} | {'/'.join(regs)} | {ok} |", flush=True)


if __name__ == "__main__":
    main()
