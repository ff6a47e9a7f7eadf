"""Track which dims of a tensor index tokens, heads and the head dim through views and copies.

A cache write must store token t's K/V row where the fused op will: the value written has
to enumerate tokens in the order the op does (projection rows).  Between the rope output (or
the V projection view) and the ``index_put`` real code transposes, clones and reshapes; this
module follows the *logical* meaning of each dim through those ops.
"""
from __future__ import annotations

from torch.fx import Node

from .graph_util import aten, is_cast, is_row_trim, is_view_node, prims, tensor_val, view_input
from .layout import HeadLayout

IDENTITY_OPS = {aten.clone.default, aten.alias.default, aten.contiguous.default,
                prims.convert_element_type.default, aten._to_copy.default}


class OrderError(ValueError):
    pass


def kinds_of(lay: HeadLayout) -> list:
    """Per dim: ("tok", rank) with rank 0 the most major token dim, "head", "d" or "one"."""
    out = []
    for i in range(lay.ndim):
        if i in lay.tok_dims:
            out.append(("tok", lay.tok_dims.index(i)))
        elif i == lay.head_axis:
            out.append("head")
        elif i == lay.ndim - 1:
            out.append("d")
        else:
            out.append("one")
    return out


def walk_back(value: Node, stop) -> tuple:
    """From a written value up through views/copies until ``stop(node)``: (node, ops)."""
    ops, n = [], value
    while not stop(n):
        if is_row_trim(n):  # a padded matmul's rows: the projection, as in trace_to_root
            break
        if is_view_node(n):
            ops.append(n)
            n = view_input(n)
        elif isinstance(n, Node) and n.op == "call_function" and n.target in IDENTITY_OPS:
            ops.append(n)
            n = n.args[0]
        else:
            break
    return n, ops


def apply(kinds: list, ops_outer_last: list) -> list:
    """Follow the dims' meaning through ops (given from the source outwards)."""
    for op in ops_outer_last:
        t = op.target
        if t in IDENTITY_OPS:
            continue
        if t is aten.permute.default:
            kinds = [kinds[j] for j in op.args[1]]
        elif t is aten.transpose.int:
            a, b = (x % len(kinds) for x in op.args[1:3])
            kinds = list(kinds)
            kinds[a], kinds[b] = kinds[b], kinds[a]
        elif t is aten.unsqueeze.default:
            dim = op.args[1] % (len(kinds) + 1)
            kinds = kinds[:dim] + ["one"] + kinds[dim:]
        elif t in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
            kinds = _reshape(kinds, op)
        else:
            raise OrderError(f"{getattr(t, '__name__', t)} between the rope and the cache write")
    return kinds


def _reshape(kinds: list, op: Node) -> list:
    logical = [k for k in kinds if k != "one"]
    toks = [k for k in logical if isinstance(k, tuple)]
    expect = sorted(toks, key=lambda k: k[1]) + [k for k in logical if not isinstance(k, tuple)]
    if logical != expect or (len(logical) >= 2 and "head" in logical and logical[-2] != "head"):
        raise OrderError("reshape of a tensor whose tokens are not in row-major order")
    shape = tensor_val(op).shape
    has_head = "head" in logical
    out = ["d"]
    rest = list(shape[:-1])
    if has_head:
        out.insert(0, "head")
        rest = rest[:-1]
    rank = 0
    lead = []
    for s in rest:
        if isinstance(s, int) and s == 1:
            lead.append("one")
        else:
            lead.append(("tok", rank))
            rank += 1
    return lead + out


def token_dims(kinds: list) -> tuple:
    toks = sorted(((k[1], i) for i, k in enumerate(kinds) if isinstance(k, tuple)))
    return tuple(i for _, i in toks)


def head_axis(kinds: list):
    return kinds.index("head") if "head" in kinds else None


def check_written_order(kinds: list, value_shape_kind: str, what: str) -> None:
    """The written value must be [T, H, D] (or HF [B, H, S, D]) in projection-row order."""
    want = (0,) if value_shape_kind == "T,H,D" else (0, 2)
    # index_put broadcasts a value of lower rank (T=1: [H, D] written to [1, H, D])
    shift = (3 if value_shape_kind == "T,H,D" else 4) - len(kinds)
    toks = tuple(t + shift for t in token_dims(kinds))
    # Token dims of size 1 carry no order (kinds_of marks them "one"): T=1, or HF B=1 / S=1
    # (decode).  The rest must sit where ``want`` puts them, major first.  (match_cache made
    # sure the value is not broadcast over tokens, so a missing token dim has size 1.)
    if shift < 0 or toks not in _in_order_subsets(want):
        raise OrderError(f"{what} is written to the cache in another token order")
    ha = head_axis(kinds)
    if ha is not None and ha + shift != 1:
        raise OrderError(f"{what} is written to the cache in another head order")


def _in_order_subsets(want: tuple) -> set:
    out = {()}
    for w in want:
        out |= {t + (w,) for t in out}
    return out


__all__ = ["kinds_of", "walk_back", "apply", "check_written_order", "OrderError", "is_cast"]
