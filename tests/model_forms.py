"""Attention pre-processing written in the forms real model code takes (SPEC's family table).

``build(Form(...))`` returns ``(fn, args)``: an unfused function and fresh random inputs.
``fn`` returns the rotated Q (and K / gate when asked), and writes K and V into the caches.
"""
from __future__ import annotations

import dataclasses
import math
import zlib

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class Form:
    split: str = "split"  # split, chunk, slice, narrow, separate, gated_interleaved, gated_blocked,
    #                       packed_linear (one QKV matmul in the graph, then split)
    norm: str = "rms_norm"  # rms_norm, nn, qwen3, gemma, none
    rope: str = "neox_halves"  # neox_halves, rotate_half, gptj, gptj_halves
    rotary: float = 1.0  # fraction of head_dim rotated
    table: str = "cos_sin_cache"  # cos_sin_cache, separate, gathered (HF cos/sin [B, S, D]),
    #                               computed (HF rotary: cos/sin of angles computed from positions)
    cache: str = "view"  # view, index_put, index_copy, nhd, nhd_negoff, hnd, kv_halves, static,
    #                      fp8, none
    hf: bool = False  # Hugging Face layout: [B, S] tokens, q transposed to [B, H, S, D]
    dtype: torch.dtype = torch.bfloat16
    eps: float = 1e-6
    k_eps: float = None  # a different eps on K (guard test)
    rope_first: bool = False  # HunYuan: rope, then the per-head norm (not this op)
    B: int = 2
    S: int = 3
    hq: int = 4
    hkv: int = 2
    d: int = 64
    return_k: bool = False
    negative_slot: bool = False  # one slot is -1: indexing counts it from the end
    rope_fp32: bool = False  # float32 cos/sin: rope math in float32, cast back afterwards
    device: str = "cpu"

    @property
    def T(self):
        return self.B * self.S

    @property
    def r(self):
        return int(self.d * self.rotary)


class Qwen3RMSNorm(torch.nn.Module):
    """Hugging Face's Qwen3 norm: float32 math, cast back before the weight."""

    def __init__(self, d, eps):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        x = x.to(torch.float32)
        var = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + self.eps)
        return self.weight * x.to(dt)


def _f32(dt):
    """The float32 of model code ("compute in float32"), but float64 stays float64, so that the
    float64 oracle (``to_float64``) does not round its norm to float32 (which would make eager
    fp32 code look exact and the fused op wrong)."""
    return torch.promote_types(dt, torch.float32)


def _norm(kind, x, w, eps):
    d = x.shape[-1]
    if kind == "rms_norm":
        return F.rms_norm(x, (d,), w, eps)
    if kind == "nn":
        return _NN_NORMS[(d, eps, w.dtype, str(x.device))](x)
    if kind == "qwen3":
        dt = x.dtype
        xf = x.to(_f32(dt))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return w * xf.to(dt)
    if kind == "gemma":
        xf = x.to(_f32(x.dtype))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (xf * (1.0 + w.to(_f32(w.dtype)))).type_as(x)
    if kind == "olmo2":  # whole projection, not per head (must not be fused)
        return F.rms_norm(x, (x.shape[-1],), None, eps)
    return x


class _NormCache(dict):
    """One torch.nn.RMSNorm per config, built outside the compiled code (its weight is set by
    ``build``), like a model's submodule."""

    def __missing__(self, key):
        d, eps, dt, dev = key
        m = torch.nn.RMSNorm(d, eps=eps, device=dev, dtype=dt).requires_grad_(False)
        self[key] = m
        return m


_NN_NORMS = _NormCache()


def _rotate(kind, x, cos, sin, r):
    """Rotate the first r dims of x; cos/sin broadcast against x[..., :r] (or its halves)."""
    d = x.shape[-1]
    xr = x[..., :r] if r < d else x
    if kind == "neox_halves":
        x1, x2 = xr.chunk(2, -1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    elif kind == "rotate_half":
        x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
        out = xr * cos + torch.cat([-x2, x1], -1) * sin
    elif kind == "gptj":
        x1, x2 = xr[..., ::2], xr[..., 1::2]
        out = xr * cos + torch.stack([-x2, x1], -1).flatten(-2) * sin
    elif kind == "gptj_halves":
        x1, x2 = xr[..., ::2], xr[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2)
    else:
        raise ValueError(kind)
    return torch.cat([out, x[..., r:]], -1) if r < d else out


def _expand_for(kind, c):
    """cos/sin of width r/2 -> the width the rope form multiplies with."""
    if kind in ("neox_halves", "gptj_halves"):
        return c
    if kind == "rotate_half":
        return torch.cat([c, c], -1)
    return c.repeat_interleave(2, -1)


def build(f: Form):
    # crc32, not hash(): str hashes change with every process (PYTHONHASHSEED), and a failing
    # form must reproduce with the same inputs
    g = torch.Generator().manual_seed(
        zlib.crc32(repr((f.split, f.norm, f.rope, f.cache, f.table)).encode()) % 2**31)
    dev, dt = f.device, f.dtype
    hq, hkv, d, r = f.hq, f.hkv, f.d, f.r
    gated = f.split.startswith("gated")
    qw_ = hq * d * (2 if gated else 1)
    kvw = hkv * d

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev)

    hidden = 32
    if f.split in ("separate", "packed_linear"):
        x_in = rnd(f.B, f.S, hidden).to(dt)
        widths = (qw_, kvw, kvw) if f.split == "separate" else (qw_ + 2 * kvw,)
        proj = [rnd(w, hidden, scale=0.3).to(dt) for w in widths]
    else:
        x_in = rnd(f.B, f.S, qw_ + 2 * kvw, scale=2.0).to(dt)
        proj = []
    wdt = dt
    qw = (rnd(d, scale=0.3) + (0.0 if f.norm == "gemma" else 1.0)).to(wdt)
    kw = (rnd(d, scale=0.3) + (0.0 if f.norm == "gemma" else 1.0)).to(wdt)
    if f.norm == "nn":  # the module's weight is the Q weight (K shares the module here)
        # Also the float64 modules the oracle's float64 weights select, and those of K's eps.
        for e in {f.eps, f.eps if f.k_eps is None else f.k_eps}:
            for mdt in (wdt, torch.float64):
                # keyed by the device as a tensor reports it ("cuda:0", not "cuda"), as
                # _norm looks it up: else the compiled code builds a module (a graph break)
                m = _NN_NORMS[(d, e, mdt, str(qw.device))]
                with torch.no_grad():
                    m.weight.copy_(qw)
        kw = qw.clone()
    max_pos = 64
    ang = torch.rand(max_pos, r // 2, generator=g).to(dev) * 2 * math.pi
    cos_sin = torch.cat([ang.cos(), ang.sin()], -1)
    pos = torch.randint(0, max_pos, (f.B, f.S), generator=g).to(dev)
    nb, bs = 8, 4
    cache_dt = torch.float8_e4m3fn if f.cache == "fp8" else dt
    if f.cache == "kv_halves":
        kv = rnd(2, nb, bs, hkv, d, scale=50).to(cache_dt)
        caches = [kv]
    elif f.cache == "hnd":
        caches = [rnd(nb, hkv, bs, d, scale=50).to(cache_dt) for _ in range(2)]
    elif f.cache == "static":
        caches = [rnd(f.B, hkv, 16, d, scale=50).to(cache_dt) for _ in range(2)]
    else:
        caches = [rnd(nb, bs, hkv, d, scale=50).to(cache_dt) for _ in range(2)]
    slots = torch.randperm(nb * bs - 1, generator=g)[: f.T].to(dev)  # row n-1 kept free
    if f.negative_slot:
        slots[1] = -1  # PyTorch indexing writes it to the last row; the rewrite must too
    cache_pos = torch.randperm(16, generator=g)[: f.S].to(dev)
    k_scale = torch.tensor(0.5, device=dev)
    v_scale = torch.tensor(2.0, device=dev)
    k_eps = f.eps if f.k_eps is None else f.k_eps

    def fn(x_in, qw, kw, cos_sin, pos, slots, cache_pos, *caches_and_proj):
        ncache = len(caches)
        cs, pj = caches_and_proj[:ncache], caches_and_proj[ncache:]
        B, S = x_in.shape[0], x_in.shape[1]
        # ---- split ----
        if f.split == "separate":
            q, k, v = (F.linear(x_in, w) for w in pj)
        elif f.split == "packed_linear":
            q, k, v = F.linear(x_in, pj[0]).split([qw_, kvw, kvw], -1)
        elif f.split == "split" or f.split == "gated_blocked":
            sizes = [hq * d, hq * d, kvw, kvw] if gated else [qw_, kvw, kvw]
            parts = x_in.split(sizes, -1)
            q, k, v = (parts[0], parts[2], parts[3]) if gated else parts
            gate = parts[1] if gated else None
        elif f.split == "chunk":
            q, k, v = x_in.chunk(3, -1)
        elif f.split == "slice":
            q, k, v = x_in[..., :qw_], x_in[..., qw_: qw_ + kvw], x_in[..., qw_ + kvw:]
        elif f.split == "narrow":
            q, k, v = x_in.narrow(-1, 0, qw_), x_in.narrow(-1, qw_, kvw), x_in.narrow(-1, qw_ + kvw, kvw)
        elif f.split == "gated_interleaved":
            q, k, v = x_in.split([qw_, kvw, kvw], -1)
            q, gate = q.reshape(B, S, hq, 2 * d).chunk(2, -1)
        if f.hf:
            shape = (B, S, -1, d)
        else:
            shape = (B * S, -1, d)
            v = v.reshape(B * S, kvw)
            if f.split != "gated_interleaved":
                q = q.reshape(B * S, -1)
            else:
                q = q.reshape(B * S, hq, d)
            k = k.reshape(B * S, kvw)
        q = q.view(*shape) if f.split != "gated_interleaved" or f.hf else q
        k = k.view(*shape)
        v = v.view(*shape)
        # ---- norm ----
        if f.norm == "olmo2":
            q = _norm("olmo2", q.flatten(-2), None, f.eps).view(q.shape)
            k = _norm("olmo2", k.flatten(-2), None, k_eps).view(k.shape)
        elif f.norm != "none" and not f.rope_first:
            q = _norm(f.norm, q, qw, f.eps)
            k = _norm(f.norm, k, kw, k_eps)
        if f.hf:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # ---- rope tables ----
        if f.table == "computed":  # HF rotary: no table, angles from positions in the graph
            inv = 1.0 / 10000 ** (torch.arange(0, r, 2, dtype=torch.float32, device=pos.device) / r)
            ang = _expand_for(f.rope, pos.to(torch.float32)[..., None] * inv)  # cat(fr, fr)
            c, s = ang.cos().to(q.dtype), ang.sin().to(q.dtype)  # [B, S, r]
            c, s = (c.unsqueeze(1), s.unsqueeze(1)) if f.hf else (c.reshape(B * S, 1, -1), s.reshape(B * S, 1, -1))
        elif f.table == "gathered":
            c, s = cos_sin[pos].chunk(2, -1)  # [B, S, r/2], computed per token like HF
            c, s = _expand_for(f.rope, c).to(q.dtype), _expand_for(f.rope, s).to(q.dtype)
            c, s = (c.unsqueeze(1), s.unsqueeze(1)) if f.hf else (c.reshape(B * S, 1, -1), s.reshape(B * S, 1, -1))
        else:
            p = pos.reshape(-1) if not f.hf else pos
            if f.table == "separate":
                ctab, stab = cos_sin[:, : r // 2], cos_sin[:, r // 2:]
                c, s = ctab[p], stab[p]
            else:
                c, s = cos_sin[p].chunk(2, -1)
            tdt = _f32(q.dtype) if f.rope_fp32 else q.dtype
            c, s = _expand_for(f.rope, c).to(tdt), _expand_for(f.rope, s).to(tdt)
            c, s = (c.unsqueeze(1), s.unsqueeze(1)) if f.hf else (c.unsqueeze(-2), s.unsqueeze(-2))
        q = _rotate(f.rope, q, c, s, r).to(q.dtype)
        k = _rotate(f.rope, k, c, s, r).to(k.dtype)
        if f.rope_first:
            q = _norm(f.norm, q, qw, f.eps)
            k = _norm(f.norm, k, kw, k_eps)
        # ---- cache write ----
        if f.cache != "none":
            kk, vv = k, v
            if f.hf and f.cache != "static":
                kk = kk.transpose(1, 2).reshape(B * S, hkv, d)
                vv = vv.transpose(1, 2).reshape(B * S, hkv, d)
            if f.cache == "fp8":
                kk = (kk / k_scale).to(torch.float8_e4m3fn)
                vv = (vv / v_scale).to(torch.float8_e4m3fn)
            sl = slots
            if f.cache in ("view", "fp8"):
                cs[0].view(-1, hkv, d)[sl] = kk
                cs[1].view(-1, hkv, d)[sl] = vv
            elif f.cache == "index_put":
                cs[0].view(-1, hkv, d).index_put_((sl,), kk)
                cs[1].view(-1, hkv, d).index_put_((sl,), vv)
            elif f.cache == "index_copy":
                cs[0].view(-1, hkv, d).index_copy_(0, sl, kk)
                cs[1].view(-1, hkv, d).index_copy_(0, sl, vv)
            elif f.cache == "nhd":
                cs[0][sl // bs, sl % bs] = kk
                cs[1][sl // bs, sl % bs] = vv
            elif f.cache == "nhd_negoff":  # offsets counted from the block's end: [-bs, -1]
                cs[0][sl // bs, sl % bs - bs] = kk
                cs[1][sl // bs, sl % bs - bs] = vv
            elif f.cache == "hnd":
                cs[0][sl // bs, :, sl % bs] = kk
                cs[1][sl // bs, :, sl % bs] = vv
            elif f.cache == "kv_halves":
                key_cache, value_cache = cs[0].unbind(0)
                key_cache.view(-1, hkv, d)[sl] = kk
                value_cache.view(-1, hkv, d)[sl] = vv
            elif f.cache == "static":
                cs[0].index_copy_(2, cache_pos, kk)
                cs[1].index_copy_(2, cache_pos, vv)
        outs = [q]
        if f.return_k:
            outs.append(k)
        if gated:
            outs.append(torch.sigmoid(gate.reshape(q.shape[0], -1) if not f.hf else gate))
        return tuple(outs)

    args = [x_in, qw, kw, cos_sin, pos, slots, cache_pos, *caches, *proj]
    return fn, args


def clone_args(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def resize_caches(args, blocks, seed=1, dim=0):
    """``args`` with new random caches (same dtype, layout, device) of ``blocks`` blocks in
    dim 0 (an int, or one per cache: K, V): a call that makes Dynamo recompile with a dynamic
    cache size.  The slots stay valid (they index the first 8 * 4 - 1 rows).  ``dim=2``
    resizes a StaticCache's length instead (``max_cache_len``; its positions are below 16)."""
    g = torch.Generator().manual_seed(seed)
    caches = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.dim() >= 4]
    blocks = [blocks] * len(caches) if isinstance(blocks, int) else list(blocks)
    out = list(args)
    for i, nb in zip(caches, blocks):
        a = args[i]
        shape = list(a.shape)
        shape[dim] = nb
        x = torch.randn(shape, generator=g) * 50
        out[i] = x.to(a.device).to(a.dtype)
    return out


def to_float64(args):
    """Inputs in float64 for the oracle (caches too, so nothing rounds)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.element_size() > 1:
            out.append(a.to(torch.float64))
        else:
            out.append(a)
    return out
