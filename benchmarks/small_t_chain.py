"""Where the op's small-T time goes: the positions -> cos/sin rows dependent load.

    python benchmarks/small_t_chain.py [--shapes glm-4.5,qwen3-8b] [--tokens 1,16,64,256]

At small T a launch is latency, not bandwidth.  A copy of the op's bytes waits for one
memory round trip; the op (vLLM form) waits for two: it reads each token's position, and only
then the cos/sin row that position selects.  This script times, side by side in CUDA graphs
on one card, NHD:

- ``op``: the vLLM form (``positions`` + ``cos_sin_cache``), as ``bench_op.py``'s ``fused``;
- ``per-token``: the same call with the tables already gathered per token (the Hugging Face
  form: ``cos``/``sin`` ``[T, r/2]``, no positions): the same bytes, one round trip fewer;
- ``copy``: a device-to-device copy of the op's bytes (``bench_op.copy_floor_us``).

``op - per-token`` is what the dependent load costs; ``per-token / copy`` what the rest of
the op (norm, rope, the slot -> cache-row address) costs over a copy.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_op import bench, copy_floor_us, floor_bytes, fused, make_inputs  # noqa: E402

import kernels  # noqa: E402


def per_token(inp, kw):
    """``fused`` with the cos/sin rows gathered beforehand: no positions in the kernel."""
    qkv, qw, kw_, cos_sin, pos, kc, vc, slots, k_scale, v_scale = inp
    r, fp8 = kw["r"], kw["fp8"]
    cos = cos_sin[pos, : r // 2].contiguous()
    sin = cos_sin[pos, r // 2: r].contiguous()

    def call():
        out = kernels.split_norm_rope_cache(
            qkv, num_q_heads=kw["hq"], num_kv_heads=kw["hkv"], head_dim=kw["d"],
            gate="interleaved" if kw["gated"] else None, q_weight=qw, k_weight=kw_, eps=1e-6,
            cos=cos, sin=sin, rotary_dim=r, key_cache=kc, value_cache=vc,
            slot_mapping=slots, k_scale=k_scale if fp8 else None,
            v_scale=v_scale if fp8 else None, return_k=False, return_v=False)
        return out.q, out.gate
    return call


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="glm-4.5,qwen3-8b,qwen3-next")
    ap.add_argument("--tokens", default="1,16,64,256")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; medians reported")
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  triton "
          f"{__import__('triton').__version__}  NHD, CUDA-graph replays, us, median of "
          f"{a.repeats} rounds")
    print(f"{'shape':11} {'T':>5} | {'op':>6} {'per-tok':>7} {'copy':>6} | {'op-pt':>6} "
          f"{'pt/copy':>7} {'op/copy':>7}")
    for name in a.shapes.split(","):
        for t in map(int, a.tokens.split(",")):
            inp, kw, cbytes = make_inputs(name, t, False)
            op = lambda: fused(*inp, **kw, opaque=False)  # noqa: E731
            pt = per_token(inp, kw)
            # both write the same Q and cache rows: check once that they agree
            q_op, q_pt = op()[0].clone(), pt()[0]
            torch.cuda.synchronize()
            if not torch.equal(q_op, q_pt):
                raise SystemExit(f"{name} T={t}: the per-token form differs from the op")
            fb = floor_bytes(t, kw["hq"], kw["hkv"], kw["d"], kw["r"], kw["gated"], cbytes)
            times: dict = {}
            for _ in range(a.repeats):
                times.setdefault("op", []).append(bench(op, True) * 1e3)
                times.setdefault("pt", []).append(bench(pt, True) * 1e3)
                times.setdefault("copy", []).append(copy_floor_us(fb))
            m = {k: statistics.median(v) for k, v in times.items()}
            print(f"{name:11} {t:>5} | {m['op']:6.2f} {m['pt']:7.2f} {m['copy']:6.2f} | "
                  f"{m['op'] - m['pt']:6.2f} {m['pt'] / m['copy']:7.2f} "
                  f"{m['op'] / m['copy']:7.2f}", flush=True)


if __name__ == "__main__":
    main()
