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
    check("eps", nq.eps == nk.eps, f"eps differs on Q ({nq.eps:g}) and K ({nk.eps:g})")
    check("norm_offset", nq.offset == nk.offset,
          f"weight offset differs on Q ({nq.offset}) and K ({nk.offset})")
    check("norm_weight", (nq.weight is None) == (nk.weight is None),
          "weight on one of Q/K only")


def same_rows(a, b, what: str) -> None:
    ra, rb = rows_of(tensor_val(a))[2], rows_of(tensor_val(b))[2]
    check("tokens", same_sym(ra, rb), f"{what} have different token counts ({ra} vs {rb})")


def head_stride(layout, d: int, what: str) -> Optional[int]:
    """Q may be interleaved with a gate (head stride 2D); everything else is packed."""
    ok = layout.head_stride == d or (what == "Q" and layout.head_stride == 2 * d) or \
        layout.heads == 1
    check("layout", ok, f"{what} heads are {layout.head_stride} columns apart (head_dim {d})")
    return 1 if (what == "Q" and layout.heads > 1 and layout.head_stride == 2 * d) else 0
