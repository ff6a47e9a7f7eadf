"""How fast can the op's own loads and stores go, with no arithmetic?  (GPU, CUDA graphs.)

    python benchmarks/movement_floor.py [--cases glm-4.5:64,glm-4.5:256,qwen3-8b:64]

At small T the op is latency-bound, and a plain copy of its bytes (``copy``, as in
``bench_op.py``) moves them contiguously, which the op cannot: it reads head rows of the
projection and writes K/V rows to scattered cache slots.  This times, side by side, us a
launch:

- ``op``: the op's launch (the entry point's, as ``bench_op.py``'s ``fused``);
- ``op, no positions``: the same launch with ``HAS_POS`` off (the table row is the token's
  index), so the cos/sin load does not wait for the positions load: what that dependent
  round trip costs;
- ``move``: a kernel that does only the op's data movement, with the op's tile and grid:
  each program loads its (token, head) rows of Q, K or V and stores them to the Q output or
  to the cache rows its tokens' slots select; no norm, no rope, no table;
- ``+norm``: ``move`` with the RMS norm's reduction and scaling (fp32) on every row;
- ``move best``, ``+norm best``: the fastest ``move`` / ``+norm`` over tiles of 1-4 tokens,
  1-8 heads and 1-8 warps (its tile printed);
- ``+norm +table best``: ``+norm best`` whose Q and K rows also load the op's table bytes
  (the ``rotary_dim`` values of the row the token's position selects: a load that waits for
  the positions load) and scale their rotary columns by them, with no rope partner;
- ``row rope``, ``row rope best``: the op's whole work (norm, NeoX rope from the table,
  Q out, K/V to the cache) on whole-row tiles (``_rope_kernel``), its rope partners taken
  from a reshape of the row (a layout conversion through shared memory on sm_90): in the
  op's tile and the best of ``ROPE_TILES``; checked against the op first;
- ``copy``: a contiguous device-to-device copy of the op's bytes.

``op - +norm`` is what the rope, the cos/sin table and the op's own layout cost; ``move best``
is a floor for any kernel of this op's layout on this card, ``+norm best`` one for any that
also normalises each row in one pass.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

os.environ.setdefault("FUSED_QKV_NATIVE", "0")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from arg_cost import recorded_launch  # noqa: E402
from bench_op import bench, copy_floor_us, floor_bytes, make_inputs, SHAPES  # noqa: E402

from kernels import triton_kernel as tk  # noqa: E402


@triton.jit
def _rows(src, src_off, dst, dst_off, m, d, D: tl.constexpr, NORM: tl.constexpr, table=None,
          row=None, R: tl.constexpr = 0):
    """NORM: 1 with the RMS norm, 2 also scaled by the table's row ``row`` (a load that
    waits for the positions' load: the op's dependent round trip, with no rope exchange)."""
    x = tl.load(src + src_off[:, None] + d[None, :], mask=m[:, None])
    if NORM:
        xf = x.to(tl.float32)
        if NORM == 2:
            # R values a row, as the op's cos and sin halves; unrotated columns read none
            xf = xf * tl.load(table + row[:, None] * R + d[None, :],
                              mask=m[:, None] & (d < R)[None, :], other=1.0)
        xf = xf * tl.rsqrt(tl.sum(xf * xf, axis=1) / D + 1e-6)[:, None]
        x = xf.to(dst.dtype.element_ty)
    tl.store(dst + dst_off[:, None] + d[None, :], x, mask=m[:, None])


@triton.jit
def _move(qkv, q_out, k_cache, v_cache, slots, pos, table, T, stride,
          HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
          BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, NQB: tl.constexpr, NKB: tl.constexpr,
          NORM: tl.constexpr):
    """The op's grid (one axis, head tiles fastest) and row movement, NHD caches."""
    pid = tl.program_id(0)
    pid_t = pid // (NQB + 2 * NKB)
    pid_h = pid % (NQB + 2 * NKB)
    r = tl.arange(0, BLOCK_T * BLOCK_H)
    d = tl.arange(0, D)
    t = pid_t * BLOCK_T + r // BLOCK_H
    if pid_h < NQB:
        h = pid_h * BLOCK_H + r % BLOCK_H
        m = (t < T) & (h < HQ)
        row = tl.load(pos + t, mask=m, other=0) if NORM == 2 else t
        _rows(qkv, t * stride + h * D, q_out, (t * HQ + h) * D, m, d, D, NORM, table, row, R)
    else:
        kv = pid_h - NQB
        is_v = (kv >= NKB).to(tl.int32)
        h = (kv - NKB * is_v) * BLOCK_H + r % BLOCK_H
        m = (t < T) & (h < HKV)
        slot = tl.load(slots + t, mask=m, other=0)
        row = tl.load(pos + t, mask=m, other=0) if NORM == 2 else t
        dst_off = (slot * HKV + h) * D
        src_off = t * stride + (HQ + HKV * is_v) * D + h * D
        if is_v == 1:
            _rows(qkv, src_off, v_cache, dst_off, m, d, D, False)
        else:
            _rows(qkv, src_off, k_cache, dst_off, m, d, D, NORM, table, row, R)


@triton.jit
def _norm_rope_row(src, src_off, dst, dst_off, m, d, w_ptr, cos_ptr, row, j,
                   D: tl.constexpr, R: tl.constexpr):
    """One-pass RMS norm and NeoX rope on whole-row tiles: each element's rope partner comes
    from a reshape of the row (within the warp), not from a second tile or load."""
    HALF: tl.constexpr = R // 2
    NB: tl.constexpr = D // R  # rotary block, then tail blocks of R columns
    rows: tl.constexpr = src_off.shape[0]
    c = tl.load(cos_ptr + row[:, None] * R + j[None, :], mask=m[:, None], other=1.0)
    sn = tl.load(cos_ptr + row[:, None] * R + HALF + j[None, :], mask=m[:, None], other=0.0)
    w = tl.load(w_ptr + d).to(tl.float32)
    x = tl.load(src + src_off[:, None] + d[None, :], mask=m[:, None]).to(tl.float32)
    x = x * (tl.rsqrt(tl.sum(x * x, axis=1) / D + 1e-6)[:, None] * w[None, :])
    x4 = tl.permute(tl.reshape(x, [rows, NB, 2, HALF]), (0, 1, 3, 2))
    lo, hi = tl.split(x4)  # [rows, NB, HALF]: first and second half of each block
    blk = tl.arange(0, NB)[None, :, None]
    cb = tl.where(blk == 0, c[:, None, :], 1.0)
    sb = tl.where(blk == 0, sn[:, None, :], 0.0)
    y = tl.join(lo * cb - hi * sb, hi * cb + lo * sb)
    x = tl.reshape(tl.permute(y, (0, 1, 3, 2)), [rows, D])
    tl.store(dst + dst_off[:, None] + d[None, :], x.to(dst.dtype.element_ty), mask=m[:, None])


@triton.jit
def _rope_kernel(qkv, q_out, k_cache, v_cache, slots, pos, table, qw, kw, T, stride,
                 HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, NQB: tl.constexpr,
                 NKB: tl.constexpr):
    """The op's work (NeoX, NHD caches, K/V only to the cache) on whole-row tiles."""
    pid = tl.program_id(0)
    pid_t = pid // (NQB + 2 * NKB)
    pid_h = pid % (NQB + 2 * NKB)
    r = tl.arange(0, BLOCK_T * BLOCK_H)
    d = tl.arange(0, D)
    j = tl.arange(0, R // 2)
    t = pid_t * BLOCK_T + r // BLOCK_H
    if pid_h < NQB:
        h = pid_h * BLOCK_H + r % BLOCK_H
        m = (t < T) & (h < HQ)
        row = tl.load(pos + t, mask=m, other=0)
        _norm_rope_row(qkv, t * stride + h * D, q_out, (t * HQ + h) * D, m, d, qw, table, row,
                       j, D, R)
    elif pid_h < NQB + NKB:
        h = (pid_h - NQB) * BLOCK_H + r % BLOCK_H
        m = (t < T) & (h < HKV)
        row = tl.load(pos + t, mask=m, other=0)
        slot = tl.load(slots + t, mask=m, other=0)
        _norm_rope_row(qkv, t * stride + (HQ + h) * D, k_cache, (slot * HKV + h) * D, m, d, kw,
                       table, row, j, D, R)
    else:
        h = (pid_h - NQB - NKB) * BLOCK_H + r % BLOCK_H
        m = (t < T) & (h < HKV)
        slot = tl.load(slots + t, mask=m, other=0)
        _rows(qkv, t * stride + (HQ + HKV + h) * D, v_cache, (slot * HKV + h) * D, m, d, D,
              False)


def _geometry(inp, kw, block_t, block_h) -> tuple:
    """(Q output, Q head tiles, K (= V) head tiles, grid) of the op's grid for this tile."""
    qkv, t = inp[0], inp[0].shape[0]
    q_out = torch.empty(t, kw["hq"], kw["d"], device=qkv.device, dtype=qkv.dtype)
    nqb, nkb = triton.cdiv(kw["hq"], block_h), triton.cdiv(kw["hkv"], block_h)
    return q_out, nqb, nkb, (triton.cdiv(t, block_t) * (nqb + 2 * nkb),)


def _slot_rows(cache, slots) -> torch.Tensor:
    """The cache rows ``slots`` select, one row of heads x D per slot (NHD)."""
    return cache.view(cache.shape[0] * cache.shape[1], -1)[slots]


def rope_call(inp, kw, block_t, block_h, warps):
    """(launch, its Q output) of ``_rope_kernel``: the op's work, whole-row tiles."""
    qkv, qw, kw_, cos_sin, pos, kc, vc, slots = inp[:8]
    q_out, nqb, nkb, grid = _geometry(inp, kw, block_t, block_h)

    def call():
        _rope_kernel[grid](qkv, q_out, kc, vc, slots, pos, cos_sin, qw, kw_, qkv.shape[0],
                           qkv.stride(0), HQ=kw["hq"], HKV=kw["hkv"], D=kw["d"], R=kw["r"],
                           BLOCK_T=block_t, BLOCK_H=block_h, NQB=nqb, NKB=nkb,
                           num_warps=warps)
    return call, q_out


def check_rope(inp, kw, tile) -> None:
    """``_rope_kernel`` writes what the op writes (bf16 rounding apart)."""
    from bench_op import fused
    kc, vc, slots = inp[5], inp[6], inp[7]
    want_q, _ = fused(*inp, **kw, opaque=False)
    want_k, want_v = _slot_rows(kc, slots).float(), _slot_rows(vc, slots).float()
    kc.normal_(), vc.normal_()
    call, q_out = rope_call(inp, kw, *tile)
    q_out.fill_(float("nan"))
    call()
    torch.testing.assert_close(q_out.float(), want_q.float().view_as(q_out), atol=0.05, rtol=0.02)
    torch.testing.assert_close(_slot_rows(kc, slots).float(), want_k, atol=0.05, rtol=0.02)
    assert torch.equal(_slot_rows(vc, slots).float(), want_v)


ROPE_TILES = [(1, 8, 4), (2, 8, 4), (2, 8, 8), (4, 8, 4), (4, 8, 8), (1, 8, 8), (2, 4, 4),
              (4, 4, 4), (8, 8, 8)]


def move_call(inp, kw, block_t, block_h, warps, norm):
    """(launch, its Q output) of ``_move`` on ``bench_op.make_inputs``' inputs."""
    qkv, _, _, table, pos, kc, vc, slots = inp[:8]
    q_out, nqb, nkb, grid = _geometry(inp, kw, block_t, block_h)

    def call():
        _move[grid](qkv, q_out, kc, vc, slots, pos, table, qkv.shape[0], qkv.stride(0),
                    HQ=kw["hq"], HKV=kw["hkv"], D=kw["d"], R=kw["r"], BLOCK_T=block_t,
                    BLOCK_H=block_h, NQB=nqb, NKB=nkb, NORM=int(norm), num_warps=warps)
    return call, q_out


def check_move(inp, kw, tile) -> None:
    """``move`` writes Q and the slots' cache rows as they are in the projection."""
    qkv, _, _, _, _, kc, vc, slots = inp[:8]
    hq, hkv, d = kw["hq"], kw["hkv"], kw["d"]
    kc.normal_(), vc.normal_()
    call, q_out = move_call(inp, kw, *tile, False)
    q_out.fill_(float("nan"))
    call()
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=1)
    assert torch.equal(q_out.flatten(1), q)
    assert torch.equal(_slot_rows(kc, slots), k)
    assert torch.equal(_slot_rows(vc, slots), v)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="glm-4.5:64,glm-4.5:256,qwen3-8b:64")
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  triton "
          f"{triton.__version__}  CUDA-graph replays, us a launch (medians)\n")
    print("| shape | T | op | op, no positions | move | +norm | move best (T, H, warps) "
          "| +norm best | +norm +table best | row rope | row rope best | copy |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case in a.cases.split(","):
        shape, t = case.split(":")
        t = int(t)
        inp, kw, cbytes = make_inputs(shape, t, False)
        assert not kw["gated"] and not kw["fp8"], "NHD bf16 shapes only"
        grid, params, opts = recorded_launch(inp, dict(kw, opaque=False))
        tile = (params["BLOCK_T"], params["BLOCK_H"], opts["num_warps"])
        check_move(inp, kw, tile)
        op = bench(lambda: tk.fused_qkv_kernel[grid](**params, **opts), graph=True) * 1e3
        # the op with positions=None: the table row is the token's own index, so the table
        # load does not wait for a positions load first
        params_np = dict(params, HAS_POS=False)  # (the table has at least T rows)
        nopos = bench(lambda: tk.fused_qkv_kernel[grid](**params_np, **opts), graph=True) * 1e3
        move = bench(move_call(inp, kw, *tile, False)[0], graph=True) * 1e3
        norm = bench(move_call(inp, kw, *tile, True)[0], graph=True) * 1e3
        tiles = list(itertools.product((1, 2, 4), (1, 2, 4, 8), (1, 2, 4, 8)))
        best, nbest, tbest = (min((bench(move_call(inp, kw, *tl_, nm)[0], graph=True) * 1e3,
                                   tl_) for tl_ in tiles) for nm in (0, 1, 2))
        check_rope(inp, kw, tile)
        rope = bench(rope_call(inp, kw, *tile)[0], graph=True) * 1e3
        rbest = min((bench(rope_call(inp, kw, *tl_)[0], graph=True) * 1e3, tl_)
                    for tl_ in ROPE_TILES)
        hq, hkv, d, r, gated, _ = SHAPES[shape]
        copy = copy_floor_us(floor_bytes(t, hq, hkv, d, r, gated, cbytes))
        print(f"| {shape} | {t} | {op:.2f} | {nopos:.2f} | {move:.2f} | {norm:.2f} "
              f"| {best[0]:.2f} {best[1]} | {nbest[0]:.2f} {nbest[1]} | {tbest[0]:.2f} {tbest[1]} "
              f"| {rope:.2f} | {rbest[0]:.2f} {rbest[1]} | {copy:.2f} |", flush=True)


if __name__ == "__main__":
    main()
