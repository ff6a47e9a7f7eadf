"""Where a per-head tensor lives inside its projection: decoded from strides, not from op names.

Every split form real code uses (split, chunk, slicing, narrow, views, transposes, the gated
``view(T, H, 2D).chunk(2)``) ends in a tensor that is a *view* of the projection.  Its fake
value's strides and storage offset, relative to the projection's, say exactly which columns
hold which head of which token, whatever sequence of view ops produced it.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .graph_util import same_sym


class LayoutError(ValueError):
    """The tensor is not a per-head view of its projection that the op can read."""


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    col: int  # column of (head 0, dim 0) within a projection row
    head_stride: int  # columns between consecutive heads (2*D for an interleaved gate)
    heads: int
    head_dim: int
    ndim: int
    tok_dims: tuple  # dims of the tensor that index tokens (size > 1), major -> minor
    head_axis: Optional[int]  # dim that indexes heads (None when there is one head)

    def canonical_to_x(self) -> list:
        """Permutation taking ``[*tok_dims, head, D]`` (non-1 dims) to the tensor's order."""
        order = list(self.tok_dims) + ([self.head_axis] if self.head_axis is not None else [])
        order.append(self.ndim - 1)
        # order[i] = x-dim of canonical dim i; the permute wants, for each kept x-dim in
        # increasing order, its canonical index.
        kept = sorted(order)
        return [order.index(d) for d in kept]


def rows_of(root: torch.Tensor) -> tuple:
    """(row_stride, width, rows) of a projection ``[..., W]`` whose leading dims flatten."""
    if root.dim() < 2 or root.stride(-1) != 1:
        raise LayoutError("projection must be at least 2-D with last-dim stride 1")
    w = root.shape[-1]
    row_stride = root.stride(-2)
    rows = 1
    for i in range(root.dim() - 2, -1, -1):
        if i < root.dim() - 2 and root.shape[i] != 1:
            expect = root.stride(i + 1) * root.shape[i + 1]
            if not same_sym(root.stride(i), expect):
                raise LayoutError("projection's leading dims do not flatten into rows")
        rows = rows * root.shape[i]
    return row_stride, w, rows


def head_layout(x: torch.Tensor, root: torch.Tensor, head_dim: int) -> HeadLayout:
    """Decode ``x`` (a view of ``root``) as ``[tokens..., heads, head_dim]`` in some order.

    Size-1 dims may be dropped: with one token and one head (T=1 decode, H_kv=1) a V written
    by a broadcasting ``index_put`` is just ``[head_dim]``; the row count check below still
    requires that it covers every projection row.
    """
    if not isinstance(head_dim, int):
        raise LayoutError("dynamic head dim")
    if x.dim() < 1 or x.shape[-1] != head_dim or x.stride(-1) != 1:
        raise LayoutError(f"last dim must be the head dim ({head_dim}) with stride 1")
    row_stride, w, rows = rows_of(root)
    if not isinstance(row_stride, int):
        raise LayoutError("dynamic projection row stride")
    col = x.storage_offset() - root.storage_offset()
    if not isinstance(col, int) or not 0 <= col < w:
        raise LayoutError("tensor does not start in the first projection row")
    tok, head_axis, heads, head_stride = [], None, 1, head_dim
    for i in range(x.dim() - 1):
        size, stride = x.shape[i], x.stride(i)
        if isinstance(size, int) and size == 1:
            continue
        if isinstance(stride, int) and 0 < stride < row_stride:
            if head_axis is not None:
                raise LayoutError("two head-like dims")
            head_axis, heads, head_stride = i, size, stride
        else:
            m = stride // row_stride
            if not same_sym(m * row_stride, stride):
                raise LayoutError("token stride is not a whole number of rows")
            tok.append((i, m, size))
    if not isinstance(heads, int):
        raise LayoutError("dynamic head count")
    if head_axis is not None and head_stride < head_dim:
        raise LayoutError("heads overlap")
    if col + (heads - 1) * head_stride + head_dim > w:
        raise LayoutError("heads run past the projection row")
    # Tokens must enumerate all projection rows in order: major dims step over minor ones.
    # Chain them from the minor end (row step 1, then the product of the sizes so far):
    # sorting by step would not do, a dynamic step (Hugging Face [B, S, H, D] with dynamic S:
    # B steps s0 rows) has no order against the static ones.
    chain, count = [], 1
    while tok:
        nxt = next((e for e in tok if same_sym(e[1], count)), None)
        if nxt is None:
            raise LayoutError("token dims do not enumerate projection rows in order")
        tok.remove(nxt)
        chain.append(nxt)
        count = count * nxt[2]
    tok = chain[::-1]  # major -> minor
    if not same_sym(count, rows):
        raise LayoutError("tensor covers only part of the projection's rows")
    return HeadLayout(col, head_stride, heads, head_dim, x.dim(), tuple(t[0] for t in tok),
                      head_axis)
