"""Compile the fused kernel for an H100/H200 (sm_90) on a machine without a GPU and count its
SASS: registers, instructions, and the kinds that matter for a memory-bound kernel (global
loads/stores, shared-memory round trips of layout conversions, barriers, shuffles).

The kernel has no loops, so a static count per region is what one program executes.  Use it
to compare kernel variants before spending device time on them.

    PYTHONPATH=. python benchmarks/sass_stats.py qwen3-next 65536 [no-gate] [--tile 4,2,4,0,0]
        [--int64] [--trampoline] [--max-regs N|none]
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile as triton_compile, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import bench_op  # noqa: E402
from kernels import triton_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
# opcode families worth watching (prefix match on the SASS mnemonic)
WATCH = ("LDG", "STG", "LDS", "STS", "BAR", "SHFL", "IMAD", "IADD", "LEA", "ISETP", "FMUL",
         "FFMA", "FADD", "F2F", "PRMT", "SEL", "MUFU")


H200_SMS = 132


def capture(name: str, t: int, gate: bool):
    """(grid, args, consts, num_warps, maxnreg) of the op's launch on CPU tensors, without
    running it; ``maxnreg``: the register budget the op gives it on an H200 (132 SMs)."""
    seen = []

    class Recorder:
        fn = triton_kernel.fused_qkv_kernel

        def __call__(self, grid, args, consts, num_warps, launch_pdl=False, maxnreg=None,
                     memo=None):
            seen.append((grid, list(args), consts, num_warps, maxnreg))

    triton_kernel._launcher = Recorder()
    budget_fns = triton_kernel._maxnreg_ok, triton_kernel._sm_count
    triton_kernel._maxnreg_ok = lambda device: True  # the budget rule as on the H200
    triton_kernel._sm_count = lambda device: H200_SMS
    inp, kw, _ = bench_op.make_inputs(name, t, False, dev="cpu")
    # the op takes the Triton path on the CPU only under this flag (read per call); the
    # kernel itself was imported without it, so it is the real JIT function, not interpreted
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        bench_op.fused(*inp, **kw, opaque=False, return_gate=gate)
    finally:
        del os.environ["TRITON_INTERPRET"]
        triton_kernel._launcher = None
        triton_kernel._maxnreg_ok, triton_kernel._sm_count = budget_fns
    grid, args, consts, warps, maxnreg = seen[0]
    consts = tuple(False if n == "INTERP" else c  # INTERP off: compiled for the GPU
                   for n, c in zip(triton_kernel._CONST_NAMES, consts))
    return grid, args, consts, warps, maxnreg


def compile_sm90(fn, kw: dict, num_warps: int, maxnreg: Optional[int] = None):
    """``fn`` (a ``@triton.jit`` kernel) compiled for sm_90 with these arguments by name;
    ``maxnreg``: ptxas's register budget (None: its own choice)."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(**kw, num_warps=num_warps)
    options, signature, constexprs, attrs = fn._pack_args(backend, {"num_warps": num_warps},
                                                          bound, spec, options)
    opts = dict(options.__dict__, maxnreg=maxnreg)
    return triton_compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET,
                          options=opts)


def op_args(args, consts) -> dict:
    """The captured launch's arguments by name."""
    fn = triton_kernel.fused_qkv_kernel
    rt = [n for n in fn.arg_names if n not in triton_kernel._CONST_NAMES]
    return {**dict(zip(rt, args)), **dict(zip(triton_kernel._CONST_NAMES, consts))}


def trampoline_args(shape: str, op: dict) -> tuple[dict, int]:
    """(kwargs, num_warps) of ``fused_qkv_inductor_kernel`` as the pass launches it for a
    dynamic T (the plan of ``inductor_launch.plan``, the caches as their own bases), built from
    the op's captured launch (``op_args``); T is odd, as Inductor gives a symbolic T no
    divisibility."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from fusion_pass import inductor_launch as il
    hq, hkv, d, r, gated, _ = bench_op.SHAPES[shape]
    p = il.plan(ShapeEnv().create_unbacked_symint(), hq=hq, hkv=hkv, d=d, rotary_dim=r,
                write_q=True, run_k=True, run_v=True, write_gate=op["WRITE_G"])
    kw = {k: v for k, v in op.items() if k not in ("k_cache", "v_cache")}
    kw.update(p.tiles.constexprs)
    # any int32 bound past the switch: both large-T copies of the call are compiled
    kw.update(k_base=op["k_cache"], v_base=op["v_cache"], T=op["T"] | 1, IDX64=False,
              PDL=False, V_IN_K_BASE=False, CACHE_FP8=0,
              SWITCH_T=p.switch_t, BIG_BLOCK_T=p.big_block_t, BIG_INT32_BELOW=1 << 20,
              WIDE_BLOCK_T=p.tiles.block_t, K_OFF=0, V_OFF=0,
              eps=il.f32_bits(op["eps"]), w_off=il.f32_bits(op["w_off"]))  # as kernel_kwargs
    return kw, p.tiles.num_warps


def registers(cubin: bytes) -> int:
    """Registers per thread, from cuobjdump's resource usage (n_regs needs a loaded kernel)."""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", out).group(1))


_ORDER = {"LDG": "L", "SHFL": "s", "BAR": "|", "STG": "S", "MUFU": "m"}


def issue_order(sass: str) -> str:
    """The order of global loads (L), shuffles (s: the norm's reduction), barriers (|), MUFU
    (m: its rsqrt) and global stores (S) in each exit path of the kernel, ``/``-separated.
    A load after the first shuffle is issued only once the reduction's input arrived: a second
    memory round trip."""
    paths, cur = [], []
    for m in re.finditer(r"^[-0-9A-Za-z:]+\t(?:@!?U?P\w+\s+)?([A-Z]+)", sass, re.M):
        op = m.group(1)
        if op == "EXIT":
            if cur:
                paths.append("".join(cur))
            cur = []
        elif op in _ORDER:
            cur.append(_ORDER[op])
    return "/".join(p for p in paths if len(p) > 1)  # not the lone stores after a branch


def stats(kernel) -> dict:
    sass = kernel.asm["sass"]
    # one instruction a line, after its control codes: "--:-:0:-:1\t@!P0 LDG.E.128 R12, ..."
    ops = re.findall(r"^[-0-9A-Za-z:]+\t(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, re.M)
    fam = collections.Counter()
    for op in ops:
        for w in WATCH:
            if op.startswith(w):
                fam[w] += 1
    ttgir = kernel.asm["ttgir"]
    # 64-bit integer arithmetic in the kernel's TTIR (index math; IDX64 off leaves ~none)
    i64 = len(re.findall(r"= arith\.(?:addi|subi|muli|divsi|remsi|extsi)\b[^\n]*i64",
                         kernel.asm["ttir"]))
    return dict(regs=registers(kernel.asm["cubin"]), i64_ops=i64, instrs=len(ops),
                convert_layout=ttgir.count("ttg.convert_layout"), **fam,
                order=issue_order(sass))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape")
    ap.add_argument("tokens", type=int)
    ap.add_argument("opts", nargs="*", help="no-gate")
    ap.add_argument("--tile", help="BLOCK_T,BLOCK_H,warps[,pairs[,early[,row_tail]]] "
                    "(default: the heuristic; any T >= 1024 gives the large-T tiles)")
    ap.add_argument("--dump", help="write the ttgir, ptx and sass here (kernel.*, and with "
                    "--trampoline trampoline.*)")
    ap.add_argument("--int64", action="store_true",
                    help="int64 element offsets (triton_kernel._INDEX32 off; by default int32 "
                    "ones where they fit)")
    ap.add_argument("--max-regs", default=None, metavar="N|none",
                    help="ptxas's register budget for the op's kernel (default: the op's "
                    "on an H200, see triton_kernel._EARLY_MAX_REGS and _LATE_MAX_REGS)")
    ap.add_argument("--trampoline", action="store_true",
                    help="also the Inductor launch's kernel for a dynamic T (all its branches)")
    a = ap.parse_args()
    if a.int64:
        triton_kernel._INDEX32 = False
    if a.tile:
        triton_kernel.set_block_override(tuple(int(x) for x in a.tile.split(",")))
    print(f"# triton {triton.__version__} (sm_90 compile)")
    grid, args, consts, warps, regs = capture(a.shape, a.tokens, "no-gate" not in a.opts)
    op = op_args(args, consts)
    if a.max_regs is not None:
        regs = bench_op._budgets(a.max_regs)[0]
    k = compile_sm90(triton_kernel.fused_qkv_kernel, op, warps, maxnreg=regs)
    print(f"{a.shape} T={a.tokens} {' '.join(a.opts)} grid={grid} warps={warps} maxnreg={regs} "
          f"idx64={int(op['IDX64'])}:",
          " ".join(f"{n}={v}" for n, v in stats(k).items()))
    dumps = {"kernel": k}
    if a.trampoline:
        from fusion_pass.inductor_launch import fused_qkv_inductor_kernel
        kw, tw = trampoline_args(a.shape, op)
        tk = compile_sm90(fused_qkv_inductor_kernel, kw, tw)
        print(f"{a.shape} trampoline (dynamic T) warps={tw}:",
              " ".join(f"{n}={v}" for n, v in stats(tk).items()))
        dumps["trampoline"] = tk
    if a.dump:
        os.makedirs(a.dump, exist_ok=True)
        for name, kern in dumps.items():
            for ext in ("ttgir", "ptx", "sass"):
                with open(os.path.join(a.dump, f"{name}.{ext}"), "w") as f:
                    f.write(kern.asm[ext])


if __name__ == "__main__":
    main()
