"""Sweep the kernel's tile shape (BLOCK_T, BLOCK_H, num_warps) per model shape and T.

One device call prints, for each shape and T, the heuristic's time and the best swept
configuration, as a fraction of the HBM floor.  Use it to retune ``_pick_blocks``.
``--variants`` also sweeps PAIRS (NeoX rope through partner loads on one full-row tile) and
times the op without its gate output (what that copy costs).

    python benchmarks/tune_kernel.py [--tokens 1,64,1024,16384] [--variants]
    python benchmarks/tune_kernel.py --shapes qwen3-next --tokens 65536 --tiles "4,2,4;8,2,4,0,0,1"
"""
import argparse
import itertools
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_op  # noqa: E402
from kernels import triton_kernel  # noqa: E402



def configs(block_d: int) -> list:
    """Tiles of 512..8192 elements; warps so that each thread holds 16..32 elements."""
    out = []
    for bt, bh, w in itertools.product((1, 2, 4, 8), (1, 2, 4, 8, 16), (1, 2, 4, 8)):
        elems = bt * bh * block_d
        if 512 <= elems <= 8192 and 16 <= elems // (32 * w) <= 32:
            out.append((bt, bh, w))
    return out


def gateless(inp, kw, t, hq, d, floor, bw):
    """The gated call without its gate output (what a compiled chain that keeps the gate as a
    view launches) and its floor: ``floor`` less the gate's read and write."""
    def call():
        return bench_op.fused(*inp, **kw, opaque=False, return_gate=False)
    return call, floor - t * hq * d * 2 * 2 / bw * 1e6


def sweep_variants(a, bw) -> None:
    """Per shape and T: the heuristic, the op without its gate output, and every tile of
    ``configs`` with and without PAIRS (NeoX through partner loads) where there is a tail.
    ``--no-gate``: the tiles are swept on the gated shapes' call without the gate output (what
    a compiled chain that keeps the gate as a view launches)."""
    for name in a.shapes.split(","):
        hq, hkv, d, r, gated, _ = bench_op.SHAPES[name]
        cfgs = configs(triton.next_power_of_2(d))
        if a.no_gate and not gated:
            continue
        for t in map(int, a.tokens.split(",")):
            inp, kw, cbytes = bench_op.make_inputs(name, t, False)
            call = lambda: bench_op.fused(*inp, **kw, opaque=False)  # noqa: E731
            triton_kernel.set_block_override(None)
            base = bench_op.bench(call, True, rep=20) * 1e3
            floor = bench_op.floor_bytes(t, hq, hkv, d, r, gated, cbytes) / bw * 1e6
            line = f"{name:11} T={t:6}: heuristic {base:8.2f} us ({floor / base:5.1%})"
            if gated:  # the same op without its gate output: what the gate copy costs
                nog, fl = gateless(inp, kw, t, hq, d, floor, bw)
                us = bench_op.bench(nog, True, rep=20) * 1e3
                line += f"; no gate out {us:.2f} us ({fl / us:.1%})"
            print(line, flush=True)
            if a.no_gate:  # sweep the gate-less call against its own floor
                call, floor = nog, fl
            found = []
            for tile in cfgs:
                for pairs in ((False, True) if r < d else (False,)):
                    triton_kernel.set_block_override((*tile, pairs))
                    try:
                        found.append((bench_op.bench(call, True, rep=20) * 1e3, (*tile, pairs)))
                    except Exception as e:  # a config the compiler rejects
                        print(f"  {tile} failed: {type(e).__name__}: {e}"[:200])
            triton_kernel.set_block_override(None)
            found.sort()
            for us, cfg in found[:a.top]:
                print(f"    {cfg} {us:8.2f} us ({floor / us:5.1%})", flush=True)


def time_tiles(a, bw) -> None:
    """``--tiles``: the heuristic and each given tile, per shape and T; gated shapes also
    without their gate output (what a compiled chain that keeps the gate as a view launches),
    each against its own floor."""
    tiles = [tuple(int(x) for x in t.split(",")) for t in a.tiles.split(";")]
    for name in a.shapes.split(","):
        hq, hkv, d, r, gated, _ = bench_op.SHAPES[name]
        for t in map(int, a.tokens.split(",")):
            inp, kw, cbytes = bench_op.make_inputs(name, t, False)
            floor = bench_op.floor_bytes(t, hq, hkv, d, r, gated, cbytes) / bw * 1e6
            calls = [("", lambda: bench_op.fused(*inp, **kw, opaque=False), floor)]
            if gated:
                calls.append(("no gate out ", *gateless(inp, kw, t, hq, d, floor, bw)))
            for label, call, fl in calls:
                cells = []
                for tile in [None] + tiles:
                    triton_kernel.set_block_override(tile)
                    try:
                        us = bench_op.bench(call, True, rep=20) * 1e3
                        cells.append(f"{tile or 'heuristic'} {us:.2f} ({fl / us:.1%})")
                    except Exception as e:  # a config the compiler rejects
                        cells.append(f"{tile} failed: {type(e).__name__}")
                triton_kernel.set_block_override(None)
                print(f"{name:11} T={t:6} {label}: " + "; ".join(cells), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,64,256,4096,65536")
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--shapes", default=",".join(bench_op.SHAPES))
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--no-gate", action="store_true",
                    help="with --variants: sweep the gated shapes' call without the gate output")
    ap.add_argument("--tiles", help="time these override tuples, ';'-separated: "
                    "BLOCK_T,BLOCK_H,warps[,pairs[,early[,row_tail]]]")
    a = ap.parse_args()
    bw = bench_op.copy_bandwidth()
    if a.tiles:
        return time_tiles(a, bw)
    print(f"# {torch.cuda.get_device_name()} copy {bw / 1e12:.2f} TB/s; "
          f"configs (BLOCK_T, BLOCK_H, warps{', pairs' * a.variants})")
    if a.variants:
        return sweep_variants(a, bw)
    for name in a.shapes.split(","):
        cfgs = configs(triton.next_power_of_2(bench_op.SHAPES[name][2]))
        for t in map(int, a.tokens.split(",")):
            inp, kw, cbytes = bench_op.make_inputs(name, t, False)
            graph = True
            call = lambda: bench_op.fused(*inp, **kw, opaque=False)  # noqa: E731
            triton_kernel.set_block_override(None)
            base = bench_op.bench(call, graph, rep=20) * 1e3
            found = []
            for cfg in cfgs:
                triton_kernel.set_block_override(cfg)
                try:
                    us = bench_op.bench(call, graph, rep=20) * 1e3
                except Exception as e:  # a config the compiler rejects
                    print(f"  {cfg} failed: {type(e).__name__}")
                    continue
                found.append((us, cfg))
            triton_kernel.set_block_override(None)
            floor = bench_op.floor_bytes(t, kw["hq"], kw["hkv"], kw["d"], kw["r"], kw["gated"],
                                         cbytes) / bw * 1e6
            found.sort()
            tops = ", ".join(f"{c} {us:.2f} ({floor / us:.0%})" for us, c in found[:a.top])
            print(f"{name:11} T={t:6}: heuristic {base:8.2f} us ({floor / base:5.1%}); "
                  f"best {tops}", flush=True)


if __name__ == "__main__":
    main()
