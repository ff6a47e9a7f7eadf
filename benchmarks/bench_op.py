"""Attention pre-processing: fused op vs eager PyTorch vs stock torch.compile, one card, one run.

Prints, per (model shape, layout, T): median time of each implementation, the floor (bytes
that must move / measured copy bandwidth), the fused op's fraction of that bandwidth, and
speed-ups against the baselines.  Every implementation is timed as CUDA-graph replays (device
time, no host launch cost).  The floor is the larger of the bytes floor and one empty kernel
launch in a CUDA graph; "copy" is a device copy of the same bytes replayed in a CUDA graph,
the floor as the hardware meets it at small T.

    python benchmarks/bench_op.py [--quick] [--csv out.csv] [--floors 1,16,64,256]
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fusion_pass  # noqa: E402
import kernels  # noqa: E402
from kernels import split_norm_rope_cache  # noqa: E402

SHAPES = {
    # name: (H_q, H_kv, D, rotary_dim, gated, cache dtype)
    "qwen3-8b": (32, 8, 128, 128, False, "bf16"),
    "qwen3-next": (16, 2, 256, 64, True, "fp8"),
    "glm-4.5": (96, 8, 128, 64, False, "bf16"),
}
TOKENS = (1, 16, 64, 256, 1024, 4096, 16384, 65536)
# One cache size for every T (an engine allocates its caches once): a cache that grew with T
# made Dynamo recompile the compiled columns with a symbolic cache size at the largest T.
CACHE_SLOTS = 2 * max(TOKENS)
# Likewise one cos/sin table (a model's max_position_embeddings rows): a table that grew with
# T gave the compiled graph a symbolic table size, whose offsets the pass cannot bound, so its
# large-T branch ran int64 offsets (48 registers against 40 on the H200, ~7% slower).
TABLE_ROWS = max(TOKENS)
# The cos/sin table's dtype: fp32 as SGLang keeps it on CUDA; vLLM casts its cos_sin_cache to
# the model dtype (bf16), which halves the table's bytes (--table-dtype bf16)
TABLE_DTYPE = torch.float32


@torch.library.custom_op("bench::write_cache", mutates_args=("key_cache", "value_cache"))
def write_cache_opaque(k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
                       value_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """vLLM-style opaque in-place cache write (reshape_and_cache_flash stand-in)."""
    h, d = k.shape[-2], k.shape[-1]
    as_bytes = key_cache.dtype.itemsize == 1  # index_copy_ has no fp8 kernel: move bytes
    kc = key_cache.view(torch.uint8) if as_bytes else key_cache
    vc = value_cache.view(torch.uint8) if as_bytes else value_cache
    k = k.to(key_cache.dtype)
    v = v.to(value_cache.dtype)
    kc.view(-1, h, d).index_copy_(0, slots, k.view(torch.uint8) if as_bytes else k)
    vc.view(-1, h, d).index_copy_(0, slots, v.view(torch.uint8) if as_bytes else v)


@write_cache_opaque.register_fake
def _(k, v, key_cache, value_cache, slots):
    return None


def unfused(qkv, qw, kw, cos_sin, pos, kc, vc, slots, k_scale, v_scale, *, hq, hkv, d, r, gated, fp8, opaque,
            hnd):
    """The chain as vLLM/HF models write it: split, per-head norm, NeoX rope, cache write."""
    t = qkv.shape[0]
    qw_, kvw = hq * d * (2 if gated else 1), hkv * d
    q, k, v = qkv.split([qw_, kvw, kvw], -1)
    gate = None
    if gated:
        q, gate = q.view(t, hq, 2 * d).chunk(2, -1)
    q = F.rms_norm(q.reshape(t, hq, d), (d,), qw, 1e-6)
    k = F.rms_norm(k.view(t, hkv, d), (d,), kw, 1e-6)
    cos, sin = cos_sin[pos].chunk(2, -1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rope(x):
        xr, xp = x[..., :r], x[..., r:]
        x1, x2 = xr.chunk(2, -1)
        o = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)
        return torch.cat([o, xp], -1) if r < d else o

    q, k = rope(q), rope(k)
    v = v.view(t, hkv, d)
    kk, vv = k, v
    if fp8:
        kk, vv = (k / k_scale).to(kc.dtype), (v / v_scale).to(vc.dtype)
    if opaque:
        write_cache_opaque(kk, vv, kc, vc, slots)
    elif hnd:
        bs = kc.shape[2]
        blk, off = slots // bs, slots % bs
        kc[blk, :, off] = kk
        vc[blk, :, off] = vv
    else:
        kc.view(-1, hkv, d)[slots] = kk
        vc.view(-1, hkv, d)[slots] = vv
    return q, gate


def fused(qkv, qw, kw, cos_sin, pos, kc, vc, slots, k_scale, v_scale, *, hq, hkv, d, r, gated, fp8, opaque, hnd,
          return_gate=True):
    """``return_gate=False``: the gated call without its gate copy, what a compiled chain that
    keeps the gate as a view launches."""
    out = split_norm_rope_cache(
        qkv, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, gate="interleaved" if gated else None,
        q_weight=qw, k_weight=kw, eps=1e-6, positions=pos, cos_sin_cache=cos_sin,
        key_cache=kc, value_cache=vc, slot_mapping=slots, cache_layout="HND" if hnd else "NHD",
        k_scale=k_scale if fp8 else None, v_scale=v_scale if fp8 else None,
        return_k=False, return_v=False, return_gate=return_gate)
    return out.q, out.gate


def floor_bytes(t, hq, hkv, d, r, gated, cache_bytes, act=2):
    table = TABLE_DTYPE.itemsize  # a token's cos and sin: r values
    read = t * (hq * (2 if gated else 1) + 2 * hkv) * d * act + t * r * table + 2 * t * 8
    write = t * hq * d * act * (2 if gated else 1) + 2 * t * hkv * d * cache_bytes
    return read + write


def launch_floor_us() -> float:
    """One tiny Triton kernel launch, replayed in a CUDA graph: the floor for small T."""
    import triton
    import triton.language as tl

    @triton.jit
    def _touch(x):
        tl.store(x, tl.load(x) + 1)

    x = torch.zeros(1, device="cuda")
    return bench(lambda: _touch[(1,)](x), graph=True) * 1e3


def copy_floor_us(nbytes: int) -> float:
    """A device-to-device copy moving ``nbytes`` in all (half read, half written), replayed in
    a CUDA graph: what the hardware does with the op's bytes and one launch, nothing else."""
    x = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return bench(lambda: y.copy_(x), graph=True) * 1e3


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), graph=False)
    return 2 * x.numel() / (ms * 1e-3)


def bench(fn, graph: bool, rep: int = 50) -> float:
    """Median ms.  ``graph``: CUDA-graph replays, i.e. device time with no host launch cost
    (without it a host-bound call, e.g. the eager entry point, would be timed as the host)."""
    import triton.testing as tt

    if graph:
        return tt.do_bench_cudagraph(fn, rep=rep, return_mode="median")
    return tt.do_bench(fn, warmup=25, rep=2 * rep, return_mode="median")


def make_inputs(name, t, hnd, dev="cuda"):
    hq, hkv, d, r, gated, cdt = SHAPES[name]
    qkv = torch.randn(t, (hq * (2 if gated else 1) + 2 * hkv) * d, device=dev, dtype=torch.bfloat16)
    qw = torch.randn(d, device=dev, dtype=torch.bfloat16)
    kw = torch.randn(d, device=dev, dtype=torch.bfloat16)
    ang = torch.rand(max(TABLE_ROWS, t), r // 2, device=dev) * 2 * math.pi
    cos_sin = torch.cat([ang.cos(), ang.sin()], -1).to(TABLE_DTYPE)
    pos = torch.randint(0, cos_sin.shape[0], (t,), device=dev)
    bs = 16
    nb = max(2 * t, CACHE_SLOTS) // bs
    cdtype = torch.float8_e4m3fn if cdt == "fp8" else torch.bfloat16
    shape = (nb, hkv, bs, d) if hnd else (nb, bs, hkv, d)
    kc = torch.randn(shape, device=dev).to(cdtype)
    vc = torch.randn(shape, device=dev).to(cdtype)
    slots = torch.randperm(nb * bs, device=dev)[:t]
    kwargs = dict(hq=hq, hkv=hkv, d=d, r=r, gated=gated, fp8=cdt == "fp8", hnd=hnd)
    scales = torch.tensor(1.5, device=dev), torch.tensor(0.75, device=dev)
    for x in (qkv, pos, slots):
        torch._dynamo.maybe_mark_dynamic(x, 0)
    return (qkv, qw, kw, cos_sin, pos, kc, vc, slots, *scales), kwargs, 1 if cdt == "fp8" else 2


def host_overhead() -> None:
    """Per-call host time at T=1 with no CUDA graph: the entry point and FusedQKVLayer."""
    from kernels import native_entry
    native = native_entry.start(wait=True)  # the C++ module for remembered calls (CUDA)
    print(f"# native entry (C++): {'on' if native else 'off: ' + native_entry.why_not}")
    inp, kw, _ = make_inputs("qwen3-8b", 1, False)
    for _ in range(50):
        fused(*inp, **kw, opaque=False)
    torch.cuda.synchronize()
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        fused(*inp, **kw, opaque=False)
    torch.cuda.synchronize()
    host_us = (time.perf_counter() - t0) / n * 1e6
    print(f"# eager entry point, T=1, no graph: {host_us:.1f} us/call")
    qkv, pos, slots = inp[0], inp[4], inp[7]
    layer = _layer(inp, kw)
    for _ in range(50):
        layer(qkv, pos, slots)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        layer(qkv, pos, slots)
    torch.cuda.synchronize()
    layer_us = (time.perf_counter() - t0) / n * 1e6
    print(f"# FusedQKVLayer (fixed arguments validated once), T=1, no graph: "
          f"{layer_us:.1f} us/call")
    one_off_signatures()


def _layer(inp: tuple, kw: dict):
    """``FusedQKVLayer`` bound to ``make_inputs``' fixed tensors, as ``fused`` calls the op."""
    _, qw, kw_, cos_sin, _, kc, vc = inp[:7]
    return kernels.FusedQKVLayer(
        num_q_heads=kw["hq"], num_kv_heads=kw["hkv"], head_dim=kw["d"], q_weight=qw,
        k_weight=kw_, eps=1e-6, cos_sin_cache=cos_sin, key_cache=kc, value_cache=vc,
        return_k=False, return_v=False)


def one_off_signatures(lo: int = 66, hi: int = 240) -> None:
    """Host time a call when every call has a new T (eager prefills: no T repeats), T = lo
    to hi - 1, each once, on slices of one input (the slicing counted).  One tile bucket
    (64 <= T < 256), whose kernel variants (T divisible by 16 or not, with the register
    budget) are compiled by calls at T = 64, 65, 240 and 241 before: no compile in the
    loop."""
    big, kwb, _ = make_inputs("qwen3-8b", 242, False)
    qkv, qw, kw_, cos_sin, pos, kc, vc, slots, ks, vs = big

    def entry(t):
        fused(qkv[:t], qw, kw_, cos_sin, pos[:t], kc, vc, slots[:t], ks, vs, **kwb,
              opaque=False)

    layer = _layer(big, kwb)
    times = []
    for fn in (entry, lambda t: layer(qkv[:t], pos[:t], slots[:t])):
        for t in (64, 65, 240, 241):
            fn(t)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for t in range(lo, hi):
            fn(t)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / (hi - lo) * 1e6)
    print(f"# a new T every call (T = {lo}..{hi - 1}, each once), no graph: entry point "
          f"{times[0]:.1f} us/call, FusedQKVLayer {times[1]:.1f} us/call")


def print_floors(args, bw: float, launch_us: float) -> None:
    """The fused op beside its floors: bytes / copy bandwidth, one empty launch, and a copy of
    the same bytes in a CUDA graph (the last is what any kernel moving them takes).  With
    ``--max-regs``, one column of the op per register budget, timed side by side."""
    from kernels import triton_kernel
    budgets = _budgets(args.max_regs) if args.max_regs else [triton_kernel._EARLY_MAX_REGS]
    cols = " ".join(f"{'fused' if len(budgets) == 1 else f'r={b}':>7}" for b in budgets)
    print(f"{'shape':11} {'T':>6} | {cols} {'bytes':>7} {'launch':>7} {'copy':>7} | "
          f"{'fused/copy':>10}")
    for name in args.shapes.split(","):
        for t in map(int, args.floors.split(",")):
            inp, kw, cbytes = make_inputs(name, t, False)
            times = []
            for b in budgets:
                triton_kernel._EARLY_MAX_REGS = triton_kernel._LATE_MAX_REGS = b
                times.append(bench(lambda: fused(*inp, **kw, opaque=False), True) * 1e3)
            fb = floor_bytes(t, kw["hq"], kw["hkv"], kw["d"], kw["r"], kw["gated"], cbytes)
            cp = copy_floor_us(fb)
            print(f"{name:11} {t:>6} | {' '.join(f'{us:7.2f}' for us in times)} "
                  f"{fb / bw * 1e6:7.2f} {launch_us:7.2f} {cp:7.2f} | "
                  f"{min(times) / cp:10.2f}", flush=True)


def _budgets(spec: str) -> list[Optional[int]]:
    return [None if b == "none" else int(b) for b in spec.split(",")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer T, NHD only")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--host", action="store_true", help="only the host-overhead lines")
    ap.add_argument("--floors", default=None, metavar="T,T,...",
                    help="only the fused op against its floors at these T (NHD)")
    ap.add_argument("--tokens", default=None, metavar="T,T,...", help="these T only")
    ap.add_argument("--layouts", default="NHD,HND")
    ap.add_argument("--table-dtype", default="fp32", choices=("fp32", "bf16"),
                    help="the cos/sin table's dtype (fp32: SGLang's; bf16: vLLM's)")
    ap.add_argument("--repeats", type=int, default=1, metavar="N",
                    help="time every implementation N times, round by round, each a fresh "
                    "CUDA-graph capture, and report the median (a capture's timing of one "
                    "call at T = 65536 moved by 5%% from one capture to the next)")
    ap.add_argument("--tile", default=None, metavar="BT,BH,W[,pairs[,early[,row_tail]]]",
                    help="force this tile on every launch, the op's and the pass's")
    ap.add_argument("--int64", action="store_true",
                    help="int64 element offsets on every launch (_INDEX32 off; by default "
                    "launches whose offsets fit run int32 ones)")
    ap.add_argument("--max-regs", default=None, metavar="N|none[,...]",
                    help="ptxas's register budget of the launches that take one (small T, "
                    "and mid T on small grids): triton_kernel._EARLY_MAX_REGS and "
                    "_LATE_MAX_REGS; with --floors, a list timed side by side")
    args = ap.parse_args()
    global TABLE_DTYPE
    TABLE_DTYPE = torch.bfloat16 if args.table_dtype == "bf16" else torch.float32
    from kernels import triton_kernel
    if args.max_regs and not args.floors:
        if "," in args.max_regs:
            ap.error("--max-regs takes a list only with --floors")
        triton_kernel._EARLY_MAX_REGS = triton_kernel._LATE_MAX_REGS = \
            _budgets(args.max_regs)[0]
    if args.int64:
        triton_kernel._INDEX32 = False
    if args.tile:
        triton_kernel.set_block_override(tuple(int(x) for x in args.tile.split(",")))
    torch.manual_seed(0)
    # Every (shape, layout, flags) is its own graph of one function: let dynamo keep them all.
    torch._dynamo.config.recompile_limit = 1024
    # Cache hits across implementations would hand the stock graph to the "+pass" column.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    torch._dynamo.config.accumulated_recompile_limit = 4096
    bw = copy_bandwidth()
    launch_us = launch_floor_us()
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"triton {__import__('triton').__version__}  copy bandwidth {bw / 1e12:.2f} TB/s  "
          f"empty launch in a CUDA graph {launch_us:.2f} us  offsets "
          f"{'int32 where they fit' if triton_kernel._INDEX32 else 'int64'}  small-T "
          f"register budget {args.max_regs or triton_kernel._EARLY_MAX_REGS} (mid T: "
          f"{args.max_regs or triton_kernel._LATE_MAX_REGS})  table "
          f"{args.table_dtype}"
          f"{'  tile ' + args.tile if args.tile else ''}")
    if args.floors:
        return print_floors(args, bw, launch_us)
    host_overhead()
    if args.host:
        return
    tokens = (1, 64, 1024, 16384) if args.quick else TOKENS
    if args.tokens:
        tokens = tuple(int(t) for t in args.tokens.split(","))
    layouts = (False,) if args.quick else tuple(x == "HND" for x in args.layouts.split(","))
    hdr = (f"{'shape':11} {'lay':3} {'T':>6} | {'eager':>8} {'compile':>8} {'c+opaque':>8} "
           f"{'fused':>7} {'+pass':>7} {'floor':>7} {'copy':>7} | {'%bw':>5} {'x eager':>7} "
           f"{'x comp':>6} {'x opq':>6} {'pass/opq':>8}")
    print(hdr)
    out = open(args.csv, "w", newline="") if args.csv else None
    writer = None
    for hnd in layouts:  # all NHD rows first: a run cut short still has them
        for name in args.shapes.split(","):
            torch._dynamo.reset()
            # Token dims dynamic (maybe_mark_dynamic in make_inputs), caches static: as engines do.
            comp = torch.compile(unfused)
            with_pass = torch.compile(unfused, backend=fusion_pass.make_backend())
            for t in tokens:
                inp, kw, cbytes = make_inputs(name, t, hnd)
                graph = True  # CUDA-graph replays: device time without host launch cost
                times: dict = {}
                # --repeats: rounds over all implementations, each timing a fresh capture
                for _ in range(args.repeats):
                    for label, fn, extra in (("eager", unfused, dict(opaque=False)),
                                             ("compile", comp, dict(opaque=False)),
                                             ("c+opaque", comp, dict(opaque=True)),
                                             ("fused", fused, dict(opaque=False)),
                                             ("pass", with_pass, dict(opaque=False))):
                        call = lambda: fn(*inp, **kw, **extra)  # noqa: E731
                        try:
                            call()
                            torch.cuda.synchronize()
                            us = bench(call, graph) * 1e3
                        except Exception as e:  # a baseline that cannot run: reported, not fatal
                            print(f"  {label} failed: {type(e).__name__}: {str(e)[:120]}")
                            us = float("nan")
                        times.setdefault(label, []).append(us)
                res = {k: statistics.median(v) for k, v in times.items()}
                fb = floor_bytes(t, kw["hq"], kw["hkv"], kw["d"], kw["r"], kw["gated"], cbytes)
                floor_us = max(fb / bw * 1e6, launch_us)
                copy_us = copy_floor_us(fb)
                pct = floor_us / res["fused"] * 100
                row = dict(shape=name, layout="HND" if hnd else "NHD", T=t, floor_us=floor_us,
                           copy_us=copy_us, bw_frac=pct / 100,
                           **{k + "_us": v for k, v in res.items()})
                if out is not None:  # row by row: a run cut short keeps what it measured
                    if writer is None:
                        writer = csv.DictWriter(out, fieldnames=list(row.keys()))
                        writer.writeheader()
                    writer.writerow(row)
                    out.flush()
                print(f"{name:11} {'HND' if hnd else 'NHD':3} {t:>6} | {res['eager']:8.2f} "
                      f"{res['compile']:8.2f} {res['c+opaque']:8.2f} {res['fused']:7.2f} "
                      f"{res['pass']:7.2f} {floor_us:7.2f} {copy_us:7.2f} | {pct:5.1f} "
                      f"{res['eager'] / res['fused']:7.2f} {res['compile'] / res['fused']:6.2f} "
                      f"{res['c+opaque'] / res['fused']:6.2f} {res['c+opaque'] / res['pass']:8.2f}",
                      flush=True)
    if out is not None:
        out.close()


if __name__ == "__main__":
    main()
