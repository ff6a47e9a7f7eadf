"""Replay Inductor's own launch of the trampoline outside its generated code (GPU).

    python benchmarks/inductor_replay.py [--shapes glm-4.5,qwen3-8b] [--tokens 1,256,4096]

The compiled module (``+pass``) ran the trampoline ~0.15-0.2 us slower than direct launches
of the same kernel (fifteenth session, ``branch_order.py``), with the same tile, grid and
registers; this script found the cause (eps and the weight offset typed fp64 by Inductor,
sixteenth session, fixed).  It records the arguments Inductor's generated code gives the kernel's
``CachingAutotuner.run`` at one T and times, side by side in CUDA-graph replays, us a launch:

- ``op``: the entry point's launch (as ``bench_op.py``'s ``fused``);
- ``+pass``: the compiled module, as ``bench_op.py`` compiles it (dynamic T, first at T = 16);
- ``replay``: ``CachingAutotuner.run`` with the recorded arguments: Inductor's binary and
  launcher, Inductor's buffers, none of the rest of the generated code;
- ``jit``: the trampoline's own JIT function (T not specialised) launched with the same
  recorded arguments and Inductor's constexprs: our compile of the kernel, Inductor's data;
- ``jit/op``: the same JIT launch with the op's buffers (the op's recorded launch);
- ``jit+ind``: ``jit`` compiled as Inductor compiled it before eps and the weight offset
  travelled as fp32 bits: both as fp64 (``branch_order.py``'s ``now+f64``), with
  ``debug=True, sanitize_overflow=False``.

``--dump DIR`` writes every trampoline binary loaded (Inductor's and ours) as cubin, for
``cuobjdump -sass``.

``replay`` against ``+pass`` isolates the generated code around the launch; ``jit`` against
``replay`` the binary and launch path (same buffers); ``jit/op`` against ``jit`` the buffers.
"""
from __future__ import annotations

import argparse
import os
import struct
import sys

os.environ.setdefault("FUSED_QKV_NATIVE", "0")

import torch  # noqa: E402
import triton  # noqa: E402
from torch._inductor.runtime import triton_heuristics as th  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from arg_cost import recorded_launch, side_by_side  # noqa: E402
from bench_op import make_inputs, unfused  # noqa: E402
from branch_order import _bits64, variants  # noqa: E402
from static_small_t import DONOR, trampoline_kwargs  # noqa: E402

import fusion_pass  # noqa: E402
from kernels import triton_kernel as tk  # noqa: E402

_CALLS: list = []
_OPTIONS: list = []  # the options Inductor compiles the trampoline with, in compile order


def _spy_compile(real):
    def compile(src, *args, **kw):
        if "fused_qkv" in getattr(getattr(src, "fn", None), "__name__", ""):
            _OPTIONS.append(dict(kw.get("options") or {}))
        return real(src, *args, **kw)
    return compile


def _recording_run(orig):
    def run(self, *args, stream, **kw):
        if getattr(self.fn, "__name__", "").startswith("fused_qkv_inductor_kernel"):
            _CALLS.append((self, args))
        return orig(self, *args, stream=stream, **kw)
    return run


def inductor_call(compiled, inp, kw) -> tuple:
    """(autotuner, its positional arguments) of the trampoline's launch in one call."""
    _CALLS.clear()
    orig = th.CachingAutotuner.run
    th.CachingAutotuner.run = _recording_run(orig)
    try:
        compiled(*inp, **kw, opaque=False)
    finally:
        th.CachingAutotuner.run = orig
    (at, args), = _CALLS
    return at, args


def _as_float(x) -> float:
    """A float argument as Inductor got it: a float, or (since the fp32-bits change) the
    int32 bits of one."""
    return x if isinstance(x, float) else struct.unpack("<f", struct.pack("<i", x))[0]


def jit_kwargs(at, args) -> tuple:
    """(grid, kwargs by name, constexprs) of the trampoline's JIT function for a recorded
    ``run`` (its last three positional arguments are the grid)."""
    names = list(DONOR.arg_names)

    def name(key):  # by name, or by (index,) as Triton's attrs key them
        return key if isinstance(key, str) else names[key[0] if isinstance(key, tuple) else key]

    # constexpr parameters; "constants" also lists specialised runtime ones (T = 1), which
    # Inductor still passes
    fixed = {p.name for p in DONOR.params if p.is_constexpr}
    consts = {name(k): v for k, v in at.triton_meta["constants"].items() if name(k) in fixed}
    runtime = [n for n in names if n not in fixed]
    assert len(runtime) + 3 == len(args), (len(runtime), len(args))
    kwargs = dict(zip(runtime, args[:-3]))
    return tuple(int(g) for g in args[-3:]), kwargs, consts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="glm-4.5,qwen3-8b")
    ap.add_argument("--tokens", default="1,256,4096")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dump", default=None, metavar="DIR")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch._inductor.config.fx_graph_cache = False
    torch._inductor.config.compile_threads = 1  # in-process compiles, seen by _spy_compile
    triton.compile = _spy_compile(triton.compile)
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  triton "
          f"{triton.__version__}  CUDA-graph replays, us a launch, median of {a.repeats}\n")
    f64 = variants()["f64"]
    print("| shape | T | op | +pass | replay | jit | jit/op | jit+ind | ok |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for shape in a.shapes.split(","):
        torch._dynamo.reset()  # static head counts for each shape (see branch_order.py)
        compiled = torch.compile(unfused, backend=fusion_pass.make_backend())
        warm, wkw, _ = make_inputs(shape, 16, False)
        compiled(*warm, **wkw, opaque=False)
        for t in map(int, a.tokens.split(",")):
            inp, kw, _ = make_inputs(shape, t, False)
            grid, params, opts = recorded_launch(inp, dict(kw, opaque=False))
            at, args = inductor_call(compiled, inp, kw)
            igrid, ikw, consts = jit_kwargs(at, args)
            q_ind = ikw["q_out"].view(params["q_out"].shape)
            warps = {k: _OPTIONS[-1][k] for k in ("num_warps", "num_stages")}
            # the op's buffers in the trampoline's arguments, Inductor's constexprs
            own = dict(trampoline_kwargs(params, 0), **consts)
            bits = dict(ikw, eps=_bits64(_as_float(ikw["eps"])),
                        w_off=_bits64(_as_float(ikw["w_off"])))

            def replay():
                at.run(*args, stream=torch.cuda.current_stream().cuda_stream)
                return q_ind

            def jit():
                DONOR[igrid](**ikw, **consts, **warps)
                return q_ind

            calls = {
                "op": lambda: tk.fused_qkv_kernel[grid](**params, **opts),
                "+pass": lambda: compiled(*inp, **kw, opaque=False)[0],
                "replay": replay,
                "jit": jit,
                "jit/op": lambda: DONOR[igrid](**own, **warps),
                "jit+ind": lambda: (f64[igrid](**bits, **consts, **warps, debug=True,
                                               sanitize_overflow=False), q_ind)[1],
            }
            q_ind.fill_(float("nan"))
            m, _, ok = side_by_side(calls, params["q_out"], a.repeats)
            print(f"| {shape} | {t} | " + " | ".join(f"{m[k]:.2f}" for k in calls)
                  + f" | {ok} |", flush=True)
    if a.dump:
        dump(a.dump)


def dump(out: str) -> None:
    """Every trampoline binary loaded, as ``<i>_<name>[_debug].cubin``; their registers and
    hashes printed."""
    import gc

    from triton.compiler.compiler import CompiledKernel
    os.makedirs(out, exist_ok=True)
    kernels = [k for k in gc.get_objects() if type(k) is CompiledKernel
               and ("inductor" in k.name or k.name.startswith("tramp_"))]
    for i, k in enumerate(kernels):
        stem = f"{i}_{k.name}{'_debug' if k.metadata.debug else ''}"
        with open(os.path.join(out, stem + ".cubin"), "wb") as f:
            f.write(k.asm["cubin"])
        print(f"{stem}: regs={k.n_regs} hash={str(getattr(k.metadata, 'hash', '?'))[:12]}")


if __name__ == "__main__":
    main()
