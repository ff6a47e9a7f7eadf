"""Let Inductor's generated code launch the fused Triton kernel itself (CUDA).

Without this the pass inserts ``auto_functionalized_v2(fused_qkv.split_norm_rope_cache, ...)``
(rewrite.py) and Inductor calls the custom op, whose Python impl allocates the outputs and
launches the kernel: Python of ours on every call.  Here the pass inserts instead what Dynamo
itself produces for a user ``@triton.jit`` kernel that mutates a graph input:

    empty = aten.empty.memory_format([T, H, D], ...)              # one per written output
    out = triton_kernel_wrapper_functional(kernel_idx, constant_args_idx, grid=[(gx * gy, 1, 1)],
              tma_descriptor_metadata={}, kwargs={<every kernel arg by name>},
              tensors_to_clone=["k_base", "v_base", "q_out", ...])
    new_k_base = out["k_base"]; q = out["q_out"]; ...
    copy_(key_cache_input, new_k_base)                            # the existing epilogue

Inductor's own passes do the rest (torch 2.11 and 2.13): ``reinplace`` drops every clone (the
caches are graph inputs with an epilogue ``copy_``, the outputs are fresh ``empty`` nodes),
``decompose_triton_kernel_wrapper_functional`` turns the node into
``triton_kernel_wrapper_mutation``, lowered to ``ir.UserDefinedTritonKernel``: the wrapper code
calls ``fused_qkv_inductor_kernel_N.run(...)`` directly (inside the CUDA graph with
``reduce-overhead``).

Why a trampoline kernel (``fused_qkv_inductor_kernel``) around ``fused_qkv_kernel``:

* reinplacing a ``triton_kernel_wrapper_functional`` only works when the mutated tensor IS a
  graph input (torch 2.11 refuses any view of an input; 2.13 accepts views for aten
  inplaceable ops only), so the kernel takes the cache *base* and a static element offset
  (constexprs ``K_OFF``/``V_OFF``): the halves of one ``kv_cache[2, ...]`` are one base,
  passed once (``V_IN_K_BASE``), since two mutated args on one storage would get one of them
  cloned;
* a ``uint8`` cache holding fp8 bytes cannot be re-viewed in the graph (the view would be
  cloned too): the trampoline bitcasts the pointer (``CACHE_FP8``);
* Inductor types Python float kernel args as fp64 (``config._use_fp64_for_unbacked_floats``,
  on outside fbcode), and their conversion to fp32 in the kernel (two F2F.F32.F64 on sm_90)
  cost 0.14-0.16 us a launch at T = 1 and 256 on an H200 (``benchmarks/inductor_replay.py``,
  GLM-4.5): ``eps`` and ``w_off`` travel as the bits of their fp32 values (``f32_bits``), an
  int Inductor types i32, bitcast back in the kernel.  (As constexprs they cost ptxas
  registers: GLM-4.5's large-T tile took 42 a thread against the op's 40, one block less a
  multiprocessor.)

What Inductor believes the kernel writes comes from its TTIR analysis, not from
``tensors_to_clone``: a pointer it wrongly counts as written becomes a mutated buffer, and a
mutated *graph input* makes CUDA-graph trees skip the graph.  The kernel is written for that
analysis (slots are loaded in the kernel body, the gate branch exists only with ``WRITE_G``);
``_check_writes`` runs the same analysis at pass time and refuses (-> custom op) if a change
to the kernel ever breaks it.  The node also carries ``eager_input_vals`` so the lowering pins
every input to the strides the kernel's stride arguments were computed from.

Entry points (drop-ins for ``rewrite.call_fused_with_cache`` / ``call_fused``, same arguments):

    call_fused_with_cache(b, op, args, kc, vc) -> (node, outs[4], {id(base): new_base_node})
    call_fused(b, op, args) -> (node, outs[4])

``outs[i]`` is None for an output the kernel does not write.  Both raise :class:`Unsupported`
(a ``ValueError``), leaving the graph as it was, when this path cannot be used (not CUDA,
Triton's interpreter, static T == 0, a symbolic value no node provides, a changed kernel or
HOP signature, an inexact write analysis...): the pass then inserts the custom op.
"""
from __future__ import annotations

import functools
import inspect
import operator
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch.fx import Node

from kernels import triton_kernel as _tk
from kernels.op_schema import GATE_NONE, LAYOUT_NHD, fp8_dtype_of
from kernels.triton_kernel import fused_qkv_kernel

from .graph_util import is_view_node, same_sym, tensor_val, view_input

#: The report's op name for a chain fused through this path (the kernel's name in the code).
OP_NAME = "fused_qkv_inductor_kernel (Inductor launch)"


class Unsupported(ValueError):
    """This graph / op call cannot use the Inductor launch path (the message says why)."""


# ----------------------------------------------------------------------------- the kernel

# fused_qkv_kernel's parameters as this trampoline was written against (checked at use).
WRAPPED_ARGS = (
    "q_src", "k_src", "v_src", "q_src_stride", "k_src_stride", "v_src_stride", "q_col",
    "k_col", "v_col", "q_w", "k_w", "eps", "w_off", "cos_ptr", "sin_ptr", "cos_stride",
    "sin_stride", "pos_ptr", "table_rows", "q_out", "k_out", "v_out", "g_out", "k_cache",
    "v_cache", "slot_ptr", "block_size", "num_slots", "kc_blk", "kc_slot", "kc_head", "vc_blk",
    "vc_slot", "vc_head", "k_scale", "v_scale", "T", "HQ", "HKV", "D", "R", "GATE",
    "HAS_NORM", "HAS_QW", "HAS_KW", "IS_NEOX", "EXPANDED", "HAS_POS", "HAS_CACHE", "SKIP_NEG",
    "IS_FP8", "HAS_KS", "HAS_VS", "FP8_MAX", "WRITE_Q", "WRITE_K", "WRITE_V", "WRITE_G", "NQB",
    "NKB", "NVB", "BLOCK_T", "BLOCK_H", "BLOCK_D", "BLOCK_HALF", "BLOCK_TAIL", "PAIRS",
    "EARLY", "ROW_TAIL", "IDX64", "INTERP", "PDL",
)


@triton.jit
def fused_qkv_inductor_kernel(
    q_src, k_src, v_src, q_src_stride, k_src_stride, v_src_stride, q_col, k_col, v_col,
    q_w, k_w, eps, w_off,
    cos_ptr, sin_ptr, cos_stride, sin_stride, pos_ptr, table_rows,
    q_out, k_out, v_out, g_out,
    k_base, v_base, slot_ptr, block_size, num_slots,
    kc_blk, kc_slot, kc_head, vc_blk, vc_slot, vc_head,
    k_scale, v_scale, T,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
    GATE: tl.constexpr, HAS_NORM: tl.constexpr, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr,
    IS_NEOX: tl.constexpr, EXPANDED: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_CACHE: tl.constexpr, SKIP_NEG: tl.constexpr, IS_FP8: tl.constexpr,
    HAS_KS: tl.constexpr, HAS_VS: tl.constexpr, FP8_MAX: tl.constexpr,
    WRITE_Q: tl.constexpr, WRITE_K: tl.constexpr, WRITE_V: tl.constexpr, WRITE_G: tl.constexpr,
    NQB: tl.constexpr, NKB: tl.constexpr, NVB: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr, PAIRS: tl.constexpr,
    EARLY: tl.constexpr, ROW_TAIL: tl.constexpr, IDX64: tl.constexpr, INTERP: tl.constexpr,
    V_IN_K_BASE: tl.constexpr, CACHE_FP8: tl.constexpr,
    SWITCH_T: tl.constexpr, BIG_BLOCK_T: tl.constexpr, BIG_INT32_BELOW: tl.constexpr,
    WIDE_BLOCK_T: tl.constexpr, K_OFF: tl.constexpr, V_OFF: tl.constexpr,
):
    """``fused_qkv_kernel`` with the caches given as (graph-input base, element offset).

    ``SWITCH_T`` > 0 (a dynamic T): from ``T >= SWITCH_T`` on, each program takes
    ``BIG_BLOCK_T`` tokens, with late loads, and int32 offsets below ``BIG_INT32_BELOW``
    (worked out from the tensors' static spans); from there int64 ones, ``WIDE_BLOCK_T``
    tokens a program (the small-T tile's when there is an int32 copy, else ``BIG_BLOCK_T``;
    the grid follows, see ``_grid_x``); below ``SWITCH_T``, the given tiles.
    Uniform branches, so one graph runs the small-T tiles for decode and the large-T ones for
    long prefills.

    Registers (sm_90, ``benchmarks/sass_stats.py``-style compiles, Qwen3-8B): the op's own
    kernel at T=65536 takes 40 a thread.  The trampoline took 44, i.e. 48 once rounded to the
    allocation unit, one block less a multiprocessor: runtime cache offsets kept both cache
    pointers in registers for the whole kernel, and the int64 copy placed after the int32
    one cost as much again.  Constexpr offsets and the int64 copy first: 40.  A kernel takes
    the registers of its hungriest branch: with Triton 3.9, an int64 copy on the large-T
    tile took 42 for GLM-4.5 and 56 for Qwen3-Next (their int32 ones 40 and 48), so the
    int64 copy takes the small-T tile's tokens (``WIDE_BLOCK_T``): 40 and 48.  It runs only
    past ``BIG_INT32_BELOW``, 74,897 tokens for GLM-4.5 with the benchmark's caches.  (With
    Triton 3.6, the H200 image's, GLM-4.5 took 42 until eps and the weight offset stopped
    being constexprs; the register test compiles with both versions.)"""
    # eps and w_off: fp32 bits (f32_bits); tl.cast, as an argument of 1 arrives as a constexpr
    eps32 = tl.cast(eps, tl.int32).to(tl.float32, bitcast=True)
    w_off32 = tl.cast(w_off, tl.int32).to(tl.float32, bitcast=True)
    # base + a constant: folded into the stores' addresses (0 for a cache that is its own
    # graph input)
    k_cache = k_base + K_OFF
    if V_IN_K_BASE:  # K and V halves of one tensor: one mutated argument
        v_cache = k_base + V_OFF
    else:
        v_cache = v_base + V_OFF
    if CACHE_FP8 == 1:  # uint8 storage holding float8_e4m3fn
        k_cache = k_cache.to(tl.pointer_type(tl.float8e4nv), bitcast=True)
        v_cache = v_cache.to(tl.pointer_type(tl.float8e4nv), bitcast=True)
    elif CACHE_FP8 == 2:  # uint8 storage holding float8_e5m2
        k_cache = k_cache.to(tl.pointer_type(tl.float8e5), bitcast=True)
        v_cache = v_cache.to(tl.pointer_type(tl.float8e5), bitcast=True)
    if SWITCH_T > 0:
        if T >= SWITCH_T:  # the same call as below but for its tile and offset constexprs
            if T >= BIG_INT32_BELOW:  # int64 offsets (0: they never fit int32)
                fused_qkv_kernel(
                    q_src=q_src, k_src=k_src, v_src=v_src, q_src_stride=q_src_stride,
                    k_src_stride=k_src_stride, v_src_stride=v_src_stride, q_col=q_col,
                    k_col=k_col, v_col=v_col, q_w=q_w, k_w=k_w, eps=eps32, w_off=w_off32,
                    cos_ptr=cos_ptr, sin_ptr=sin_ptr, cos_stride=cos_stride,
                    sin_stride=sin_stride, pos_ptr=pos_ptr, table_rows=table_rows,
                    q_out=q_out, k_out=k_out, v_out=v_out, g_out=g_out,
                    k_cache=k_cache, v_cache=v_cache, slot_ptr=slot_ptr, block_size=block_size,
                    num_slots=num_slots, kc_blk=kc_blk, kc_slot=kc_slot, kc_head=kc_head,
                    vc_blk=vc_blk, vc_slot=vc_slot, vc_head=vc_head, k_scale=k_scale,
                    v_scale=v_scale, T=T, HQ=HQ, HKV=HKV, D=D, R=R, GATE=GATE,
                    HAS_NORM=HAS_NORM, HAS_QW=HAS_QW, HAS_KW=HAS_KW, IS_NEOX=IS_NEOX,
                    EXPANDED=EXPANDED, HAS_POS=HAS_POS, HAS_CACHE=HAS_CACHE, SKIP_NEG=SKIP_NEG,
                    IS_FP8=IS_FP8, HAS_KS=HAS_KS, HAS_VS=HAS_VS, FP8_MAX=FP8_MAX,
                    WRITE_Q=WRITE_Q, WRITE_K=WRITE_K, WRITE_V=WRITE_V, WRITE_G=WRITE_G,
                    NQB=NQB, NKB=NKB, NVB=NVB, BLOCK_T=WIDE_BLOCK_T, BLOCK_H=BLOCK_H,
                    BLOCK_D=BLOCK_D, BLOCK_HALF=BLOCK_HALF, BLOCK_TAIL=BLOCK_TAIL, PAIRS=PAIRS,
                    EARLY=False, ROW_TAIL=ROW_TAIL, IDX64=True, INTERP=INTERP, PDL=False,
                )
                return
            fused_qkv_kernel(
                q_src=q_src, k_src=k_src, v_src=v_src, q_src_stride=q_src_stride,
                k_src_stride=k_src_stride, v_src_stride=v_src_stride, q_col=q_col,
                k_col=k_col, v_col=v_col, q_w=q_w, k_w=k_w, eps=eps32, w_off=w_off32,
                cos_ptr=cos_ptr, sin_ptr=sin_ptr, cos_stride=cos_stride,
                sin_stride=sin_stride, pos_ptr=pos_ptr, table_rows=table_rows, q_out=q_out,
                k_out=k_out, v_out=v_out, g_out=g_out, k_cache=k_cache, v_cache=v_cache,
                slot_ptr=slot_ptr, block_size=block_size, num_slots=num_slots,
                kc_blk=kc_blk, kc_slot=kc_slot, kc_head=kc_head, vc_blk=vc_blk,
                vc_slot=vc_slot, vc_head=vc_head, k_scale=k_scale, v_scale=v_scale, T=T,
                HQ=HQ, HKV=HKV, D=D, R=R, GATE=GATE, HAS_NORM=HAS_NORM, HAS_QW=HAS_QW,
                HAS_KW=HAS_KW, IS_NEOX=IS_NEOX, EXPANDED=EXPANDED, HAS_POS=HAS_POS,
                HAS_CACHE=HAS_CACHE, SKIP_NEG=SKIP_NEG, IS_FP8=IS_FP8, HAS_KS=HAS_KS,
                HAS_VS=HAS_VS, FP8_MAX=FP8_MAX, WRITE_Q=WRITE_Q, WRITE_K=WRITE_K,
                WRITE_V=WRITE_V, WRITE_G=WRITE_G, NQB=NQB, NKB=NKB, NVB=NVB,
                BLOCK_T=BIG_BLOCK_T, BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D,
                BLOCK_HALF=BLOCK_HALF, BLOCK_TAIL=BLOCK_TAIL, PAIRS=PAIRS, EARLY=False,
                ROW_TAIL=ROW_TAIL, IDX64=False, INTERP=INTERP, PDL=False,
            )
            return
    fused_qkv_kernel(
        q_src=q_src, k_src=k_src, v_src=v_src, q_src_stride=q_src_stride,
        k_src_stride=k_src_stride, v_src_stride=v_src_stride, q_col=q_col, k_col=k_col,
        v_col=v_col, q_w=q_w, k_w=k_w, eps=eps32, w_off=w_off32,
        cos_ptr=cos_ptr, sin_ptr=sin_ptr, cos_stride=cos_stride, sin_stride=sin_stride,
        pos_ptr=pos_ptr, table_rows=table_rows,
        q_out=q_out, k_out=k_out, v_out=v_out, g_out=g_out,
        k_cache=k_cache, v_cache=v_cache, slot_ptr=slot_ptr, block_size=block_size,
        num_slots=num_slots, kc_blk=kc_blk, kc_slot=kc_slot, kc_head=kc_head, vc_blk=vc_blk,
        vc_slot=vc_slot, vc_head=vc_head, k_scale=k_scale, v_scale=v_scale, T=T,
        HQ=HQ, HKV=HKV, D=D, R=R, GATE=GATE, HAS_NORM=HAS_NORM, HAS_QW=HAS_QW, HAS_KW=HAS_KW,
        IS_NEOX=IS_NEOX, EXPANDED=EXPANDED, HAS_POS=HAS_POS, HAS_CACHE=HAS_CACHE,
        SKIP_NEG=SKIP_NEG, IS_FP8=IS_FP8, HAS_KS=HAS_KS, HAS_VS=HAS_VS, FP8_MAX=FP8_MAX,
        WRITE_Q=WRITE_Q, WRITE_K=WRITE_K, WRITE_V=WRITE_V, WRITE_G=WRITE_G,
        NQB=NQB, NKB=NKB, NVB=NVB, BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D,
        BLOCK_HALF=BLOCK_HALF, BLOCK_TAIL=BLOCK_TAIL, PAIRS=PAIRS, EARLY=EARLY,
        ROW_TAIL=ROW_TAIL, IDX64=IDX64, INTERP=INTERP, PDL=False,
    )


_CACHE_FP8 = {torch.float8_e4m3fn: 1, torch.float8_e5m2: 2}

# Device types whose graphs may use this path.  Only CUDA runs it; the CPU check script adds
# "cpu" to inspect Inductor's generated code on a machine without a GPU (it cannot run it).
DEVICES = {"cuda"}
# Accept Triton's interpreter (TRITON_INTERPRET=1) kernels: only for the CPU check script, which
# runs the post-grad graph eagerly (the HOP's dense impl launches the interpreted kernel).
ALLOW_INTERPRETER = False
# Compare Inductor's TTIR write analysis of the kernel with what it really writes (see
# _check_writes).  Off only for the interpreter check (no TTIR for interpreted kernels).
CHECK_WRITES = True

# The HOP's arguments in torch 2.11 to 2.13 (the node this module builds by hand).
_HOP_PARAMS = ("kernel_idx", "constant_args_idx", "grid", "tma_descriptor_metadata", "kwargs",
               "tensors_to_clone")


@functools.lru_cache(maxsize=None)
def _hop_params() -> tuple:
    from torch._higher_order_ops.triton_kernel_wrap import TritonKernelWrapperFunctional

    return tuple(p for p in inspect.signature(TritonKernelWrapperFunctional.__call__).parameters
                 if p != "self")


def supported(device: torch.device) -> tuple[bool, str]:
    """Can graphs on ``device`` use this path?  Returns ``(ok, reason when not)``."""
    if device.type not in DEVICES:
        return False, f"device {device.type}: Inductor launches user Triton kernels on CUDA only"
    jit = triton.runtime.jit.JITFunction
    if not (isinstance(fused_qkv_kernel, jit) and isinstance(fused_qkv_inductor_kernel, jit)) \
            and not ALLOW_INTERPRETER:
        return False, "Triton's interpreter (TRITON_INTERPRET=1): kernels are not JITFunctions"
    if tuple(fused_qkv_kernel.arg_names) != WRAPPED_ARGS:
        return False, "fused_qkv_kernel's signature changed: update the trampoline"
    if _hop_params() != _HOP_PARAMS:  # e.g. a new mutation-analysis argument
        return False, f"triton_kernel_wrapper_functional takes {_hop_params()}: not built here"
    return True, ""


# ----------------------------------------------------------------- what to launch, statically

# Where a dynamic-T launch ("auto") switches to its large-T tiles: launch()'s own switch.
# The CPU checks lower it to run the large-T branch at a few tokens (it is no pass option).
SWITCH_T = _tk._T_LARGE
# The same where launch() takes 2-token tiles with early loads from T = 64: many heads a token
# at D = 128 exactly (GLM-4.5), and a whole-row tail tile of at most 512 elements a token whose
# large-T branch takes 2 tokens (Qwen3-Next).  The large-T branch here has late loads (early
# ones cost up to 14% at large T); with those the 2-token tile overtakes the small-T one
# (early loads) at T = 128.  GLM-4.5: 2.92-3.01 against 3.04-3.05 us, 3.50-3.52 against
# 3.99-4.02 at T = 192, but 2.74-2.76 against 2.64-2.70 at T = 96 and 2.36-2.38 against 2.21
# at T = 64 (results/h200-2026-12-01-s13-tune-glm-early.txt).  Qwen3-Next without the gate
# output (what its compiled chain launches): 2.00 against 2.05-2.08 at T = 128, 2.50-2.52 /
# 3.40-3.46 / 4.47-4.54 against 2.90-2.91 / 4.45-4.51 / 5.99-6.04 at T = 256 / 512 / 768, but
# 1.84-1.87 against 1.80-1.83 at T = 64 (...-s13-tune-qwen3-next-mid.txt).  Many heads at
# other D keep T = 256 (untimed).
MID_SWITCH_T = 128
# The CPU checks also lower the large-T branch's int32 bound (None: as the spans allow) to run
# its int64 copy at a few tokens.
INT32_BELOW_CAP: Optional[int] = None


class Plan(NamedTuple):
    """What the Inductor launch runs: ``tiles`` (below ``switch_t``, or for every T), and
    from ``switch_t`` > 0 on (a dynamic T only) ``big_block_t`` tokens a program with the
    same head tiles and warps and late loads.  Offset widths (set by ``_build`` from the
    tensors' spans, see ``_offset_widths``): ``idx64``, the element offsets of ``tiles`` are
    int64; the large-T branch takes int32 ones below ``big_int32_below``, int64 from there,
    with ``wide_block_t`` tokens a program."""
    tiles: _tk.TilePlan
    switch_t: int = 0
    big_block_t: int = 1
    idx64: bool = True
    big_int32_below: int = 0
    wide_block_t: int = 1


def plan(T, *, hq: int, hkv: int, d: int, rotary_dim: int, write_q: bool, run_k: bool,
         run_v: bool, write_gate: bool, dynamic_tiles: str = "auto",
         is_neox: bool = True) -> Plan:
    """The kernel's tiles for ``T`` tokens (an int, or a SymInt when T is dynamic).

    Static T: exactly ``launch()``'s choice (``tile_plan``).  Dynamic T, ``"auto"``: the
    choice for T = 32 (one token a program, T x head-tiles programs; a whole-row tail tile
    when the unrotated tail is not a power of two) below T = 1024 (T = 128, ``MID_SWITCH_T``,
    with 64 or more heads a token at D = 128, e.g. GLM-4.5, and for a whole-row tail tile
    whose large-T branch takes 2 tokens, e.g. Qwen3-Next; T = 256 with many heads at other D;
    launch() changes tiles at D = 256 too, where the switch stays at 1024, untimed), and from
    there the same head tiles and warps with 16 elements a thread, 2 tokens a program for the
    benchmark shapes (an H200, gate-less Qwen3-Next at T = 65536: 355 against 412 us for one
    token a program; 1.92 against 1.83 us at T = 1 if used there), late loads, and int32
    offsets up to the bound ``_offset_widths`` works out; past it int64 ones, on the small-T
    tile's tokens.
    ``"decode"``: the T = 32 tiles for every T, ``"prefill"``: the T = 1024 ones for every T,
    both with late loads (EARLY off: early loads gain ~0.1 us at small T but cost up to 14%
    at large T).
    (Triton autotuning would not do this: Inductor benchmarks a user kernel's configs once, at
    the first call, and keeps the winner for every later T.)"""
    static_t = isinstance(T, int)
    if static_t and T == 0:
        raise Unsupported("T == 0: nothing to launch")
    at = T if static_t else _tk._T_LARGE if dynamic_tiles == "prefill" else _tk._T_SMALL
    tiles = _tk.tile_plan(at, hq, hkv, d, rotary_dim, write_q, run_k, run_v, write_gate,
                          is_neox)
    if tiles is None:
        raise Unsupported("the op writes nothing")
    if static_t:
        return Plan(tiles)
    if dynamic_tiles != "auto":
        return Plan(tiles._replace(constexprs={**tiles.constexprs, "EARLY": False}))
    if tiles.block_t > 1:  # only a forced tile (tune_kernel.py) has more at T = 32
        return Plan(tiles)
    # From the switch: 16 elements a thread (2 tokens for the benchmark shapes), or still one
    # token when a row of head tiles already has that many (D = 256 with 8 KV heads), late
    # loads either way.  Many heads a token: from MID_SWITCH_T (D = 128) or T = 256
    # (for GLM-4.5 launch()'s tile, 2 tokens of 8 heads on 4 warps; at D = 64 launch() takes
    # 4 tokens on 4 warps, this branch 2 tokens on the small-T tile's 2 warps).  A whole-row
    # tail tile with 2 tokens in this branch: from MID_SWITCH_T too (Qwen3-Next: 2 tokens of
    # 2 heads on 2 warps, where launch() takes them on 4 warps with early loads).
    c = tiles.constexprs
    row = c["BLOCK_H"] * c["BLOCK_D"]
    big = max(1, 16 * 32 * tiles.num_warps // row)
    switch = SWITCH_T
    if _tk.many_heads(hq, hkv) and not c["ROW_TAIL"] and not c["PAIRS"]:
        switch = min(SWITCH_T, MID_SWITCH_T if d == 128 else _tk._T_MID)
    elif c["ROW_TAIL"] and big > 1:
        switch = min(SWITCH_T, MID_SWITCH_T)
    return Plan(tiles, switch, big)


def f32_bits(x: float) -> int:
    """``x`` rounded to fp32 (to nearest, as the op's own launch rounds it), its bits as a
    signed int32: how the trampoline takes ``eps`` and ``w_off`` (see the module's notes)."""
    return int(torch.tensor(float(x), dtype=torch.float32).view(torch.int32).item())


def kernel_kwargs(a: dict, *, T, outs: dict, k_base, v_base, k_off, v_off, v_in_k_base: bool,
                  cache_fp8: int, fp8: Optional[torch.dtype], has_cache: bool, geom: dict,
                  scalars: dict, launch: Plan, dummy, interp: bool = False) -> dict:
    """Every argument of ``fused_qkv_inductor_kernel`` by name (values: graph nodes or ints).

    ``a``: the op's arguments by schema name; ``outs``: q_out/k_out/v_out/g_out (None: not
    written); ``geom``: block_size, num_slots, kc_*/vc_*; ``scalars``: the row strides and
    table_rows; ``launch``: tiles, switch and offset width (``plan``); ``dummy``: a
    read-only tensor for pointers that are never dereferenced (their constexpr flag is off, so
    the kernel has no load or store through them)."""
    def opt(x):
        return dummy if x is None else x

    kw = dict(
        q_src=a["q_src"], k_src=a["k_src"], v_src=a["v_src"],
        q_src_stride=scalars["q_src_stride"], k_src_stride=scalars["k_src_stride"],
        v_src_stride=scalars["v_src_stride"], q_col=a["q_col"], k_col=a["k_col"],
        v_col=a["v_col"], q_w=opt(a["q_weight"]), k_w=opt(a["k_weight"]),
        eps=f32_bits(a["eps"]), w_off=f32_bits(a["weight_offset"]),
        cos_ptr=a["cos"], sin_ptr=a["sin"], cos_stride=scalars["cos_stride"],
        sin_stride=scalars["sin_stride"], pos_ptr=opt(a["positions"]),
        table_rows=scalars["table_rows"],
        q_out=opt(outs["q_out"]), k_out=opt(outs["k_out"]), v_out=opt(outs["v_out"]),
        g_out=opt(outs["g_out"]),
        k_base=k_base, v_base=v_base,
        slot_ptr=opt(a["slot_mapping"]), block_size=geom["block_size"],
        num_slots=geom["num_slots"], kc_blk=geom["kc_blk"], kc_slot=geom["kc_slot"],
        kc_head=geom["kc_head"], vc_blk=geom["vc_blk"], vc_slot=geom["vc_slot"],
        vc_head=geom["vc_head"], k_scale=opt(a["k_scale"]), v_scale=opt(a["v_scale"]),
        T=T,
        HQ=a["num_q_heads"], HKV=a["num_kv_heads"], D=a["head_dim"], R=a["rotary_dim"],
        GATE=a["gate_layout"], HAS_NORM=bool(a["apply_norm"]),
        HAS_QW=a["q_weight"] is not None, HAS_KW=a["k_weight"] is not None,
        IS_NEOX=bool(a["is_neox"]), EXPANDED=bool(a["table_expanded"]),
        HAS_POS=a["positions"] is not None, HAS_CACHE=has_cache,
        SKIP_NEG=bool(a["skip_negative_slots"]), IS_FP8=fp8 is not None,
        HAS_KS=a["k_scale"] is not None, HAS_VS=a["v_scale"] is not None,
        FP8_MAX=float(torch.finfo(fp8).max) if fp8 is not None else 0.0,
        WRITE_Q=outs["q_out"] is not None, WRITE_K=outs["k_out"] is not None,
        WRITE_V=outs["v_out"] is not None, WRITE_G=outs["g_out"] is not None,
        **launch.tiles.constexprs,
        IDX64=launch.idx64,
        INTERP=interp, V_IN_K_BASE=v_in_k_base, CACHE_FP8=cache_fp8,
        SWITCH_T=launch.switch_t, BIG_BLOCK_T=launch.big_block_t,
        BIG_INT32_BELOW=launch.big_int32_below, WIDE_BLOCK_T=launch.wide_block_t,
        K_OFF=k_off, V_OFF=v_off,
    )
    assert list(kw) == list(fused_qkv_inductor_kernel.arg_names), "kwargs out of sync"
    return kw


# -------------------------------------------------------------------------- graph building

_AUTOTUNED: dict = {}


def _kernel_idx(num_warps: int) -> int:
    """Side-table index of the kernel wrapped in a one-config autotuner carrying num_warps
    (what Dynamo records for ``kernel[grid](..., num_warps=w)``); one object per num_warps, so
    the side table (and the FX cache key built from it) sees the same kernel every time."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from triton import Config
    from triton.runtime.autotuner import autotune

    k = _AUTOTUNED.get(num_warps)
    if k is None:
        k = _AUTOTUNED[num_warps] = autotune(configs=[Config({}, num_warps=num_warps)],
                                             key=[])(fused_qkv_inductor_kernel)
    return kernel_side_table.add_kernel(k)


class _Syms:
    """Ints stay ints; a SymInt becomes a graph node computing it (a SymInt placeholder, or
    sym_size / sym_stride of a provider tensor), else Unsupported."""

    def __init__(self, b, providers):
        self.b, self.providers = b, [p for p in providers if isinstance(p, Node)]

    def __call__(self, s):
        if isinstance(s, (int, float, bool)) or s is None:
            return s
        if not isinstance(s, torch.SymInt):
            raise Unsupported(f"scalar of type {type(s).__name__}")
        try:
            return self.b.size(s, self.providers)
        except LookupError:
            pass
        for p in self.providers:
            for dim, st in enumerate(tensor_val(p).stride()):
                if not isinstance(st, int) and same_sym(st, s):
                    return self.b.call(torch.ops.aten.sym_stride.int, (p, dim))
        raise Unsupported(f"no node provides the symbolic value {s}")

    def mul(self, x, y):
        if isinstance(x, int) and isinstance(y, int):
            return x * y
        return self.b.call(operator.mul, (x, y))


def _geometry(size, stride, layout) -> tuple:
    """(num_blocks, block_size, stride_block, stride_slot, stride_head) of a 4-D cache view."""
    if layout == LAYOUT_NHD:
        return size[0], size[1], stride[0], stride[1], stride[2]
    return size[0], size[2], stride[0], stride[2], stride[1]


def _op_args(op, args: tuple) -> dict:
    names = [x.name for x in op._schema.arguments]
    if len(names) != len(args):
        raise Unsupported(f"{op} takes {len(names)} args, got {len(args)}")
    return dict(zip(names, args))


def call_fused_with_cache(b, op, args: tuple, kc: dict, vc: dict,
                         dynamic_tiles: str = "auto") -> tuple:
    """Drop-in for ``rewrite.call_fused_with_cache`` (``kc``/``vc``: base, size, stride,
    offset, alias): returns ``(hop_node, outs[4], {id(base): new_base_node})``.
    ``dynamic_tiles``: see :func:`plan`.

    Raises :class:`Unsupported` (graph untouched) when this path cannot be used."""
    return _build(b, _op_args(op, args), kc, vc, dynamic_tiles)


def call_fused(b, op, args: tuple, dynamic_tiles: str = "auto") -> tuple:
    """Drop-in for ``rewrite.call_fused`` (no cache): returns ``(hop_node, outs[4])``.

    Raises :class:`Unsupported` (graph untouched) when this path cannot be used."""
    a = _op_args(op, args)
    for k in ("slot_mapping", "k_scale", "v_scale"):
        a.setdefault(k, None)
    a.setdefault("skip_negative_slots", True)
    node, outs, _ = _build(b, a, None, None, dynamic_tiles)
    return node, outs


def _build(b, a: dict, kc: Optional[dict], vc: Optional[dict], dynamic_tiles: str) -> tuple:
    from torch._higher_order_ops.triton_kernel_wrap import (kernel_side_table,
                                                            triton_kernel_wrapper_functional)

    qv = tensor_val(a["q_src"])
    ok, why = supported(qv.device)
    if not ok:
        raise Unsupported(why)
    has_cache = kc is not None
    T = qv.shape[0]
    hq, hkv, d = a["num_q_heads"], a["num_kv_heads"], a["head_dim"]
    write_gate = bool(a["write_gate"]) and a["gate_layout"] != GATE_NONE
    launch = plan(T, hq=hq, hkv=hkv, d=d, rotary_dim=a["rotary_dim"], write_q=a["write_q"],
                  run_k=a["write_k"] or has_cache, run_v=a["write_v"] or has_cache,
                  write_gate=write_gate, dynamic_tiles=dynamic_tiles,
                  is_neox=bool(a["is_neox"]))
    launch = _offset_widths(a, kc, vc, T, launch)

    # --- everything static is checked before the first node goes in -----------------------
    cache_fp8, fp8, k_off, v_off = 0, None, 0, 0
    if has_cache:
        kb_v, vb_v = tensor_val(kc["base"]), tensor_val(vc["base"])
        if vb_v.dtype != kb_v.dtype:
            raise Unsupported("K and V cache bases differ in dtype")
        fp8 = fp8_dtype_of(kb_v.dtype, a["kv_cache_dtype"])
        if kb_v.dtype == torch.uint8:
            cache_fp8 = _CACHE_FP8[fp8]
        offs = []
        for c, bv in ((kc, kb_v), (vc, vb_v)):
            boff = bv.storage_offset()
            if not isinstance(boff, int) or not isinstance(c["offset"], int):
                raise Unsupported("symbolic cache storage offset")
            offs.append(c["offset"] - boff)  # elements from the base's data pointer
        k_off, v_off = offs
        if kb_v.device != qv.device or vb_v.device != qv.device:
            raise Unsupported("a cache is not on the kernel's device")
    for name in ("q_src", "k_src", "v_src", "cos", "sin"):
        if tensor_val(a[name]).stride(-1) != 1:
            raise Unsupported(f"{name} last dim is not contiguous")
    # Every tensor on the kernel's device (Inductor would turn a 0-d CPU scale into a float).
    for name in ("k_src", "v_src", "q_weight", "k_weight", "cos", "sin", "positions",
                 "slot_mapping", "k_scale", "v_scale"):
        v = tensor_val(a[name])
        if v is not None and v.device != qv.device:
            raise Unsupported(f"{name} is on {v.device}, the kernel runs on {qv.device}")

    before = set(b.graph.nodes)
    try:
        return _insert(b, a, kc, vc, launch, T=T, write_gate=write_gate, fp8=fp8,
                       cache_fp8=cache_fp8, k_off=k_off, v_off=v_off,
                       hop=triton_kernel_wrapper_functional, side_table=kernel_side_table)
    except Exception:
        # Leave the graph as it was: also the sym_size nodes Builder.size inserts untracked.
        for n in reversed(list(b.graph.nodes)):
            if n not in before and not n.users:
                b.graph.erase_node(n)
        b.created[:] = [n for n in b.created if n in before]
        raise


def _int32_fits(a: dict, kc: Optional[dict], vc: Optional[dict], T):
    """``fits(t, block_t)``: whether ``t`` tokens in tiles of ``block_t`` keep every element
    offset in int32, as ``launch()`` decides (``triton_kernel._needs_int64``): the sources
    and per-token tables have ``t`` rows, the caches and other tables their own size.  None
    when a stride, a cache or a table size is symbolic."""
    def dims(x, per_token=False):
        v = tensor_val(x)
        out = list(zip(v.shape, v.stride()))
        if per_token or (not isinstance(T, int) and same_sym(v.shape[0], T)):
            out[0] = (None, out[0][1])  # one row per token: t rows
        return out if all(isinstance(n, int) for dim in out for n in dim if n is not None) \
            else None

    srcs = [dims(a[n], True) for n in ("q_src", "k_src", "v_src")]
    fixed = [dims(x) for x in ([kc["base"], vc["base"]] if kc is not None else []) +
             [a["cos"], a["sin"]]]
    if any(x is None for x in srcs + fixed):
        return None
    out_row = max(a["num_q_heads"], a["num_kv_heads"]) * a["head_dim"]

    def fits(t: int, block_t: int) -> bool:
        def span(ds):
            return _tk.span_of((t if n is None else n, st) for n, st in ds)
        return not _tk.needs_int64_spans(t, block_t, [(span(x), x[0][1]) for x in srcs],
                                         out_row, max(span(x) for x in fixed))
    return fits


def _offset_widths(a: dict, kc: Optional[dict], vc: Optional[dict], T, launch: Plan) -> Plan:
    """``launch`` with its offset widths: ``idx64`` for ``tiles`` (static T, or a dynamic T
    below ``switch_t``); ``big_int32_below``, the T up to which the large-T branch still
    keeps int32 offsets (0: never), and ``wide_block_t``, the tokens a program of its int64
    copy: the large-T tile's when that copy is the whole branch, else the small-T tile's
    (fewer registers than the large-T tile with int64 offsets, which would bound the int32
    copy's: see ``fused_qkv_inductor_kernel``).  Symbolic strides or sizes, int32 turned off
    (``triton_kernel._INDEX32``) and a dynamic T without a switch: int64."""
    launch = launch._replace(wide_block_t=launch.big_block_t, big_int32_below=0)
    fits = _int32_fits(a, kc, vc, T) if _tk._INDEX32 else None
    if fits is None or (not isinstance(T, int) and not launch.switch_t):
        return launch._replace(idx64=True)
    t_max = T if isinstance(T, int) else launch.switch_t - 1
    launch = launch._replace(idx64=not fits(t_max, launch.tiles.block_t))
    lo, big = launch.switch_t, launch.big_block_t
    if isinstance(T, int) or not fits(lo, big):
        return launch
    hi = 1 << 31  # fits(hi) is False: offsets of 2^31 tokens of one element overflow
    while hi - lo > 1:  # fits() is monotone in t: the largest t that fits is lo
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid, big) else (lo, mid)
    below = lo + 1 if INT32_BELOW_CAP is None else min(lo + 1, INT32_BELOW_CAP)
    if below <= launch.switch_t:  # (a cap only) no int32 copy: int64 is the whole branch
        return launch._replace(big_int32_below=below)
    return launch._replace(big_int32_below=below, wide_block_t=launch.tiles.block_t)


def _token_tiles(launch: Plan) -> list:
    """[(first T, tokens a program)] of the kernel's branches, in T order: the small-T tiles
    from T = 1; with a switch, the large-T int32 copy from ``switch_t`` (when its bound lies
    past the switch) and the int64 copy from there or from ``big_int32_below``."""
    tiles = [(1, launch.tiles.block_t)]
    s, w = launch.switch_t, launch.big_int32_below
    if s:
        tiles += [(s, launch.big_block_t), (w, launch.wide_block_t)] if w > s else \
            [(s, launch.wide_block_t)]
    return tiles


def _grid_x(b, t_arg, launch: Plan):
    """Token tiles of the grid: cdiv(T, tokens a program) of the branch T takes
    (``_token_tiles``).  Each change of branch at T = S adds a step ``(2T) // (T + S)`` (0
    below, 1 from there: 2T < T + S iff T < S, and 2T < 2(T + S) always) times the change,
    so the grid stays one integer expression of T that Inductor's wrapper evaluates per
    call."""
    tiles = _token_tiles(launch)
    if isinstance(t_arg, int):
        return triton.cdiv(t_arg, [bt for s, bt in tiles if t_arg >= s][-1])

    def op(f, x, y):
        return b.call(f, (x, y))

    def cdiv(bt):
        return t_arg if bt == 1 else op(operator.floordiv, op(operator.add, t_arg, bt - 1), bt)

    gx = cdiv(tiles[0][1])
    for (_, prev), (s, bt) in zip(tiles, tiles[1:]):
        if bt != prev:
            step = op(operator.floordiv, op(operator.mul, t_arg, 2), op(operator.add, t_arg, s))
            gx = op(operator.sub, gx, op(operator.mul, step, op(operator.sub, cdiv(prev),
                                                                cdiv(bt))))
    return gx


def _insert(b, a, kc, vc, launch, *, T, write_gate, fp8, cache_fp8, k_off, v_off, hop,
            side_table) -> tuple:
    """Insert the outputs, the HOP node and its getitems; see ``_build``."""
    tiles = launch.tiles
    qv = tensor_val(a["q_src"])
    hq, hkv, d = a["num_q_heads"], a["num_kv_heads"], a["head_dim"]
    has_cache = kc is not None
    syms = _Syms(b, [a["q_src"], a["k_src"], a["v_src"], a["cos"], a["sin"]] +
                 ([kc["base"], vc["base"]] if has_cache else []))
    t_arg = syms(T)
    scalars = {
        "q_src_stride": syms(qv.stride(0)),
        "k_src_stride": syms(tensor_val(a["k_src"]).stride(0)),
        "v_src_stride": syms(tensor_val(a["v_src"]).stride(0)),
        "cos_stride": syms(tensor_val(a["cos"]).stride(0)),
        "sin_stride": syms(tensor_val(a["sin"]).stride(0)),
        "table_rows": syms(tensor_val(a["cos"]).shape[0]),
    }
    if has_cache:
        layout = a["cache_layout"]
        knb, kbs, kb_, ks_, kh_ = (syms(x) for x in _geometry(kc["size"], kc["stride"], layout))
        _, _, vb_, vs_, vh_ = (syms(x) for x in _geometry(vc["size"], vc["stride"], layout))
        geom = dict(block_size=kbs, num_slots=syms.mul(knb, kbs), kc_blk=kb_, kc_slot=ks_,
                    kc_head=kh_, vc_blk=vb_, vc_slot=vs_, vc_head=vh_)
    else:
        geom = dict(block_size=1, num_slots=1, kc_blk=1, kc_slot=1, kc_head=1, vc_blk=1,
                    vc_slot=1, vc_head=1)

    def empty(heads):  # fresh outputs, only for what the kernel writes
        return b.call(torch.ops.aten.empty.memory_format, ([t_arg, heads, d],),
                      {"dtype": qv.dtype, "device": qv.device, "pin_memory": False})

    outs = {"q_out": empty(hq) if a["write_q"] else None,
            "k_out": empty(hkv) if a["write_k"] else None,
            "v_out": empty(hkv) if a["write_v"] else None,
            "g_out": empty(hq) if write_gate else None}
    dummy = a["q_src"]  # read-only input, for pointers that are never dereferenced
    to_clone = [n for n, x in outs.items() if x is not None]
    same = has_cache and vc["base"] is kc["base"]
    if has_cache:
        k_base, v_base = kc["base"], (dummy if same else vc["base"])
        to_clone = ["k_base"] + ([] if same else ["v_base"]) + to_clone
    else:
        k_base = v_base = dummy
    kw = kernel_kwargs(a, T=t_arg, outs=outs, k_base=k_base, v_base=v_base, k_off=k_off,
                       v_off=v_off, v_in_k_base=same, cache_fp8=cache_fp8, fp8=fp8,
                       has_cache=has_cache, geom=geom, scalars=scalars,
                       launch=launch, dummy=dummy,
                       interp=qv.device.type == "cpu")
    if CHECK_WRITES:
        _check_writes(kw, set(to_clone), tiles.num_warps)
    # one grid axis, head tiles fastest (see fused_qkv_kernel)
    grid = (syms.mul(_grid_x(b, t_arg, launch), tiles.head_tiles), 1, 1)
    node = b.call(hop, (), dict(kernel_idx=_kernel_idx(tiles.num_warps),
                                constant_args_idx=side_table.add_constant_args({}),
                                grid=[grid], tma_descriptor_metadata={},
                                kwargs=kw, tensors_to_clone=to_clone))
    # Exact input strides at lowering (the kernel takes row strides as arguments): what
    # make_fx records for user Triton kernels, propagated by Inductor's decomposition.
    node.meta["eager_input_vals"] = torch.fx.node.map_aggregate(
        (node.args, node.kwargs), lambda x: x.meta["val"] if isinstance(x, Node) else x)
    node.meta["fused_qkv_launch"] = describe(node)  # before reinplace empties the list
    get = {name: b.call(operator.getitem, (node, name)) for name in to_clone}
    new_bases = {}
    if has_cache:
        new_bases[id(kc["base"])] = get["k_base"]
        new_bases[id(vc["base"])] = get["k_base"] if same else get["v_base"]
    return node, [get.get(n) for n in ("q_out", "k_out", "v_out", "g_out")], new_bases


_WRITES_CACHE: dict = {}


def _check_writes(kw: dict, expected: set, num_warps: int) -> None:
    """Inductor decides what a user kernel mutates by analysing its TTIR (every pointer a store
    address is derived from, through helper calls, counts as written).  A tensor it wrongly
    counts becomes a mutated buffer; if that is a graph input, CUDA-graph trees skip the graph.
    A missed write would be worse (readers scheduled before the kernel).  Refuse both: run the
    analysis Inductor will run (cached per specialisation)."""
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    vals = torch.fx.node.map_arg(kw, lambda n: n.meta["val"])
    cx = {p.name for p in fused_qkv_inductor_kernel.params if p.is_constexpr}
    key = tuple((k, (v.dtype, v.dim()) if isinstance(v, torch.Tensor) else
                 v if k in cx else type(v).__name__) for k, v in vals.items())
    written = _WRITES_CACHE.get(key)
    if written is None:
        kernel = tkw.kernel_side_table.get_kernel(_kernel_idx(num_warps))
        if hasattr(tkw, "identify_accessed_tensors"):  # torch >= 2.12
            acc = tkw.identify_accessed_tensors(kernel, dict(vals), {})
            written = {d.name for d in acc.read_writes.writes}
        else:  # torch 2.11: the list of written tensor names
            written = set(tkw.identify_mutated_tensors(kernel, dict(vals), {}))
        _WRITES_CACHE[key] = written
    missed = expected - written
    if missed:
        raise Unsupported(f"Inductor's kernel analysis misses the writes to {sorted(missed)}")
    for name in sorted(written - expected):
        n = kw[name]
        while isinstance(n, Node) and is_view_node(n):
            n = view_input(n)
        if isinstance(n, Node) and n.op == "placeholder":
            raise Unsupported(
                f"Inductor's kernel analysis counts {name} as written: graph input {n.name} "
                f"would become a mutated input (CUDA graphs skipped); the kernel must not "
                f"derive store addresses from {name} through a helper call")


def describe(node: Node) -> str:
    """One line for reports and debugging: kernel, grid, num_warps, tile, what it mutates."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    k = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
    nw = k.configs[0].num_warps if hasattr(k, "configs") else "?"
    kw = node.kwargs["kwargs"]
    tile = ",".join(f"{n}={int(kw[n])}" for n in ("BLOCK_T", "BLOCK_H", "PAIRS", "EARLY",
                                                   "ROW_TAIL", "IDX64"))
    if kw["SWITCH_T"]:
        below = kw["BIG_INT32_BELOW"]
        tile += f" from T>={kw['SWITCH_T']}: " + (
            f"BLOCK_T={kw['BIG_BLOCK_T']},EARLY=0,IDX64=0 below T={below} else "
            f"BLOCK_T={kw['WIDE_BLOCK_T']},IDX64=1" if below > kw["SWITCH_T"] else
            f"BLOCK_T={kw['WIDE_BLOCK_T']},EARLY=0,IDX64=1")
    return (f"{fused_qkv_inductor_kernel.__name__} grid={node.kwargs['grid']} num_warps={nw} "
            f"tile={tile} mutates={list(node.kwargs['tensors_to_clone'])}")


__all__ = ["OP_NAME", "Unsupported", "supported", "plan", "kernel_kwargs",
           "call_fused_with_cache", "call_fused", "describe", "fused_qkv_inductor_kernel"]
