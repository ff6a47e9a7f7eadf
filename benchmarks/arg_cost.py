"""What the kernel's runtime arguments cost a small-T launch in a CUDA graph.

    python benchmarks/arg_cost.py [--shapes glm-4.5,qwen3-8b] [--tokens 1,16,64,256]

At small T the op is latency: a launch, one memory round trip, a short chain of math.  The
kernel takes ~37 runtime arguments (~300 bytes of parameters), a copy kernel a handful.  This
script times, side by side in CUDA-graph replays on one card:

1. empty Triton kernels taking 1 to 48 pointer arguments (what parameter bytes alone cost a
   launch);
2. the op's own launch (the arguments the entry point passes, recorded once) against the
   same kernel with the arguments that stay fixed for a model (row strides, column offsets,
   eps, table rows, cache geometry) turned into constexprs, which also lets the compiler fold
   them, and with T a constexpr too (a ceiling: one compile per T).
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import re
import statistics
import sys
import tempfile

os.environ.setdefault("FUSED_QKV_NATIVE", "0")  # the Python path records the launch

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_op import bench, copy_floor_us, floor_bytes, fused, make_inputs  # noqa: E402

from kernels import triton_kernel as tk  # noqa: E402

FIXED = ("q_src_stride", "k_src_stride", "v_src_stride", "q_col", "k_col", "v_col", "eps",
         "w_off", "cos_stride", "sin_stride", "table_rows", "block_size", "num_slots",
         "kc_blk", "kc_slot", "kc_head", "vc_blk", "vc_slot", "vc_head")


def empty_kernel(n: int):
    """A Triton kernel taking ``n`` pointers that stores one value through the first."""
    names = [f"p{i}" for i in range(n)]
    src = (f"import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
           f"def empty_{n}({', '.join(names)}):\n    tl.store(p0, 1.0)\n")
    return _load_module(src, f"empty_{n}").__dict__[f"empty_{n}"]


def _load_module(src: str, name: str):
    path = os.path.join(tempfile.mkdtemp(), f"{name}.py")  # Triton reads the source file
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def const_variant(names: tuple):
    """fused_qkv_kernel with the parameters ``names`` made constexprs."""
    src = inspect.getsource(tk.fused_qkv_kernel.fn)
    head, body = src.split("):\n", 1)
    for n in names:
        head, k = re.subn(rf"\b{n}\b(?!:)", f"{n}: tl.constexpr", head, count=1)
        assert k == 1, n
    head = head.replace("@triton.jit\n", "").replace("def fused_qkv_kernel(",
                                                      "def fused_qkv_variant(")
    src = ("import triton\nimport triton.language as tl\nimport kernels.triton_kernel as _tk\n"
           "globals().update({k: v for k, v in vars(_tk).items() if not k.startswith('__')})"
           "\n\n\n@triton.jit\n" + head + "):\n" + body)
    return _load_module(src, "variant_" + str(len(names))).fused_qkv_variant


class _Recorder:
    """Stands in for fused_qkv_kernel: records one launch's grid and arguments."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *a, **kw: self.calls.append((grid, a, kw))


def recorded_launch(inp, kw):
    """(grid, {parameter: value}, launch options) of the entry point's launch for ``inp``."""
    rec, real, fast = _Recorder(), tk.fused_qkv_kernel, tk._FAST_LAUNCH
    tk.fused_qkv_kernel, tk._FAST_LAUNCH = rec, False
    try:
        fused(*inp, **kw)
    finally:
        tk.fused_qkv_kernel, tk._FAST_LAUNCH = real, fast
    (grid, args, kwargs), = rec.calls
    names = [n for n, c in zip(tk._PARAMS, tk.IS_CONSTEXPR) if not c]
    params = dict(zip(names, args))
    opts = {k: kwargs.pop(k) for k in ("num_warps", "maxnreg", "launch_pdl") if k in kwargs}
    params.update(kwargs)
    return grid, params, opts


def side_by_side(calls: dict, q_out: torch.Tensor, repeats: int) -> tuple[dict, list, bool]:
    """Run each launch of ``calls`` once, its Q output poisoned first, then time them all in
    ``repeats`` alternating rounds of CUDA-graph replays: (median us by name, registers a
    thread, whether every launch wrote the first one's Q).  A call that returns a tensor
    (a compiled module) returns its own Q."""
    outs, regs = {}, []
    for k, fn in calls.items():
        q_out.fill_(float("nan"))
        kern = fn()
        torch.cuda.synchronize()
        outs[k] = (kern if isinstance(kern, torch.Tensor) else q_out).clone()
        regs.append(str(getattr(kern, "n_regs", "?")))
    first = next(iter(outs.values()))
    ok = all(torch.equal(first, v) for v in outs.values())
    times = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            times[k].append(bench(fn, graph=True) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}, regs, ok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="glm-4.5,qwen3-8b,qwen3-next")
    ap.add_argument("--tokens", default="1,16,64,256")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; medians reported")
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  triton "
          f"{triton.__version__}  CUDA-graph replays, us a launch, median of {a.repeats}")
    x = torch.zeros(64, device="cuda")
    counts = (1, 8, 16, 24, 32, 40, 48)
    kernels_n = {n: empty_kernel(n) for n in counts}
    rows = {n: [] for n in counts}
    for _ in range(a.repeats):
        for n in counts:
            k = kernels_n[n]
            rows[n].append(bench(lambda k=k, n=n: k[(1,)](*([x] * n)), graph=True) * 1e3)
    print("\n## empty kernel, n pointer arguments\n\n| n | us |\n|---:|---:|")
    for n in counts:
        print(f"| {n} | {statistics.median(rows[n]):.3f} |")

    variants = {"const": const_variant(FIXED), "const+T": const_variant(FIXED + ("T",))}
    print("\n## the op (vLLM form, NHD): runtime fixed arguments vs constexprs\n")
    print("| shape | T | op | const | const+T | copy | op - const | same Q |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for shape in a.shapes.split(","):
        for t in map(int, a.tokens.split(",")):
            inp, kw, cache_bytes = make_inputs(shape, t, False)
            kw = dict(kw, gated=kw["gated"], opaque=False)
            grid, params, opts = recorded_launch(inp, kw)
            calls = {
                "op": lambda: tk.fused_qkv_kernel[grid](**params, **opts),
                "const": lambda: variants["const"][grid](**params, **opts),
                "const+T": lambda: variants["const+T"][grid](**params, **opts),
            }
            hq, hkv, d, r, gated = (kw[k] for k in ("hq", "hkv", "d", "r", "gated"))
            nbytes = floor_bytes(t, hq, hkv, d, r, gated, cache_bytes)
            m, regs, ok = side_by_side(calls, params["q_out"], a.repeats)
            copy = statistics.median(copy_floor_us(nbytes) for _ in range(a.repeats))
            print(f"| {shape} | {t} | {m['op']:.2f} | {m['const']:.2f} | {m['const+T']:.2f} | "
                  f"{copy:.2f} | {m['op'] - m['const']:+.2f} | {ok} |", flush=True)


if __name__ == "__main__":
    main()
