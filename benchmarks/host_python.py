"""Our Python per eager call at T=1, with the kernel launch stubbed out: no GPU needed.

    python benchmarks/host_python.py [--int64] [--profile]

What ``bench_op.py``'s host lines measure on the device, less the launch itself (Triton's
launcher and the GPU driver): the entry point (``kernels.split_norm_rope_cache``: validation,
the argument tuple, output allocation, the int32/int64 choice), its two halves
(``api.prepare`` and ``api.run``), and ``FusedQKVLayer`` (fixed arguments validated once).
CPU tensors, Qwen3-8B shape as in ``profile_launch.py``.  Use it to compare host-side
changes on any machine; absolute numbers depend on the CPU.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import pstats
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors take the Triton path
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import kernels  # noqa: E402
from kernels import FusedQKVLayer, api, triton_kernel  # noqa: E402

HQ, HKV, D, T = 32, 8, 128, 1


def inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    bf16, nb, bs = torch.bfloat16, 4096, 16
    ang = torch.rand(40960, D // 2, generator=g) * 2 * math.pi
    return dict(
        qkv=torch.randn(T, (HQ + 2 * HKV) * D, dtype=bf16, generator=g),
        num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
        q_weight=torch.randn(D, dtype=bf16, generator=g),
        k_weight=torch.randn(D, dtype=bf16, generator=g), eps=1e-6,
        positions=torch.randint(0, 40960, (T,), generator=g),
        cos_sin_cache=torch.cat([ang.cos(), ang.sin()], -1),
        key_cache=torch.randn(nb, bs, HKV, D, dtype=bf16, generator=g),
        value_cache=torch.randn(nb, bs, HKV, D, dtype=bf16, generator=g),
        slot_mapping=torch.randperm(nb * bs, generator=g)[:T], return_k=False, return_v=False)


class _NoLaunch:
    """Stands in for the cached launcher: takes the call, launches nothing."""
    fn = None

    def __call__(self, *args, **kw):
        pass


def per_call_us(fn, n: int = 5000, reps: int = 5) -> float:
    for _ in range(200):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--int64", action="store_true", help="int64 offsets (no int32 check)")
    ap.add_argument("--profile", action="store_true", help="cProfile of the entry point")
    a = ap.parse_args()
    if a.int64:
        triton_kernel._INDEX32 = False
    triton_kernel._FAST_LAUNCH = True
    triton_kernel._cached_launcher = _NoLaunch  # every launch() call gets a no-op launcher
    inp = inputs()
    step = {k: inp[k] for k in ("qkv", "positions", "slot_mapping")}
    layer = FusedQKVLayer(**{k: v for k, v in inp.items() if k not in step})
    call = api.prepare(**inp)
    rows = [("entry point", lambda: kernels.split_norm_rope_cache(**inp)),
            ("  api.prepare", lambda: api.prepare(**inp)),
            ("  api.run of a prepared call", lambda: api.run(call)),
            ("FusedQKVLayer", lambda: layer(**step)),
            ("one torch.empty of an output", lambda: torch.empty((T, HQ, D), dtype=torch.bfloat16))]
    print(f"# our Python per call, launch stubbed, T={T}, "
          f"{'int64' if a.int64 else 'int32 where they fit'} offsets, torch {torch.__version__}")
    for name, fn in rows:
        print(f"{name:32} {per_call_us(fn):7.1f} us")
    if a.profile:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(5000):
            kernels.split_norm_rope_cache(**inp)
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(20)
        print(s.getvalue())


if __name__ == "__main__":
    main()
