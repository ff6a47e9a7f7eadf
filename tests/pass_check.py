"""Compile a model form with the pass and prove both the rewrite and the numerics."""
from __future__ import annotations

import re

import torch
from torch._inductor.utils import run_and_get_code

import fusion_pass
from fusion_pass.graph_util import aten

from .model_forms import build, clone_args, to_float64
from .numerics import assert_spec_close

FUSED_CACHE = "fused_qkv.split_norm_rope_cache"
FUSED_NOCACHE = "fused_qkv.split_norm_rope"


class RecordingPass(fusion_pass.FusionPass):
    """The pass, keeping the post-grad graphs it produced (for FX-level assertions)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.graphs = []

    def __call__(self, graph):
        super().__call__(graph)
        self.graphs.append({n.target for n in graph.nodes if n.op == "call_function"})


def cache_numels(args):
    return [a.numel() for a in args if isinstance(a, torch.Tensor) and a.dim() >= 4]


def assert_no_cache_copy(code: str, args) -> None:
    """No buffer as large as a cache is allocated: the caches are written in place."""
    biggest = min(cache_numels(args))
    for m in re.finditer(r"empty_strided_\w+\(\(([^)]*)\)", code):
        dims = [int(x) for x in m.group(1).replace(" ", "").split(",") if x.strip().isdigit()]
        n = 1
        for x in dims:
            n *= x
        assert n < biggest, f"a buffer of {n} elements (a cache copy?) in: {m.group(0)}"


def assert_numerics(fn, args, out, args_before):
    eager_args = clone_args(args_before)
    exact_args = to_float64(clone_args(args_before))
    eager = fn(*eager_args)
    exact = fn(*exact_args)
    for i, (o, e, x) in enumerate(zip(out, eager, exact)):
        assert_spec_close(o, e, x, f"output {i}")
    for i, (a, e, x) in enumerate(zip(args, eager_args, exact_args)):
        if isinstance(a, torch.Tensor) and a.dim() >= 4:  # caches
            assert_spec_close(a, e, x, f"cache arg {i}")


def check_fused(form, *, expect=FUSED_CACHE, dynamic=False, **options):
    """Compile, then assert the op replaced the chain and the numbers are right."""
    fn, args0 = build(form)
    before = clone_args(args0)
    args, out, code, fpass = _run(fn, args0, dynamic, **options)
    report = fpass.report
    assert report.fused, f"nothing fused:\n{report}"
    assert expect in code, f"{expect} not in generated code:\n{report}"
    targets = set().union(*fpass.graphs)
    assert aten.rsqrt.default not in targets, "an unfused norm is left"
    if expect == FUSED_CACHE:
        assert aten.index_put.default not in targets, "an unfused cache write is left"
        assert_no_cache_copy(code, args)
    assert_numerics(fn, args, out, before)
    return report, code


def _run(fn, args, dynamic, **options):
    """Compile ``fn`` with the pass and run it on ``args`` (updated in place: the caches).

    ``dynamic``: mark the token dims dynamic, as serving engines do (caches stay static)."""
    fpass = RecordingPass(**{"allow_cpu": True, **options})
    torch._dynamo.reset()
    if dynamic:
        torch._dynamo.mark_dynamic(args[0], 1)  # x_in [B, S, W]: S tokens per sequence
        torch._dynamo.mark_dynamic(args[4], 1)  # positions [B, S]
        torch._dynamo.mark_dynamic(args[5], 0)  # slots [T]
    with torch._inductor.config.patch(post_grad_custom_post_pass=fpass, fx_graph_cache=False):
        compiled = torch.compile(fn)
        out, codes = run_and_get_code(compiled, *args)
    return args, out, "\n".join(codes), fpass


def check_unfused(form, **options):
    """The pass must leave the chain alone, and the compiled result must still be right."""
    fn, args0 = build(form)
    before = clone_args(args0)
    args, out, code, fpass = _run(fn, args0, False, **options)
    assert "fused_qkv" not in code, f"fused although it must not:\n{fpass.report}"
    assert_numerics(fn, args, out, before)
    return fpass.report
