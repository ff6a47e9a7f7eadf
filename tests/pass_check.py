"""Compile a model form with the pass and prove both the rewrite and the numerics."""
from __future__ import annotations

import os
import re
from typing import Callable

import torch
from torch._inductor.utils import run_and_get_code

import fusion_pass
from fusion_pass.graph_util import aten
from fusion_pass.inductor_launch import OP_NAME as INDUCTOR_LAUNCH

from .model_forms import build, clone_args, to_float64
from .numerics import assert_spec_close

FUSED_CACHE = "fused_qkv.split_norm_rope_cache"
FUSED_NOCACHE = "fused_qkv.split_norm_rope"
# Inductor's own launch of the kernel in the generated code (FusionOptions.inductor_launch).
LAUNCH_RE = re.compile(r"fused_qkv_inductor_kernel_\d+\.run\(")
NOCACHE_RE = re.compile(r"fused_qkv\.split_norm_rope(?!_cache)")
# On CUDA with inductor_launch on (the default), every fused chain must use the Inductor
# launch; REQUIRE_INDUCTOR_LAUNCH=0 accepts the custom op too (the code must match the report).
REQUIRE_INDUCTOR_LAUNCH = os.environ.get("REQUIRE_INDUCTOR_LAUNCH", "1") != "0"


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


def _calls(code: str, call: str) -> list:
    """(size tuple as a list of dim expressions, the rest of its line) for every ``call`` in
    generated code: ``call`` is a regex ending where the tuple's ``(`` starts, e.g.
    ``empty_strided_\\w+\\(``.  Parentheses inside a dim (``(1 + s0)//2``) are balanced,
    not cut at."""
    out = []
    for m in re.finditer(call + r"\(", code):
        depth, i = 0, m.end() - 1
        for j in range(i, len(code)):
            depth += {"(": 1, ")": -1}.get(code[j], 0)
            if depth == 0:
                break
        dims, depth, cur = [], 0, ""
        for ch in code[i + 1: j]:
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                dims.append(cur)
                cur = ""
            else:
                cur += ch
        eol = code.find("\n", j)
        out.append(([x.strip() for x in dims + [cur] if x.strip()],
                    code[j + 1: eol if eol >= 0 else len(code)]))
    return out


def size_tuples(code: str, call: str) -> list:
    """The size tuples of every ``call`` in generated code (see ``_calls``)."""
    return [dims for dims, _ in _calls(code, call)]


_INPUT_SIZES = r"assert_size_stride\(\w+, "
_BUFFERS = r"empty_strided_\w+\("
_SYM = r"\b[su]\d+\b"


def _aliases(code: str) -> dict:
    """The generated code's ``s47 = s11`` lines: symbols Dynamo found equal (a StaticCache's
    batch and the activations'), each mapped to the end of its chain."""
    alias = dict(re.findall(r"^\s*([su]\d+) = ([su]\d+)\s*$", code, re.M))
    out = {}
    for s in alias:
        t, seen = s, set()
        while t in alias and t not in seen:
            seen.add(t)
            t = alias[t]
        out[s] = t
    return out


def _symbols(text: str, alias: dict) -> set:
    """The symbols (``s0``, ``u0``) in ``text``, aliases resolved (``_aliases``)."""
    return {alias.get(s, s) for s in re.findall(_SYM, text)}


def _input_symbols(inputs: list, alias: dict, caches: bool) -> set:
    """Symbols in the input size tuples ``inputs`` of caches (4 or more dims, as
    ``cache_numels`` counts them) or, ``caches=False``, of the other inputs."""
    return {s for dims in inputs if (len(dims) >= 4) == caches
            for x in dims for s in _symbols(x, alias)}


def cache_symbols(code: str) -> set:
    """Symbols (``s0``...) in the sizes of the generated code's cache inputs: the caches'
    dynamic sizes."""
    return _input_symbols(size_tuples(code, _INPUT_SIZES), _aliases(code), True)


def _numel_at(dims: list, env: dict, alias: dict) -> int:
    """Element count of a size tuple of generated code, with each symbol's value from ``env``
    (aliases resolved; 1 for a symbol it lacks: a token count)."""
    n = 1
    for x in dims:
        local = {s: env.get(alias.get(s, s), 1) for s in re.findall(_SYM, x)}
        n *= int(eval(x, {"__builtins__": {}}, local))  # sympy's printout: + - * // ( )
    return n


def assert_no_cache_copy(code: str, args) -> None:
    """No buffer as large as a cache is allocated: the caches are written in place.

    With a dynamic cache size (a symbol in a cache input's size), no buffer is sized by a
    symbol only caches have (a block count, a StaticCache's length; index buffers, int32 or
    int64, may be), and sizes are compared with the caches' symbols set large: a copy of a
    cache is as large as the cache for every value.  A batch symbol the cache shares with
    the activations (a StaticCache's) is set large too, so a test's cache must hold more
    than one step's tokens.  A 5-D input (``kv_cache[2, ...]``) counts as its halves."""
    alias, inputs = _aliases(code), size_tuples(code, _INPUT_SIZES)
    syms = _input_symbols(inputs, alias, True)
    shared = _input_symbols(inputs, alias, False)
    big = {s: 1 << 20 for s in syms}
    caches = [_numel_at(d, big, alias) // (_numel_at(d[:1], big, alias) if len(d) == 5 else 1)
              for d in inputs if len(d) >= 4]
    halves = [a.numel() // a.shape[0] for a in args
              if isinstance(a, torch.Tensor) and a.dim() == 5 and a.shape[0]]
    smallest = min(caches or cache_numels(args) + halves)
    for dims, rest in _calls(code, _BUFFERS):
        # an index buffer (the slots, sized by a StaticCache's batch symbol where Dynamo
        # keeps it apart from the activations') cannot hold a cache's values
        is_index = re.match(r"\s*,\s*\([^()]*\)\s*,\s*torch\.int(32|64)\b", rest)
        used = (syms - shared) & {s for x in dims for s in _symbols(x, alias)}
        assert is_index or not used, \
            f"a buffer sized by the cache's {sorted(used)} (a cache copy?): {dims}"
        n = _numel_at(dims, big, alias)
        assert n < smallest, f"a buffer of {n} elements (a cache copy?): {dims}" + \
            (f" (cache symbols {sorted(syms)} set to {1 << 20})" if syms else "")


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


def assert_fused_code(code: str, report, *, cache: bool, device: str,
                      inductor_launch: bool = True) -> None:
    """The generated code calls what the pass inserted, once per fused chain in the report.

    On CUDA with ``inductor_launch`` (the default) the chains must use the Inductor launch
    (unless ``REQUIRE_INDUCTOR_LAUNCH=0``): ``fused_qkv_inductor_kernel`` launched by the code
    and no ``fused_qkv`` custom op called; elsewhere the custom op, with the cache write
    (``cache``) or without."""
    fused = report.fused
    assert fused, f"nothing fused:\n{report}"
    launched = [c for c in fused if c.op == INDUCTOR_LAUNCH]
    if not (device == "cuda" and inductor_launch):
        assert not launched, f"Inductor launch used where it must not be:\n{report}"
    elif REQUIRE_INDUCTOR_LAUNCH:
        assert len(launched) == len(fused), f"not every chain uses the Inductor launch " \
            f"(the fusion_pass DEBUG log says why):\n{report}"
    want = "fused" if cache else "fused-partial"
    assert all(c.status == want for c in fused), f"expected {want} chains:\n{report}"
    n = len(LAUNCH_RE.findall(code))
    assert n >= len(launched), f"{n} kernel launch(es) in the code for {len(launched)}:\n{report}"
    ops = len(fused) - len(launched)
    if ops == 0:
        assert "torch.ops.fused_qkv" not in code, f"a fused_qkv custom op is called:\n{report}"
        return
    got = code.count(FUSED_CACHE) if cache else len(NOCACHE_RE.findall(code))
    assert got >= ops, f"{FUSED_CACHE if cache else FUSED_NOCACHE} not in the code:\n{report}"
    if not cache:
        assert FUSED_CACHE not in code, f"{FUSED_CACHE} in the code:\n{report}"


def check_fused(form, *, expect=FUSED_CACHE, dynamic=False, **options):
    """Compile, then assert the op replaced the chain and the numbers are right."""
    fn, args0 = build(form)
    before = clone_args(args0)
    args, out, code, fpass = _run(fn, args0, dynamic, **options)
    report = fpass.report
    assert_fused_code(code, report, cache=expect == FUSED_CACHE, device=form.device,
                      inductor_launch=options.get("inductor_launch", True))
    targets = set().union(*fpass.graphs)
    assert aten.rsqrt.default not in targets, "an unfused norm is left"
    if expect == FUSED_CACHE:
        assert aten.index_put.default not in targets, "an unfused cache write is left"
        assert_no_cache_copy(code, args)
        if LAUNCH_RE.search(code):  # the kernel writes the cache inputs: no clone, no copy back
            copies = re.findall(r".*(?:\bclone\(|clone_preserve_strides|\.copy_\().*", code)
            assert not copies, f"a clone/copy in the generated code: {copies[:3]}"
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


def launch_path_backend(fp: Callable[[torch.fx.Graph], None], graphs: list):
    """A ``torch.compile`` backend that takes a graph through AOT autograd, Inductor's
    decompositions and its whole post-grad pipeline (``fp``, the pass or a callable standing
    for it, included), then runs it eagerly:
    on the CPU the Inductor launch's ``triton_kernel_wrapper_mutation`` nodes launch the
    kernel under Triton's interpreter.  Each final graph is appended to ``graphs``.  Needs
    ``inductor_launch_on_cpu`` (Inductor itself writes no code for user kernels on the CPU)."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.fx_passes.post_grad import post_grad_passes, view_to_reshape
    from torch._inductor.virtualized import V

    def fw(gm, example_inputs):
        fake = torch._guards.detect_fake_mode(example_inputs)
        view_to_reshape(gm)  # as compile_fx does first: a fused output's strides may differ
        with V.set_fake_mode(fake), \
                torch._inductor.config.patch(post_grad_custom_post_pass=fp):
            post_grad_passes(gm, is_inference=True)
        gm.recompile()
        graphs.append(gm.graph)
        return gm

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=fw,
                                     decompositions=select_decomp_table(),
                                     keep_inference_input_mutations=True)
    return backend


def inductor_launch_on_cpu(monkeypatch) -> None:
    """Let the pass build its Inductor launch for CPU graphs, with interpreted kernels (no
    TTIR to analyse there: the CUDA tests and the launch check's codegen mode cover that)."""
    from fusion_pass import inductor_launch as il

    monkeypatch.setattr(il, "DEVICES", il.DEVICES | {"cpu"})
    monkeypatch.setattr(il, "ALLOW_INTERPRETER", True)
    monkeypatch.setattr(il, "CHECK_WRITES", False)


def assert_launch_graph(graph: torch.fx.Graph, fused: int) -> None:
    """A final graph of ``launch_path_backend``: ``fused`` kernel nodes writing the caches that
    are graph inputs, no fused_qkv custom op, no clone of an input, no epilogue ``copy_`` into
    a cache (other state, e.g. a StaticCache's counters, keeps its own)."""
    hop = torch.ops.higher_order.triton_kernel_wrapper_mutation
    hops = [n for n in graph.nodes if n.target is hop]
    assert len(hops) == fused, f"{len(hops)} kernel node(s) for {fused} fused chain(s)"
    targets = {str(n.target) for n in graph.nodes if n.op == "call_function"}
    assert not any("fused_qkv" in t for t in targets), f"a fused_qkv op is left: {targets}"
    bases = {h.kwargs["kwargs"][k] for h in hops for k in ("k_base", "v_base")}
    copies = [n.name for n in graph.nodes if n.target is aten.copy_.default and n.args[0] in bases]
    assert not copies, f"an epilogue copy_ into a cache is left: {copies}"
    cloned = [n.name for n in graph.nodes if "clone" in str(n.target) and
              isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "placeholder"]
    assert not cloned, f"a graph input is cloned: {cloned}"
    for h in hops:
        kw = h.kwargs["kwargs"]
        assert kw["HAS_CACHE"] and kw["k_base"].op == "placeholder", "K cache not an input"
        assert kw["V_IN_K_BASE"] or kw["v_base"].op == "placeholder", "V cache not an input"


def force_pad_mm(monkeypatch, policy: str) -> list:
    """Force the answer of Inductor's ``pad_mm`` benchmark (CUDA-only, per shape and process):
    pad every matmul it is offered (``"all"``) or every other one (``"alternate"``), also on
    the CPU, where it is never asked.  Returns the answers given, in order."""
    from torch._inductor.fx_passes import pad_mm

    answers = []

    def should_pad(match, mat1, mat2, op, input=None):
        answers.append(policy == "all" or len(answers) % 2 == 0)
        return answers[-1]
    monkeypatch.setattr(pad_mm, "should_pad", should_pad)
    return answers
