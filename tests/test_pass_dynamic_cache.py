"""A dynamic KV-cache size: the second compile of a function, after its caches changed size.

With automatic dynamic shapes, Dynamo recompiles a function called with caches of another
number of blocks and makes that size symbolic, one symbol per cache (``s0`` for K, ``s1`` for
V: nothing tells Dynamo they are equal).  The pass used to compare the K and V cache shapes
symbolically only, so it found them different and fused without the cache write, leaving
Inductor to write the caches: benchmarks/bench_op.py's T=65536 rows, where the caches grow
and the "+pass" column measured 2.4x the fused op's time on an H200 (NHD).  Now sizes equal
at compile time are guarded equal (a recompile if they ever differ) and the write is fused.

Each test compiles an unfused form (tests/model_forms.py) on the CPU (the custom op, the
kernel under Triton's interpreter) with caches of 8 blocks, then of 16 blocks, and checks the
second compile: the cache write fused, no buffer sized like a cache in the generated code
(no clone, no copy back), and outputs and caches right (tests/numerics.py's rule).  The same
scenario on the Inductor-launch path (CUDA code, fake target on the CPU):
benchmarks/check_inductor_launch.py's ``*_dyn_cache`` forms, run here in a subprocess.
"""
import dataclasses
import os
import re
import subprocess
import sys
from unittest import mock

import pytest
import torch
from torch._inductor.graph import GraphLowering

import fusion_pass

from .conftest import DEVICES
from .model_forms import Form, build, clone_args, resize_caches
from .pass_check import (FUSED_CACHE, INDUCTOR_LAUNCH, LAUNCH_RE, NOCACHE_RE,
                         assert_no_cache_copy, assert_numerics, cache_symbols)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fused_ops(compiled, args):
    """The fused_qkv ops a call of ``compiled`` runs (a call that compiles nothing: under the
    profiler, so that no tracing is seen; the caches get the same rows again)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        compiled(*args)
    return [e.name.split("::")[1] for e in prof.events() if e.name.startswith("fused_qkv::")]


def _run_and_get_code(compiled, args):
    """``torch._inductor.utils.run_and_get_code`` without its ``torch._dynamo.reset()`` (which
    would forget the first compile: no recompile, no dynamic cache size)."""
    codes = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        out = compiled(*args)
    return out, codes


def _compile_calls(fn, fpass, calls, dynamic_tokens=False):
    """Compile ``fn`` with the pass; run it on each argument list in ``calls``, in order.

    Returns per call: (args after the call, outputs, generated code of that call (empty when
    it reused a compiled graph), fused_qkv ops called, args before the call)."""
    torch._dynamo.reset()
    compiled = torch.compile(fn)
    res = []
    with torch.no_grad(), torch._inductor.config.patch(post_grad_custom_post_pass=fpass,
                                                       fx_graph_cache=False):
        for args in calls:
            if dynamic_tokens:  # the token dims dynamic as well, as serving engines mark them
                torch._dynamo.maybe_mark_dynamic(args[0], 1)
                torch._dynamo.maybe_mark_dynamic(args[4], 1)
                torch._dynamo.maybe_mark_dynamic(args[5], 0)
                torch._dynamo.maybe_mark_dynamic(args[6], 0)  # a StaticCache's positions [S]
            before = clone_args(args)
            out, codes = _run_and_get_code(compiled, args)
            res.append((args, out, "\n".join(codes), _fused_ops(compiled, args), before))
    return res


CACHES = ["view", "nhd", "hnd", "index_copy", "fp8"]


def _check_recompiled(fn, fpass, runs, launch: bool = False) -> str:
    """Two compiles (the third call reused the dynamic graph), the cache write fused in each,
    the second one's cache size symbolic, written in place; every call right.  ``launch``:
    CUDA, where Inductor's code launches the kernel itself (no custom op is called).  Returns
    the second compile's code."""
    report = fpass.report
    op = INDUCTOR_LAUNCH if launch else FUSED_CACHE
    assert report.counts["graphs"] == 2, f"expected 2 compiles (the third call reuses the " \
        f"dynamic graph):\n{report}"
    assert all(c.status == "fused" and c.op == op for c in report.candidates), \
        f"the cache write is not fused in every compile:\n{report}"
    args, out, code, ops, before = runs[1]
    assert cache_symbols(code), "the second compile did not make the cache size dynamic"
    if launch:
        assert LAUNCH_RE.search(code) and "fused_qkv." not in code, code
    else:
        assert FUSED_CACHE in code and not NOCACHE_RE.search(code), code
    assert "index_put" not in code and "index_copy" not in code, "an unfused cache write"
    assert_no_cache_copy(code, args)
    for args, out, _, ops, before in runs:
        assert ops == ([] if launch else ["split_norm_rope_cache"]), f"op calls {ops}"
        assert_numerics(fn, args, out, before)
    return code


@pytest.mark.parametrize("dynamic_tokens", [False, True], ids=["static_T", "dynamic_T"])
@pytest.mark.parametrize("cache", CACHES)
def test_recompile_with_dynamic_cache_size_fuses_in_place(cache, dynamic_tokens):
    fn, args8 = build(Form(cache=cache))
    fpass = fusion_pass.FusionPass(allow_cpu=True)
    calls = [args8, resize_caches(args8, 16, 1), resize_caches(args8, 32, 2)]
    _check_recompiled(fn, fpass, _compile_calls(fn, fpass, calls, dynamic_tokens))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("change", ["length", "batch", "length_dynamic_T"])
def test_recompile_with_new_static_cache_size_fuses_in_place(change, device):
    """Hugging Face StaticCache ``[B, H, L, D]``: a generate() call with another
    ``max_cache_len`` (or batch size) recompiles with L (or B) symbolic.  The write used to be
    rejected there ("cache view has dynamic shape"); the op now takes the cache input itself,
    with B and L read from the graph for the slots (b * L + cache_position).  On CUDA the
    Inductor-launch path, with the real kernel."""
    form = Form(split="separate", hf=True, cache="static", table="gathered", rope="rotate_half",
                device=device)
    fn, args16 = build(form)
    if change == "batch":  # every input's batch dim changes with the cache's
        calls = [args16] + [build(dataclasses.replace(form, B=b))[1] for b in (3, 5)]
    else:
        calls = [args16] + [resize_caches(args16, n, seed, dim=2)
                            for seed, n in ((1, 24), (2, 40))]
    fpass = fusion_pass.FusionPass(allow_cpu=True)
    runs = _compile_calls(fn, fpass, calls, change == "length_dynamic_T")
    code = _check_recompiled(fn, fpass, runs, launch=device == "cuda")
    if change == "length_dynamic_T":  # x_in [B, S, hidden] with S a symbol
        assert re.search(r"assert_size_stride\(\w+, \(2, s\d+, 32\)", code), \
            "the token count is not dynamic"


def test_k_and_v_caches_of_different_sizes():
    """K and V caches that differ in size are not the op's (one geometry): that compile
    fuses without the cache write (Inductor writes the caches), and stays correct.  Guards
    go both ways: caches of equal sizes afterwards still run a graph with the write fused."""
    fn, args8 = build(Form(cache="view", negative_slot=True))  # -1 counts from each cache's end
    fpass = fusion_pass.FusionPass(allow_cpu=True)
    calls = [args8] + [resize_caches(args8, nb, seed) for seed, nb in
                       enumerate(((16, 16), (16, 24), (32, 32), (40, 24)), 1)]
    runs = _compile_calls(fn, fpass, calls)
    statuses = [c.status for c in fpass.report.candidates]
    assert statuses == ["fused", "fused", "fused-partial"], f"{statuses}:\n{fpass.report}"
    assert "K and V caches differ in shape" in fpass.report.candidates[2].reason
    want = ["split_norm_rope_cache", "split_norm_rope_cache", "split_norm_rope",
            "split_norm_rope_cache", "split_norm_rope"]
    assert [r[3] for r in runs] == [[w] for w in want], [r[3] for r in runs]
    for args, out, code, ops, before in runs:
        assert_numerics(fn, args, out, before)


def test_inductor_launch_dynamic_cache_forms():
    """The Inductor-launch path (CUDA wrapper code for a fake target, and the post-grad graph
    run under the interpreter): benchmarks/check_inductor_launch.py's dynamic-cache forms (a
    StaticCache of a new length among them), and
    a dynamic T with ``dynamic_tiles="prefill"`` (its launch must carry the T=1024 tiles),
    and dynamic T run past the large-T switch (lowered to T=4 for those forms), with larger
    tiles there (int32 offsets, int64 ones with int32 turned off, and both past a lowered
    int32 bound) and with the same one-token tiles, and the switch at T=128 for 64 heads a
    token at D=128."""
    forms = ("view_dyn_cache,hnd_dyn_cache,view_dyn_cache_dyn_t,hf_static_dyn_cache,"
             "gated_dyn_prefill,"
             "view_dyn_switch,view_dyn_switch_int64,view_dyn_switch_wide,d256_kv8_dyn_switch,"
             "many_heads_dyn")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU modes (codegen and interp), even on a GPU box
    p = subprocess.run([sys.executable, "benchmarks/check_inductor_launch.py", "--forms", forms],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert p.stdout.count("PASS") == 20, p.stdout


def test_no_cache_copy_check_tells_copies_from_batch_outputs():
    """``assert_no_cache_copy`` on generated code whose StaticCache batch symbol the activations
    share: the q output passes and a buffer of the cache's size fails, also when the code
    names the cache's symbol through an alias (``s47 = s11``).  Where Dynamo keeps the cache's
    batch symbol apart (torch 2.11), an index buffer sized by it passes and a float one fails,
    and so does one sized by the cache's length."""
    inputs = ("assert_size_stride(arg0_1, (s11, 3, 96), (288, 96, 1), 'input')\n"
              "assert_size_stride(arg7_1, (s11, 2, 16, 64), (2048, 1024, 64, 1), 'input')\n")
    assert_no_cache_copy(inputs + "buf0 = empty_strided_cuda((3*s11, 4, 64), (256, 64, 1), "
                         "torch.bfloat16)\n", [])
    copy = "buf1 = empty_strided_cuda((s47, 2, 16, 64), (2048, 1024, 64, 1), torch.bfloat16)\n"
    with pytest.raises(AssertionError, match="a buffer of"):
        assert_no_cache_copy(inputs + copy.replace("s47", "s11"), [])
    with pytest.raises(AssertionError, match="a buffer of"):  # only if the alias is followed
        assert_no_cache_copy("    s47 = s11\n" + inputs + copy, [])
    apart = "    s11 = arg8_1\n    s47 = arg13_1\n" + inputs.replace("(s11, 2", "(s47, 2")
    assert_no_cache_copy(apart + "buf4 = empty_strided_cuda((3*s47, ), (1, ), torch.int64)\n",
                         [])
    with pytest.raises(AssertionError, match=r"cache's \['s47'\]"):
        assert_no_cache_copy(apart + "buf4 = empty_strided_cuda((3*s47, 64), (64, 1), "
                             "torch.float32)\n", [])
    by_length = ("assert_size_stride(arg7_1, (2, 2, s1, 64), (256*s1, 128*s1, 64, 1))\n"
                 "buf1 = empty_strided_cuda((2, s1, 64), (64*s1, 64, 1), torch.float32)\n")
    with pytest.raises(AssertionError, match=r"cache's \['s1'\]"):
        assert_no_cache_copy(by_length, [])
