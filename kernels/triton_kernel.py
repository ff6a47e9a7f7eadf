"""The fused Triton kernel: split -> per-head RMSNorm -> RoPE -> paged KV-cache write.

One launch does everything.  Each program handles a ``[BLOCK_T * BLOCK_H, BLOCK_D]`` tile of
(token, head) rows of one region; the head tiles enumerate, in order, the Q heads (with their
gate, if any), the K heads and the V heads, and the one-axis grid runs through all head tiles
of a token tile before the next token tile.

Why this shape: the op is purely memory-bound, each byte is read once and written once or
twice, and every (token, head) row is independent except for the norm's reduction over D,
which stays inside one row of the tile.  For NeoX rope (the common case) a row is handled as
three contiguous tiles, the two rotary halves and the unrotated tail, so element i of one half
meets its partner i of the other in the same thread, and every access is a full-width vector.
GPT-J pairs (2i, 2i+1) load each element's partner a second time instead (same cache line),
and so does NeoX below T=32 when a tail that is not a power of two would leave tile lanes idle
(PAIRS); from T=32 such a tail is handled in a tile that spans the whole row (ROW_TAIL).
"""
from __future__ import annotations

import functools
import inspect
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .fast_launch import CachedLauncher, _is_constexpr
from .op_schema import GATE_NONE, cache_geometry, fp8_dtype_of

try:  # grid dependency control (Triton >= 3.4)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - an older Triton: PDL stays off (_pdl_ok)
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERP: tl.constexpr):
    """fp32 -> dtype.  Triton's CPU interpreter truncates fp32 -> bf16; pre-round to nearest-even
    there so the CPU tests see the same numbers as the GPU (no cost on the GPU: constexpr)."""
    if INTERP:
        # bits of fp32 mantissa dropped by the target format (normal numbers)
        DROP: tl.constexpr = 16 if dtype == tl.bfloat16 else 20 if dtype == tl.float8e4nv \
            else 21 if dtype == tl.float8e5 else 0
        if DROP > 0:
            bits = x.to(tl.uint32, bitcast=True)
            HALF: tl.constexpr = (1 << (DROP - 1)) - 1
            KEEP: tl.constexpr = 0xFFFFFFFF - ((1 << DROP) - 1)
            bits = (bits + HALF + ((bits >> DROP) & 1)) & KEEP
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _tile_rows(pid_t, h0, T, NH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
               IDX64: tl.constexpr):
    """Token and head of each tile row.  IDX64: the element offsets built from ``t`` are
    int64; off, int32, which the host allows only when every offset fits (``_needs_int64``):
    64-bit index arithmetic is 17-34% of the kernel's sm_90 instructions."""
    r = tl.arange(0, BLOCK_T * BLOCK_H)
    if IDX64:
        t = tl.cast(pid_t, tl.int64) * BLOCK_T + r // BLOCK_H
    else:
        t = pid_t * BLOCK_T + r // BLOCK_H
    h = h0 + r % BLOCK_H
    return t, h, (t < T) & (h < NH)


@triton.jit
def _load(ptr, rows, cols, rmask, cmask):
    """fp32 tile ``ptr[rows[:, None] + cols[None, :]]``; masked lanes read 0."""
    m = rmask[:, None] & cmask[None, :]
    return tl.load(ptr + rows[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _store(ptr, rows, cols, rmask, cmask, val, INTERP: tl.constexpr):
    m = rmask[:, None] & cmask[None, :]
    tl.store(ptr + rows[:, None] + cols[None, :], _cast(val, ptr.dtype.element_ty, INTERP),
             mask=m)


@triton.jit
def _emit(ptr, rows, rmask, y1, y2, yt, c1, c2, ct, m1, m2, mt,
          SPLIT: tl.constexpr, HAS_TAIL: tl.constexpr, INTERP: tl.constexpr):
    """Store a row tile: one part (columns c1) or, SPLIT, the two rotary halves and the tail."""
    _store(ptr, rows, c1, rmask, m1, y1, INTERP)
    if SPLIT:
        _store(ptr, rows, c2, rmask, m2, y2, INTERP)
        if HAS_TAIL:
            _store(ptr, rows, ct, rmask, mt, yt, INTERP)


@triton.jit
def _cache_rows(slot, h, rmask, block_size, num_slots, s_blk, s_slot, s_head,
                SKIP_NEG: tl.constexpr, IDX64: tl.constexpr):
    """Element offset of each (token, head) row in a paged cache, and whether it is written.

    Takes the loaded slots, not their pointer: Inductor's analysis of which kernel arguments
    are written would otherwise count slot_mapping (its pointer feeds a store address).
    The range check runs on the slots as loaded (an int64 slot past 2^31 must not wrap into
    range); IDX64 off, the offsets of the slots that pass are then int32."""
    if not SKIP_NEG:
        # Indexing mode: a negative slot counts from the end, as cache.view(-1,H,D)[slot].
        slot = tl.where(slot < 0, slot + num_slots, slot)
    ok = rmask & (slot >= 0) & (slot < num_slots)
    if IDX64:
        slot = slot.to(tl.int64)
        h = h.to(tl.int64)
    else:
        slot = tl.where(ok, slot, 0).to(tl.int32)
    blk = slot // block_size
    off = slot - blk * block_size
    return blk * s_blk + off * s_slot + h * s_head, ok


@triton.jit
def _cache_scale(scale_ptr, IS_FP8: tl.constexpr, HAS_SCALE: tl.constexpr):
    """The fp8 cache's scale, loaded where a K/V region starts: where it is used, after the
    norm's reduction, its load was one more memory round trip."""
    if IS_FP8 and HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    else:
        scale = 1.0
    return scale


@triton.jit
def _fp8(val, scale, IS_FP8: tl.constexpr, HAS_SCALE: tl.constexpr, FP8_MAX: tl.constexpr):
    if IS_FP8:
        if HAS_SCALE:
            val = val / scale
        val = tl.minimum(tl.maximum(val, -FP8_MAX), FP8_MAX)
    return val


@triton.jit
def _table_rows(pos_ptr, t, rmask, table_rows, HAS_POS: tl.constexpr, IDX64: tl.constexpr):
    if HAS_POS:
        # a negative position counts from the table's end; valid ones lie in [-rows, rows),
        # so (wrapped in the width loaded) they fit int32 whenever the table's offsets do
        row = tl.load(pos_ptr + t, mask=rmask, other=0)
        row = tl.where(row < 0, row + table_rows, row)
        row = row.to(tl.int64) if IDX64 else row.to(tl.int32)
    else:
        row = t
    return row


@triton.jit
def _halves_weights(w_ptr, j, e, w_off, HALF: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
                    HAS_W: tl.constexpr, ROW_TAIL: tl.constexpr):
    """The norm's scale (weight + offset) for the two rotary halves and the tail (ROW_TAIL:
    ``e`` spans the whole row)."""
    if HAS_W:
        w1 = tl.load(w_ptr + j, mask=j < HALF, other=0.0).to(tl.float32) + w_off
        w2 = tl.load(w_ptr + HALF + j, mask=j < HALF, other=0.0).to(tl.float32) + w_off
        if D > R and ROW_TAIL:
            wt = tl.load(w_ptr + e, mask=(e >= R) & (e < D), other=0.0).to(tl.float32) + w_off
        elif D > R:
            wt = tl.load(w_ptr + R + e, mask=e < D - R, other=0.0).to(tl.float32) + w_off
        else:
            wt = w1  # no tail: unused
    else:
        w1 = tl.full([j.shape[0]], 1.0, tl.float32) + w_off
        w2 = w1
        wt = tl.full([e.shape[0]], 1.0, tl.float32) + w_off
    return w1, w2, wt


@triton.jit
def _halves_table(cos_ptr, sin_ptr, crow, srow, rmask, j, HALF: tl.constexpr,
                  EXPANDED: tl.constexpr):
    jm = j < HALF
    c1 = _load(cos_ptr, crow, j, rmask, jm)
    s1 = _load(sin_ptr, srow, j, rmask, jm)
    if EXPANDED:  # HF tables repeat the half: read both to honour any table exactly
        c2 = _load(cos_ptr, crow, HALF + j, rmask, jm)
        s2 = _load(sin_ptr, srow, HALF + j, rmask, jm)
    else:
        c2 = c1
        s2 = s1
    return c1, s1, c2, s2


@triton.jit
def _norm_rope_halves(src, rows, rmask, j, e, w_ptr, eps, w_off,
                      cos_ptr, sin_ptr, crow, srow,
                      D: tl.constexpr, R: tl.constexpr, HAS_NORM: tl.constexpr,
                      HAS_W: tl.constexpr, EXPANDED: tl.constexpr, EARLY: tl.constexpr,
                      ROW_TAIL: tl.constexpr):
    """NeoX rope: the two rotary halves and the unrotated tail are separate contiguous tiles,
    so every load and store is a full-width vector access and (ROW_TAIL aside) no element is
    read twice.

    EARLY: the table and weight loads go before the norm's reduction (a load after its
    barrier waits for it: one more memory round trip, which small T pays in full); off, they
    follow it, which held fewer registers and kept large-T tiles faster on partial rotary.

    ROW_TAIL: the tail tile is the whole row (``e`` spans D; its rotary columns are stored by
    the halves): the norm's sum comes from one tile, with no layout conversion between three,
    and a tail that is not a power of two leaves no lanes idle.  The halves read their 2 * HALF
    columns a second time, from L1/L2, not HBM."""
    HALF: tl.constexpr = R // 2
    HAS_TAIL: tl.constexpr = D > R
    x1 = _load(src, rows, j, rmask, j < HALF)
    x2 = _load(src, rows, HALF + j, rmask, j < HALF)
    if HAS_TAIL and ROW_TAIL:
        xt = _load(src, rows, e, rmask, e < D)
    elif HAS_TAIL:
        xt = _load(src, rows, R + e, rmask, e < D - R)
    else:
        xt = x1  # unused
    if EARLY:
        c1, s1, c2, s2 = _halves_table(cos_ptr, sin_ptr, crow, srow, rmask, j, HALF, EXPANDED)
        if HAS_NORM:
            w1, w2, wt = _halves_weights(w_ptr, j, e, w_off, HALF, R, D, HAS_W, ROW_TAIL)
    if HAS_NORM:
        if HAS_TAIL and ROW_TAIL:
            ss = tl.sum(xt * xt, axis=1)
        else:
            ss = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
            if HAS_TAIL:
                ss += tl.sum(xt * xt, axis=1)
        rstd = tl.rsqrt(ss / D + eps)[:, None]
        if not EARLY:
            w1, w2, wt = _halves_weights(w_ptr, j, e, w_off, HALF, R, D, HAS_W, ROW_TAIL)
        x1 = x1 * rstd * w1[None, :]
        x2 = x2 * rstd * w2[None, :]
        if HAS_TAIL:
            xt = xt * rstd * wt[None, :]
    if not EARLY:
        c1, s1, c2, s2 = _halves_table(cos_ptr, sin_ptr, crow, srow, rmask, j, HALF, EXPANDED)
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2, xt


@triton.jit
def _pairs_weights(w_ptr, d, pd, rot, w_off, D: tl.constexpr, HAS_W: tl.constexpr):
    if HAS_W:
        w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32) + w_off
        wp = tl.load(w_ptr + pd, mask=rot, other=0.0).to(tl.float32) + w_off
    else:
        w = tl.full([d.shape[0]], 1.0, tl.float32) + w_off
        wp = w
    return w, wp


@triton.jit
def _pairs_table(cos_ptr, sin_ptr, crow, srow, rmask, ci, rot):
    cmask = rmask[:, None] & rot[None, :]
    c = tl.load(cos_ptr + crow[:, None] + ci[None, :], mask=cmask, other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + srow[:, None] + ci[None, :], mask=cmask, other=0.0).to(tl.float32)
    return c, s


@triton.jit
def _norm_rope_pairs(src, rows, rmask, d, w_ptr, eps, w_off,
                     cos_ptr, sin_ptr, crow, srow,
                     D: tl.constexpr, R: tl.constexpr, HAS_NORM: tl.constexpr,
                     HAS_W: tl.constexpr, IS_NEOX: tl.constexpr, EXPANDED: tl.constexpr,
                     EARLY: tl.constexpr):
    """Any rope style on one [rows, D] tile: each element's rotation partner is loaded a
    second time (same cache line).  Used for GPT-J pairs (2i, 2i+1).  EARLY: as in
    ``_norm_rope_halves``."""
    x = _load(src, rows, d, rmask, d < D)
    rot = d < R
    HALF: tl.constexpr = R // 2
    if IS_NEOX:
        pd = tl.where(d < HALF, d + HALF, d - HALF)
        sign = tl.where(d < HALF, -1.0, 1.0)
        pair = tl.where(d < HALF, d, d - HALF)
    else:
        pd = d ^ 1
        sign = tl.where(d % 2 == 0, -1.0, 1.0)
        pair = d // 2
    pd = tl.where(rot, pd, d)
    xp = _load(src, rows, pd, rmask, rot)
    if EXPANDED:
        ci = d
    else:
        ci = pair
    if EARLY:
        c, s = _pairs_table(cos_ptr, sin_ptr, crow, srow, rmask, ci, rot)
        if HAS_NORM:
            w, wp = _pairs_weights(w_ptr, d, pd, rot, w_off, D, HAS_W)
    if HAS_NORM:
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        if not EARLY:
            w, wp = _pairs_weights(w_ptr, d, pd, rot, w_off, D, HAS_W)
        x = x * rstd[:, None] * w[None, :]
        xp = xp * rstd[:, None] * wp[None, :]
    if not EARLY:
        c, s = _pairs_table(cos_ptr, sin_ptr, crow, srow, rmask, ci, rot)
    return x * c + sign[None, :] * xp * s


@triton.jit
def _norm_rope(src, rows, rmask, d, j, e, w_ptr, eps, w_off, cos_ptr, sin_ptr, crow, srow,
               D: tl.constexpr, R: tl.constexpr, HAS_NORM: tl.constexpr, HAS_W: tl.constexpr,
               IS_NEOX: tl.constexpr, EXPANDED: tl.constexpr, SPLIT: tl.constexpr,
               EARLY: tl.constexpr, ROW_TAIL: tl.constexpr):
    if SPLIT:
        y1, y2, yt = _norm_rope_halves(src, rows, rmask, j, e, w_ptr, eps, w_off, cos_ptr,
                                       sin_ptr, crow, srow, D, R, HAS_NORM, HAS_W, EXPANDED,
                                       EARLY, ROW_TAIL)
    else:
        y1 = _norm_rope_pairs(src, rows, rmask, d, w_ptr, eps, w_off, cos_ptr, sin_ptr, crow,
                              srow, D, R, HAS_NORM, HAS_W, IS_NEOX, EXPANDED, EARLY)
        y2 = y1
        yt = y1
    return y1, y2, yt


@triton.jit
def fused_qkv_kernel(
    q_src, k_src, v_src, q_src_stride, k_src_stride, v_src_stride, q_col, k_col, v_col,
    q_w, k_w, eps, w_off,
    cos_ptr, sin_ptr, cos_stride, sin_stride, pos_ptr, table_rows,
    q_out, k_out, v_out, g_out,
    k_cache, v_cache, slot_ptr, block_size, num_slots,
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
    PDL: tl.constexpr,
):
    if PDL:  # programmatic dependent launch (sm_90+, launched with launch_pdl=True): this
        # grid may start while the previous kernel still runs; wait for it before any memory
        # access, and let the next one start its own launch at once (it must wait likewise)
        gdc_wait()
        gdc_launch_dependents()
    # One grid axis, head tiles varying fastest: the programs resident at once then cover
    # whole token rows (contiguous memory), which kept HBM busier than a (token, head) grid:
    # +7% bandwidth at T=65536 on an H200 (benchmarks/tune_kernel.py --variants).
    GY: tl.constexpr = NQB + NKB + NVB
    pid = tl.program_id(0)
    pid_t = pid // GY
    pid_h = pid % GY
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    # NeoX rope works on the two rotary halves and the tail as separate tiles (SPLIT).
    SPLIT: tl.constexpr = IS_NEOX and not PAIRS
    HAS_TAIL: tl.constexpr = D > R
    HALF: tl.constexpr = R // 2
    j = tl.arange(0, BLOCK_HALF)
    e = tl.arange(0, BLOCK_TAIL)  # ROW_TAIL: BLOCK_TAIL == BLOCK_D, the tile spans the row
    if SPLIT and ROW_TAIL:  # the columns of the three parts, and their masks
        c1, c2, ct, m1, m2, mt = j, HALF + j, e, j < HALF, j < HALF, (e >= R) & (e < D)
    elif SPLIT:
        c1, c2, ct, m1, m2, mt = j, HALF + j, R + e, j < HALF, j < HALF, e < D - R
    else:
        c1, c2, ct, m1, m2, mt = d, d, d, dm, dm, dm
    # Column stride between consecutive Q heads, and where the gate of a head starts.
    Q_HSTRIDE: tl.constexpr = 2 * D if GATE == 1 else D
    if pid_h < NQB:
        t, h, rmask = _tile_rows(pid_t, pid_h * BLOCK_H, T, HQ, BLOCK_T, BLOCK_H, IDX64)
        if WRITE_G:  # the gate of the same heads: its load in flight while Q is computed
            m = rmask[:, None] & dm[None, :]
            if GATE == 1:
                gcol = q_col + h * (2 * D) + D
            else:
                gcol = q_col + HQ * D + h * D
            g = tl.load(q_src + (t * q_src_stride + gcol)[:, None] + d[None, :], mask=m)
        if WRITE_Q:
            tab = _table_rows(pos_ptr, t, rmask, table_rows, HAS_POS, IDX64)
            y1, y2, yt = _norm_rope(q_src, t * q_src_stride + q_col + h * Q_HSTRIDE, rmask, d,
                                    j, e, q_w, eps, w_off, cos_ptr, sin_ptr, tab * cos_stride,
                                    tab * sin_stride, D, R, HAS_NORM, HAS_QW, IS_NEOX,
                                    EXPANDED, SPLIT, EARLY, ROW_TAIL)
            _emit(q_out, (t * HQ + h) * D, rmask, y1, y2, yt, c1, c2, ct, m1, m2, mt,
                  SPLIT, HAS_TAIL, INTERP)
        if WRITE_G:
            tl.store(g_out + ((t * HQ + h) * D)[:, None] + d[None, :], g, mask=m)
    elif pid_h < NQB + NKB:
        t, h, rmask = _tile_rows(pid_t, (pid_h - NQB) * BLOCK_H, T, HKV, BLOCK_T, BLOCK_H,
                                 IDX64)
        tab = _table_rows(pos_ptr, t, rmask, table_rows, HAS_POS, IDX64)
        if HAS_CACHE:  # slot loads first: in flight with the activation loads
            slot = tl.load(slot_ptr + t, mask=rmask, other=-1)
            ks = _cache_scale(k_scale, IS_FP8, HAS_KS)
            if not EARLY:
                rows, ok = _cache_rows(slot, h, rmask, block_size, num_slots, kc_blk, kc_slot,
                                       kc_head, SKIP_NEG, IDX64)
        y1, y2, yt = _norm_rope(k_src, t * k_src_stride + k_col + h * D, rmask, d, j, e,
                                k_w, eps, w_off, cos_ptr, sin_ptr, tab * cos_stride,
                                tab * sin_stride, D, R, HAS_NORM, HAS_KW, IS_NEOX, EXPANDED,
                                SPLIT, EARLY, ROW_TAIL)
        if WRITE_K:
            _emit(k_out, (t * HKV + h) * D, rmask, y1, y2, yt, c1, c2, ct, m1, m2, mt,
                  SPLIT, HAS_TAIL, INTERP)
        if HAS_CACHE:
            if EARLY:  # the slot arithmetic after the loads: it waits for the slots
                rows, ok = _cache_rows(slot, h, rmask, block_size, num_slots, kc_blk, kc_slot,
                                       kc_head, SKIP_NEG, IDX64)
            _emit(k_cache, rows, ok, _fp8(y1, ks, IS_FP8, HAS_KS, FP8_MAX),
                  _fp8(y2, ks, IS_FP8, HAS_KS, FP8_MAX),
                  _fp8(yt, ks, IS_FP8, HAS_KS, FP8_MAX), c1, c2, ct, m1, m2, mt,
                  SPLIT, HAS_TAIL, INTERP)
    else:  # V (the grid has exactly NQB + NKB + NVB head tiles)
        t, h, rmask = _tile_rows(pid_t, (pid_h - NQB - NKB) * BLOCK_H, T, HKV, BLOCK_T, BLOCK_H,
                                 IDX64)
        m = rmask[:, None] & dm[None, :]
        if HAS_CACHE:
            slot = tl.load(slot_ptr + t, mask=rmask, other=-1)
            vs = _cache_scale(v_scale, IS_FP8, HAS_VS)
            if not EARLY:
                rows, ok = _cache_rows(slot, h, rmask, block_size, num_slots, vc_blk, vc_slot,
                                       vc_head, SKIP_NEG, IDX64)
        x = tl.load(v_src + (t * v_src_stride + v_col + h * D)[:, None] + d[None, :], mask=m)
        if WRITE_V:
            tl.store(v_out + ((t * HKV + h) * D)[:, None] + d[None, :], x, mask=m)
        if HAS_CACHE:
            if EARLY:
                rows, ok = _cache_rows(slot, h, rmask, block_size, num_slots, vc_blk, vc_slot,
                                       vc_head, SKIP_NEG, IDX64)
            _store(v_cache, rows, d, ok, dm, _fp8(x.to(tl.float32), vs, IS_FP8, HAS_VS,
                                                  FP8_MAX), INTERP)


# (BLOCK_T, BLOCK_H, num_warps[, pairs[, early[, row_tail]]]) forced by tuning
_BLOCK_OVERRIDE = None


def set_block_override(cfg) -> None:
    """Force ``(BLOCK_T, BLOCK_H, num_warps)``, ``(..., pairs)``, ``(..., pairs, early)`` or
    ``(..., pairs, early, row_tail)`` for every launch (None: the heuristic).  ``row_tail``
    applies only to NeoX rope with a tail and without pairs.  Dynamic-T Inductor launches take
    the forced tile for every T, with no switch (``fusion_pass.inductor_launch.plan``)."""
    global _BLOCK_OVERRIDE
    _BLOCK_OVERRIDE = cfg


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """triton.next_power_of_2 without its wrapper (~1.5 us a call on the host)."""
    return 1 << (max(n, 1) - 1).bit_length()


# the only token counts at which the tile choice changes (_T_TWO: 2-token tiles with early
# loads for many heads a token and for the whole-row tail tile, see _pick_blocks)
_T_SMALL, _T_TWO, _T_MID, _T_LARGE = 32, 64, 256, 1024


def _pick_blocks(num_tokens: int, head_dim: int, num_q_heads: int, num_kv_heads: int,
                 row_tail: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_H, BLOCK_D, num_warps), from ``benchmarks/tune_kernel.py`` on an H200.

    BLOCK_H: up to 8 heads, but no more than the KV heads (with 2 KV heads, 8-head tiles leave
    K/V programs 3/4 idle).  Small T: one token per program (more programs, shorter latency
    chain).  Large T (and mid T at D=256 or with many heads a token, see ``large_tiles_from``,
    with early loads below T=256): tiles of 2K elements, 16 per thread (4 warps): at D=256
    that beat 32 per thread by 16% at
    T=65536 (94 registers a thread held occupancy to 31%).  With a whole-row tail tile
    (ROW_TAIL): from T=1024 one token of up to 1024 elements a program on one warp, as many
    heads as the Q heads allow even if K/V tiles then have idle rows (Qwen3-Next, 4 heads of
    2 KV heads, T=65536: 557 against 572 us for 4 tokens of 2 heads on 4 warps; gate-less
    350 / 381 us); below, the small-T tiles (at T=256 the 1024-element tile took 3.85 us, the
    split tiles 3.55, gated), two tokens of them on twice the warps from T=64 where a token's
    tile has at most 512 elements (Qwen3-Next, 2 heads: T = 64 / 128 / 256 / 512 / 768 took
    1.80 / 2.10-2.14 / 2.95-2.98 / 4.26-4.35 / 5.45-5.62 us gated against 1.86-1.89 /
    2.17-2.19 / 3.01-3.02 / 4.50-4.53 / 6.05-6.27 for one token, and 1.74-1.75 / 1.95-1.98 /
    2.56-2.59 / 4.03-4.05 / 5.12-5.20 against 1.80-1.83 / 2.05-2.08 / 2.90-2.91 / 4.45-4.51 /
    5.99-6.04 without the gate output; ``results/h200-2026-12-01-s13-tune-qwen3-next-mid.txt``).
    """
    block_d = _pow2(head_dim)
    if row_tail and num_tokens >= _T_LARGE:  # (K/V tiles may have more heads than there are)
        return 1, max(1, min(_pow2(num_q_heads), 1024 // block_d)), block_d, 1
    block_h = max(1, min(8, _pow2(num_kv_heads), 4096 // block_d))
    block_t = 1
    if row_tail:  # below T=1024 the small-T tile, two tokens of it from T=64 when it is small
        if num_tokens >= _T_TWO and block_h * block_d <= 512:
            block_t = 2
    elif num_tokens >= large_tiles_from(head_dim, num_q_heads, num_kv_heads):
        block_t = max(1, 2048 // (block_h * block_d))
    num_warps = 4 if block_t * block_h * block_d >= 1024 else 2
    return block_t, block_h, block_d, num_warps


def large_tiles_from(head_dim: int, num_q_heads: int, num_kv_heads: int) -> int:
    """The T from which ``_pick_blocks`` gives the large-T tiles (without ROW_TAIL): T=64 with
    many heads a token at D=128 exactly, T=256 with many heads at other D or at D=256, else
    T=1024.
    GLM-4.5 (112 heads a token) on an H200: 2 tokens of 8 heads on 4 warps took 4.13 / 6.50 /
    10.38 us at T = 256 / 512 / 768, against 4.27 / 6.87 / 10.81 for 2 tokens of 4 heads on
    one warp, and 1 token of 8 heads (the small-T tile) lost by 20% at T=256
    (``results/h200-2026-11-30-tune-mid-glm.txt``).  With
    the early loads (below T=256) the 2-token tile also wins from T=64: 2.11-2.18 / 2.42-2.50 /
    2.68-2.77 / 3.48-3.51 us at T = 64 / 96 / 128 / 192 against 2.14-2.21 / 2.64-2.70 /
    3.00-3.07 / 3.96-4.03 for the small-T tile, and ties it at T = 32 (1.75-1.80 against
    1.79-1.87; ``results/h200-2026-12-01-s13-tune-glm-mid.txt``)."""
    if not many_heads(num_q_heads, num_kv_heads):
        return _T_MID if _pow2(head_dim) > 128 else _T_LARGE
    return _T_TWO if head_dim == 128 else _T_MID  # (other D: untimed below T=256)


def many_heads(num_q_heads: int, num_kv_heads: int) -> bool:
    """Q, K and V heads of a token fill a grid row of many programs (GLM-4.5: 112)."""
    return num_q_heads + 2 * num_kv_heads >= 64


def _odd_tail(head_dim: int, rotary_dim: int) -> bool:
    """An unrotated tail that is not a power of two: its own tile would leave lanes idle
    (Qwen3-Next: 192 of 256)."""
    tail = head_dim - rotary_dim
    return tail > 0 and tail & (tail - 1) != 0


def _use_pairs(num_tokens: int, head_dim: int, rotary_dim: int) -> bool:
    """NeoX through partner loads (one full-row tile) for an odd tail below T=32: 2.00 against
    2.07 us for the whole-row tail at T=16 on Qwen3-Next (H200), but 2.22 against 2.13 at T=64,
    and far behind at large T (439 against 344 us gate-less at T=65536)."""
    return num_tokens < _T_SMALL and _odd_tail(head_dim, rotary_dim)


def _use_row_tail(num_tokens: int, head_dim: int, rotary_dim: int) -> bool:
    """The whole-row tail tile (ROW_TAIL) for an odd tail from T=32 on: on Qwen3-Next (H200)
    +11% gated and +27% gate-less at T=65536 over the half/half/tail tiles.  A power-of-two
    tail keeps its own tile: GLM-4.5 (tail 64 of 128) ran 10% slower with the whole row."""
    return num_tokens >= _T_SMALL and _odd_tail(head_dim, rotary_dim)


class TilePlan(NamedTuple):
    block_t: int  # tokens per program
    head_tiles: int  # of all regions: the grid is cdiv(T, block_t) * head_tiles programs
    num_warps: int
    constexprs: dict  # _TILE_CONSTS: NQB ... BLOCK_TAIL, PAIRS, EARLY, ROW_TAIL


def tile_plan(num_tokens: int, hq: int, hkv: int, d: int, rotary_dim: int, write_q: bool,
              run_k: bool, run_v: bool, write_gate: bool,
              is_neox: bool = True) -> Optional[TilePlan]:
    """Tiles and grid of one launch (None: nothing to do).  ``run_k``/``run_v``: K/V programs
    run (an output or the cache wants them); ``write_gate`` only when the layout is gated;
    ``is_neox``: the rope style (GPT-J has no half/half/tail tiles, so no PAIRS or ROW_TAIL)."""
    if _BLOCK_OVERRIDE is not None:  # benchmarks/tune_kernel.py sweeps tile shapes
        return _plan(num_tokens, hq, hkv, d, rotary_dim, write_q, run_k, run_v, write_gate,
                     is_neox, tuple(_BLOCK_OVERRIDE))
    # the choice only changes at _T_SMALL, _T_TWO, _T_MID and _T_LARGE
    bucket = 1 if num_tokens < _T_SMALL else _T_SMALL if num_tokens < _T_TWO else \
        _T_TWO if num_tokens < _T_MID else _T_MID if num_tokens < _T_LARGE else _T_LARGE
    return _plan(bucket, hq, hkv, d, rotary_dim, write_q, run_k, run_v, write_gate, is_neox,
                 None)


@functools.lru_cache(maxsize=256)
def _plan(num_tokens, hq, hkv, d, rotary_dim, write_q, run_k, run_v, write_gate, is_neox,
          override):
    if override is not None:
        (block_t, block_h, num_warps), block_d = override[:3], _pow2(d)
        pairs = bool(override[3]) if len(override) > 3 else False
        early = bool(override[4]) if len(override) > 4 else num_tokens < _T_MID
        row_tail = bool(override[5]) if len(override) > 5 else False
    else:
        row_tail = is_neox and _use_row_tail(num_tokens, d, rotary_dim)
        block_t, block_h, block_d, num_warps = _pick_blocks(num_tokens, d, hq, hkv, row_tail)
        pairs = is_neox and _use_pairs(num_tokens, d, rotary_dim)
        # loads before the norm's reduction: -0.1 to -0.2 us at T <= 64 on an H200, but up to
        # 14% slower at T = 65536 for partial rotary (GLM-4.5); the whole-row tail tile keeps
        # them up to T=1024 (Qwen3-Next T=256: 2.95-2.98 against 3.10 us, 2 tokens a program)
        early = num_tokens < (_T_LARGE if row_tail else _T_MID)
    row_tail = row_tail and is_neox and d > rotary_dim and not pairs
    # Q programs also copy the gate of their heads (one pass over each interleaved [q|g] row)
    nqb = _cdiv(hq, block_h) if (write_q or write_gate) else 0
    nkb = _cdiv(hkv, block_h) if run_k else 0
    nvb = _cdiv(hkv, block_h) if run_v else 0
    if nqb + nkb + nvb == 0:
        return None
    return TilePlan(block_t, nqb + nkb + nvb, num_warps, dict(
        NQB=nqb, NKB=nkb, NVB=nvb, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d,
        BLOCK_HALF=_pow2(rotary_dim // 2),
        BLOCK_TAIL=_pow2(d) if row_tail else _pow2(d - rotary_dim), PAIRS=pairs, EARLY=early,
        ROW_TAIL=row_tail))


_EMPTY: dict = {}  # (device, dtype) -> the shared 0-element output of launch(share_empty=True)
_FAST_LAUNCH = True  # False: every launch through fused_qkv_kernel[grid] (profile_launch.py)
# True: int32 element offsets (IDX64 off) for launches whose offsets all fit: 17-34% fewer
# sm_90 instructions (benchmarks/sass_stats.py); on an H200 -0.14..-0.25 us at T <= 64
# (GLM-4.5 T=64: 2.18 against 2.43 us) and up to -1.3% at T = 65536.
_INDEX32 = True
# Programmatic dependent launch for eager launches on sm_90+: the kernel may start while the
# previous kernel on the stream finishes (it waits for it before touching memory).  Off: it
# only paid back to back with itself (benchmarks/pdl_bench.py).  Read when a BoundLaunch is
# built (a FusedQKVLayer keeps its first one).
_PDL = False
# ptxas's register budget for launches with early loads (EARLY), on NVIDIA.  Left to itself,
# ptxas holds those small-T kernels to 32 registers a thread and, to fit, sinks the table and
# weight loads after the norm's reduction: a second memory round trip (SASS from
# benchmarks/sass_stats.py).  With room it keeps them first (37-44 registers; the PAIRS path
# takes 56-64 either way).  H200, CUDA graph, T = 1 / 16 / 64 / 128: Qwen3-8B 1.48 / 1.75 /
# 1.91 / 2.17 -> 1.36 / 1.54 / 1.68 / 1.99 us, Qwen3-Next T = 64 / 128 2.08 / 2.41 -> 1.84 /
# 2.14.  None: ptxas's own choice.  Inductor's launches cannot pass it (its autotuner drops
# the option), but their dynamic-T kernel gets the room from its large-T branch.
_EARLY_MAX_REGS: Optional[int] = 64
# The same budget for launches with late loads (EARLY off: T >= 256, or T >= 1024 for a
# whole-row tail tile).  Given 64 registers, ptxas takes 48-56 where it took 32-40 on its own,
# and the kernel issues faster.  H200, CUDA graph (``benchmarks/regs_waves.py``,
# ``results/h200-2026-12-01-s17-regs-*``), us without -> with: GLM-4.5 T = 256 / 512 4.14 /
# 6.50 -> 3.96 / 6.35, Qwen3-8B T = 256 / 512 / 1024 2.59 / 3.73 / 5.46 -> 2.52 / 3.67 / 5.27.
_LATE_MAX_REGS: Optional[int] = 64
# Either budget goes to launches of at most 16 elements a thread whose grid is at most this
# many warps an SM.  Past ~128 warps an SM occupancy wins back (GLM-4.5 T=768, 163 warps an
# SM: 10.43 -> 10.86 us with the budget), and so it does for Qwen3-Next's one-warp tiles of 32
# elements a thread (from T=1024): ptxas gives them 80 registers, and a cap of 64 cost 50%.
# Early-load launches of 40-155 warps an SM gained or tied (``results/h200-2026-12-02-s18-
# regs-*``): GLM-4.5 T = 192 / 255 3.50 / 4.12 -> 3.41 / 3.98, Qwen3-Next T = 384 / 768 3.52 /
# 5.51 -> 3.47 / 5.38, Qwen3-8B T = 255 2.67 -> 2.57.  One forced tile lost: GLM-4.5 T=128 in
# one-token programs (54 warps an SM, one wave at ptxas's 32 registers, 1.13 at the budget's
# 38) 2.98 -> 3.14; the heuristic gives that shape two-token tiles from T=64 (2.92 -> 2.67).
# Early-load tiles of 32 elements a thread (D=512 with 8 KV heads) lost the budget with this
# rule (untimed; the late-load ones of that size were the 50% loss above).
_BUDGET_WARPS_PER_SM = 128
_INT32_SPAN = 1 << 30  # offsets must stay below 2^31: a factor 2 for masked lanes' offsets
_launcher: Optional[CachedLauncher] = None
# False: kept plans launch through the launcher's key every call, not its memo (A/B timing in
# benchmarks/profile_launch.py)
_LAUNCH_MEMO = True


@functools.lru_cache(maxsize=None)
def _maxnreg_ok(device: torch.device) -> bool:
    """ptxas's register budget is a compile option of Triton's NVIDIA backend only."""
    if device.type != "cuda" or torch.version.hip is not None \
            or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover - a Triton without the NVIDIA backend
        return False
    return "maxnreg" in getattr(CUDAOptions, "__dataclass_fields__", {})


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _pdl_ok(device: torch.device) -> bool:
    """Programmatic dependent launch needs an NVIDIA device of compute capability 9.0 or more
    (Hopper), a Triton with grid dependency control, and no interpreter (it has none)."""
    return (device.type == "cuda" and gdc_wait is not None and torch.version.cuda is not None
            and os.environ.get("TRITON_INTERPRET", "0") != "1"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def launch_settings() -> tuple:
    """The module settings a kept launch (``BoundLaunch`` and its plans) was built under:
    benchmarks change them between calls with the same arguments."""
    return (_BLOCK_OVERRIDE, _INDEX32, _EARLY_MAX_REGS, _PDL, _BUDGET_WARPS_PER_SM,
            _LATE_MAX_REGS)


def _cached_launcher() -> CachedLauncher:
    """fused_qkv_kernel's CachedLauncher (rebuilt when a test swaps the kernel out)."""
    global _launcher
    if _launcher is None or _launcher.fn is not fused_qkv_kernel:
        _launcher = CachedLauncher(fused_qkv_kernel)
    return _launcher


_REAL_CACHED_LAUNCHER = _cached_launcher  # native_entry.state: not swapped for a spy


def _span(x: torch.Tensor) -> int:
    """One past the largest element offset of ``x`` from its data pointer."""
    if x.is_contiguous():  # the common case, without a Python loop over the dims
        return x.numel()
    return span_of(zip(x.shape, x.stride()))


def span_of(dims) -> int:
    """``_span`` of (size, stride) pairs."""
    return 1 + sum((n - 1) * s for n, s in dims)


def _needs_int64(t: int, block_t: int, srcs, out_row: int, fixed_span: int) -> bool:
    """Whether some element offset of a launch over ``t`` tokens may reach 2^31 / 2: the
    sources plus the masked rows of the last token tile, outputs of ``out_row`` elements a
    token, and the caches and tables (``fixed_span``).  The factor 2 covers the offsets of
    masked head and column lanes, which are computed but never dereferenced."""
    return needs_int64_spans(t, block_t, [(_span(s), s.stride(0)) for s in srcs], out_row,
                             fixed_span)


def needs_int64_spans(t: int, block_t: int, srcs, out_row: int, fixed_span: int) -> bool:
    """``_needs_int64`` with each source given as (span, row stride)."""
    span = max(max(sp + block_t * st for sp, st in srcs), (t + block_t) * out_row, fixed_span)
    return span >= _INT32_SPAN


# Where launch()'s per-step tensors sit in its positional arguments
_STEP_ARGS = (0, 1, 2, 17, 23)  # q_src, k_src, v_src, positions, slot_mapping
# Kernel constexprs in kernel order: the fixed ones, TilePlan's, IDX64, INTERP, PDL
_TILE_CONSTS = ("NQB", "NKB", "NVB", "BLOCK_T", "BLOCK_H", "BLOCK_D", "BLOCK_HALF",
                "BLOCK_TAIL", "PAIRS", "EARLY", "ROW_TAIL")


def launch(*args, poison: float | None = None, share_empty: bool = False):
    """Allocate the outputs and launch the kernel once; caches (if given) are written in place.

    Arguments: ``split_norm_rope_cache_impl``'s, in its order.  ``poison`` (tests only) fills
    the outputs first, so an element the kernel skips shows.  ``share_empty``: outputs not
    asked for are one shared 0-element tensor (an allocation costs microseconds of host time);
    only for callers outside torch.library, which forbids outputs that alias.
    """
    return BoundLaunch(*args, share_empty=share_empty)(
        *(args[i] for i in _STEP_ARGS), poison=poison)


class BoundLaunch:
    """``launch`` with everything that does not change between steps worked out once.

    Built from ``launch``'s arguments; the per-step tensors among them (``q_src``, ``k_src``,
    ``v_src``, ``positions``, ``slot_mapping``) are only looked at for their presence, dtype
    and device, and not kept.  ``bound(q_src, k_src, v_src, positions, slot_mapping)`` then
    launches for a step whose tensors match those in everything but their data and token
    count (``FusedQKVLayer`` checks that), which skips rebuilding ~70 kernel arguments.
    """

    def __init__(self, q_src, k_src, v_src, q_col, k_col, v_col, hq, hkv, d, gate_layout,
                 q_weight, k_weight, apply_norm, eps, weight_offset, cos, sin, positions,
                 rotary_dim, is_neox, table_expanded, key_cache, value_cache, slot_mapping,
                 cache_layout, skip_negative_slots, kv_cache_dtype, k_scale, v_scale,
                 write_q, write_k, write_v, write_gate, *, share_empty: bool = False):
        self.dev, self.dt = q_src.device, q_src.dtype
        write_gate = write_gate and gate_layout != GATE_NONE
        has_cache = key_cache is not None
        self.shape = (hq, hkv, d, rotary_dim, write_q, write_k or has_cache,
                      write_v or has_cache, write_gate, is_neox)  # tile_plan's after T
        self.wants = ((write_q, hq), (write_k, hkv), (write_v, hkv), (write_gate, hq))
        self.share_empty = share_empty
        self.has_cache, self.has_pos = has_cache, positions is not None
        fp8 = self._fp8_view = None
        if has_cache:
            fp8 = fp8_dtype_of(key_cache.dtype, kv_cache_dtype)
            if key_cache.dtype == torch.uint8:  # fp8 bytes: let Triton see the real format
                key_cache, value_cache = key_cache.view(fp8), value_cache.view(fp8)
                self._fp8_view = fp8  # (again for each call's own caches, see __call__)
            nb, bs, kb, ks, kh, _ = cache_geometry(key_cache, cache_layout)
            _, _, vb, vs, vh, _ = cache_geometry(value_cache, cache_layout)
            num_slots = nb * bs
        else:
            bs = kb = ks = kh = vb = vs = vh = num_slots = 1
        # Pointers the kernel never dereferences (their flag is off) get the table: any tensor
        # will do, and this one is fixed, so the arguments below do not change per step.
        dummy = cos
        # The kernel's runtime arguments; None marks a per-step entry, filled in __call__.
        self.args = [
            None, None, None, None, None, None, q_col, k_col, v_col,
            q_weight if q_weight is not None else dummy,
            k_weight if k_weight is not None else dummy,
            float(eps), float(weight_offset),
            cos, sin, cos.stride(0), sin.stride(0), None if self.has_pos else dummy,
            cos.shape[0], None, None, None, None,
            key_cache if has_cache else dummy, value_cache if has_cache else dummy,
            None if has_cache else dummy, bs, num_slots, kb, ks, kh, vb, vs, vh,
            k_scale if k_scale is not None else dummy,
            v_scale if v_scale is not None else dummy, None,
        ]
        self.consts = (  # the fixed constexprs, in kernel order
            hq, hkv, d, rotary_dim, gate_layout, apply_norm, q_weight is not None,
            k_weight is not None, is_neox, table_expanded, self.has_pos, has_cache,
            skip_negative_slots, fp8 is not None, k_scale is not None, v_scale is not None,
            float(torch.finfo(fp8).max) if fp8 is not None else 0.0,
            write_q, write_k, write_v, write_gate)
        # kernel argument slots that hold the fixed tensors, and which of them (index into
        # __call__'s ``fixed``; 2 = cos stands in for an absent one): ``unbind`` empties
        # them, ``__call__(..., fixed=)`` refills them
        present = (q_weight, k_weight, cos, sin, key_cache, value_cache, k_scale, v_scale)
        self._slots = tuple((slot, j if present[j] is not None else 2) for slot, j in
                            ((9, 0), (10, 1), (13, 2), (14, 3), (23, 4), (24, 5), (34, 6),
                             (35, 7)))
        self._slots += ((17, 2),) if not self.has_pos else ()
        self._slots += ((25, 2),) if not has_cache else ()
        self.interp = q_src.is_cpu
        self.settings = launch_settings()  # what this launch and its plans are built under
        self.pdl = _PDL and _pdl_ok(self.dev)
        # warps that run at once under the register budget (0: no budget on this device)
        sms = _sm_count(self.dev) if _maxnreg_ok(self.dev) else 0
        self.budget_warps = _BUDGET_WARPS_PER_SM * sms
        # the fixed tensors the kernel indexes from their data pointers (int32 check)
        self._fixed = (key_cache, value_cache) if has_cache else ()
        self.fixed_span = None  # their largest span, worked out at the first int32 check
        self.out_row = max(hq, hkv) * d  # elements a token of the widest output

    def stale(self) -> bool:
        """Whether the module settings changed since this launch was built (benchmarks change
        them between calls with the same arguments): its keeper must build a new one."""
        return self.settings != launch_settings()

    def unbind(self) -> "BoundLaunch":
        """Drop the fixed tensors (every call then passes them as ``fixed``), so that a kept
        launch does not hold caches alive; only their geometry stays.  Returns self."""
        if self.fixed_span is None:
            self.fixed_span = self._fixed_span()
        for slot, _ in self._slots:
            self.args[slot] = None
        self._fixed = ()
        return self

    def _fixed_span(self) -> int:
        """The largest span of the caches and tables.  A table's is bounded by its rows times
        its row stride plus a head: the kernel reads at most ``rotary_dim <= D`` columns of a
        row, and this skips a Python loop over the dims of the (strided) cos/sin views on the
        entry point's per-call path."""
        a, d = self.args, self.shape[2]
        tables = a[18] * max(a[15], a[16]) + d  # table_rows, cos_stride, sin_stride
        return max([tables] + [_span(x) for x in self._fixed])

    def _alloc(self, t: int, poison):
        outs = []
        for want, heads in self.wants:
            if not want and self.share_empty:
                key = (self.dev, self.dt)
                e = _EMPTY.get(key)
                if e is None:
                    e = _EMPTY[key] = torch.empty((0,), device=self.dev, dtype=self.dt)
                outs.append(e)
                continue
            out = torch.empty((t, heads, self.shape[2]) if want else (0,), device=self.dev,
                              dtype=self.dt)
            outs.append(out if poison is None else out.fill_(poison))
        return outs

    def plan(self, q_src, k_src, v_src) -> tuple:
        """What a launch over these sources needs besides their data: (grid, constexprs,
        num_warps, register budget or None, the launcher's memo); ``()`` when there is nothing
        to launch.  It depends on the sources' token count, shapes and strides only, so a
        caller that keeps it for those passes it back with later steps' tensors."""
        t = q_src.shape[0]
        tiles = tile_plan(t, *self.shape) if t else None
        if tiles is None:
            return ()
        idx64 = True
        if _INDEX32:
            if self.fixed_span is None:
                self.fixed_span = self._fixed_span()
            # one span for a packed qkv (host time: this runs on every eager call)
            srcs = (q_src,) if k_src is q_src and v_src is q_src else (q_src, k_src, v_src)
            idx64 = _needs_int64(t, tiles.block_t, srcs, self.out_row, self.fixed_span)
        # the plan's constexprs are built in _TILE_CONSTS order (tests check it)
        consts = self.consts + tuple(tiles.constexprs.values()) + (idx64, self.interp,
                                                                    self.pdl)
        grid = (_cdiv(t, tiles.block_t) * tiles.head_tiles,)
        regs = None
        if grid[0] * tiles.num_warps <= self.budget_warps and tiles.block_t \
                * tiles.constexprs["BLOCK_H"] * tiles.constexprs["BLOCK_D"] \
                <= 16 * 32 * tiles.num_warps:
            regs = _EARLY_MAX_REGS if tiles.constexprs["EARLY"] else _LATE_MAX_REGS
        return grid, consts, tiles.num_warps, regs, []

    def __call__(self, q_src, k_src, v_src, positions, slot_mapping, *, fixed=None,
                 plan=None, poison=None):
        """Launch for one step.  ``fixed``: (q_weight, k_weight, cos, sin, key_cache,
        value_cache, k_scale, v_scale) of the same geometry as those bound, for a launch that
        was ``unbind``-ed (None where the bound call had None).  ``plan``: ``self.plan`` of
        sources with this step's shapes and strides (worked out here when None)."""
        outs = self._alloc(q_src.shape[0], poison)
        memo = None
        if plan is None:
            plan = self.plan(q_src, k_src, v_src)
        elif plan and _LAUNCH_MEMO:  # a kept plan: all but the tensors repeat (see plan())
            memo = plan[4]
        if not plan:
            return tuple(outs)
        grid, consts, num_warps, regs = plan[:4]
        a = self.args_for(q_src, k_src, v_src, positions, slot_mapping, outs, fixed)
        if _FAST_LAUNCH:  # the compiled kernel's own launcher, without JITFunction.run per call
            _cached_launcher()(grid, a, consts, num_warps, self.pdl, regs, memo)
        else:
            fused_qkv_kernel[grid](*a, **dict(zip(_CONST_NAMES, consts)), num_warps=num_warps,
                                   **({"launch_pdl": True} if self.pdl else {}),
                                   **({"maxnreg": regs} if regs is not None else {}))
        return tuple(outs)

    def args_for(self, q_src, k_src, v_src, positions, slot_mapping, outs, fixed=None) -> list:
        """The kernel's runtime arguments for one step (``outs``: q, k, v, gate)."""
        a = self.args.copy()
        if fixed is not None:
            if self._fp8_view is not None:  # uint8 caches holding fp8 bytes
                fixed = fixed[:4] + (fixed[4].view(self._fp8_view),
                                     fixed[5].view(self._fp8_view)) + fixed[6:]
            for slot, j in self._slots:
                a[slot] = fixed[j]
        a[0], a[1], a[2] = q_src, k_src, v_src
        a[3], a[4], a[5] = q_src.stride(0), k_src.stride(0), v_src.stride(0)
        a[19], a[20], a[21], a[22] = outs
        if self.has_pos:
            a[17] = positions
        if self.has_cache:
            a[25] = slot_mapping
        a[36] = q_src.shape[0]
        return a

    def roles(self) -> dict:
        """Which tensor each tensor argument of ``args_for`` is, by argument index: a step
        tensor ("q_src", "k_src", "v_src", "positions", "slot_mapping"), an output ("out0" to
        "out3": q, k, v, gate) or a fixed tensor (``FIXED_ROLES``; "cos" also stands in for the
        pointers the kernel never reads)."""
        roles = {0: "q_src", 1: "k_src", 2: "v_src", 19: "out0", 20: "out1", 21: "out2",
                 22: "out3"}
        if self.has_pos:
            roles[17] = "positions"
        if self.has_cache:
            roles[25] = "slot_mapping"
        for slot, j in self._slots:
            roles[slot] = FIXED_ROLES[j]
        return roles


# BoundLaunch's ``fixed`` tensors, in order
FIXED_ROLES = ("q_weight", "k_weight", "cos", "sin", "key_cache", "value_cache", "k_scale",
               "v_scale")

# The kernel's constexpr names in order (BoundLaunch.consts, TilePlan's, IDX64, INTERP, PDL)
_PARAMS = inspect.signature(fused_qkv_kernel.fn).parameters
# per kernel parameter, in order: whether it is a constexpr
IS_CONSTEXPR = tuple(map(_is_constexpr, _PARAMS.values()))
_CONST_NAMES = tuple(n for n, c in zip(_PARAMS, IS_CONSTEXPR) if c)
