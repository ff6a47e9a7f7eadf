"""Matcher for RMSNorm over the last dim, in the forms post-grad graphs show.

Core (every form): ``xc * rsqrt(mean(xc ** 2, -1, keepdim) + eps)`` with ``xc = x`` or
``x.float()``; then, in either order, an optional cast back and an optional weight multiply:
``F.rms_norm``/``nn.RMSNorm`` (weight before the cast), Hugging Face ``Qwen3RMSNorm`` (cast,
then ``weight * x``), Gemma ``x * (1 + w.float())`` (offset 1), no weight at all.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from torch.fx import Node

from .graph_util import aten, is_cast, is_op, tensor_val


@dataclasses.dataclass
class NormMatch:
    out: Node  # normalised tensor (after the weight and the cast back)
    x: Node  # its input (before any cast to float32)
    weight: Optional[Node]
    offset: float
    eps: Optional[float]  # None: eps is the tensor ``eps_node`` (not fusable, see _eps_tensor)
    nodes: set  # the norm's own nodes
    eps_node: Optional[Node] = None


def _eps_tensor(n) -> Optional[Node]:
    """If ``n`` is a 0-d float graph input, maybe cast, return that input; else None.  That is
    how Dynamo passes a float attribute (a norm's ``variance_epsilon``) under
    ``torch.compile(dynamic=True)``, where floats are not specialised.  Its value is known
    only at run time, so the chain is matched (for the report) and refused by the ``eps``
    guard."""
    while is_cast(n):
        n = n.args[0]
    v = tensor_val(n)
    if isinstance(n, Node) and n.op == "placeholder" and v is not None and v.dim() == 0 \
            and v.is_floating_point():
        return n
    return None


def _core(n) -> Optional[tuple]:
    """n == xc * rsqrt(mean(xc**2) + eps) -> (xc, eps, nodes); eps: a number, or the graph
    input of a tensor eps (``_eps_tensor``)."""
    if not is_op(n, aten.mul.Tensor):
        return None
    for xc, r in ((n.args[0], n.args[1]), (n.args[1], n.args[0])):
        if not is_op(r, aten.rsqrt.default):
            continue
        add = r.args[0]
        if not is_op(add, aten.add.Scalar, aten.add.Tensor):
            continue
        for mean, eps in ((add.args[0], add.args[1]), (add.args[1], add.args[0])):
            if not isinstance(eps, Node) and isinstance(eps, (int, float)):
                eps = float(eps)
                break
            if is_op(mean, aten.mean.dim) and (node := _eps_tensor(eps)) is not None:
                eps = node
                break
        else:
            continue
        if not is_op(mean, aten.mean.dim):
            continue
        dims = mean.args[1]
        keep = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
        pv = tensor_val(mean.args[0])
        if pv is None or not keep or list(dims) not in ([-1], [pv.dim() - 1]):
            continue
        pw = mean.args[0]
        if not is_op(pw, aten.pow.Tensor_Scalar) or pw.args[1] != 2 or pw.args[0] is not xc:
            continue
        return xc, eps, {n, r, add, mean, pw}
    return None


def _weight(n) -> Optional[tuple]:
    """A weight operand: w, w.float(), (w + 1) or (1 + w) -> (w, offset)."""
    offset = 0.0
    if is_op(n, aten.add.Tensor, aten.add.Scalar):
        a, b = n.args[0], n.args[1]
        if isinstance(b, (int, float)) and isinstance(a, Node):
            offset, n = float(b), a
        elif isinstance(a, (int, float)) and isinstance(b, Node):
            offset, n = float(a), b
        else:
            return None
    while is_cast(n):
        n = n.args[0]
    v = tensor_val(n)
    if v is None or v.dim() != 1 or not v.is_floating_point():
        return None
    return n, offset


def match_norm(out: Node) -> Optional[NormMatch]:
    """``out`` is a candidate norm output; returns the match or None."""
    n = out
    nodes = set()
    weight, offset = None, 0.0
    if is_cast(n):
        nodes.add(n)
        n = n.args[0]
    core = _core(n)
    if core is None and is_op(n, aten.mul.Tensor):
        for c, w in ((n.args[0], n.args[1]), (n.args[1], n.args[0])):
            inner = c
            inner_nodes = set()
            if is_cast(inner):
                inner_nodes.add(inner)
                inner = inner.args[0]
            core = _core(inner) if isinstance(inner, Node) else None
            wm = _weight(w) if isinstance(w, Node) else None
            if core is not None and wm is not None:
                weight, offset = wm[0], wm[1]
                nodes |= {n} | inner_nodes | _weight_nodes(w)
                break
            core = None
    if core is None:
        return None
    xc, eps, core_nodes = core
    nodes |= core_nodes
    x = xc
    if is_cast(x):
        nodes.add(x)
        x = x.args[0]
    if isinstance(eps, Node):
        return NormMatch(out, x, weight, offset, None, nodes, eps_node=eps)
    return NormMatch(out, x, weight, offset, eps, nodes)


def _weight_nodes(w: Node) -> set:
    """The nodes of a weight expression (casts, +1) that belong to the norm."""
    nodes = set()
    while isinstance(w, Node) and (is_cast(w) or is_op(w, aten.add.Tensor, aten.add.Scalar)):
        nodes.add(w)
        w = w.args[0] if isinstance(w.args[0], Node) else w.args[1]
    return nodes
