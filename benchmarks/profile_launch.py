"""Host cost per call of the eager entry point at T=1 (no CUDA graph), and where it goes.

    python benchmarks/profile_launch.py

Qwen3-8B shape: 32 Q heads, 8 KV heads, D=128, packed bf16 qkv, vLLM fp32 cos_sin_cache with
int64 positions, NHD bf16 caches of 4096 blocks x 16 slots, bf16 per-head norm weights, K/V
written to the cache only (as ``bench_op.py``'s "fused" column).  Each row: median over 5
loops of 2000 calls of the per-call time (perf_counter around the loop, one synchronize at
the end); at T=1 the host is the bottleneck, so this is host time per call.

Rows: (i) ``kernels.split_norm_rope_cache``; (i-b) the same with the kernel launch replaced
by a no-op (our Python only); (ii) ``custom_op.split_norm_rope_cache_impl`` (no validation);
(iii) ``fused_qkv_kernel[grid](...)`` with launch()'s arguments, outputs pre-allocated;
(iv) ``fast_launch.CachedLauncher`` with the same arguments; (v) ``torch.empty`` of the
outputs; (vi) an empty ``@triton.jit`` kernel with one pointer (Triton's floor), and through
CachedLauncher; then the entry point's remembered calls in Python (launcher memo off / on)
and through the C++ module (``kernels/native_entry.py``), single pieces, a cProfile of (i),
and exactness checks: the cached launcher against the normal launch, the module against
Python.
"""
from __future__ import annotations

import cProfile
import io
import math
import os
import platform
import pstats
import statistics
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # read when @triton.jit runs: before any import of it
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

N, REPS = 2000, 5
HQ, HKV, D, T = 32, 8, 128, 1


def per_call_us(fn, n: int = N, reps: int = REPS, cuda: bool = True) -> float:
    """Median per-call time; ``cuda``: wait for the GPU at the end of each loop."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(50):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(times)


def make_inputs(dev: str = "cuda") -> dict:
    g = torch.Generator(device=dev).manual_seed(0)
    bf16 = torch.bfloat16
    ang = torch.rand(40960, D // 2, device=dev, generator=g) * 2 * math.pi
    nb, bs = 4096, 16
    return dict(
        qkv=torch.randn(T, (HQ + 2 * HKV) * D, device=dev, dtype=bf16, generator=g),
        num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
        q_weight=torch.randn(D, device=dev, dtype=bf16, generator=g),
        k_weight=torch.randn(D, device=dev, dtype=bf16, generator=g),
        eps=1e-6,
        positions=torch.randint(0, 40960, (T,), device=dev, generator=g),
        cos_sin_cache=torch.cat([ang.cos(), ang.sin()], -1),
        key_cache=torch.randn(nb, bs, HKV, D, device=dev, dtype=bf16, generator=g),
        value_cache=torch.randn(nb, bs, HKV, D, device=dev, dtype=bf16, generator=g),
        slot_mapping=torch.randperm(nb * bs, device=dev, generator=g)[:T],
        return_k=False, return_v=False,
    )


class _Capture:
    """Stands in for fused_qkv_kernel: records the launch, launches nothing."""

    def __init__(self, kernel):
        self.calls = []
        self.fn = kernel.fn  # its signature: launch() passes the constexprs as a tuple

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((grid, args, kw))


def _copy_args(args: tuple) -> tuple:
    """Fresh storages, same views (strides, offsets, aliasing): an independent launch."""
    copies = {}

    def copy(a):
        st = a.untyped_storage()
        new = copies.setdefault(st.data_ptr(), st.clone())
        return torch.empty(0, dtype=a.dtype, device=a.device).set_(
            new, a.storage_offset(), a.size(), a.stride())
    return tuple(copy(a) if isinstance(a, torch.Tensor) else a for a in args)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(as_int), b.view(as_int))


def main() -> int:
    if not torch.cuda.is_available():
        print("profile_launch.py: no CUDA device; this script measures GPU launch overhead. "
              "Nothing to do.")
        return 0
    import triton

    import kernels
    from kernels import custom_op, native_entry, triton_kernel
    from kernels.fast_launch import CachedLauncher

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor()) \
        if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"# {torch.cuda.get_device_name()} | CPU {cpu} | Python {platform.python_version()} | "
          f"torch {torch.__version__} | triton {triton.__version__}")
    t0 = time.perf_counter()
    native = native_entry.start(wait=True)
    print(f"# native entry (C++): {'loaded' if native else 'none: ' + native_entry.why_not} "
          f"in {time.perf_counter() - t0:.1f} s (built once per torch/Python, then cached)")
    kern = triton_kernel.fused_qkv_kernel
    inp = make_inputs()
    entry = kernels.split_norm_rope_cache
    fast_flag = hasattr(triton_kernel, "_FAST_LAUNCH")  # set once launch() uses CachedLauncher
    print(f"# launch() uses CachedLauncher: "
          f"{'yes (_FAST_LAUNCH=%s)' % triton_kernel._FAST_LAUNCH if fast_flag else 'no'}")

    # what launch() passes to the kernel, captured once
    cap = _Capture(kern)
    triton_kernel.fused_qkv_kernel = cap
    try:
        entry(**inp)
    finally:
        triton_kernel.fused_qkv_kernel = kern
    (grid, kargs, kkw), = cap.calls
    kkw = dict(kkw)
    num_warps = kkw.pop("num_warps")
    regs = kkw.pop("maxnreg", None)  # the register budget the op passes (NVIDIA)
    opt = {"maxnreg": regs} if regs is not None else {}
    print(f"# kernel: {len(kargs)} runtime args, {len(kkw)} constexprs, grid {grid}, "
          f"num_warps {num_warps}")

    # the custom op's arguments, built as api.py builds them
    r = inp["cos_sin_cache"].shape[-1]
    qkv = inp["qkv"]
    head = (qkv, qkv, qkv, 0, HQ * D, (HQ + HKV) * D, HQ, HKV, D, 0, inp["q_weight"],
            inp["k_weight"], True, 1e-6, 0.0, inp["cos_sin_cache"][:, : r // 2],
            inp["cos_sin_cache"][:, r // 2: r], inp["positions"], r, True, False)
    tail = (inp["key_cache"], inp["value_cache"], inp["slot_mapping"][:T], 0, True, "auto",
            None, None, True, False, False, False)

    launcher = CachedLauncher(kern)
    consts = tuple(kkw[n] for n in launcher._cnames)

    @triton.jit
    def _empty(x):
        pass

    x1 = torch.zeros(16, device="cuda")
    empty_launcher = CachedLauncher(_empty)
    outs_decode = [((T, HQ, D)), (0,), (0,), (0,)]
    outs_all = [(T, HQ, D), (T, HKV, D), (T, HKV, D), (0,)]

    rows = [
        ("(i)    entry point kernels.split_norm_rope_cache", lambda: entry(**inp)),
        ("(ii)   custom_op.split_norm_rope_cache_impl (no validation)",
         lambda: custom_op.split_norm_rope_cache_impl(*head, *tail)),
        ("(iii)  fused_qkv_kernel[grid](...), outputs pre-allocated",
         lambda: kern[grid](*kargs, **kkw, num_warps=num_warps, **opt)),
        ("(iv)   CachedLauncher, constexprs as dict",
         lambda: launcher(grid, kargs, kkw, num_warps, False, regs)),
        ("(iv-b) CachedLauncher, constexprs as tuple",
         lambda: launcher(grid, kargs, consts, num_warps, False, regs)),
        ("(v)    torch.empty x4 as launch() allocates here (q + 3 x (0,))",
         lambda: [torch.empty(s, device="cuda", dtype=torch.bfloat16) for s in outs_decode]),
        ("(v-b)  torch.empty x4, q/k/v/gate shapes",
         lambda: [torch.empty(s, device="cuda", dtype=torch.bfloat16) for s in outs_all]),
        ("(vi)   empty @triton.jit kernel, 1 pointer: _empty[(1,)](x)", lambda: _empty[(1,)](x1)),
        ("(vi-b) the same through CachedLauncher", lambda: empty_launcher((1,), (x1,), (), 4)),
    ]
    results = {}
    for name, fn in rows:
        results[name] = per_call_us(fn)
        print(f"{results[name]:9.2f} us  {name}", flush=True)

    # The entry point's remembered calls three ways, in alternating rounds (this host drifts
    # from one call to the next): Python without and with the launcher's memo, and the C++
    # module (native_entry); FusedQKVLayer without and with the memo.
    step_names = ("qkv", "positions", "slot_mapping")
    layer = kernels.FusedQKVLayer(**{k: v for k, v in inp.items() if k not in step_names})
    step = tuple(inp[k] for k in step_names)
    native = native_entry.module
    ways = [("python, memo off", False, None), ("python, memo on", True, None),
            ("native (C++)", True, native)]
    layer_native = kernels.FusedQKVLayer(**{k: v for k, v in inp.items()
                                            if k not in step_names})
    ab: dict = {}
    for _ in range(5):
        for way, memo, mod in ways:
            triton_kernel._LAUNCH_MEMO, native_entry.module = memo, mod
            entry(**inp)  # (re)remembered under this setting
            ab.setdefault(("entry point", way), []).append(per_call_us(lambda: entry(**inp),
                                                                       reps=1))
            if mod is not None and native_entry.why_not:
                print(f"# the module did not take the call: {native_entry.why_not}")
            lay = layer if mod is None else layer_native
            ab.setdefault(("FusedQKVLayer", way), []).append(
                per_call_us(lambda: lay(*step), reps=1))
    triton_kernel._LAUNCH_MEMO, native_entry.module = True, native
    for (what, way), xs in ab.items():
        print(f"# A/B, {what}, {way}: {statistics.median(xs):.2f} us (median of 5 alternating "
              f"rounds of {N} calls: {' '.join(f'{x:.1f}' for x in xs)})", flush=True)
    if native is not None:
        state = native_entry.state()
        qkv_kw = {k: v for k, v in inp.items() if k != "qkv"}
        print(f"{per_call_us(lambda: native.call(qkv, qkv_kw, state)):9.2f} us  "
              f"native.call(...) alone (no Python wrapper); {native.stats()}")

    # (i-b): our Python only (the kernel launch is a no-op stand-in)
    class _NoKernel:
        fn = kern.fn  # its signature: the launcher maps the constexpr tuple onto it

        def __getitem__(self, grid):
            return lambda *a, **k: None
    triton_kernel.fused_qkv_kernel = _NoKernel()
    try:
        ours = per_call_us(lambda: entry(**inp))
    finally:
        triton_kernel.fused_qkv_kernel = kern
    print(f"{ours:9.2f} us  (i-b)  entry point with the kernel launch stubbed (our Python, "
          f"allocations included)")
    print(f"# launcher hits/misses: {launcher.hits}/{launcher.misses}; "
          f"fast path off because: {launcher.why_slow!r}" if launcher.why_slow else
          f"# launcher hits/misses: {launcher.hits}/{launcher.misses}")

    print("\n# single pieces (us per call)")
    csc, slots = inp["cos_sin_cache"], inp["slot_mapping"]
    pieces = [
        ("triton.cdiv(32, 8)", lambda: triton.cdiv(32, 8)),
        ("triton.next_power_of_2(128)", lambda: triton.next_power_of_2(128)),
        ("-(-32 // 8) (plain Python)", lambda: -(-32 // 8)),
        ("torch.empty((1, 32, 128)) cuda", lambda: torch.empty((1, 32, 128), device="cuda",
                                                               dtype=torch.bfloat16)),
        ("torch.empty((0,)) cuda", lambda: torch.empty((0,), device="cuda", dtype=torch.bfloat16)),
        ("cos_sin_cache[:, :64] (a view)", lambda: csc[:, :64]),
        ("slot_mapping[:1] (a view)", lambda: slots[:1]),
        ("torch.cuda.current_device()", torch.cuda.current_device),
        ("torch._C._cuda_getCurrentRawStream(0)", lambda: torch._C._cuda_getCurrentRawStream(0)),
        ("x.data_ptr()", lambda: qkv.data_ptr()),
    ]
    for name, fn in pieces:
        print(f"{per_call_us(fn, reps=3):9.3f} us  {name}")

    print("\n# cProfile: 2000 calls of (i), by tottime")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2000):
        entry(**inp)
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue())

    # exactness: the cached launcher launches the same kernel as the normal path
    ok = True
    ref, got = _copy_args(kargs), _copy_args(kargs)
    kern[grid](*ref, **kkw, num_warps=num_warps, **opt)
    hits0 = launcher.hits
    launcher(grid, got, kkw, num_warps, False, regs)
    torch.cuda.synchronize()
    same = all(_bits_equal(a, b) for a, b in zip(ref, got) if isinstance(a, torch.Tensor))
    ok &= same
    hit = launcher.hits == hits0 + 1
    print(f"# kernel level: CachedLauncher == fused_qkv_kernel[grid]: {same} (through the "
          f"fast path: {hit}{'' if hit else '; why not: ' + repr(launcher.why_slow)})")
    if fast_flag:
        saved = triton_kernel._FAST_LAUNCH
        outs = []
        native_entry.module = None  # the Python path (the module is checked below)
        for flag in (False, True):
            triton_kernel._FAST_LAUNCH = flag
            for _ in range(2):  # the first call of a new key takes the normal path
                run_inp = dict(inp, key_cache=inp["key_cache"].clone(),
                               value_cache=inp["value_cache"].clone(), return_k=True,
                               return_v=True)
                hits0 = triton_kernel._cached_launcher().hits
                out = entry(**run_inp)
            outs.append((*out, run_inp["key_cache"], run_inp["value_cache"]))
        hit = triton_kernel._cached_launcher().hits == hits0 + 1
        triton_kernel._FAST_LAUNCH = saved
        torch.cuda.synchronize()
        same = all(_bits_equal(a, b) for a, b in zip(*outs))
        ok &= same
        print(f"# entry point: outputs and caches with _FAST_LAUNCH on == off: {same} "
              f"(on: through the fast path: {hit})")
        outs = []
        for mod in (None, native):
            native_entry.module = mod
            for _ in range(3):  # remembered, handed to the module, then through it
                run_inp = dict(inp, key_cache=inp["key_cache"].clone(),
                               value_cache=inp["value_cache"].clone(), return_k=True,
                               return_v=True)
                hits0 = native.stats()["hits"] if native else 0
                out = entry(**run_inp)
            outs.append((*out, run_inp["key_cache"], run_inp["value_cache"]))
        hit = native is not None and native.stats()["hits"] == hits0 + 1
        torch.cuda.synchronize()
        same = all(_bits_equal(a, b) for a, b in zip(*outs))
        ok &= same
        print(f"# entry point: outputs and caches with the native entry on == off: {same} "
              f"(on: through the module: {hit}{'' if hit else '; ' + native_entry.why_not})")
    print("# exactness:", "OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
