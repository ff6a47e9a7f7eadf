"""Matcher for a paged KV-cache write, as the functional post-grad graph shows it.

Every form (``cache.view(-1,H,D)[slots] = k``, ``index_put_``, ``index_copy_(0, ...)``,
``cache[blk, off] = k`` in NHD and HND, the halves of one ``kv_cache[2, ...]``, Hugging Face
StaticCache ``index_copy_(2, cache_position, k)``) becomes ``aten.index_put`` on some view of a
graph input, whose new value flows (through reshapes or ``select_scatter``) into an epilogue
``copy_(input, new_value)``.  This module decodes one such write.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch
from torch.fx import Node

from kernels.op_schema import FP8_DTYPES, LAYOUT_HND, LAYOUT_NHD

from .graph_util import aten, is_op, is_view_node, prims, tensor_val, view_input


class CacheMatchError(ValueError):
    """The index_put is a cache write the op cannot take over (message says why)."""


@dataclasses.dataclass
class CacheWrite:
    index_put: Node
    base: Node  # the graph input that is mutated
    size: tuple  # 4-D geometry of the cache as the op sees it, inside ``base``'s storage
    stride: tuple
    offset: int
    layout: int
    slot_kind: str  # "slot": slots node; "blk_off": (blk, off) nodes; "static": HF (pos, B, L)
    slot_args: tuple
    value: Node  # the K or V tensor written (before any fp8 conversion)
    value_shape_kind: str  # "T,H,D" or "B,H,S,D"
    fp8: Optional[torch.dtype]
    kv_cache_dtype: str
    scale: Optional[Node]
    full_value_nodes: list  # nodes whose value is the whole new base (to become the getitem)
    copy_node: Node
    alias: bool = False  # the op can take the graph input itself (no view geometry needed)
    post_views: list = dataclasses.field(default_factory=list)  # views after an fp8 cast


def _walk_to_base(n: Node) -> tuple:
    """self arg of index_put -> (graph input, tensor whose storage the view is in)."""
    while True:
        if n.op == "placeholder":
            return n, n
        if is_view_node(n):
            n = view_input(n)
            continue
        if is_op(n, aten.select_scatter.default, aten.slice_scatter.default):
            # value of the whole base after an earlier write into it
            base, _ = _walk_to_base(n.args[0])
            return base, n
        if n.op == "call_function" and n.target is operator.getitem:
            # new base value from an auto_functionalized (an earlier fused write)
            return None, n
        raise CacheMatchError(f"cache is computed by {n.target}, not a view of a graph input")


def _epilogue_copy(base: Node) -> Optional[Node]:
    for u in base.users:
        if is_op(u, aten.copy_.default) and u.args[0] is base:
            return u
    return None


def _full_value_nodes(ip: Node, base: Node, copy_node: Node) -> list:
    """Nodes from the index_put forward to the copy_ source whose value is the whole base."""
    bv = tensor_val(base)
    out, n = [], copy_node.args[1]
    seen = set()
    while isinstance(n, Node) and n not in seen:
        seen.add(n)
        v = tensor_val(n)
        if v is not None and tuple(v.shape) == tuple(bv.shape):
            out.append(n)
        if n is ip:
            break
        if is_op(n, aten.select_scatter.default, aten.slice_scatter.default):
            # the written part is arg 1; earlier writes live in arg 0
            src = n.args[1]
            if _reaches(src, ip):
                n = src
                continue
            n = n.args[0]
            continue
        if is_view_node(n):
            n = view_input(n)
            continue
        break
    return out


def _reaches(n, target, limit=8) -> bool:
    while isinstance(n, Node) and limit:
        if n is target:
            return True
        if not is_view_node(n):
            return False
        n, limit = view_input(n), limit - 1
    return False


def _strip_value(v: Node) -> tuple:
    """Peel fp8 conversion off a written value: (value, fp8 dtype, uint8?, scale).

    Views between the conversion and the write (index_put broadcasts a T=1 value [H, D]) are
    kept in ``post_views`` (innermost first) so the token-order check can follow them.
    """
    top = v
    post = []
    while is_op(v, aten.reshape.default, aten.view.default, aten.unsqueeze.default,
                aten.squeeze.dim):
        post.append(v)
        v = v.args[0]
    fp8, as_uint8, scale = None, False, None
    if is_op(v, aten.view.dtype) and v.args[1] == torch.uint8:
        as_uint8, v = True, v.args[0]
    if is_op(v, prims.convert_element_type.default, aten._to_copy.default):
        dt = v.args[1] if len(v.args) > 1 else v.kwargs.get("dtype")
        if dt in FP8_DTYPES:
            fp8, v = dt, v.args[0]
            if is_op(v, aten.div.Tensor) and isinstance(v.args[1], Node):
                sv = tensor_val(v.args[1])
                if sv is not None and sv.numel() == 1 and sv.dtype == torch.float32:
                    scale, v = v.args[1], v.args[0]
    if fp8 is None:  # nothing to peel: the views stay part of the value path
        return top, None, False, None, []
    return v, fp8, as_uint8, scale, list(reversed(post))


def _decode_blk_off(blk, off, bs) -> Optional[Node]:
    """blk == slot // bs and off == slot % bs of one slot tensor -> slot."""
    if is_op(blk, aten.div.Tensor_mode) and blk.kwargs.get("rounding_mode") == "floor":
        s1, d1 = blk.args[0], blk.args[1]
    elif is_op(blk, aten.floor_divide.default):
        s1, d1 = blk.args[0], blk.args[1]
    else:
        return None
    if is_op(off, aten.remainder.Scalar, aten.remainder.Tensor):
        s2, d2 = off.args[0], off.args[1]
    else:
        return None
    if s1 is s2 and d1 == bs and d2 == bs:
        return s1
    return None


def match_cache_write(ip: Node) -> CacheWrite:
    """Decode ``aten.index_put(self, indices, values)``; raise CacheMatchError with the reason."""
    if len(ip.args) > 3 and ip.args[3]:
        raise CacheMatchError("index_put accumulates")
    self_n, indices, values = ip.args[0], list(ip.args[1]), ip.args[2]
    base, storage_holder = _walk_to_base(self_n)
    if base is None:
        raise CacheMatchError("cache already written by a fused op")
    copy_node = _epilogue_copy(base)
    if copy_node is None:
        raise CacheMatchError("the written cache is not a graph input updated in place (a "
                              "training graph returns mutations as outputs: compile under "
                              "torch.no_grad() or inference_mode)")
    sv, bv = tensor_val(self_n), tensor_val(base)
    _check_not_broadcast(sv, indices, values)
    alias = _is_base_itself(self_n, base, sv, bv, indices)
    if alias is None and any(not isinstance(s, int) for s in tuple(sv.shape) + tuple(sv.stride())):
        raise CacheMatchError("cache view has dynamic shape")
    if alias is not None:
        return _aliased_write(ip, base, bv, alias, indices, values, copy_node)
    rel = sv.storage_offset() - tensor_val(storage_holder).storage_offset()
    if tuple(tensor_val(storage_holder).stride()) != tuple(bv.stride()):
        raise CacheMatchError("cache base is not laid out like the graph input")
    offset = bv.storage_offset() + rel
    value, fp8, as_uint8, scale, post = _strip_value(values)
    if sv.stride(-1) != 1:
        raise CacheMatchError("cache last dim is not contiguous")
    _check_value_dtype(sv, fp8, as_uint8)
    kv_dtype = "auto"
    if as_uint8:
        kv_dtype = "fp8_e4m3" if fp8 == torch.float8_e4m3fn else "fp8_e5m2"
    common = dict(index_put=ip, base=base, offset=offset, value=value, fp8=fp8, post_views=post,
                  kv_cache_dtype=kv_dtype, scale=scale, copy_node=copy_node,
                  full_value_nodes=_full_value_nodes(ip, base, copy_node))
    shape, stride = tuple(sv.shape), tuple(sv.stride())
    nidx = [i for i in indices if i is not None]
    if sv.dim() == 3 and len(indices) == 1 and indices[0] is not None:
        # flat rows [N, H, D][slot]: NHD with block_size 1
        return CacheWrite(size=(shape[0], 1, shape[1], shape[2]),
                          stride=(stride[0], stride[0], stride[1], stride[2]), layout=LAYOUT_NHD,
                          slot_kind="slot", slot_args=(indices[0],), value_shape_kind="T,H,D",
                          **common)
    if sv.dim() == 4 and len(indices) == 2 and len(nidx) == 2:
        slot = _decode_blk_off(indices[0], indices[1], shape[1])
        kind, args = ("slot", (slot,)) if slot is not None else ("blk_off", tuple(indices))
        return CacheWrite(size=shape, stride=stride, layout=LAYOUT_NHD, slot_kind=kind,
                          slot_args=args, value_shape_kind="T,H,D", **common)
    if sv.dim() == 4 and len(indices) == 3 and indices[1] is None and len(nidx) == 2:
        slot = _decode_blk_off(indices[0], indices[2], shape[2])
        kind, args = ("slot", (slot,)) if slot is not None else ("blk_off", (indices[0], indices[2]))
        return CacheWrite(size=shape, stride=stride, layout=LAYOUT_HND, slot_kind=kind,
                          slot_args=args, value_shape_kind="T,H,D", **common)
    if sv.dim() == 4 and len(indices) == 3 and indices[0] is None and indices[1] is None:
        # Hugging Face StaticCache [B, H, L, D].index_copy_(2, cache_position, k[B, H, S, D])
        return CacheWrite(size=shape, stride=stride, layout=LAYOUT_HND, slot_kind="static",
                          slot_args=(indices[2],), value_shape_kind="B,H,S,D", **common)
    raise CacheMatchError(f"index_put on a {sv.dim()}-D cache with indices "
                          f"{['None' if i is None else 'T' for i in indices]} is not a paged write")


def _check_not_broadcast(sv, indices, values) -> None:
    """The value must hold one row per written position: the op writes token t's row to
    slot t only, while index_put broadcasts a smaller value (one token's K to several slots,
    a batch-1 K into a StaticCache of several rows) to every indexed position.

    Decided per dim, without creating shape guards: broadcasting only stretches a dim of size
    1 (or a missing leading one), and a symbolic size is never 1 (0/1 specialization)."""
    idx = [tensor_val(i) for i in indices if i is not None]
    if not idx or any(v is None for v in idx):
        raise CacheMatchError("cache write without index tensors")
    if any(v.dtype == torch.bool for v in idx):
        raise CacheMatchError("cache write indexed by a mask, not by slots")
    vv = tensor_val(values)
    if vv is None:
        raise CacheMatchError("written value has no shape")
    pos = [i for i, x in enumerate(indices) if x is not None]
    bshape = _broadcast_shape([tuple(v.shape) for v in idx])
    if pos == list(range(pos[0], pos[-1] + 1)):  # adjacent indices stay in place
        target = list(sv.shape[:pos[0]]) + bshape + list(sv.shape[pos[-1] + 1:])
    else:  # separated ones go first (advanced indexing rule)
        target = bshape + [s for d, s in enumerate(sv.shape) if d not in pos]
    vshape = list(vv.shape)
    for i in range(1, len(target) + 1):
        t = target[-i]
        v = vshape[-i] if i <= len(vshape) else 1
        if _is_one(v) and not _is_one(t):
            raise CacheMatchError("the written value is broadcast over the indexed cache rows")


def _is_one(s) -> bool:
    return isinstance(s, int) and s == 1


def _broadcast_shape(shapes: list) -> list:
    n = max(len(s) for s in shapes)
    out = []
    for i in range(n, 0, -1):
        dims = [s[-i] for s in shapes if len(s) >= i]
        big = [d for d in dims if not _is_one(d)]
        out.append(big[0] if big else 1)
    return out


def _is_base_itself(self_n, base, sv, bv, indices):
    """'nhd'/'hnd'/'flat'/'static' when the op can be handed the 4-D graph input itself
    (its sizes may then be symbolic: a block count, or a StaticCache's batch and length after
    a recompile with a new ``max_cache_len``)."""
    if storage_offset_differs(sv, bv) or bv.dim() != 4 or bv.stride(-1) != 1:
        return None
    if self_n is base:
        if len(indices) == 2 and all(i is not None for i in indices):
            return "nhd"
        if len(indices) == 3 and indices[1] is None and indices[0] is not None:
            return "hnd"
        if len(indices) == 3 and indices[0] is None and indices[1] is None:
            return "static"  # [B, H, L, D].index_copy_(2, cache_position, k)
        return None
    # cache.view(-1, H, D)[slot] on a [nb, bs, H, D] input whose rows are contiguous
    if sv.dim() == 3 and len(indices) == 1 and indices[0] is not None and \
            _reaches_by_reshape(self_n, base) and bv.stride(0) == bv.shape[1] * bv.stride(1) and \
            sv.shape[-2:] == bv.shape[-2:]:
        return "flat"
    return None


def storage_offset_differs(a, b) -> bool:
    return a.storage_offset() != b.storage_offset()


def _reaches_by_reshape(n, base) -> bool:
    while is_op(n, aten.reshape.default, aten.view.default):
        n = n.args[0]
    return n is base


def _aliased_write(ip, base, bv, kind, indices, values, copy_node) -> CacheWrite:
    value, fp8, as_uint8, scale, post = _strip_value(values)
    _check_value_dtype(bv, fp8, as_uint8)
    kv_dtype = "auto" if not as_uint8 else ("fp8_e4m3" if fp8 == torch.float8_e4m3fn else "fp8_e5m2")
    layout = LAYOUT_HND if kind in ("hnd", "static") else LAYOUT_NHD
    shape_kind = "T,H,D"
    if kind == "flat":
        kind_args = ("slot", (indices[0],))
    elif kind == "static":
        kind_args, shape_kind = ("static", (indices[2],)), "B,H,S,D"
    else:
        blk, off = indices[0], indices[-1]
        bs = bv.shape[1] if layout == LAYOUT_NHD else bv.shape[2]
        slot = _decode_blk_off(blk, off, bs)
        kind_args = ("slot", (slot,)) if slot is not None else ("blk_off", (blk, off))
    return CacheWrite(ip, base, tuple(bv.shape), tuple(bv.stride()), bv.storage_offset(), layout,
                      kind_args[0], kind_args[1], value, shape_kind, fp8,
                      kv_dtype, scale, _full_value_nodes(ip, base, copy_node), copy_node,
                      alias=True, post_views=post)


def _check_value_dtype(cv, fp8, as_uint8) -> None:
    if as_uint8 and cv.dtype != torch.uint8:
        raise CacheMatchError("uint8 view written into a non-uint8 cache")
    if fp8 is not None and not as_uint8 and cv.dtype != fp8:
        raise CacheMatchError("fp8 value written into a cache of another dtype")
    if fp8 is None and cv.dtype in FP8_DTYPES + (torch.uint8,):
        raise CacheMatchError("fp8 cache written without a recognised fp8 conversion")


def find_index_puts(graph) -> list:
    return [n for n in graph.nodes if is_op(n, aten.index_put.default)]
