"""Our Python per eager call at T=1, with the kernel launch stubbed out: no GPU needed.

    python benchmarks/host_python.py [--int64] [--profile]

What ``bench_op.py``'s host lines measure on the device, less the launch itself (Triton's
launcher and the GPU driver): the entry point (``kernels.split_norm_rope_cache``: validation,
the argument tuple, output allocation, the int32/int64 choice), its two halves
(``api.prepare`` and ``api.run``), ``FusedQKVLayer`` (fixed arguments validated once), and a
remembered call answered by the C++ module (``kernels/native_entry.cpp``), dry.
CPU tensors, Qwen3-8B shape as in ``profile_launch.py``.  Use it to compare host-side
changes on any machine; absolute numbers depend on the CPU.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# profile_launch.py drops TRITON_INTERPRET when imported (it is for the GPU): set it after
from profile_launch import HQ, D, T, make_inputs, per_call_us  # noqa: E402

os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors take the Triton path (read at call time)

import torch  # noqa: E402

import kernels  # noqa: E402
from kernels import FusedQKVLayer, api, triton_kernel  # noqa: E402


class _NoLaunch:
    """Stands in for the cached launcher: takes the call, launches nothing."""
    fn = None

    def __call__(self, *args, **kw):
        pass


def _stub_launcher():
    """The real CachedLauncher over a stand-in compiled kernel whose low-level launch does
    nothing: its key, its memo and its checks run as on the GPU, minus Triton's C launcher."""
    from triton.runtime.jit import JITFunction

    from kernels import fast_launch

    class Compiled:
        function, packed_metadata = 0, ()

        def run(self, *a):
            pass

    jf = JITFunction(triton_kernel.fused_qkv_kernel.fn)
    compiled = Compiled()
    jf.run = lambda *a, grid, warmup, **kw: compiled
    fast_launch._device_and_stream = lambda: (lambda: 0, lambda dev: 0)
    return fast_launch.CachedLauncher(jf)


def native_row(inp: dict) -> None:
    """A remembered call through the C++ module, dry (all but the driver's launch): what the
    entry point costs on CUDA once the module took the call, less ``cuLaunchKernel``."""
    from kernels import native_entry

    mod = native_entry.start(wait=True)
    if mod is None:
        print(f"# no C++ module: {native_entry.why_not}")
        return
    out = kernels.split_norm_rope_cache(**inp)
    (known,) = api._KNOWN.values()
    kw = {k: v for k, v in inp.items() if k != "qkv"}
    why = native_entry.register(mod, known, inp["qkv"], kw, out, ("dry",), dry=True)
    if why:
        print(f"# the C++ module did not take the call: {why}")
        return
    us = per_call_us(lambda: mod.call(inp["qkv"], kw, ("dry",)), 5000, cuda=False)
    print(f"{'C++ module call, dry (no launch)':32} {us:7.1f} us")
    api.forget_calls()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--int64", action="store_true", help="int64 offsets (no int32 check)")
    ap.add_argument("--profile", action="store_true", help="cProfile of the entry point")
    a = ap.parse_args()
    if a.int64:
        triton_kernel._INDEX32 = False
    triton_kernel._FAST_LAUNCH = True
    triton_kernel._cached_launcher = _NoLaunch  # every launch() call gets a no-op launcher
    inp = make_inputs("cpu")
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
        print(f"{name:32} {per_call_us(fn, 5000, cuda=False):7.1f} us")
    # the same with CachedLauncher's Python in (its key or its memo), the C launch stubbed
    from kernels import fast_launch
    saved = fast_launch._device_and_stream
    stub = _stub_launcher()
    triton_kernel._cached_launcher = lambda: stub
    api.forget_calls()
    layer = FusedQKVLayer(**{k: v for k, v in inp.items() if k not in step})
    for name, fn in [("entry point + launcher", lambda: kernels.split_norm_rope_cache(**inp)),
                     ("FusedQKVLayer + launcher", lambda: layer(**step))]:
        print(f"{name:32} {per_call_us(fn, 5000, cuda=False):7.1f} us")
    print(f"# launcher hits {stub.hits}, misses {stub.misses} (memo {stub.memo_hits})")
    triton_kernel._cached_launcher, fast_launch._device_and_stream = _NoLaunch, saved
    api.forget_calls()  # --profile below: our Python with the no-op launcher, as before
    native_row(inp)
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
