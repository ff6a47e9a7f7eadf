"""Why a graph where nothing matched may still hold the chain: int arguments made symbolic.

After a recompile with new values, Dynamo's automatic dynamic shapes turn int arguments (a
``num_heads`` passed to a function) into symbols; ``torch.compile(dynamic=True)`` does so
from the first compile.  The matchers need static head counts, head and rotary dims, so such
a graph matches nothing.  Without this note the report would show no candidate at all.
Symbolic tensor dims are not named: a token count (dim 0, or dim 1 in ``[B, S, ...]``), a
cache's block count or block size may be symbolic in a graph the pass handles.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import Graph

from .graph_util import aten, is_op

_TENSOR_PROPERTY = (".size()", ".stride()", ".storage_offset()")
# a graph without any of these holds no part of the chain worth a note
_CHAIN_OPS = (aten.rsqrt.default, aten.index_put.default, aten.index_put_.default)


def _source_name(src) -> str:
    name = src.name  # a property in torch 2.13, a method before
    return name() if callable(name) else name


def _graph_symbols(graph: Graph) -> set:
    """Free symbols of the placeholders' values (SymInt inputs and tensor sizes)."""
    syms = set()
    for n in graph.find_nodes(op="placeholder"):
        v = n.meta.get("val")
        sizes = [v] if isinstance(v, torch.SymInt) else \
            list(v.shape) if isinstance(v, torch.Tensor) else []
        for s in sizes:
            if isinstance(s, torch.SymInt):
                syms |= s.node.expr.free_symbols
    return syms


def symbolic_int_args(graph: Graph, fake_mode) -> list:
    """Dynamo's source names (e.g. ``L['num_heads']``) of the int arguments that are symbols
    in ``graph``: symbols none of whose sources is a tensor's size, stride or offset."""
    env = getattr(fake_mode, "shape_env", None)
    if env is None:
        return []
    used = _graph_symbols(graph)
    out = set()
    for sym, sources in env.var_to_sources.items():
        names = [_source_name(s) for s in sources]
        if sym in used and names and \
                not any(p in n for n in names for p in _TENSOR_PROPERTY):
            out.add(names[0])
    return sorted(out)


def note(graph: Graph, fake_mode) -> Optional[str]:
    """The report's reason for a graph with a norm or a cache write where nothing matched and
    int arguments are symbolic; None otherwise."""
    if not any(is_op(n, *_CHAIN_OPS) for n in graph.nodes):
        return None
    names = symbolic_int_args(graph, fake_mode)
    if not names:
        return None
    return (f"nothing matched, and int arguments are symbolic: {', '.join(names)}. Dynamo made "
            "them dynamic (automatic dynamic shapes after a recompile with new values, or "
            "torch.compile(dynamic=True)); the pass needs static head counts, head and rotary "
            "dims. Pass them as constants (module attributes), compile one function per model "
            "shape (torch._dynamo.reset() between shapes), or mark them static "
            "(torch.compile(dynamic=False))")
