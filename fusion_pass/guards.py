"""Guards: checks a matched chain must pass before it is rewritten.

Each guard returns None (pass) or a reason string naming the value that failed.  A failed
guard leaves the graph untouched and the reason goes into the report.
"""
from __future__ import annotations

from typing import Optional

import torch

from kernels.op_schema import ACT_DTYPES, SUPPORTED_HEAD_DIMS, TABLE_DTYPES

from .graph_util import same_sym, tensor_val
from .layout import rows_of


class GuardFailure(Exception):
    def __init__(self, guard: str, reason: str):
        super().__init__(f"{guard}: {reason}")
        self.guard, self.reason = guard, reason


def check(guard: str, ok: bool, reason: str) -> None:
    if not ok:
        raise GuardFailure(guard, reason)


def device(roots: list, allow_cpu: bool) -> None:
    for r in roots:
        dev = tensor_val(r).device
        check("device", dev.type == "cuda" or (allow_cpu and dev.type == "cpu"),
              f"tensor on {dev}; the fused op runs on CUDA (allow_cpu=False)")


def dtypes(roots: list) -> None:
    dts = {tensor_val(r).dtype for r in roots}
    check("dtype", len(dts) == 1, f"Q/K/V projections differ in dtype: {sorted(map(str, dts))}")
    dt = dts.pop()
    check("dtype", dt in ACT_DTYPES, f"activation dtype {dt} not in {ACT_DTYPES}")


def head_dim(d: int) -> None:
    check("head_dim", d in SUPPORTED_HEAD_DIMS, f"head_dim {d} not in {SUPPORTED_HEAD_DIMS}")


def heads(hq: int, hkv: int) -> None:
    check("heads", hq % hkv == 0, f"num_q_heads {hq} is not a multiple of num_kv_heads {hkv}")


def rotary(rq: int, rk: int, neox_q: bool, neox_k: bool, d: int) -> None:
    check("rotary_dim", rq == rk, f"rotary_dim differs on Q ({rq}) and K ({rk})")
    check("rotary_dim", rq % 2 == 0 and 0 < rq <= d, f"rotary_dim {rq} must be even and <= {d}")
    check("rope_style", neox_q == neox_k, "Q and K use different rotary styles")


def tables(cos_q, cos_k, sin_q, sin_k) -> None:
    check("rope_table", cos_q.key() == cos_k.key() and sin_q.key() == sin_k.key(),
          "Q and K read cos/sin from different tables")
    for src in (cos_q, sin_q):
        node = src.table if src.table is not None else src.gathered
        dt = tensor_val(node).dtype
        check("rope_table", dt in TABLE_DTYPES, f"cos/sin dtype {dt} not in {TABLE_DTYPES}")
        if src.positions is not None:
            pdt = tensor_val(src.positions).dtype
            check("positions", pdt in (torch.int32, torch.int64), f"positions dtype {pdt}")


def norms(nq, nk) -> None:
    check("norm", (nq is None) == (nk is None),
          f"norm on {'Q' if nq is not None else 'K'} only")
    if nq is None:
        return
    tensor_eps = list(dict.fromkeys(n.eps_node.name for n in (nq, nk) if n.eps is None))
    check("eps", not tensor_eps,
          f"eps is a tensor input ({', '.join(tensor_eps)}), known only at run time: e.g. "
          "torch.compile(dynamic=True) passes float attributes (a norm's variance_epsilon) as "
          "tensors. Set torch._dynamo.config.specialize_float = True (floats traced as "
          "constants) or keep dynamic=None")
    check("eps", nq.eps == nk.eps, f"eps differs on Q ({nq.eps:g}) and K ({nk.eps:g})")
    check("norm_offset", nq.offset == nk.offset,
          f"weight offset differs on Q ({nq.offset}) and K ({nk.offset})")
    check("norm_weight", (nq.weight is None) == (nk.weight is None),
          "weight on one of Q/K only")


def _hint(s):
    """The value of a size in this compile: an int, a backed SymInt's hint, else None."""
    if isinstance(s, int):
        return s
    node = getattr(s, "node", None)
    try:
        return node.hint if node is not None and node.has_hint() else None
    except Exception:
        return None


def cache_shapes(ks, vs, layouts_equal: bool) -> list:
    """K and V caches of one shape (the op takes one geometry: block size, number of slots).

    Returns the pairs of sizes that are equal only for this compile's inputs, not provably:
    dynamic cache sizes, where Dynamo gives each cache its own symbol (automatic dynamic
    shapes after a recompile: num_blocks ``s0`` for K, ``s1`` for V).  ``assume_equal`` then
    guards on them; sizes that differ now fail here."""
    check("cache", layouts_equal and len(ks) == len(vs), "K and V caches differ in layout")
    pairs = []
    for a, b in zip(ks, vs):
        if same_sym(a, b):
            continue
        ha, hb = _hint(a), _hint(b)
        if ha is not None and hb is not None and ha != hb:
            # Guard on the difference too (``s0 != s1``): K and V caches of equal sizes in a
            # later call get a graph with the cache write fused, not this one.
            bool(a == b)
        check("cache", ha is not None and ha == hb,
              f"K and V caches differ in shape ({tuple(ks)} vs {tuple(vs)})")
        pairs.append((a, b))
    return pairs


def assume_equal(pairs: list) -> None:
    """Guard on sizes ``cache_shapes`` found equal only for this compile's inputs: ``bool()``
    of a backed symbolic comparison adds a shape guard (here ``s0 == s1``), which Dynamo checks
    before it runs the compiled graph (K and V caches of other sizes: a recompile)."""
    for a, b in pairs:
        check("cache", bool(a == b), f"K and V cache sizes {a} and {b} differ")


def same_rows(a, b, what: str) -> None:
    ra, rb = rows_of(tensor_val(a))[2], rows_of(tensor_val(b))[2]
    check("tokens", same_sym(ra, rb), f"{what} have different token counts ({ra} vs {rb})")


def head_stride(layout, d: int, what: str) -> Optional[int]:
    """Q may be interleaved with a gate (head stride 2D); everything else is packed."""
    ok = layout.head_stride == d or (what == "Q" and layout.head_stride == 2 * d) or \
        layout.heads == 1
    check("layout", ok, f"{what} heads are {layout.head_stride} columns apart (head_dim {d})")
    return 1 if (what == "Q" and layout.heads > 1 and layout.head_stride == 2 * d) else 0
