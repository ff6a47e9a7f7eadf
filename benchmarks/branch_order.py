"""Does the Inductor trampoline's code layout cost time?  (GPU, CUDA-graph replays.)

    python benchmarks/branch_order.py [--shapes glm-4.5,qwen3-8b] [--tokens 16,256,4096]

The trampoline (``fusion_pass.inductor_launch.fused_qkv_inductor_kernel``) holds three
copies of the op's call (small-T tile; large-T int32; large-T int64), 2-3x the op's code,
and its large-T branch ran 5% behind the op with the same tile and registers.  This times
direct launches of the op and of the trampoline with its branches in different source orders
(T not specialised, as Inductor passes a dynamic T), at T where each branch runs:

- ``op``: the op's launch (as the entry point makes it); ``op/none``: the same without the
  register budget the op passes at small T and on small mid-T grids (Inductor cannot pass
  one, so the trampoline columns run without it);
- ``one``: the trampoline with only the branch this T takes (``SWITCH_T`` = 0 and this T's
  tile: a static-T build);
- ``now``: the three branches as in the source today (large-T first, small-T last);
- ``small1st``: small-T branch first, then int32, then int64;
- ``i32first``: int32 large-T first, then small-T, then int64;
- ``now+debug``: ``now`` compiled with ``debug=True, sanitize_overflow=False``, as
  Inductor compiles user kernels;
- ``now+f64``: ``now`` taking eps and the weight offset as fp64 bits, converted in the kernel
  as Inductor's fp64 float arguments are;
- ``+pass``: ``bench_op.py``'s compiled module with the pass (dynamic T, first compiled at
  T = 16; T = 1 gets a graph of its own), i.e. Inductor's own launch of the trampoline.
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import struct
import sys
import textwrap

os.environ.setdefault("FUSED_QKV_NATIVE", "0")

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from arg_cost import _load_module, recorded_launch, side_by_side  # noqa: E402
from bench_op import make_inputs, unfused  # noqa: E402
from static_small_t import DONOR, trampoline_kwargs  # noqa: E402

import fusion_pass  # noqa: E402
from fusion_pass import inductor_launch as il  # noqa: E402
from kernels import triton_kernel as tk  # noqa: E402


def variants() -> dict:
    """JIT functions of the trampoline with its three calls in other orders."""
    src = textwrap.dedent(inspect.getsource(il.fused_qkv_inductor_kernel.fn))
    head, rest = src.split("    if SWITCH_T > 0:\n", 1)
    calls = re.findall(r"( *)fused_qkv_kernel\((.*?)\n\1\)", rest, re.S)
    assert len(calls) == 3, len(calls)
    body = ["fused_qkv_kernel(" + textwrap.dedent(c[1]).strip("\n") + "\n)" for c in calls]
    i64, i32, small = body

    def ind(text, n):
        return textwrap.indent(text, " " * n)

    orders = {
        "small1st": ("    if SWITCH_T == 0 or T < SWITCH_T:\n" + ind(small, 8) + "\n"
                     "    elif T < BIG_INT32_BELOW:\n" + ind(i32, 8) + "\n"
                     "    else:\n" + ind(i64, 8) + "\n"),
        "i32first": ("    if SWITCH_T > 0 and T >= SWITCH_T and T < BIG_INT32_BELOW:\n"
                     + ind(i32, 8) + "\n"
                     "    elif SWITCH_T == 0 or T < SWITCH_T:\n" + ind(small, 8) + "\n"
                     "    else:\n" + ind(i64, 8) + "\n"),
    }
    # the order as now, eps and the weight offset taken as the bits of an fp64 (an int): the
    # conversion Inductor's fp64 float arguments cost, in a direct launch
    cvt = re.search(r" *eps32 = .*\n *w_off32 = .*\n", head)
    assert cvt, "the trampoline's eps / w_off conversion moved"
    orders["f64"] = "    if SWITCH_T > 0:\n" + rest
    heads = {"f64": head.replace(cvt.group(0),
                                 "    eps32, w_off32 = _f64(eps), _f64(w_off)\n")}
    out = {}
    for name, tail in orders.items():
        text = heads.get(name, head).replace("def fused_qkv_inductor_kernel(",
                                             f"def tramp_{name}(") + tail
        text = text.replace("@triton.jit\n", "")
        mod_src = ("import triton\nimport triton.language as tl\n"
                   "import fusion_pass.inductor_launch as _il\n"
                   "globals().update({k: v for k, v in vars(_il).items() "
                   "if not k.startswith('__')})\n\n\n"
                   "@triton.jit\ndef _f64(bits):\n"
                   "    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(tl.float32)"
                   "\n\n\n"
                   f"@triton.jit(do_not_specialize=['T'])\n" + text)
        out[name] = getattr(_load_module(mod_src, f"tramp_{name}"), f"tramp_{name}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="glm-4.5,qwen3-8b")
    ap.add_argument("--tokens", default="16,256,4096")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    now = DONOR  # the trampoline, T not specialised (as Inductor passes a dynamic T)
    var = variants()
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  triton "
          f"{triton.__version__}  CUDA-graph replays, us a launch, median of {a.repeats}\n")
    print("| shape | T | op | op/none | one | now | small1st | i32first | now+debug | now+f64 "
          "| +pass | regs | ok |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for shape in a.shapes.split(","):
        # a fresh Dynamo: after one shape, the head counts (int arguments of unfused) would
        # turn dynamic, and the pass fuses static head counts only
        torch._dynamo.reset()
        compiled = torch.compile(unfused, backend=fusion_pass.make_backend())
        warm, wkw, _ = make_inputs(shape, 16, False)
        compiled(*warm, **wkw, opaque=False)  # the dynamic-T graph, as bench_op.py compiles it
        for t in map(int, a.tokens.split(",")):
            inp, kw, _ = make_inputs(shape, t, False)
            grid, params, opts = recorded_launch(inp, dict(kw, opaque=False))
            none = {k: v for k, v in opts.items() if k != "maxnreg"}
            one = trampoline_kwargs(params, 0)
            # the dynamic build: the small-T tile is this T's only below 64 (the benchmark
            # T); above, run the large-T branch with this T's tile as its BIG_BLOCK_T
            switch = 64
            if t >= switch:
                small = tk.tile_plan(16, *_shape_args(params))
                dyn = dict(trampoline_kwargs(params, switch),
                           **dict(small.constexprs, EARLY=True), BIG_BLOCK_T=params["BLOCK_T"],
                           BIG_INT32_BELOW=1 << 30, WIDE_BLOCK_T=small.block_t)
            else:
                dyn = dict(trampoline_kwargs(params, switch), BIG_INT32_BELOW=1 << 30)
            f64 = dict(dyn, eps=_bits64(params["eps"]), w_off=_bits64(params["w_off"]))
            calls = {
                "op": lambda: tk.fused_qkv_kernel[grid](**params, **opts),
                "op/none": lambda: tk.fused_qkv_kernel[grid](**params, **none),
                "one": lambda: il.fused_qkv_inductor_kernel[grid](**one, **none),
                "now": lambda: now[grid](**dyn, **none),
                "small1st": lambda: var["small1st"][grid](**dyn, **none),
                "i32first": lambda: var["i32first"][grid](**dyn, **none),
                "now+debug": lambda: now[grid](**dyn, **none, debug=True,
                                               sanitize_overflow=False),
                "now+f64": lambda: var["f64"][grid](**f64, **none),
                "+pass": lambda: compiled(*inp, **kw, opaque=False)[0],
            }
            m, regs, ok = side_by_side(calls, params["q_out"], a.repeats)
            print(f"| {shape} | {t} | " + " | ".join(f"{m[k]:.2f}" for k in calls)
                  + f" | {'/'.join(regs)} | {ok} |", flush=True)


def _bits64(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _shape_args(p: dict) -> tuple:
    """tile_plan's arguments after T, from a recorded launch's constexprs."""
    return (p["HQ"], p["HKV"], p["D"], p["R"], p["WRITE_Q"], p["NKB"] > 0, p["NVB"] > 0,
            p["WRITE_G"], p["IS_NEOX"])


if __name__ == "__main__":
    main()
