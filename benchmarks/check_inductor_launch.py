"""Check fusion_pass/inductor_launch.py: Inductor's generated code launches the fused kernel.

    python benchmarks/check_inductor_launch.py              # GPU: --mode cuda, else both CPU modes
    python benchmarks/check_inductor_launch.py --mode cuda  # one device call, ~1 min: a table
    python benchmarks/check_inductor_launch.py --mode cuda --forms all --budget 0
    python benchmarks/check_inductor_launch.py --mode codegen
    python benchmarks/check_inductor_launch.py --mode interp [--forms view,kv_halves]

Modes:

* ``cuda``: model forms (tests/model_forms.py, on CUDA; by default the subset CUDA_FORMS, within
  ``--budget`` seconds) compiled with the pass and run once: the pass must have used the
  Inductor launch (report op), the generated code must launch ``fused_qkv_inductor_kernel``
  once per fused chain, call no ``fused_qkv`` custom op, clone or copy nothing (no cache-sized
  buffer), Inductor's TTIR write analysis must match the kernel's writes and only the caches
  be mutated inputs, and outputs and caches must meet the numerics rule (tests/numerics.py).
  Then three checks: ``reduce-overhead`` with no CUDA-graph skip, ``inductor_launch=False``
  still inserting the custom op, and an FX-graph-cache hit on a second compile.
* ``codegen`` (no GPU): Triton is given a fake CUDA target (a stub driver), so Inductor
  lowers the graph and writes the wrapper code for real; the same code and write-analysis
  assertions run.  The code cannot run: loading the module fails, after it was captured.
* Forms in ``RESIZE_CACHES`` are compiled twice, the second time with caches of another
  size (Dynamo recompiles with a dynamic number of blocks per cache): the checks apply to the
  second compile, whose cache inputs must have a symbolic size.
* ``interp`` (no GPU, TRITON_INTERPRET=1): Dynamo + AOT autograd + Inductor's decompositions
  and its whole post-grad pipeline (the pass, reinplace, the HOP decomposition); the final
  graph must hold ``triton_kernel_wrapper_mutation`` on the cache graph inputs themselves,
  with no clone and no epilogue copy left; then that graph runs eagerly (the HOP's dense impl
  launches the kernel under Triton's interpreter) and the numerics rule is checked.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FORMS = {  # name: (Form kwargs or a custom case, dynamic tokens)
    "view": (dict(), False),
    "view_dyn": (dict(), True),
    "view_dyn_block_t2": (dict(), True),  # BLOCK_T forced to 2: ((T + 1) // 2) * tiles in-graph
    "index_put": (dict(cache="index_put"), False),
    "index_copy": (dict(cache="index_copy"), False),
    "nhd": (dict(cache="nhd"), False),
    "hnd": (dict(cache="hnd"), False),
    "kv_halves": (dict(cache="kv_halves"), False),
    "kv_halves_dyn": (dict(cache="kv_halves"), True),
    "kv_halves_negslot": (dict(cache="kv_halves", negative_slot=True), False),
    "fp8": (dict(cache="fp8"), False),
    "hf_static": (dict(split="separate", hf=True, cache="static", table="gathered",
                       rope="rotate_half"), False),
    "hf_separate": (dict(split="separate", hf=True), False),
    "gated": (dict(split="gated_interleaved"), False),
    "gptj_partial": (dict(rope="gptj", rotary=0.5), False),
    "gemma": (dict(norm="gemma"), False),
    "no_norm": (dict(norm="none"), False),
    "return_k": (dict(return_k=True), False),
    "fp32_d80": (dict(dtype="float32", hq=2, hkv=2, d=80, rotary=0.4), False),
    "no_cache": (dict(cache="none", return_k=True), False),
    "no_cache_dyn": (dict(cache="none", return_k=True), True),
    "gpu_gated_fp8_d256": (dict(split="gated_interleaved", rotary=0.25, d=256, hq=4, hkv=1,
                                norm="gemma", cache="fp8"), False),
    "uint8_fp8": ("uint8", False),  # vLLM's uint8 cache holding fp8 bytes (custom_case)
    "big_t_static": ("big_t", False),  # T = 1100: BLOCK_T > 1, as launch() picks (custom_case)
    # compiled twice, the second time with bigger caches (RESIZE_CACHES): a dynamic num_blocks,
    # one symbol per cache (bench_op.py's T=65536 rows); the second compile is checked
    "view_dyn_cache": (dict(), False),
    "hnd_dyn_cache": (dict(cache="hnd"), False),
    "view_dyn_cache_dyn_t": (dict(), True),
    # a Hugging Face StaticCache compiled again with another length (RESIZE_DIM): L symbolic
    "hf_static_dyn_cache": (dict(split="separate", hf=True, cache="static", table="gathered",
                                 rope="rotate_half"), False),
    # a dynamic T past the large-T switch (lowered to 4 tokens, SWITCH_OVERRIDE): the
    # kernel's other branch (8 tokens a program at this shape) and the grid's step
    "view_dyn_switch": (dict(S=9), True),  # T = 18: 3 tiles of 8 tokens, the last partial
    # the same with int32 offsets off (INDEX32_OVERRIDE): the large-T branch's int64 copy
    "view_dyn_switch_int64": (dict(S=9), True),
    # the same with the int32 bound lowered to T = 10 (INT32_CAP_OVERRIDE): the large-T
    # branch's int64 copy, which takes the small-T tile's one token a program (a third grid
    # step)
    "view_dyn_switch_wide": (dict(S=9), True),
    # the same where the large-T tile keeps one token (D = 256, 8 KV heads: 2048 elements a
    # row of head tiles): the switch only turns early loads off
    "d256_kv8_dyn_switch": (dict(d=256, hq=8, hkv=8), True),
    # 64 heads a token at D = 128 (GLM-4.5-like): the switch comes at T = 128 (checked in the
    # plan and the grid; the form itself runs the small-T branch)
    "many_heads_dyn": (dict(hq=48, hkv=8, d=128), True),
    # FusionOptions(dynamic_tiles="prefill") on a dynamic T with a 192-wide tail: the T=1024
    # tiles (one token of four heads, the whole-row tail), not the decode ones (FORM_CHECKS)
    "gated_dyn_prefill": (dict(split="gated_interleaved", rotary=0.25, d=256, hq=4, hkv=1,
                               norm="gemma", cache="fp8"), True),
}
FORM_OPTIONS = {"gated_dyn_prefill": dict(dynamic_tiles="prefill")}  # more FusionOptions
# a substring every launch description (inductor_launch.describe) of the form must hold
FORM_CHECKS = {"gated_dyn_prefill": "tile=BLOCK_T=1,BLOCK_H=4,PAIRS=0,EARLY=0,ROW_TAIL=1",
               "view_dyn": "EARLY=1,ROW_TAIL=0,IDX64=0 from T>=1024: BLOCK_T=8,EARLY=0,IDX64=0 "
                           "below T=",
               "view_dyn_switch": "from T>=4: BLOCK_T=8,EARLY=0,IDX64=0 below T=",
               "view_dyn_switch_int64": "IDX64=1 from T>=4: BLOCK_T=8,EARLY=0,IDX64=1 mutates",
               "view_dyn_switch_wide": "from T>=4: BLOCK_T=8,EARLY=0,IDX64=0 below T=10 else "
                                       "BLOCK_T=1,IDX64=1 mutates",
               "d256_kv8_dyn_switch": "EARLY=1,ROW_TAIL=0,IDX64=0 from T>=4: BLOCK_T=1,EARLY=0",
               "many_heads_dyn": "EARLY=1,ROW_TAIL=0,IDX64=0 from T>=128: BLOCK_T=2,EARLY=0"}
# inductor_launch.SWITCH_T for the form
SWITCH_OVERRIDE = {"view_dyn_switch": 4, "view_dyn_switch_int64": 4, "view_dyn_switch_wide": 4,
                   "d256_kv8_dyn_switch": 4}
INDEX32_OVERRIDE = {"view_dyn_switch_int64": False}  # triton_kernel._INDEX32 for the form
INT32_CAP_OVERRIDE = {"view_dyn_switch_wide": 10}  # inductor_launch.INT32_BELOW_CAP
# a regex the generated code of the form must match: the grid's step at the switch,
# (2T) // (T + SWITCH_T) as sympy prints it (T = 2 s here, so the constant is halved)
CODE_CHECKS = {"view_dyn_switch": r"\(2\*s\d+\) // \(2 \+ s\d+\)",
               "view_dyn_switch_int64": r"\(2\*s\d+\) // \(2 \+ s\d+\)",
               # both steps: at the switch and at the int32 bound (T + 10 = 2 (s + 5))
               "view_dyn_switch_wide": r"(?s)(?=.*\(2\*s\d+\) // \(2 \+ s\d+\))"
                                       r".*\(2\*s\d+\) // \(5 \+ s\d+\)",
               "many_heads_dyn": r"\(2\*s\d+\) // \(64 \+ s\d+\)"}
RESIZE_CACHES = {"view_dyn_cache": 16, "hnd_dyn_cache": 16, "view_dyn_cache_dyn_t": 16,
                 "hf_static_dyn_cache": 24}
RESIZE_DIM = {"hf_static_dyn_cache": 2}  # the cache dim RESIZE_CACHES sets (default: 0)
BLOCK_OVERRIDE = {"view_dyn_block_t2": (2, 4, 2)}  # (BLOCK_T, BLOCK_H, num_warps)
# --mode cuda's default: one form per feature of the launch path (offsets into a shared base,
# fp8 bitcast, dynamic grid, gate, no cache, BLOCK_T > 1), most important first (--budget cuts
# the tail); --forms all for every form.
CUDA_FORMS = ["view", "view_dyn", "view_dyn_switch", "view_dyn_switch_int64",
              "view_dyn_switch_wide",
              "kv_halves_dyn", "uint8_fp8", "gpu_gated_fp8_d256", "no_cache_dyn", "big_t_static",
              "view_dyn_block_t2",
              "hf_static", "hnd", "kv_halves_negslot", "fp8", "gptj_partial", "fp32_d80",
              "view_dyn_cache", "d256_kv8_dyn_switch", "many_heads_dyn"]
LAUNCH_RE = re.compile(r"fused_qkv_inductor_kernel_\d+\.run\(")


# ------------------------------------------------------------------------------- helpers

class Recorder:
    launches: list = []  # inductor_launch.describe() of each HOP node built
    fallbacks: list = []  # Unsupported reasons (the pass then used the custom op)
    writes: list = []  # (expected, analysed) written kernel args, per lowering
    eager_vals: list = []  # mutation node had eager_input_vals at lowering
    mutated_inputs: list = []  # Inductor's mutated graph inputs, per generated module

    @classmethod
    def clear(cls):
        for v in (cls.launches, cls.fallbacks, cls.writes, cls.eager_vals, cls.mutated_inputs):
            v.clear()


@contextlib.contextmanager
def recording():
    """Record what inductor_launch built, or why it refused (the pass calls it through the
    module, so wrapping its entry points sees every call)."""
    from fusion_pass import inductor_launch as il

    orig = il.call_fused_with_cache, il.call_fused

    def wrap(f):
        def g(*a, **k):
            try:
                r = f(*a, **k)
            except il.Unsupported as e:
                Recorder.fallbacks.append(str(e))
                raise
            Recorder.launches.append(r[0].meta["fused_qkv_launch"])
            return r
        return g

    il.call_fused_with_cache, il.call_fused = wrap(orig[0]), wrap(orig[1])
    try:
        yield
    finally:
        il.call_fused_with_cache, il.call_fused = orig


def assert_launch_used(rep, name=None):
    """Every fused chain went through the Inductor launch (no fallback to the custom op), with
    the cache write when form ``name`` writes a cache."""
    from fusion_pass import inductor_launch as il

    fused = len(rep.fused)
    assert fused, f"nothing fused:\n{rep}"
    kw = FORMS[name][0] if name else None
    if name and (isinstance(kw, str) or kw.get("cache") != "none"):
        partial = [c for c in rep.fused if c.status != "fused"]
        assert not partial, f"cache write not fused: {partial[0].reason}\n{rep}"
    assert not Recorder.fallbacks, f"fell back to the custom op: {Recorder.fallbacks}"
    ops = {c.op for c in rep.fused}
    assert ops == {il.OP_NAME}, f"report ops {ops}, expected {il.OP_NAME!r}"
    assert len(Recorder.launches) == fused, "not every fused chain used inductor_launch"
    want = FORM_CHECKS.get(name)
    assert want is None or all(want in d for d in Recorder.launches), \
        f"launch {Recorder.launches} lacks {want!r}"
    return fused


@contextlib.contextmanager
def block_override(name):
    """The form's BLOCK_OVERRIDE tiles, SWITCH_OVERRIDE switch, INDEX32_OVERRIDE and
    INT32_CAP_OVERRIDE, while it compiles and runs."""
    from fusion_pass import inductor_launch
    from kernels import triton_kernel

    cfg, switch = BLOCK_OVERRIDE.get(name), inductor_launch.SWITCH_T
    index32, cap = triton_kernel._INDEX32, inductor_launch.INT32_BELOW_CAP
    if cfg is not None:
        triton_kernel.set_block_override(cfg)
    inductor_launch.SWITCH_T = SWITCH_OVERRIDE.get(name, switch)
    triton_kernel._INDEX32 = INDEX32_OVERRIDE.get(name, index32)
    inductor_launch.INT32_BELOW_CAP = INT32_CAP_OVERRIDE.get(name, cap)
    try:
        yield
    finally:
        triton_kernel.set_block_override(None)
        inductor_launch.SWITCH_T = switch
        triton_kernel._INDEX32 = index32
        inductor_launch.INT32_BELOW_CAP = cap


def build_case(name, device):
    import torch

    from tests.model_forms import Form, build

    kw, dynamic = FORMS[name]
    if isinstance(kw, str):
        return custom_case(device, uint8=kw == "uint8", T=1100 if kw == "big_t" else 6) + \
            (dynamic,)
    kw = dict(kw)
    if isinstance(kw.get("dtype"), str):
        kw["dtype"] = getattr(torch, kw["dtype"])
    fn, args = build(Form(device=device, **kw))
    return fn, args, dynamic


def custom_case(device, uint8: bool, T: int):
    """vLLM-style chain on a packed qkv [T, W]; ``uint8``: the fp8 cache as vLLM stores it,
    uint8 storage written with ``(k / k_scale).to(fp8).view(uint8)``."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(7)
    hq, hkv, d, eps = 4, 2, 64, 1e-6
    nb = T + 2  # caches larger than any output (assert_no_cache_copy tells them apart by size)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device)

    qkv = rnd(T, (hq + 2 * hkv) * d, scale=2.0).to(torch.bfloat16)
    qw, kw = (rnd(d, scale=0.3) + 1).to(torch.bfloat16), (rnd(d, scale=0.3) + 1).to(torch.bfloat16)
    ang = torch.rand(64, d // 2, generator=g).to(device) * 6.28
    cos_sin = torch.cat([ang.cos(), ang.sin()], -1)
    pos = torch.randint(0, 64, (T,), generator=g).to(device)
    slots = torch.randperm(nb * 4 - 1, generator=g)[:T].to(device)
    cdt = torch.uint8 if uint8 else torch.bfloat16
    kc = torch.zeros(nb, 4, hkv, d, dtype=cdt, device=device)
    vc = torch.zeros(nb, 4, hkv, d, dtype=cdt, device=device)
    ks, vs = torch.tensor(0.5, device=device), torch.tensor(2.0, device=device)

    def fn(qkv, qw, kw, cos_sin, pos, slots, kc, vc, ks, vs):
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], -1)
        q = F.rms_norm(q.view(T, hq, d), (d,), qw, eps)
        k = F.rms_norm(k.view(T, hkv, d), (d,), kw, eps)
        c, s = cos_sin[pos].chunk(2, -1)
        c, s = c.unsqueeze(1).to(q.dtype), s.unsqueeze(1).to(q.dtype)

        def rope(x):
            x1, x2 = x.chunk(2, -1)
            return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)

        q, k = rope(q), rope(k)
        v = v.reshape(T, hkv, d)
        if uint8:
            k = (k / ks).to(torch.float8_e4m3fn).view(torch.uint8)
            v = (v / vs).to(torch.float8_e4m3fn).view(torch.uint8)
        kc.view(-1, hkv, d)[slots] = k
        vc.view(-1, hkv, d)[slots] = v
        return (q,)

    return fn, [qkv, qw, kw, cos_sin, pos, slots, kc, vc, ks, vs]


def mark_dynamic(args, name):
    import torch

    if isinstance(FORMS[name][0], str):
        return
    torch._dynamo.mark_dynamic(args[0], 1)  # x_in [B, S, W]: S tokens per sequence
    torch._dynamo.mark_dynamic(args[4], 1)  # positions [B, S]
    torch._dynamo.mark_dynamic(args[5], 0)  # slots [T]


def check_numerics(name, fn, args, out, before):
    import torch

    from tests.model_forms import clone_args
    from tests.pass_check import assert_numerics

    if FORMS[name][0] != "uint8":
        assert_numerics(fn, args, out, before)
        return
    eager_args = clone_args(before)
    eager = fn(*eager_args)
    torch.testing.assert_close(out[0].float().cpu(), eager[0].float().cpu(), rtol=2e-2, atol=2e-2)
    for got, ref in ((args[6], eager_args[6]), (args[7], eager_args[7])):
        a = got.view(torch.float8_e4m3fn).float().cpu()
        b = ref.view(torch.float8_e4m3fn).float().cpu()
        bad = (a - b).abs() > 0.13 * torch.maximum(a.abs(), b.abs()) + 2 ** -9  # 1 fp8 ulp
        assert not bad.any(), f"fp8 cache differs by more than 1 ulp at {bad.nonzero()[:4]}"


def check_code(code, args, fused, expect_cache):
    from tests.pass_check import assert_no_cache_copy

    launches = LAUNCH_RE.findall(code)
    assert len(launches) == fused, f"{len(launches)} kernel launch(es) for {fused} fused chain(s)"
    assert "torch.ops.fused_qkv" not in code and "fused_qkv.split_norm_rope" not in code, \
        "a fused_qkv custom-op call is left"
    clones = re.findall(r".*(?:\bclone\(|clone_preserve_strides|\.copy_\().*", code)
    assert not clones, f"a clone/copy in the generated code: {clones[:3]}"
    # Inductor types a Python float argument fp64, whose conversion costs the kernel time
    # (one definition serves identical chains of a graph)
    sigs = re.findall(r"'signature': \{[^}]*'k_base'[^}]*\}", code)
    assert sigs, "no trampoline signature in the generated code"
    f64 = [s for s in sigs if "fp64" in s]
    assert not f64, f"a trampoline argument typed fp64: {f64[0]}"
    if expect_cache:
        assert_no_cache_copy(code, args)


def relevant_lines(code):
    keep = []
    for line in code.splitlines():
        s = line.strip()
        if LAUNCH_RE.search(s) or s.startswith("buf") and "empty_strided" in s or \
                "async_compile.triton('fused_qkv_inductor_kernel" in s or \
                "'signature':" in s and "k_base" in s:
            keep.append(s if len(s) < 900 else s[:900] + " ...")
    return keep


class Table:
    """One row per check as it finishes: name, PASS/FAIL/SKIP, seconds, detail."""

    def __init__(self, verbose=False):
        self.verbose, self.rows = verbose, []
        print(f"{'check':<40} {'result':<6} {'secs':>6}  detail", flush=True)

    def row(self, name, status, secs, msg=""):
        self.rows.append(status)
        first = msg.splitlines()[0] if msg else ""
        if not self.verbose and len(first) > 150:
            first = first[:147] + "..."
        print(f"{name:<40} {status:<6} {secs:>6.1f}  {first}", flush=True)
        if status == "FAIL" and "\n" in msg:  # e.g. the pass's report: where it went wrong
            rest = msg.split("\n", 1)[1]
            print("    " + rest[:2000].replace("\n", "\n    "), flush=True)

    def run(self, name, fn, *args):
        """Run one check: ``fn(*args)`` returns the detail string or raises."""
        t = time.monotonic()
        try:
            detail = fn(*args)
        except Exception as e:
            self.row(name, "FAIL", time.monotonic() - t, f"{type(e).__name__}: {e}")
            if self.verbose:
                traceback.print_exc()
            return False
        self.row(name, "PASS", time.monotonic() - t, detail or "")
        return True

    @property
    def failures(self):
        return self.rows.count("FAIL")


# ----------------------------------------------------------------------------------- modes

def run_compile_modes(mode, names, table, budget):
    """cuda: compile + run; codegen: fake CUDA target, capture the code (cannot run)."""
    from fusion_pass import inductor_launch as il

    codes = []
    if mode == "codegen":
        install_fake_cuda_target()
        il.DEVICES.add("cpu")
    hook_codegen(codes)  # on CUDA too: the TTIR write analysis and mutated inputs are checked
    t0 = time.monotonic()
    for name in names:
        if budget and time.monotonic() - t0 > budget:
            table.row(name, "SKIP", 0.0, f"time budget ({budget:.0f} s) spent")
            continue
        table.run(name, compile_one, mode, name, codes, table.verbose)


def compile_one(mode, name, codes, verbose):
    import torch

    import fusion_pass
    from tests.model_forms import clone_args, resize_caches
    from tests.pass_check import cache_symbols

    device = "cuda" if mode == "cuda" else "cpu"
    Recorder.clear(), codes.clear()
    fn, args, dynamic = build_case(name, device)
    torch._dynamo.reset()
    compiled = torch.compile(fn)

    def call(fp, args):
        if dynamic:
            mark_dynamic(args, name)
        with block_override(name), torch.no_grad(), torch._inductor.config.patch(
                post_grad_custom_post_pass=fp, fx_graph_cache=False):
            if mode == "cuda":
                out = compiled(*args)
                torch.cuda.synchronize()
                return out
            try:
                compiled(*args)
            except Exception as e:  # expected: the module cannot load without a GPU
                if "compatible backends" not in str(e) and "active drivers" not in str(e):
                    raise

    if name in RESIZE_CACHES:  # the first compile, with the caches as built (not checked)
        call(fusion_pass.FusionPass(allow_cpu=device == "cpu"), args)
        args = resize_caches(args, RESIZE_CACHES[name], dim=RESIZE_DIM.get(name, 0))
        Recorder.clear(), codes.clear()
    before = clone_args(args)
    fp = fusion_pass.FusionPass(allow_cpu=device == "cpu", inductor_launch=True,
                                **FORM_OPTIONS.get(name, {}))
    with recording():
        out = call(fp, args)
    code = "\n".join(codes)
    if name in RESIZE_CACHES:
        assert cache_symbols(code), "the caches' size is not dynamic in the second compile"
    rep = fp.report
    fused = assert_launch_used(rep, name)
    with_cache = any(c.status == "fused" for c in rep.fused)
    check_code(code, args, fused, with_cache)
    want = CODE_CHECKS.get(name)
    assert want is None or re.search(want, code), f"no match for {want!r} in the code"
    extra = set()
    for exp, got in Recorder.writes:
        assert exp <= got, f"TTIR analysis misses writes {sorted(exp - got)}"
        extra |= got - exp
    assert len(Recorder.writes) == fused, "the kernel was not lowered"
    assert all(Recorder.eager_vals), "mutation node lowered without eager_input_vals"
    caches = len({id(a) for a in args if getattr(a, "dim", lambda: 0)() >= 4}) \
        if with_cache else 0
    got_inputs = Recorder.mutated_inputs[-1] if Recorder.mutated_inputs else []
    assert len(got_inputs) == caches, \
        f"Inductor's mutated inputs {got_inputs}: expected only the {caches} cache(s)"
    if mode == "cuda":
        check_numerics(name, fn, args, out, before)
    if verbose:
        for line in relevant_lines(code):
            print("    " + line)
    notes = [x.replace("fused_qkv_inductor_kernel ", "") for x in Recorder.launches]
    if extra:
        notes.append(f"(TTIR also counts {sorted(extra)} as written: intermediates, harmless)")
    return "; ".join(notes)


def check_cudagraphs():
    """reduce-overhead (CUDA-graph trees), caches as module buffers and fresh slots each step,
    as tests/test_pass_gpu.py: the launch path must not cost a cudagraph skip (it would if
    Inductor thought an ordinary input such as slot_mapping was mutated)."""
    import torch
    from torch._dynamo.utils import counters

    import fusion_pass
    from tests.test_pass_gpu import replay_reduce_overhead

    Recorder.clear()
    be = fusion_pass.make_backend(mode="reduce-overhead")
    torch._dynamo.reset()
    counters.clear()
    # no FX-graph cache: a hit (an earlier run on this machine compiled the same layer) skips
    # the pass and its report, as in tests/test_pass_gpu.py
    with recording(), torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        replay_reduce_overhead(be)
    assert_launch_used(be.report)
    skips = counters["inductor"]["cudagraph_skips"]
    assert skips == 0, f"{skips} cudagraph skip(s): {dict(counters['inductor'])}"
    return "4 replays, 0 cudagraph skips"


def check_custom_op_option():
    """``inductor_launch=False``: the pass inserts the custom op, as before."""
    import torch
    from torch._inductor.utils import run_and_get_code

    import fusion_pass
    from tests.model_forms import Form, build, clone_args
    from tests.pass_check import FUSED_CACHE, assert_numerics

    fn, args = build(Form(device="cuda"))
    before = clone_args(args)
    fp = fusion_pass.FusionPass(inductor_launch=False)
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(post_grad_custom_post_pass=fp,
                                                       fx_graph_cache=False):
        out, codes = run_and_get_code(torch.compile(fn), *args)
    code = "\n".join(codes)
    ops = {c.op for c in fp.report.fused}
    assert ops == {FUSED_CACHE}, f"report ops {ops}:\n{fp.report}"
    assert FUSED_CACHE in code and not LAUNCH_RE.search(code), "not the custom op in the code"
    assert_numerics(fn, args, out, before)
    return f"report op {FUSED_CACHE}"


def check_fx_cache():
    """A second compile of the same graph is an FX-graph-cache hit (the pass does not run)
    that still launches the kernel: the launch path must not make Inductor bypass the cache."""
    import tempfile

    import torch
    from torch._dynamo.utils import counters

    import fusion_pass
    from tests.model_forms import Form, build, clone_args
    from tests.pass_check import assert_numerics

    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fused_qkv_fxcache_")
    try:
        reports = []
        for i in range(2):
            Recorder.clear()  # launches counted per compile, not the earlier checks'
            # a form no other check compiles: the first compile must miss even if the cache
            # directory set above is not picked up (Inductor may have read it already)
            fn, args = build(Form(device="cuda", S=5, eps=1e-5))
            before = clone_args(args)
            fp = fusion_pass.FusionPass()
            torch._dynamo.reset()
            counters.clear()
            with recording(), torch.no_grad(), torch._inductor.config.patch(
                    post_grad_custom_post_pass=fp, fx_graph_cache=True):
                out = torch.compile(fn)(*args)
            assert_numerics(fn, args, out, before)
            reports.append(fp.report)
            hits = counters["inductor"]["fxgraph_cache_hit"] + \
                counters["aot_autograd"]["autograd_cache_hit"]
            bypass = counters["inductor"]["fxgraph_cache_bypass"] + \
                counters["aot_autograd"]["autograd_cache_bypass"]
            assert not bypass, f"cache bypassed: {dict(counters['inductor'])}"
            if i == 0:
                assert_launch_used(reports[0])
        assert hits and not reports[1].candidates, \
            f"second compile: {hits} cache hit(s), the pass ran: {reports[1]}"
    finally:
        if old is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = old
    return "second compile: cache hit, correct"


def install_fake_cuda_target():
    """Let Triton's frontend (TTIR) and Inductor's codegen run without a GPU."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    class FakeCudaDriver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    triton.runtime.driver.set_active(FakeCudaDriver())


def hook_codegen(codes):
    """Capture the wrapper code, the TTIR write analysis and the eager_input_vals presence."""
    import torch
    from torch._inductor import ir
    from torch._inductor.codecache import PyCodeCache
    from torch._inductor.graph import GraphLowering

    write = PyCodeCache.write.__func__

    def capture(cls, src, *a, **k):
        from torch._inductor.virtualized import V

        codes.append(src)
        if hasattr(V.graph, "mutated_inputs"):  # not when a cached module is loaded
            Recorder.mutated_inputs.append(sorted(V.graph.mutated_inputs))
        return write(cls, src, *a, **k)

    PyCodeCache.write = classmethod(capture)

    init = ir.UserDefinedTritonKernel.__init__

    def record(self, *, kernel_idx, grid, tma_descriptor_metadata, kernel_args):
        init(self, kernel_idx=kernel_idx, grid=grid,
             tma_descriptor_metadata=tma_descriptor_metadata, kernel_args=kernel_args)
        a = kernel_args
        if "V_IN_K_BASE" not in a:
            return
        exp = {n for n, on in (("q_out", a["WRITE_Q"]), ("k_out", a["WRITE_K"]),
                               ("v_out", a["WRITE_V"]), ("g_out", a["WRITE_G"]),
                               ("k_base", a["HAS_CACHE"]),
                               ("v_base", a["HAS_CACHE"] and not a["V_IN_K_BASE"])) if on}
        acc = getattr(self, "arg_accesses", None)
        got = {d.name for d in acc.read_writes.writes} if acc is not None else \
            {k for k, v in a.items() if any(v is m for m in self.mutable_args)}
        Recorder.writes.append((exp, got))

    ir.UserDefinedTritonKernel.__init__ = record

    run_node = GraphLowering.run_node

    def run(self, n):
        if n.target is torch.ops.higher_order.triton_kernel_wrapper_mutation:
            Recorder.eager_vals.append("eager_input_vals" in n.meta)
        return run_node(self, n)

    GraphLowering.run_node = run


def run_interp(names, table):
    """TRITON_INTERPRET=1: Inductor's post-grad pipeline, then the graph runs eagerly."""
    from fusion_pass import inductor_launch as il

    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    il.DEVICES.add("cpu")
    il.ALLOW_INTERPRETER = True
    il.CHECK_WRITES = False  # no TTIR for interpreted kernels (the codegen mode checks it)
    for name in names:
        table.run(name, interp_one, name, table.verbose)


def interp_one(name, verbose):
    import torch

    import fusion_pass
    from tests.model_forms import clone_args, resize_caches
    from tests.pass_check import launch_path_backend

    Recorder.clear()
    graphs = []
    fn, args, dynamic = build_case(name, "cpu")
    fp = fusion_pass.FusionPass(allow_cpu=True, inductor_launch=True,
                                **FORM_OPTIONS.get(name, {}))
    passes = [fp]  # RESIZE_CACHES: the first compile runs a pass of its own
    backend = launch_path_backend(lambda graph: passes[-1](graph), graphs)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend)
    if name in RESIZE_CACHES:  # the first compile, with the caches as built (not checked)
        passes.append(fusion_pass.FusionPass(allow_cpu=True, inductor_launch=True))
        if dynamic:
            mark_dynamic(args, name)
        with torch.no_grad():
            compiled(*args)
        passes.pop()
        args = resize_caches(args, RESIZE_CACHES[name], dim=RESIZE_DIM.get(name, 0))
        Recorder.clear()
    before = clone_args(args)
    if dynamic:
        mark_dynamic(args, name)
    with recording(), block_override(name), torch.no_grad():
        out = compiled(*args)
    fused = assert_launch_used(fp.report, name)
    g = graphs[-1]
    hops = [n for n in g.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_mutation]
    assert len(hops) == fused, f"{len(hops)} kernel node(s) for {fused} fused chain(s)"
    targets = {str(n.target) for n in g.nodes if n.op == "call_function"}
    assert not any("fused_qkv" in t for t in targets), "a fused_qkv op is left"
    kernel_args = {a for h in hops for a in h.kwargs["kwargs"].values()}
    cloned = [n.name for n in g.nodes if "clone" in str(n.target) and
              (n.args[0] in kernel_args or n.args[0].op == "placeholder")]
    assert not cloned, f"a kernel argument or graph input is cloned: {cloned}"
    assert "aten.copy_.default" not in targets, "an epilogue copy_ is left"
    for h in hops:
        assert "eager_input_vals" in h.meta, "no eager_input_vals on the mutation node"
        kw = h.kwargs["kwargs"]
        if kw["HAS_CACHE"]:
            assert kw["k_base"].op == "placeholder", "the K cache is not the graph input"
            if not kw["V_IN_K_BASE"]:
                assert kw["v_base"].op == "placeholder", "the V cache is not the graph input"
            if name in RESIZE_CACHES:
                dim = RESIZE_DIM.get(name, 0)
                assert not isinstance(kw["k_base"].meta["val"].shape[dim], int), \
                    "the caches' size is not dynamic in the second compile"
    check_numerics(name, fn, args, out, before)
    if verbose:
        print(graphs[-1].python_code("self").src)
    return "; ".join(x.replace("fused_qkv_inductor_kernel ", "") for x in Recorder.launches)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["auto", "cuda", "codegen", "interp"], default="auto")
    ap.add_argument("--forms", default=None,
                    help="comma-separated form names, or 'all' (default: all; cuda: CUDA_FORMS)")
    ap.add_argument("--budget", type=float, default=45.0,
                    help="cuda: seconds for the forms; later forms are skipped (0: no limit)")
    ap.add_argument("-v", "--verbose", action="store_true")
    opts = ap.parse_args()
    mode = opts.mode
    if mode == "auto":
        import torch

        if torch.cuda.is_available():
            mode = "cuda"
        else:  # both CPU checks, each in its own process (TRITON_INTERPRET is read at import)
            rc = 0
            for m, env in (("codegen", {"TRITON_INTERPRET": "0"}),
                           ("interp", {"TRITON_INTERPRET": "1"})):
                print(f"=== --mode {m}", flush=True)
                cmd = [sys.executable, os.path.abspath(__file__), "--mode", m] + \
                    (["--forms", opts.forms] if opts.forms else []) + \
                    (["-v"] if opts.verbose else [])
                rc |= subprocess.call(cmd, env={**os.environ, **env})
            sys.exit(rc)
    forms = opts.forms or ("cuda" if mode == "cuda" else "all")
    names = list(FORMS) if forms == "all" else CUDA_FORMS if forms == "cuda" else \
        [n for n in forms.split(",") if n]
    unknown = set(names) - set(FORMS)
    if unknown:
        sys.exit(f"unknown forms {sorted(unknown)}; known: {', '.join(FORMS)}")
    if mode == "interp" and os.environ.get("TRITON_INTERPRET") != "1":
        os.execve(sys.executable, [sys.executable] + sys.argv,
                  {**os.environ, "TRITON_INTERPRET": "1"})
    if mode in ("cuda", "codegen") and os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("--mode cuda/codegen needs TRITON_INTERPRET unset")
    import logging

    import torch
    import triton

    t0 = time.monotonic()
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION")
    if mode == "codegen":  # silence the expected failure to compile for the fake target
        torch._logging.set_logs(inductor=logging.CRITICAL)
        warnings.filterwarnings("ignore", message="Could not find an active CPU backend")
    dev = torch.cuda.get_device_name() if mode == "cuda" else "no GPU"
    print(f"check_inductor_launch --mode {mode}: torch {torch.__version__}, triton "
          f"{triton.__version__}, {dev}", flush=True)
    table = Table(opts.verbose)
    if mode == "interp":
        run_interp(names, table)
    else:
        run_compile_modes(mode, names, table, opts.budget if mode == "cuda" else 0)
    if mode == "cuda":
        table.run("reduce-overhead: no CUDA-graph skip", check_cudagraphs)
        table.run("inductor_launch=False: custom op", check_custom_op_option)
        table.run("FX graph cache hit", check_fx_cache)
    n = len(table.rows)
    print(f"{table.rows.count('PASS')}/{n} passed, {table.failures} failed, "
          f"{table.rows.count('SKIP')} skipped ({mode}, {time.monotonic() - t0:.0f} s)")
    sys.exit(1 if table.failures else 0)


if __name__ == "__main__":
    main()
