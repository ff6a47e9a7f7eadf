"""Random test cases for the fused op: one config -> fresh random op arguments.

Shared by the kernel tests and the fuzzers.  Inputs are never zeros; caches start poisoned
with random values so that a stray write, or a missed one, shows.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from kernels.op_schema import LAYOUT_HND, LAYOUT_NHD, fp8_dtype_of

TABLE_FORMS = ("cos_sin_cache", "front", "expanded", "gathered_front", "gathered_expanded")


@dataclasses.dataclass
class Case:
    T: int = 7
    hq: int = 4
    hkv: int = 2
    d: int = 64
    rotary_dim: Optional[int] = None  # None: d
    is_neox: bool = True
    gate: int = 0  # 0 none, 1 interleaved, 2 blocked
    norm: Optional[float] = 0.0  # weight offset; None: no norm
    has_weight: bool = True
    eps: float = 1e-6
    table: str = "cos_sin_cache"
    table_dtype: torch.dtype = torch.float32
    dtype: torch.dtype = torch.bfloat16
    separate: bool = False
    row_pad: int = 0  # extra columns per row of the activation: any row stride
    cache: bool = True
    layout: int = LAYOUT_NHD
    shared_base: bool = False  # caches are the two halves of one [2, ...] tensor
    block_size: int = 4
    num_blocks: int = 5
    cache_dtype: str = "auto"  # auto, fp8_e4m3, fp8_e5m2, uint8_e4m3, uint8_e5m2
    scales: bool = True
    skip_negative: bool = True
    bad_slots: bool = True  # include -1 and a slot past the end
    # With bad_slots: the negative slot is ``perm[1] - num_slots`` (in [-n, -1]) instead of -1,
    # so that in indexing mode it wraps onto a slot no other token uses.  Duplicate slots have no
    # defined write order on the GPU, so the fuzzers (which compare with the reference) need this.
    unique_slots: bool = False
    idx_dtype: torch.dtype = torch.int64
    writes: tuple = (True, True, True, True)

    @property
    def r(self) -> int:
        return self.d if self.rotary_dim is None else self.rotary_dim


def _cache_tensor(c: Case, device) -> tuple[torch.Tensor, torch.Tensor, str]:
    if c.layout == LAYOUT_NHD:
        shape = (c.num_blocks, c.block_size, c.hkv, c.d)
    else:
        shape = (c.num_blocks, c.hkv, c.block_size, c.d)
    kv_dtype_str = "auto"
    if c.cache_dtype == "auto":
        dt = c.dtype
    elif c.cache_dtype.startswith("uint8"):
        dt = torch.uint8
        kv_dtype_str = "fp8_e4m3" if c.cache_dtype.endswith("e4m3") else "fp8_e5m2"
    else:
        dt = torch.float8_e4m3fn if c.cache_dtype == "fp8_e4m3" else torch.float8_e5m2
    if c.shared_base:
        base = torch.randn((2,) + shape, device=device).mul_(50)
        kc, vc = base[0], base[1]
    else:
        kc = torch.randn(shape, device=device).mul_(50)
        vc = torch.randn(shape, device=device).mul_(50)
    if dt == torch.uint8:
        fp8 = fp8_dtype_of(dt, kv_dtype_str)
        kc, vc = kc.to(fp8).view(torch.uint8), vc.to(fp8).view(torch.uint8)
        if c.shared_base:  # keep them views of one storage
            base = torch.stack([kc, vc])
            kc, vc = base[0], base[1]
    else:
        if c.shared_base:
            base = base.to(dt)
            kc, vc = base[0], base[1]
        else:
            kc, vc = kc.to(dt), vc.to(dt)
    return kc, vc, kv_dtype_str


def _slots(c: Case, device) -> torch.Tensor:
    n = c.num_blocks * c.block_size
    assert c.T <= n, "case needs more cache slots (randperm(n)[:T] gives at most n)"
    perm = torch.randperm(n)[: c.T]
    if c.bad_slots and c.T >= 3:
        perm[1] = perm[1] - n if c.unique_slots else -1
        perm[c.T // 2 + 1] = n + 3  # past the end
    return perm.to(device=device, dtype=c.idx_dtype)


def make_args(c: Case, device="cpu") -> tuple:
    """The op's low-level argument tuple for split_norm_rope_cache (or split_norm_rope)."""
    q_width = c.hq * c.d * (2 if c.gate else 1)
    kv_width = c.hkv * c.d
    if c.separate:
        srcs = []
        for w in (q_width, kv_width, kv_width):
            full = torch.randn(c.T, w + c.row_pad, device=device).mul_(2).to(c.dtype)
            srcs.append(full[:, :w])
        q_src, k_src, v_src = srcs
        cols = (0, 0, 0)
    else:
        full = torch.randn(c.T, q_width + 2 * kv_width + c.row_pad, device=device)
        q_src = k_src = v_src = full.mul_(2).to(c.dtype)[:, : q_width + 2 * kv_width]
        cols = (0, q_width, q_width + kv_width)
    if c.norm is None:
        qw = kw = None
        apply_norm, offset = False, 0.0
    else:
        apply_norm, offset = True, c.norm
        if c.has_weight:
            center = 1.0 - offset
            qw = (torch.randn(c.d, device=device) * 0.3 + center).to(c.dtype)
            kw = (torch.randn(c.d, device=device) * 0.3 + center).to(c.dtype)
        else:
            qw = kw = None
    r = c.r
    max_pos = 64
    gathered = c.table.startswith("gathered")
    rows = c.T if gathered else max_pos
    ang = torch.rand(rows, r // 2, device=device) * 2 * math.pi
    cos_h, sin_h = ang.cos(), ang.sin()
    positions = None if gathered else torch.randint(0, max_pos, (c.T,), device=device,
                                                     dtype=c.idx_dtype)
    if c.table == "cos_sin_cache":
        tab = torch.cat([cos_h, sin_h], -1).to(c.table_dtype)
        cos, sin, expanded = tab[:, : r // 2], tab[:, r // 2:], False
    elif c.table.endswith("front"):
        cos, sin, expanded = cos_h.to(c.table_dtype), sin_h.to(c.table_dtype), False
    else:
        if c.is_neox:
            cos, sin = torch.cat([cos_h, cos_h], -1), torch.cat([sin_h, sin_h], -1)
        else:
            cos, sin = cos_h.repeat_interleave(2, -1), sin_h.repeat_interleave(2, -1)
        cos, sin, expanded = cos.to(c.table_dtype), sin.to(c.table_dtype), True
    head = (q_src, k_src, v_src, *cols, c.hq, c.hkv, c.d, c.gate, qw, kw, apply_norm, c.eps,
            offset, cos, sin, positions, r, c.is_neox, expanded)
    if not c.cache:
        return head + tuple(c.writes)
    kc, vc, kvs = _cache_tensor(c, device)
    fp8 = fp8_dtype_of(kc.dtype, kvs)
    ks = vs = None
    if fp8 is not None and c.scales:
        ks = torch.tensor(0.7, device=device)
        vs = torch.tensor(1.9, device=device)
    return head + (kc, vc, _slots(c, device), c.layout, c.skip_negative, kvs, ks, vs,
                   *c.writes)


CACHE_ARGS = slice(21, 23)  # key_cache, value_cache positions in the cache op's args


def clone_args(args: tuple) -> tuple:
    """Deep-copy the caches (the only mutated args), keeping shared-base views shared."""
    out = list(args)
    kc, vc = args[21], args[22]
    if kc._base is not None and kc._base is vc._base:
        base = kc._base.clone()
        out[21] = base.as_strided(kc.shape, kc.stride(), kc.storage_offset())
        out[22] = base.as_strided(vc.shape, vc.stride(), vc.storage_offset())
    else:
        out[21], out[22] = kc.clone(), vc.clone()
    return tuple(out)


def written_rows(args: tuple) -> torch.Tensor:
    """Bool [num_blocks, block_size]: which cache rows the op must write."""
    kc, slots, layout, skip_neg = args[21], args[23], args[24], args[25]
    nb = kc.shape[0]
    bs = kc.shape[1] if layout == LAYOUT_NHD else kc.shape[2]
    n = nb * bs
    s = slots.long().cpu()
    if not skip_neg:
        s = torch.where(s < 0, s + n, s)
    s = s[(s >= 0) & (s < n)]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[s] = True
    return mask.view(nb, bs)
