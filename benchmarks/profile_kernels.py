"""Which kernels the op and the compiled module (+pass) run, and their device time (GPU).

    python benchmarks/profile_kernels.py [--shape qwen3-8b] [--tokens 16384] [--hnd] [--static]
        [--dump DIR]

Compiles the unfused chain with the pass as ``bench_op.py`` does (dynamic T: first called
at T=16, then at ``--tokens``), then profiles 20 calls of each with ``torch.profiler`` and
prints, per implementation, every CUDA kernel with its count and mean time, grid, block and
registers, then ``bench_op.py``'s timing of the same call: where the compiled module's time
goes beside the fused kernel.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_op  # noqa: E402
import fusion_pass  # noqa: E402


def kernels(fn, n: int = 20) -> list:
    """(name, count, mean us, launch) of the CUDA kernels ``n`` calls of ``fn`` run, longest
    first; launch: grid, block and registers a thread, from the profiler's trace."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as g:
            trace = json.load(g)
    acc = collections.defaultdict(lambda: [0, 0.0, ""])
    for e in trace.get("traceEvents", []):
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            r = acc[e["name"]]
            r[0] += 1
            r[1] += e["dur"]
            args = e.get("args", {})
            r[2] = (f"grid={args.get('grid')} block={args.get('block')} "
                    f"regs={args.get('registers per thread')}")
    rows = [(name, c, us / c, launch) for name, (c, us, launch) in acc.items()]
    return sorted(rows, key=lambda r: -r[1] * r[2])


def dump_binaries(out: str) -> None:
    """Every loaded fused kernel (the op's and Inductor's): registers, spills and the compile
    options that differ between them printed; ptx, ttgir, cubin and metadata written to ``out``
    (the question: why the same kernel runs slower from Inductor's code)."""
    import gc

    from triton.compiler.compiler import CompiledKernel
    os.makedirs(out, exist_ok=True)
    # type(), not isinstance(): gc also lists weak proxies, which raise once their object died
    seen = [k for k in gc.get_objects() if type(k) is CompiledKernel
            and k.name.startswith("fused_qkv")]
    metas = []
    for i, k in enumerate(seen):
        meta = {f: v for f, v in k.metadata._asdict().items() if isinstance(v, (int, float, str,
                                                                             bool, type(None)))}
        metas.append(meta)
        print(f"{i}: {k.name} regs={k.n_regs} spills={k.n_spills} "
              f"warps={k.metadata.num_warps} stages={k.metadata.num_stages}")
        stem = os.path.join(out, f"{i}_{k.name}")
        for ext in ("ptx", "ttgir", "ttir"):
            with open(f"{stem}.{ext}", "w") as f:
                f.write(k.asm.get(ext, ""))
        with open(f"{stem}.cubin", "wb") as f:
            f.write(k.asm["cubin"])
        with open(f"{stem}.json", "w") as f:
            json.dump(meta, f, indent=1, default=str)
        print("   ", specialisation(k.asm.get("ttir", "")))
    for f in sorted({f for m in metas for f in m}):
        vals = [m.get(f) for m in metas]
        if len(set(map(str, vals))) > 1:
            print(f"  differs: {f}: {vals}")


def specialisation(ttir: str) -> str:
    """The kernel's specialisation from its TTIR signature: scalar arguments with their types,
    and every argument (pointers too: unaligned ones load without vectors) that the launch did
    not mark 16-divisible, as ``(nodiv)``."""
    sig = re.search(r"tt\.func public @\w+\((.*?)\) attributes", ttir, re.S)
    args = re.findall(r"%(\w+): ([^ ]+)( \{[^}]*\})?", sig.group(1) if sig else "")
    out = []
    for n, t, a in args:
        nodiv = "" if "divisibility = 16" in (a or "") else "(nodiv)"
        if not t.startswith("!tt.ptr"):
            out.append(f"{n}:{t}{nodiv}")
        elif nodiv:
            out.append(f"{n}:ptr{nodiv}")
    return " ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hnd", action="store_true")
    ap.add_argument("--static", action="store_true",
                    help="compile for this T only (dynamic=False): no switch in the kernel")
    ap.add_argument("--dump", default=None, metavar="DIR",
                    help="write each fused kernel's ptx/ttgir/cubin and metadata here")
    a = ap.parse_args()
    torch._inductor.config.fx_graph_cache = False
    with_pass = torch.compile(bench_op.unfused, backend=fusion_pass.make_backend(),
                              dynamic=False if a.static else None)
    if not a.static:
        warm, kw, _ = bench_op.make_inputs(a.shape, 16, a.hnd)
        with_pass(*warm, **kw, opaque=False)  # the dynamic-T graph, as bench_op.py compiles it
    inp, kw, _ = bench_op.make_inputs(a.shape, a.tokens, a.hnd)
    print(f"# {torch.cuda.get_device_name()} {a.shape} T={a.tokens} "
          f"{'HND' if a.hnd else 'NHD'}{' static T' if a.static else ''}: per call, 20 calls")
    for label, fn, extra in (("fused op", bench_op.fused, {}), ("+pass", with_pass, {})):
        print(f"{label}:")
        call = lambda: fn(*inp, **kw, **extra, opaque=False)  # noqa: E731
        for name, count, us, launch in kernels(call):
            print(f"  {us:9.2f} us x {count / 20:4.1f}  {name[:60]}  {launch}")
        # bench_op.py's own timing (CUDA-graph replays) of the same call: where the two
        # disagree, the difference lies outside the kernels
        print(f"  {bench_op.bench(call, True) * 1e3:9.2f} us a call, bench_op.py's timing")
    if a.dump:
        dump_binaries(a.dump)


if __name__ == "__main__":
    main()
