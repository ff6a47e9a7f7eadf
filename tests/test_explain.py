"""fusion_pass.explain: the report of what was fused and why not; logging; the depyf recipe."""
import functools
import importlib.util
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fusion_pass
from fusion_pass.explain import ExplainReport, clone_tensors
from fusion_pass.report import COLUMNS

from .model_forms import Form, _rotate, build, clone_args
from .pass_check import FUSED_CACHE, FUSED_NOCACHE, assert_numerics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _explain(form, **kw):
    fn, args = build(form)
    before = clone_args(args)
    report = fusion_pass.explain(fn, *args, **kw)
    return report, args, before


def _only(report, status):
    cands = [c for c in report.candidates if c.status == status]
    assert cands, str(report)
    return cands[0]


def test_fused_report_table_data_and_logs(caplog):
    with caplog.at_level(logging.DEBUG, logger="fusion_pass"):
        report, args, before = _explain(Form())
    assert isinstance(report, ExplainReport) and report.allow_cpu  # CPU inputs -> allowed
    assert report.counts == {"graphs": 1, "candidates": 1, "fused": 1, "fused_with_cache": 1,
                             "fused_partial": 0, "rejected": 0, "errors": 0}
    c = report.candidates[0]
    assert (c.graph, c.status, c.op) == (0, "fused", FUSED_CACHE)
    assert c.forms["split"] == "Q cols 0+4x64, K cols 256+2x64"
    assert c.forms["norm"] == "rms_norm"
    assert c.forms["rope"].startswith("neox-halves(r=64)") and "positions" in c.forms["rope"]
    assert c.forms["cache"] == "NHD[slot]"
    d = report.to_dicts()[0]
    assert d["status"] == "fused" and d["op"] == FUSED_CACHE and d["cache"] == "NHD[slot]"
    # printed: a summary line, then an aligned table with a header row
    text = str(report)
    lines = text.splitlines()
    assert "1 fused with cache write" in lines[0]
    assert lines[1].split() == ["graph", "candidate", "status", "split", "norm", "rope", "cache",
                                "op", "/", "reason"]
    assert set(lines[2].replace(" ", "")) == {"-"}
    row = lines[3]
    for col, value in zip(COLUMNS, ("0", c.name, "fused", c.forms["split"], "rms_norm")):
        assert lines[1].index(col) == row.index(value), (col, text)
    assert row.rstrip().endswith(FUSED_CACHE)
    # the user's tensors (caches included) were not written: explain ran on copies
    for a, b in zip(args, before):
        assert torch.equal(a, b)
    # logging: one INFO line for the graph with its counts, one DEBUG line per candidate
    recs = [r for r in caplog.records if r.name == "fusion_pass"]
    info = [r.getMessage() for r in recs if r.levelno == logging.INFO]
    assert info == ["fusion_pass: graph 0: 1 candidate(s): 1 fused with cache write, "
                    "0 fused without, 0 rejected; 1 fused op call(s) inserted"]
    assert any(r.levelno == logging.DEBUG and FUSED_CACHE in r.getMessage() for r in recs)


def test_partly_fused_says_why_not_more():
    report, _, _ = _explain(Form(cache="none", return_k=True))
    c = _only(report, "fused-partial")
    assert c.op == FUSED_NOCACHE and c.forms["cache"] is None
    assert (c.guard, c.reason) == ("cache", "no cache write of K")
    assert report.counts["fused_partial"] == 1 and not report.rejected
    assert "cache not fused: no cache write of K" in str(report)


def test_fusion_options_and_clone_inputs_false():
    report, args, before = _explain(Form(), fuse_cache=False, clone_inputs=False)
    c = _only(report, "fused-partial")
    assert "fuse_cache=False" in c.reason
    assert not report.cloned_inputs
    assert torch.equal(args[0], before[0])  # x_in is only read
    # the run wrote into the caller's caches (fused without the cache write: still written)
    assert not all(torch.equal(a, b) for a, b in zip(args[7:], before[7:]))


def test_rejected_eps_names_guard_and_values():
    report, _, _ = _explain(Form(eps=1e-5, k_eps=1e-6))
    c = _only(report, "rejected")
    assert c.guard == "eps" and c.reason == "eps differs on Q (1e-05) and K (1e-06)"
    assert not report.fused
    assert "eps: eps differs on Q (1e-05) and K (1e-06)" in str(report)
    assert report.to_dicts()[0]["guard"] == "eps"


def test_rejected_olmo2_whole_projection_norm():
    report, _, _ = _explain(Form(norm="olmo2"))
    assert report.rejected and not report.fused
    assert all("OLMo2" in c.reason for c in report.rejected), str(report)
    assert "norm spans all heads (OLMo2 style)" in str(report)


def test_rejected_head_dim():
    report, _, _ = _explain(Form(d=32, hq=2, hkv=1))
    c = _only(report, "rejected")
    assert c.guard == "head_dim" and c.reason.startswith("head_dim 32 not in (64, 80, 96, 128")
    assert c.forms["split"] == "Q cols 0+2x32, K cols 64+1x32"


def test_graph_break_gives_graph_indices_and_kwargs_are_passed():
    fn, args = build(Form())
    fn2, args2 = build(Form(eps=1e-5, k_eps=1e-6))

    def two_layers(a, b):
        out = fn(*a)
        torch._dynamo.graph_break()
        return out, fn2(*b)

    report = fusion_pass.explain(two_layers, args, example_kwargs={"b": args2})
    assert report.graphs == 2 and report.target.endswith("two_layers")
    assert [(c.graph, c.status) for c in report.candidates] == [(0, "fused"), (1, "rejected")]


def test_explain_refuses_a_backend():
    fn, args = build(Form())
    with pytest.raises(TypeError, match="backend"):
        fusion_pass.explain(fn, *args, backend="eager")


def test_clone_tensors_keeps_strides_aliasing_and_dynamic_marks():
    kv = torch.randn(2, 3, 4, 5)
    k, v = kv.unbind(0)  # two views of one storage (a cache's halves)
    x = torch.randn(6, 8)[:, 2:5]  # strided, offset view
    torch._dynamo.mark_dynamic(x, 0)
    ck, cv, cx = clone_tensors([k, v, x])
    assert ck.untyped_storage().data_ptr() == cv.untyped_storage().data_ptr()
    assert ck.untyped_storage().data_ptr() != kv.untyped_storage().data_ptr()
    for a, b in ((ck, k), (cv, v), (cx, x)):
        assert torch.equal(a, b)
        assert (a.stride(), a.storage_offset()) == (b.stride(), b.storage_offset())
    assert cx._dynamo_dynamic_indices == {0}
    ck.add_(1)
    assert torch.equal(k, kv[0])  # the original is untouched


def test_torch_logs_env_turns_on_fusion_pass_logs():
    """TORCH_LOGS=+fusion_pass works because fusion_pass is an importable module."""
    code = ("import torch, fusion_pass\n"
            "from tests.model_forms import Form, build\n"
            "fn, args = build(Form(cache='none', return_k=True))\n"
            "fusion_pass.explain(fn, *args)\n")
    env = dict(os.environ, TORCH_LOGS="+fusion_pass", TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "fusion_pass: graph 0: 1 candidate(s)" in p.stderr  # INFO
    assert "fused-partial" in p.stderr  # DEBUG, per candidate


def _load_recipe():
    path = os.path.join(ROOT, "examples", "depyf_recipe.py")
    spec = importlib.util.spec_from_file_location("depyf_recipe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_depyf_recipe_dumps_the_fused_op(tmp_path):
    pytest.importorskip("depyf")
    recipe = _load_recipe()
    files, hits, report = recipe.dump_with_depyf(tmp_path / "dump", device="cpu")
    assert files and report.counts["fused_with_cache"] == 1, str(report)
    assert any(FUSED_CACHE in ln for lines in hits.values() for ln in lines), hits
    names = " ".join(hits)
    assert "AFTER_POST_GRAD" in names, sorted(hits)  # the post-grad graph after our pass


def _chain_with_int_args(qkv, qw, kw, cos_sin, pos, kc, vc, slots, *, hq, hkv, d, r):
    """The vLLM chain with its head counts, head dim and rotary dim as int arguments."""
    t = qkv.shape[0]
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], -1)
    q = F.rms_norm(q.reshape(t, hq, d), (d,), qw, 1e-6)
    k = F.rms_norm(k.view(t, hkv, d), (d,), kw, 1e-6)
    cos, sin = cos_sin[pos].chunk(2, -1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q, k = (_rotate("neox_halves", x, cos, sin, r).to(x.dtype) for x in (q, k))
    kc.view(-1, hkv, d)[slots] = k
    vc.view(-1, hkv, d)[slots] = v.view(t, hkv, d)
    return (q,)


def _int_chain_args(t, hq, hkv, d, r, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(dtype)

    ang = torch.rand(64, r // 2, generator=g) * 6.28
    return (rnd(t, (hq + 2 * hkv) * d), rnd(d), rnd(d), torch.cat([ang.cos(), ang.sin()], -1),
            torch.randint(0, 64, (t,), generator=g), rnd(8, 4, hkv, d), rnd(8, 4, hkv, d),
            torch.randperm(32, generator=g)[:t])


def test_sizes_made_symbolic_by_a_recompile_are_reported():
    """Int arguments that change between calls turn symbolic at the recompile (automatic
    dynamic shapes). The first graph fuses; the second matches nothing, and the report names
    the symbolic int arguments (not T, symbolic too) and what to do instead of showing no
    candidate. Both compute what eager does."""
    torch._dynamo.reset()
    # no FX-graph-cache hit, which would skip the pass and its report
    backend = fusion_pass.make_backend(allow_cpu=True, inductor_options={"fx_graph_cache": False})
    compiled = torch.compile(_chain_with_int_args, backend=backend)
    for i, (t, hq, r) in enumerate(((5, 4, 64), (7, 8, 32))):
        sizes = dict(hq=hq, hkv=2, d=64, r=r)
        args = _int_chain_args(t, **sizes, seed=i)
        before = clone_args(args)
        with torch.no_grad():
            out = compiled(*args, **sizes)
        assert_numerics(functools.partial(_chain_with_int_args, **sizes), args, out, before)
    torch._dynamo.reset()
    rep = backend.report
    assert rep.graphs == 2, str(rep)
    assert [(c.graph, c.status) for c in rep.candidates] == [(0, "fused"), (1, "rejected")], \
        str(rep)
    note = rep.candidates[1]
    assert note.guard == "dynamic" and note.name == "graph", str(rep)
    assert "L['hq']" in note.reason and "L['r']" in note.reason, note.reason
    assert ".size()" not in note.reason  # tensor dims (T here, symbolic too) are not named
    assert "torch.compile(dynamic=False)" in note.reason
