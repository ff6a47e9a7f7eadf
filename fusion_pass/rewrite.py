"""Graph surgery: insert the fused op call and rewire the users of the unfused chain.

With a cache write the op is called through ``auto_functionalized_v2`` with the mutated
graph inputs as ``_all_bases`` and each cache's geometry as size/stride/offset, so Inductor
re-inplaces it onto the caches with no clone (v1 would clone a cache that is a view, e.g. one
half of a ``[2, ...]`` kv tensor).  The epilogue ``copy_(input, new)`` then takes the
auto_functionalized output directly, which Inductor drops.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch.fx import Graph, Node

from .graph_util import aten, is_cast, prims, same_sym, set_fake_val, size_arg, tensor_val
from .layout import HeadLayout


class Builder:
    """Inserts nodes before ``anchor`` and gives each a fake value."""

    def __init__(self, graph: Graph, fake_mode, anchor: Node, stack_trace: Optional[str] = None):
        self.graph, self.fake_mode, self.anchor = graph, fake_mode, anchor
        self.stack_trace = stack_trace  # of the code replaced: shows in Inductor's output code
        self.created = []

    def call(self, target, args, kwargs=None) -> Node:
        with self.graph.inserting_before(self.anchor):
            n = self.graph.call_function(target, tuple(args), kwargs or {})
        set_fake_val(n, self.fake_mode)
        if self.stack_trace:
            n.meta["stack_trace"] = self.stack_trace
        self.created.append(n)
        return n

    def size(self, s, providers) -> object:
        return size_arg(self.graph, s, providers, self.anchor)

    # -- inputs -------------------------------------------------------------------
    def rows2d(self, root: Node) -> Node:
        """The projection as [rows, W] (a view when the leading dims flatten)."""
        v = tensor_val(root)
        if v.dim() == 2:
            return root
        return self.call(aten.reshape.default, (root, [-1, v.shape[-1]]))

    def flat1d(self, n: Node) -> Node:
        v = tensor_val(n)
        return n if v.dim() == 1 else self.call(aten.reshape.default, (n, [-1]))

    def table_cols(self, table: Node, col: int, width: int) -> Node:
        v = tensor_val(table)
        if col == 0 and v.shape[1] == width:
            return table
        return self.call(aten.slice.Tensor, (table, 1, col, col + width))

    def per_token(self, g: Node, x: Node, lay: HeadLayout, providers, unsqueeze=()) -> Node:
        """Per-token values broadcast against head tensor ``x`` -> [T, C] in token order.

        ``unsqueeze``: dims to unsqueeze ``g`` at first (in order), as the code did before
        multiplying (Hugging Face ``cos.unsqueeze(1)``); then leading dims as broadcasting.
        """
        gv, xv = tensor_val(g), tensor_val(x)
        nd = xv.dim()
        cur = g
        for dim in unsqueeze:
            cur = self.call(aten.unsqueeze.default, (cur, dim))
        while tensor_val(cur).dim() < nd:
            cur = self.call(aten.unsqueeze.default, (cur, 0))
        cv = tensor_val(cur)
        tok = list(lay.tok_dims)
        others = [i for i in range(nd - 1) if i not in tok]
        for i in others:
            if cv.shape[i] != 1:
                raise ValueError("cos/sin vary along a head dim")
        perm = tok + others + [nd - 1]
        if perm != list(range(nd)):
            cur = self.call(aten.permute.default, (cur, perm))
        cv = tensor_val(cur)
        need_expand = any(not same_sym(cv.shape[j], xv.shape[tok[j]]) for j in range(len(tok)))
        if need_expand:
            sizes = [self.size(xv.shape[t], providers) for t in tok] + [-1] * (nd - len(tok))
            cur = self.call(aten.expand.default, (cur, sizes))
        return self.call(aten.reshape.default, (cur, [-1, gv.shape[-1]]))

    # -- outputs ------------------------------------------------------------------
    def to_head_tensor(self, out: Node, like: Node, lay: HeadLayout, providers) -> Node:
        """Op output [T, H, D] -> the shape and dim order of ``like``."""
        lv = tensor_val(like)
        tok_sizes = [self.size(lv.shape[t], providers) for t in lay.tok_dims]
        canon = tok_sizes + ([lay.heads] if lay.head_axis is not None else []) + [lay.head_dim]
        cur = self.call(aten.reshape.default, (out, canon))
        perm = lay.canonical_to_x()
        if perm != list(range(len(perm))):
            cur = self.call(aten.permute.default, (cur, perm))
        kept = sorted(list(lay.tok_dims) + ([lay.head_axis] if lay.head_axis is not None else [])
                      + [lay.ndim - 1])
        for dim in range(lay.ndim):
            if dim not in kept:
                cur = self.call(aten.unsqueeze.default, (cur, dim))
        return cur


def _cast_target(n: Node):
    """The dtype a pure dtype cast converts to (None if it also changes anything else)."""
    if n.target is prims.convert_element_type.default:
        return n.args[1]
    if set(n.kwargs) <= {"dtype"} and len(n.args) == 1:
        return n.kwargs.get("dtype")
    return None


def rewire(b: Builder, old: Node, new: Node, users=None) -> None:
    """Point ``users`` (default: all) of ``old`` at ``new``, an op output of the same shape.

    The op returns the activation dtype.  Where the unfused chain computed in float32 and cast
    back, that cast is now a no-op: its users take ``new`` directly (else Inductor launches a
    copy kernel for it).  Any other user of the float32 value gets an explicit upcast."""
    users = list(old.users) if users is None else users
    ov, nv = tensor_val(old), tensor_val(new)
    up = None
    for u in users:
        if ov.dtype == nv.dtype:
            u.replace_input_with(old, new)
        elif is_cast(u) and u.args[0] is old and _cast_target(u) == nv.dtype:
            u.replace_all_uses_with(new)
        else:
            if up is None:
                up = b.call(prims.convert_element_type.default, (new, ov.dtype))
            u.replace_input_with(old, up)


def op_kwargs(op, args: tuple) -> dict:
    names = [a.name for a in op._schema.arguments]
    return dict(zip(names, args))


def call_fused_with_cache(b: Builder, op, args: tuple, kc: dict, vc: dict) -> tuple:
    """auto_functionalized_v2 of the cache op.  kc/vc: dict(base, size, stride, offset)."""
    kwargs = op_kwargs(op, args)
    kwargs.pop("key_cache")
    kwargs.pop("value_cache")
    bases = [kc["base"]]
    if vc["base"] is not kc["base"]:
        bases.append(vc["base"])
    for name, c in (("key_cache", kc), ("value_cache", vc)):
        kwargs[f"_{name}_base_index"] = bases.index(c["base"])
        if c.get("alias"):  # the graph input itself: no view to describe (may be dynamic)
            continue
        kwargs[f"_{name}_size"] = tuple(c["size"])
        kwargs[f"_{name}_stride"] = tuple(c["stride"])
        kwargs[f"_{name}_storage_offset"] = c["offset"]
    kwargs["_all_bases"] = bases
    af = b.call(torch.ops.higher_order.auto_functionalized_v2, (op,), kwargs)
    outs = [b.call(operator.getitem, (af, i)) for i in range(4)]
    new_bases = {id(base): b.call(operator.getitem, (af, 4 + i)) for i, base in enumerate(bases)}
    return af, outs, new_bases


def call_fused(b: Builder, op, args: tuple) -> tuple:
    call = b.call(op, args)
    return call, [b.call(operator.getitem, (call, i)) for i in range(4)]


def replace_cache_chain(b: Builder, write, new_base: Node) -> None:
    """Users of the old write now read the new base (or the written view of it)."""
    for n in write.full_value_nodes:
        n.replace_all_uses_with(new_base)
    ip = write.index_put
    # users left: not the full-value nodes just bypassed (dead now, e.g. the view back to the
    # cache's shape), for which no view needs building
    live = [u for u in ip.users if u.users or u not in write.full_value_nodes]
    if live and ip.args[0] is write.base:
        ip.replace_all_uses_with(new_base)
    elif live:
        sv = tensor_val(ip.args[0])
        view = b.call(aten.as_strided.default,
                      (new_base, list(sv.shape), list(sv.stride()), sv.storage_offset()))
        ip.replace_all_uses_with(view)

