"""Matcher for rotary position embedding (RoPE) on a per-head tensor.

Recognised forms of the rotated part (x: the head tensor, r: rotary dim, c/s: cos/sin):

* NeoX halves:      ``cat([x1*c - x2*s, x2*c + x1*s])``           (vLLM)
* NeoX rotate-half: ``x*c + cat([-x2, x1])*s``                    (Hugging Face)
* GPT-J stack:      ``x*c + stack([-x_odd, x_even], -1).flatten(-2)*s``
* GPT-J halves:     ``stack([xe*c - xo*s, xo*c + xe*s], -1).flatten(-2)``
* partial rotary:   any of the above on ``x[..., :r]``, then ``cat([rot, x[..., r:]])``

Where cos/sin come from (see ``CosSource``) is decoded separately by ``match_cos_sin``.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional

from torch.fx import Node

from .graph_util import aten, is_cast, is_op, prims, same_value, tensor_val

INT_MAX = 2**63 - 1


@dataclasses.dataclass
class CosSource:
    """Per-token cos (or sin) values as the op reads them.

    ``table``: a 2-D node ``[rows, C]`` (or a 2-D view of one); with ``positions`` the row of
    token t is ``positions[t]``; ``col``: first column used.  Without ``positions`` the
    ``gathered`` node holds per-token values; ``gathered.unsqueeze(d)`` for each ``d`` of
    ``unsqueeze`` (in order) broadcasts them against the head tensor, as the code did (Hugging
    Face: ``cos[B, S, D].unsqueeze(1)`` against ``q[B, H, S, D]``).
    ``expanded``: one value per rotary element (width r) instead of one per pair (r/2).
    """

    expanded: bool
    table: Optional[Node] = None
    col: int = 0
    positions: Optional[Node] = None
    gathered: Optional[Node] = None
    unsqueeze: tuple = ()

    def key(self):
        return (self.table, self.positions, self.gathered, self.expanded, self.unsqueeze)


@dataclasses.dataclass
class RopeMatch:
    out: Node  # the node whose value is the rotated full head tensor
    x: Node  # the head tensor that was rotated
    rotary_dim: int
    is_neox: bool
    cos: CosSource
    sin: CosSource
    form: str


def _last_dim(n: Node) -> Optional[int]:
    v = tensor_val(n)
    return None if v is None else v.dim() - 1


def last_dim_range(n):
    """Compose last-dim slices/splits: ``(base, start, length, step)`` such that element i of
    ``n``'s last dim is element ``start + i * step`` of ``base``'s last dim."""
    ranges = last_dim_ranges(n)
    return ranges[0] if ranges else None


def last_dim_ranges(n) -> list:
    """Every ``(base, start, length, step)`` on the way from ``n`` to ``last_dim_range(n)``'s
    base: the outermost base first, ``(n, 0, length, 1)`` itself last.  (The head tensor a rope
    reads can be a split of the projection with no view in between: T=1 and one head.)"""
    v = tensor_val(n)
    if v is None:
        return []
    start, step, length = 0, 1, v.shape[-1]
    out = [(n, start, length, step)]
    while True:
        if is_op(n, aten.slice.Tensor):
            base = n.args[0]
            dim = n.args[1] if len(n.args) > 1 else 0
            if dim not in (-1, _last_dim(base)):
                break
            size = tensor_val(base).shape[-1]
            s = n.args[2] if len(n.args) > 2 and n.args[2] is not None else 0
            st = n.args[4] if len(n.args) > 4 else 1
            if not all(isinstance(x, int) for x in (s, st, size)):
                break
            s = s + size if s < 0 else s
        elif n.op == "call_function" and n.target is operator.getitem and is_op(
                n.args[0], aten.split.Tensor, aten.split_with_sizes.default):
            sp = n.args[0]
            base = sp.args[0]
            dim = sp.args[2] if len(sp.args) > 2 else sp.kwargs.get("dim", 0)
            if dim not in (-1, _last_dim(base)):
                break
            sizes = sp.args[1]
            if not (isinstance(sizes, int) or all(isinstance(x, int) for x in sizes)):
                break
            if sp.target is aten.split.Tensor:
                s, st = sp.args[1] * n.args[1], 1
            else:
                s, st = sum(sp.args[1][: n.args[1]]), 1
        else:
            break
        start, step = s + start * st, step * st
        n = base
        out.append((n, start, length, step))
    return out[::-1]


def _width_ok(x, width) -> bool:
    """The rotated tensor must be as wide as the rope output (the head dim)."""
    v = tensor_val(x)
    return width is None or (v is not None and v.shape[-1] == width)


def _x_candidates(mul, step: int, width):
    """``mul == x[..., 0::step] * other`` (either order): yields ``(other, range of x)`` for
    each tensor x, ``width`` wide, that the operand is such a range of."""
    ops = _mul_operands(mul)
    for mx, other in (_pair(ops) if ops else ()):
        for rng in (last_dim_ranges(mx) if isinstance(mx, Node) else ()):
            if rng[1] == 0 and rng[3] == step and _width_ok(rng[0], width):
                yield other, rng


def _mul_operands(n) -> Optional[tuple]:
    if not is_op(n, aten.mul.Tensor):
        return None
    a, b = n.args[0], n.args[1]
    return a, b


def _split_mul(n, want_x) -> Optional[Node]:
    """If n == want_x(a) * b (either order), return b."""
    ops = _mul_operands(n)
    if ops is None:
        return None
    a, b = ops
    if isinstance(a, Node) and want_x(a):
        return b
    if isinstance(b, Node) and want_x(b):
        return a
    return None


def _is_range(n, base, start, stop, step=1) -> bool:
    """n == base[..., start:stop:step]."""
    if not isinstance(n, Node):
        return False
    length = (stop - start + step - 1) // step
    return any(r[0] is base and r[1:] == (start, length, step) for r in last_dim_ranges(n))


def _pair(nodes):
    """Try both operand orders of a commutative op."""
    a, b = nodes
    return ((a, b), (b, a))


def _match_halves_neox(out: Node, width=None):
    """cat([x1*c - x2*s, x2*c + x1*s]) -> (x, r, c, s)."""
    if not is_op(out, aten.cat.default) or len(out.args[0]) != 2:
        return None
    dim = out.args[1] if len(out.args) > 1 else 0
    if dim not in (-1, _last_dim(out)):
        return None
    o1, o2 = out.args[0]
    if not is_op(o1, aten.sub.Tensor) or not is_op(o2, aten.add.Tensor):
        return None
    a, b = o1.args[0], o1.args[1]  # x1*c, x2*s
    for my, r1 in _x_candidates(a, 1, width):
        x, _, half, _ = r1  # x1 = x[..., :half]
        r = 2 * half
        c = my
        s = _split_mul(b, lambda n: _is_range(n, x, half, r))
        if s is None:
            continue
        for p, q in _pair(o2.args):
            c2 = _split_mul(p, lambda n: _is_range(n, x, half, r))
            s2 = _split_mul(q, lambda n: _is_range(n, x, 0, half))
            if c2 is not None and s2 is not None and same_value(c2, c) and same_value(s2, s):
                return x, r, c, s, True, "neox-halves"
    return None


def _match_rotate_half(out: Node, width=None):
    """x*c + rotate(x)*s with rotate = cat([-x2, x1]) (NeoX) or the GPT-J stack/flatten."""
    if not is_op(out, aten.add.Tensor):
        return None
    for m1, m2 in _pair(out.args):
        if not is_op(m1, aten.mul.Tensor) or not is_op(m2, aten.mul.Tensor):
            continue
        for xr, c in _pair(m1.args):
            if not isinstance(xr, Node):
                continue
            for rng in last_dim_ranges(xr):
                if rng[1] != 0 or rng[3] != 1 or not _width_ok(rng[0], width):
                    continue
                x, _, r, _ = rng  # xr = x[..., :r]
                for rot, s in _pair(m2.args):
                    style = _rotation_of(rot, x, r)
                    if style is not None:
                        return x, r, c, s, style, "rotate-half" if style else "gptj-stack"
    return None


def _rotation_of(rot, x, r) -> Optional[bool]:
    """True: rot == cat([-x2, x1]) (NeoX); False: GPT-J interleaved rotation; None: neither."""
    if not isinstance(rot, Node):
        return None
    if is_op(rot, aten.cat.default) and len(rot.args[0]) == 2:
        a, b = rot.args[0]
        if is_op(a, aten.neg.default) and _is_range(a.args[0], x, r // 2, r) and \
                _is_range(b, x, 0, r // 2):
            return True
    if is_op(rot, aten.reshape.default, aten.view.default, aten.flatten.using_ints):
        inner = rot.args[0]
        if is_op(inner, aten.cat.default) and len(inner.args[0]) == 2:
            a, b = inner.args[0]
            if is_op(a, aten.unsqueeze.default) and is_op(b, aten.unsqueeze.default):
                a, b = a.args[0], b.args[0]
                if is_op(a, aten.neg.default) and _is_range(a.args[0], x, 1, r, 2) and \
                        _is_range(b, x, 0, r, 2):
                    return False
    return None


def _match_halves_gptj(out: Node, width=None):
    """stack([xe*c - xo*s, xo*c + xe*s], -1).flatten(-2)."""
    if not is_op(out, aten.reshape.default, aten.view.default, aten.flatten.using_ints):
        return None
    inner = out.args[0]
    if not is_op(inner, aten.cat.default) or len(inner.args[0]) != 2:
        return None
    a, b = inner.args[0]
    if not (is_op(a, aten.unsqueeze.default) and is_op(b, aten.unsqueeze.default)):
        return None
    o1, o2 = a.args[0], b.args[0]
    if not is_op(o1, aten.sub.Tensor) or not is_op(o2, aten.add.Tensor):
        return None
    for c, rng in _x_candidates(o1.args[0], 2, width):
        x, _, half, _ = rng  # x_even = x[..., 0:r:2]
        r = 2 * half
        s = _split_mul(o1.args[1], lambda n: _is_range(n, x, 1, r, 2))
        if s is None:
            continue
        for p, q in _pair(o2.args):
            c2 = _split_mul(p, lambda n: _is_range(n, x, 1, r, 2))
            s2 = _split_mul(q, lambda n: _is_range(n, x, 0, r, 2))
            if c2 is not None and s2 is not None and same_value(c2, c) and same_value(s2, s):
                return x, r, c, s, False, "gptj-halves"
    return None


def match_rotated(out: Node, width=None):
    """Match the rotated part; returns (x_or_xrot_base, r, c, s, is_neox, form) or None.

    ``width``: the rotated head tensor x must be this wide (the rope output's head dim)."""
    while is_cast(out):  # math in float32 (fp32 cos/sin), cast back: the kernel does the same
        out = out.args[0]
    for fn in (_match_halves_neox, _match_rotate_half, _match_halves_gptj):
        m = fn(out, width)
        if m is not None:
            return m
    return None


def match_rope(out: Node) -> Optional[RopeMatch]:
    """``out`` is a candidate rope output (full head, partial rotary included)."""
    ov = tensor_val(out)
    width = None if ov is None or ov.dim() == 0 else ov.shape[-1]
    m = match_rotated(out, width)
    if m is not None:
        x, r, c, s, neox, form = m
        d = tensor_val(x).shape[-1]
        if r != d:
            return None  # a partial rotary is matched from its outer cat
        return _with_tables(out, x, r, neox, c, s, form)
    # partial rotary: cat([rot(x[..., :r]), x[..., r:]], -1)
    if not is_op(out, aten.cat.default) or len(out.args[0]) != 2:
        return None
    rot, rest = out.args[0]
    m = match_rotated(rot, width) if isinstance(rot, Node) else None
    if m is None:
        return None
    x, r, c, s, neox, form = m
    d = tensor_val(x).shape[-1]
    if not _is_range(rest, x, r, d):
        return None
    return _with_tables(out, x, r, neox, c, s, form + "+partial")


def _with_tables(out, x, r, neox, c, s, form) -> Optional[RopeMatch]:
    cs = match_cos_sin(c, r, neox)
    ss = match_cos_sin(s, r, neox)
    if cs is None or ss is None:
        return None
    return RopeMatch(out, x, r, neox, cs, ss, form)


# ---------------------------------------------------------------- cos / sin sources
def _strip_broadcast(n, unsqueezed: Optional[list] = None):
    """Skip unsqueeze and dtype casts of a cos/sin operand (the kernel reads in fp32).

    ``unsqueezed``, when given, collects the dims of the skipped unsqueezes, outermost first.
    """
    while is_op(n, aten.unsqueeze.default, prims.convert_element_type.default,
                aten._to_copy.default, aten.alias.default):
        if unsqueezed is not None and is_op(n, aten.unsqueeze.default):
            unsqueezed.append(n.args[1])
        n = n.args[0]
    return n


def _unrepeat(n, r: int, neox: bool):
    """If n repeats a width-r/2 tensor the way the rope style pairs elements, return it."""
    if is_op(n, aten.reshape.default, aten.view.default):
        inner = n.args[0]
        if is_op(inner, aten.clone.default):
            inner = inner.args[0]
        if is_op(inner, aten.expand.default) and is_op(inner.args[0], aten.unsqueeze.default):
            ev = tensor_val(inner)
            src = inner.args[0].args[0]
            if ev is not None and tuple(ev.shape[-2:]) == ((2, r // 2) if neox else (r // 2, 2)):
                return src
    if neox and is_op(n, aten.cat.default) and len(n.args[0]) == 2:
        a, b = n.args[0]
        if same_value(a, b):
            return a
    if not neox and is_op(n, aten.repeat_interleave.self_int) and n.args[1] == 2:
        return n.args[0]
    return None


def match_cos_sin(n, r: int, neox: bool) -> Optional[CosSource]:
    if not isinstance(n, Node):
        return None
    v = tensor_val(n)
    if v is None or not v.is_floating_point():
        return None
    width = v.shape[-1]
    unsqueezed = []  # outermost first; a repeat keeps the rank, so inner ones follow
    base = _strip_broadcast(n, unsqueezed)
    if width == r:
        front = _unrepeat(base, r, neox)
        if front is None:
            return _table_source(base, r, True, unsqueezed)
        base, expanded = _strip_broadcast(front, unsqueezed), False
    elif width == r // 2:
        expanded = False
    else:
        return None
    return _table_source(base, r, expanded, unsqueezed)


def _table_source(n: Node, r: int, expanded: bool, unsqueezed: list) -> CosSource:
    """Decode ``table[positions]`` (and its column slice/split); else per-token values, with
    the stripped unsqueezes kept to broadcast them (``unsqueezed``: outermost first)."""
    width = r if expanded else r // 2
    rng = last_dim_range(n)
    col = 0
    inner = n
    if rng is not None and rng[3] == 1 and rng[2] == width:
        inner, col = rng[0], rng[1]
    if is_op(inner, aten.index.Tensor):
        table, idx = inner.args[0], inner.args[1]
        tv = tensor_val(table)
        if tv is not None and tv.dim() == 2 and len(idx) == 1 and isinstance(idx[0], Node):
            return CosSource(expanded, table=table, col=col, positions=idx[0])
    if is_op(inner, aten.embedding.default):
        table, pos = inner.args[0], inner.args[1]
        if tensor_val(table) is not None and tensor_val(table).dim() == 2:
            return CosSource(expanded, table=table, col=col, positions=pos)
    return CosSource(expanded, gathered=n, unsqueeze=tuple(reversed(unsqueezed)))
