"""``torch.ops.fused_qkv.*``: the fused op registered with ``torch.library``.

Two ops share one kernel: ``split_norm_rope_cache`` (mutates the caches) and
``split_norm_rope`` (no cache write; the pass's fallback when a graph has no cache write).
No input validation here: the ops run inside compiled graphs, where that would cost time
on every call.  The eager entry point (``kernels/api.py``) validates first.

Device dispatch: CUDA (and ROCm, which PyTorch also calls "cuda") runs the Triton kernel;
CPU runs the reference, or the Triton kernel under Triton's interpreter when
``TRITON_INTERPRET=1`` (that is how the CPU test-suite exercises the kernel).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import reference
from .op_schema import GATE_NONE

_RET = tuple[Tensor, Tensor, Tensor, Tensor]


def _use_triton(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


_LAUNCH = None


def _launch(*args, **kw):
    global _LAUNCH
    if _LAUNCH is None:  # imported lazily (triton is read at import time), then kept: an
        from .triton_kernel import launch  # import statement costs ~1.7 us a call
        _LAUNCH = launch
    return _LAUNCH(*args, **kw)


def split_norm_rope_cache_direct(*args) -> _RET:
    """``split_norm_rope_cache_impl`` for the eager entry point when nothing traces: outputs
    not asked for share one empty tensor (the registered op may not alias its outputs)."""
    if _use_triton(args[0].device):
        return _launch(*args, share_empty=True)
    return reference.split_norm_rope_cache(*args)


def split_norm_rope_cache_impl(
    q_src: Tensor, k_src: Tensor, v_src: Tensor, q_col: int, k_col: int, v_col: int,
    num_q_heads: int, num_kv_heads: int, head_dim: int, gate_layout: int,
    q_weight: Optional[Tensor], k_weight: Optional[Tensor], apply_norm: bool, eps: float,
    weight_offset: float, cos: Tensor, sin: Tensor, positions: Optional[Tensor],
    rotary_dim: int, is_neox: bool, table_expanded: bool,
    key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor, cache_layout: int,
    skip_negative_slots: bool, kv_cache_dtype: str,
    k_scale: Optional[Tensor], v_scale: Optional[Tensor],
    write_q: bool, write_k: bool, write_v: bool, write_gate: bool,
) -> _RET:
    args = (q_src, k_src, v_src, q_col, k_col, v_col, num_q_heads, num_kv_heads, head_dim,
            gate_layout, q_weight, k_weight, apply_norm, eps, weight_offset, cos, sin,
            positions, rotary_dim, is_neox, table_expanded, key_cache, value_cache,
            slot_mapping, cache_layout, skip_negative_slots, kv_cache_dtype, k_scale, v_scale,
            write_q, write_k, write_v, write_gate)
    if _use_triton(q_src.device):
        return _launch(*args)
    return reference.split_norm_rope_cache(*args)


def split_norm_rope_impl(
    q_src: Tensor, k_src: Tensor, v_src: Tensor, q_col: int, k_col: int, v_col: int,
    num_q_heads: int, num_kv_heads: int, head_dim: int, gate_layout: int,
    q_weight: Optional[Tensor], k_weight: Optional[Tensor], apply_norm: bool, eps: float,
    weight_offset: float, cos: Tensor, sin: Tensor, positions: Optional[Tensor],
    rotary_dim: int, is_neox: bool, table_expanded: bool,
    write_q: bool, write_k: bool, write_v: bool, write_gate: bool,
) -> _RET:
    head = (q_src, k_src, v_src, q_col, k_col, v_col, num_q_heads, num_kv_heads, head_dim,
            gate_layout, q_weight, k_weight, apply_norm, eps, weight_offset, cos, sin,
            positions, rotary_dim, is_neox, table_expanded)
    flags = (write_q, write_k, write_v, write_gate)
    if _use_triton(q_src.device):
        return _launch(*head, None, None, None, 0, True, "auto", None, None, *flags)
    return reference.split_norm_rope(*head, *flags)


# The registered ops.  The eager entry point calls the *_impl functions directly when nothing
# is tracing: the dispatcher's Python path for ops with mutated args costs ~200 us per call.
split_norm_rope_cache_op = torch.library.custom_op(
    "fused_qkv::split_norm_rope_cache", split_norm_rope_cache_impl,
    mutates_args=("key_cache", "value_cache"))
split_norm_rope_op = torch.library.custom_op(
    "fused_qkv::split_norm_rope", split_norm_rope_impl, mutates_args=())


def _fake_outputs(q_src, hq, hkv, d, gate_layout, flags) -> _RET:
    t = q_src.shape[0]
    wq, wk, wv, wg = flags
    wg = wg and gate_layout != GATE_NONE

    def out(want, heads):
        return q_src.new_empty((t, heads, d) if want else (0,))

    return out(wq, hq), out(wk, hkv), out(wv, hkv), out(wg, hq)


@split_norm_rope_cache_op.register_fake
def _(q_src, k_src, v_src, q_col, k_col, v_col, num_q_heads, num_kv_heads, head_dim,
      gate_layout, q_weight, k_weight, apply_norm, eps, weight_offset, cos, sin, positions,
      rotary_dim, is_neox, table_expanded, key_cache, value_cache, slot_mapping, cache_layout,
      skip_negative_slots, kv_cache_dtype, k_scale, v_scale,
      write_q, write_k, write_v, write_gate):
    return _fake_outputs(q_src, num_q_heads, num_kv_heads, head_dim, gate_layout,
                         (write_q, write_k, write_v, write_gate))


@split_norm_rope_op.register_fake
def _(q_src, k_src, v_src, q_col, k_col, v_col, num_q_heads, num_kv_heads, head_dim,
      gate_layout, q_weight, k_weight, apply_norm, eps, weight_offset, cos, sin, positions,
      rotary_dim, is_neox, table_expanded, write_q, write_k, write_v, write_gate):
    return _fake_outputs(q_src, num_q_heads, num_kv_heads, head_dim, gate_layout,
                         (write_q, write_k, write_v, write_gate))
