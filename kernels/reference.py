"""Plain-PyTorch reference of the fused attention pre-processing op.

This is the oracle for every test and the CPU implementation of the custom op.
It takes exactly the op's low-level arguments (see ``kernels/op_schema.py``):
math in float32, then a cast to the output dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .op_schema import (
    GATE_BLOCKED,
    GATE_INTERLEAVED,
    GATE_NONE,
    LAYOUT_HND,
    LAYOUT_NHD,
    fp8_dtype_of,
)


def _region(src: Tensor, col: int, width: int, md: torch.dtype) -> Tensor:
    return src[:, col : col + width].to(md)


def _split_q_gate(q_src: Tensor, q_col: int, hq: int, d: int, gate_layout: int, md):
    t = q_src.shape[0]
    if gate_layout == GATE_NONE:
        return _region(q_src, q_col, hq * d, md).view(t, hq, d), None
    wide = _region(q_src, q_col, 2 * hq * d, md)
    if gate_layout == GATE_INTERLEAVED:
        qg = wide.reshape(t, hq, 2 * d)
        return qg[..., :d], qg[..., d:]
    if gate_layout == GATE_BLOCKED:
        return wide[:, : hq * d].reshape(t, hq, d), wide[:, hq * d :].reshape(t, hq, d)
    raise ValueError(f"gate_layout must be 0, 1 or 2, got {gate_layout}")


def _rms_norm(x: Tensor, w: Optional[Tensor], eps: float, offset: float) -> Tensor:
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * (w.to(x.dtype) + offset)
    elif offset != 0.0:
        y = y * (1.0 + offset)
    return y


def _cos_sin_per_token(cos, sin, positions, t, rotary_dim, is_neox, expanded, md):
    """Return cos/sin of shape [T, rotary_dim], one value per rotary element."""
    if positions is None:
        c, s = cos[:t].to(md), sin[:t].to(md)
    else:
        c, s = cos[positions.long()].to(md), sin[positions.long()].to(md)
    if expanded:
        return c[:, :rotary_dim], s[:, :rotary_dim]
    c, s = c[:, : rotary_dim // 2], s[:, : rotary_dim // 2]
    if is_neox:
        return torch.cat([c, c], -1), torch.cat([s, s], -1)
    return c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)


def _rope(x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int, is_neox: bool) -> Tensor:
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if is_neox:
        x1, x2 = rot.chunk(2, -1)
        partner = torch.cat([-x2, x1], -1)
    else:
        x1, x2 = rot[..., ::2], rot[..., 1::2]
        partner = torch.stack([-x2, x1], -1).flatten(-2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return torch.cat([rot * c + partner * s, rest], -1)


def _to_cache(x: Tensor, cache: Tensor, kv_cache_dtype: str, scale: Optional[Tensor]) -> Tensor:
    fp8 = fp8_dtype_of(cache.dtype, kv_cache_dtype)
    if fp8 is None:
        return x.to(cache.dtype)
    if scale is not None:
        x = x / scale.to(x.dtype)
    fmax = torch.finfo(fp8).max
    y = x.clamp(-fmax, fmax).to(fp8)
    return y.view(torch.uint8) if cache.dtype == torch.uint8 else y


def _write_cache(cache, rows, slot_mapping, layout, skip_negative, kv_cache_dtype, scale):
    if layout == LAYOUT_NHD:
        nb, bs = cache.shape[0], cache.shape[1]
    elif layout == LAYOUT_HND:
        nb, bs = cache.shape[0], cache.shape[2]
    else:
        raise ValueError(f"cache_layout must be 0 (NHD) or 1 (HND), got {layout}")
    n = nb * bs
    slots = slot_mapping.long()
    if not skip_negative:
        slots = torch.where(slots < 0, slots + n, slots)
    valid = (slots >= 0) & (slots < n)
    vals = _to_cache(rows[valid], cache, kv_cache_dtype, scale)
    slots = slots[valid]
    blk, off = slots // bs, slots % bs
    # Python loop-free scatter; duplicates: the last token in order wins (like index_put on CPU).
    if layout == LAYOUT_NHD:
        cache[blk, off] = vals
    else:
        cache[blk, :, off] = vals


def split_norm_rope(
    q_src: Tensor, k_src: Tensor, v_src: Tensor, q_col: int, k_col: int, v_col: int,
    num_q_heads: int, num_kv_heads: int, head_dim: int, gate_layout: int,
    q_weight: Optional[Tensor], k_weight: Optional[Tensor], apply_norm: bool, eps: float,
    weight_offset: float, cos: Tensor, sin: Tensor, positions: Optional[Tensor],
    rotary_dim: int, is_neox: bool, table_expanded: bool,
    write_q: bool = True, write_k: bool = True, write_v: bool = True, write_gate: bool = True,
    *, math_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split, per-head RMSNorm, RoPE; returns (q, k, v, gate), unneeded ones empty."""
    out = _compute(q_src, k_src, v_src, q_col, k_col, v_col, num_q_heads, num_kv_heads,
                   head_dim, gate_layout, q_weight, k_weight, apply_norm, eps, weight_offset,
                   cos, sin, positions, rotary_dim, is_neox, table_expanded, math_dtype)
    return _finish(out, q_src.dtype, (write_q, write_k, write_v, write_gate))


def split_norm_rope_cache(
    q_src: Tensor, k_src: Tensor, v_src: Tensor, q_col: int, k_col: int, v_col: int,
    num_q_heads: int, num_kv_heads: int, head_dim: int, gate_layout: int,
    q_weight: Optional[Tensor], k_weight: Optional[Tensor], apply_norm: bool, eps: float,
    weight_offset: float, cos: Tensor, sin: Tensor, positions: Optional[Tensor],
    rotary_dim: int, is_neox: bool, table_expanded: bool,
    key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor, cache_layout: int,
    skip_negative_slots: bool, kv_cache_dtype: str,
    k_scale: Optional[Tensor], v_scale: Optional[Tensor],
    write_q: bool = True, write_k: bool = True, write_v: bool = True, write_gate: bool = True,
    *, math_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """As :func:`split_norm_rope`, and writes K and V into the paged caches in place.

    ``math_dtype=torch.float64`` gives the tests their high-precision oracle.
    """
    q, k, v, g = _compute(q_src, k_src, v_src, q_col, k_col, v_col, num_q_heads, num_kv_heads,
                          head_dim, gate_layout, q_weight, k_weight, apply_norm, eps,
                          weight_offset, cos, sin, positions, rotary_dim, is_neox, table_expanded,
                          math_dtype)
    _write_cache(key_cache, k, slot_mapping, cache_layout, skip_negative_slots, kv_cache_dtype, k_scale)
    _write_cache(value_cache, v, slot_mapping, cache_layout, skip_negative_slots, kv_cache_dtype, v_scale)
    return _finish((q, k, v, g), q_src.dtype, (write_q, write_k, write_v, write_gate))


def _compute(q_src, k_src, v_src, q_col, k_col, v_col, hq, hkv, d, gate_layout,
             q_weight, k_weight, apply_norm, eps, weight_offset, cos, sin, positions,
             rotary_dim, is_neox, table_expanded, md):
    t = q_src.shape[0]
    q, gate = _split_q_gate(q_src, q_col, hq, d, gate_layout, md)
    k = _region(k_src, k_col, hkv * d, md).view(t, hkv, d)
    v = _region(v_src, v_col, hkv * d, md).view(t, hkv, d)
    if apply_norm:
        q = _rms_norm(q, q_weight, eps, weight_offset)
        k = _rms_norm(k, k_weight, eps, weight_offset)
    c, s = _cos_sin_per_token(cos, sin, positions, t, rotary_dim, is_neox, table_expanded, md)
    q = _rope(q, c, s, rotary_dim, is_neox)
    k = _rope(k, c, s, rotary_dim, is_neox)
    return q, k, v, gate


def _finish(outs, dtype, wanted):
    res = []
    for x, want in zip(outs, wanted):
        if x is None or not want:
            res.append(torch.empty(0, dtype=dtype, device=outs[0].device))
        else:
            # A fresh tensor: an op output must never alias an input (fp32 V would).
            res.append(torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x))
    return tuple(res)
