"""Matcher for the QKV split: which projection, which columns, which token order.

Walks a per-head tensor back through view ops (split/chunk getitems, slices, narrow, views,
reshapes, transposes) to the projection it views, then decodes the columns from strides
(``layout.head_layout``).  Views applied *after* the norm (Hugging Face transposes the normed
tensor) are replayed on fake values so the layout is still relative to the projection.
"""
from __future__ import annotations

import dataclasses

import torch
from torch.fx import Node

from .graph_util import is_cast, is_row_trim, is_view_node, tensor_val, val, view_input
from .layout import HeadLayout, LayoutError, head_layout


@dataclasses.dataclass
class HeadSource:
    root: Node  # the projection [..., W]
    layout: HeadLayout  # of the tensor the rope reads (and writes, same shape)
    raw: Node  # the view of the projection the chain starts from (a free provider of sizes)


def trace_to_root(n: Node) -> tuple:
    """(root, view nodes from n up to root): the first non-view ancestor through views, or
    the row trim of a padded matmul (``is_row_trim``)."""
    chain = []
    while is_view_node(n) and not is_row_trim(n):
        chain.append(n)
        n = view_input(n)
    return n, chain


def trace_views(n: Node, stop) -> tuple:
    """Walk up through views and casts until ``stop(node)``; returns (node, ops walked)."""
    ops = []
    while not stop(n) and (is_view_node(n) or is_cast(n)):
        ops.append(n)
        n = view_input(n) if is_view_node(n) else n.args[0]
    return n, ops


def _replay(v: torch.Tensor, ops: list, fake_mode) -> torch.Tensor:
    """Apply view ops (outermost last) to fake value v; casts are skipped (same layout)."""
    for op in reversed(ops):
        if is_cast(op):
            continue
        rest = tuple(val(a) if isinstance(a, Node) else
                     [val(e) if isinstance(e, Node) else e for e in a] if isinstance(a, (list, tuple))
                     else a for a in op.args[1:])
        with fake_mode:
            if op.target.__name__ == "getitem":  # split output: replay split then index
                sp = op.args[0]
                srest = tuple(val(a) if isinstance(a, Node) else a for a in sp.args[1:])
                v = sp.target(v, *srest, **sp.kwargs)[op.args[1]]
            else:
                v = op.target(v, *rest, **op.kwargs)
    return v


def head_source(x_raw: Node, post_ops: list, head_dim: int, fake_mode) -> HeadSource:
    """Layout (relative to the projection) of the tensor reached from ``x_raw`` via post_ops."""
    root, _ = trace_to_root(x_raw)
    rv = tensor_val(root)
    xv = tensor_val(x_raw)
    if rv is None or xv is None:
        raise LayoutError("no fake value")
    if root is x_raw and not is_row_trim(root):
        raise LayoutError("head tensor is computed, not a view of a projection")
    if not torch._C._is_alias_of(xv, rv) and xv.untyped_storage() is not rv.untyped_storage():
        raise LayoutError("head tensor does not share the projection's storage")
    v = _replay(xv, post_ops, fake_mode) if post_ops else xv
    if post_ops and not torch._C._is_alias_of(v, xv):
        raise LayoutError("views after the norm copy the tensor")
    return HeadSource(root, head_layout(v, rv, head_dim), x_raw)

