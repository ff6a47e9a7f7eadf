"""The fusion: find QKV split -> per-head RMSNorm -> RoPE -> paged cache write chains, replace.

Steps, each a small matcher of its own module:
1. ``match_rope`` anchors every candidate (the rotation is the one step every chain has);
2. ``match_norm`` looks behind the rope input (through views and casts) for a per-head norm;
3. ``match_split`` decodes which projection columns the head tensor reads (by strides);
4. ``match_cache`` decodes every ``index_put`` cache write; K writes are the ones whose value
   is a rope output, V writes the ones whose value is a projection view;
5. ropes sharing cos/sin are paired into Q and K, guards run, and one fused call goes in: on
   CUDA a launch of the Triton kernel by Inductor's own code (``inductor_launch``), else (or
   with ``inductor_launch=False``) the custom op (``rewrite``).
Longest chain first: with a cache write when there is one (``split_norm_rope_cache``), else the
partial fusion without it (``split_norm_rope``).  Rope-before-norm (HunYuan) and norms over the
whole projection (OLMo2) are not this op and are reported as rejected.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import re
from typing import Optional

import torch
from torch.fx import Graph, Node

from kernels import custom_op  # noqa: F401  (registers torch.ops.fused_qkv.*)

from . import dynamic_sizes, guards, inductor_launch, token_order
from .graph_util import (aten, check_acyclic, depends_on, fake_mode_of, is_cast, is_op,
                         is_row_trim, is_view_node, same_sym, same_value, tensor_val,
                         view_input)
from .guards import GuardFailure
from .layout import LayoutError, head_layout, rows_of
from .match_cache import CacheMatchError, CacheWrite, find_index_puts, match_cache_write
from .match_norm import NormMatch, match_norm
from .match_rope import RopeMatch, match_rope
from .match_split import HeadSource, head_source, trace_views
from .options import FusionOptions
from .report import Candidate, Report
from .rewrite import Builder, call_fused, call_fused_with_cache, replace_cache_chain, rewire

log = logging.getLogger("fusion_pass")

ROPE_ANCHORS = (aten.cat.default, aten.add.Tensor, aten.reshape.default, aten.view.default)


@dataclasses.dataclass
class Chain:
    """One head tensor's chain: projection view -> [norm] -> rope."""

    rope: RopeMatch
    norm: Optional[NormMatch]
    src: Optional[HeadSource]
    error: Optional[str] = None
    cache: Optional[CacheWrite] = None
    cache_ops: Optional[list] = None  # views/copies from the rope output to the written K

    @property
    def heads(self) -> int:
        return self.src.layout.heads

    def forms(self) -> dict:
        norm = None
        if self.norm is not None:
            norm = "rms_norm" + ("(1+w)" if self.norm.offset else "") + \
                ("" if self.norm.weight is not None else "(no weight)") + \
                ("(eps tensor)" if self.norm.eps is None else "")
        cos = self.rope.cos
        table = ("cos_sin_cache[positions]" if cos.positions is not None else "per-token cos/sin")
        return {"split": _split_form(self.src), "norm": norm,
                "rope": f"{self.rope.form}(r={self.rope.rotary_dim}) {table}"}


def _where(n: Node) -> str:
    """' (file.py:LINE)' of the user code that produced ``n``, from its stack trace."""
    st = n.meta.get("stack_trace") or ""
    hits = re.findall(r'File "([^"]+)", line (\d+)', st)
    if not hits:
        return ""
    path, line = hits[-1]
    return f" ({path.rsplit('/', 1)[-1]}:{line})"


def _cache_form(cw) -> Optional[str]:
    if cw is None:
        return None
    return ("NHD" if cw.layout == 0 else "HND") + f"[{cw.slot_kind}]" + \
        (f" {cw.fp8}" if cw.fp8 else "")


def _split_form(src: Optional[HeadSource]) -> Optional[str]:
    if src is None:
        return None
    lay = src.layout
    return f"cols {lay.col}+{lay.heads}x{lay.head_stride}"


def _find_chains(graph: Graph, fake_mode) -> list:
    chains = []
    claimed = set()
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target not in ROPE_ANCHORS or n in claimed:
            continue
        try:
            m = match_rope(n)
        except Exception as e:  # an odd node must not stop the others from matching
            log.debug("rope matcher failed on %s: %s", n.name, e)
            continue
        if m is None:
            continue
        # A partial rotary's inner rotation can also match on its own (its x[..., :r] then
        # looks like a whole head of r dims): the outer cat wins.
        claimed.update(a for a in (n.args[0] if is_op(n, aten.cat.default) else []) if
                       isinstance(a, Node))
        chains.append(_chain_for(m, fake_mode))
    return [c for c in chains if c.rope.out not in claimed]


def _chain_for(m: RopeMatch, fake_mode) -> Chain:
    d = tensor_val(m.x).shape[-1]
    node, post = trace_views(m.x, stop=lambda n: match_norm(n) is not None)
    nm = match_norm(node)
    if nm is not None:
        if tensor_val(nm.x).shape[-1] != d:
            return Chain(m, nm, None, "norm spans all heads (OLMo2 style): not a per-head norm")
        x_raw, post_ops = nm.x, post
    else:
        x_raw = m.x
        while is_cast(x_raw):
            x_raw = x_raw.args[0]
        post_ops = []
        if not is_view_node(x_raw):
            return Chain(m, None, None, _why_not_projection(x_raw))
    try:
        src = head_source(x_raw, post_ops, d, fake_mode)
    except LayoutError as e:
        return Chain(m, nm, None, f"split: {e}")
    return Chain(m, nm, src)


def _why_not_projection(n: Node) -> str:
    if match_norm(n) is not None:
        return "norm spans all heads (OLMo2 style): not a per-head norm"
    return f"rope input is computed by {getattr(n.target, '__name__', n.target)}, not a view " \
           f"of a projection"


def _rope_then_norm(chain: Chain) -> bool:
    """HunYuan: the rope output feeds a per-head norm."""
    for u in chain.rope.out.users:
        node = u
        for _ in range(4):
            if is_op(node, aten.pow.Tensor_Scalar) or is_op(node, aten.mul.Tensor) and any(
                    is_op(a, aten.rsqrt.default) for a in node.args):
                return True
            if not isinstance(node, Node) or not node.users:
                break
            node = next(iter(node.users))
    return False


def _value_source(value: Node, rope_outs: dict) -> tuple:
    """A written value -> ("k", chain, ops) if it comes from a rope output, ("v", root, ops) if
    from a projection; ops are the views/copies in between, from the source outwards."""
    n, ops = token_order.walk_back(value, lambda x: x in rope_outs)
    if n in rope_outs:
        return "k", rope_outs[n], list(reversed(ops))
    if ops and is_view_node(ops[-1]):
        return "v", n, list(reversed(ops))
    return None, None, None


def run(graph: Graph, opts: FusionOptions, report: Report) -> int:
    """Fuse every chain in ``graph``; returns how many op calls were inserted."""
    gid = report.new_graph()
    fake_mode = fake_mode_of(graph)
    if fake_mode is None:
        return 0
    chains = _find_chains(graph, fake_mode)
    rope_outs = {c.rope.out: c for c in chains}

    # Cache writes: K writes hang off rope outputs, V writes off projection views.
    v_writes = []
    for ip in find_index_puts(graph):
        try:
            w = match_cache_write(ip)
        except CacheMatchError as e:
            report.add(Candidate(gid, f"cache write {ip.name}", {"cache": "index_put"},
                                 "rejected", str(e), "cache"))
            continue
        kind, what, ops = _value_source(w.value, rope_outs)
        if kind == "k" and what.cache is None:
            what.cache, what.cache_ops = w, ops
        elif kind == "v":
            v_writes.append((w, what, ops))

    # Pair Q and K: chains that read the same cos/sin; K is the one written to a cache.
    usable = []
    for c in chains:
        if c.error is not None:
            report.add(Candidate(gid, c.rope.out.name + _where(c.rope.out), c.forms(), "rejected",
                                 c.error, "match"))
        elif _rope_then_norm(c):
            report.add(Candidate(gid, c.rope.out.name + _where(c.rope.out), c.forms(), "rejected",
                                 "rope is followed by a norm (HunYuan style): not this op",
                                 "order"))
        else:
            usable.append(c)
    pairs = _pair(usable, report, gid)
    fused = 0
    for q, k in pairs:
        fused += _fuse_pair(graph, fake_mode, q, k, v_writes, opts, report, gid)
    if not any(c.graph == gid for c in report.candidates):  # say why, if sizes are symbolic
        why = dynamic_sizes.note(graph, fake_mode)
        if why is not None:
            report.add(Candidate(gid, "graph", {}, "rejected", why, "dynamic"))
    if fused:
        from torch._inductor.pattern_matcher import stable_topological_sort

        check_acyclic(graph)  # a clear error, before the sort's bare assert
        stable_topological_sort(graph)
        graph.eliminate_dead_code()
        graph.lint()
    return fused


def _pair(chains: list, report: Report, gid: int) -> list:
    groups = {}
    for c in chains:
        key = (c.rope.cos.key(), c.rope.sin.key(), c.rope.rotary_dim, c.rope.is_neox)
        groups.setdefault(key, []).append(c)
    pairs = []
    for group in groups.values():
        left = list(group)
        while left:
            a = left.pop(0)
            partner = None
            for b in left:  # same projection (packed) first, then same layer input
                if b.src.root is a.src.root:
                    partner = b
                    break
            if partner is None:
                for b in left:
                    if _layer_input(b.src.root) is _layer_input(a.src.root) and \
                            _layer_input(a.src.root) is not None and _independent(a, b):
                        partner = b
                        break
            if partner is None and len(left) == 1 and len(group) == 2 and \
                    _independent(a, left[0]):
                partner = left[0]
            if partner is None:
                report.add(Candidate(gid, a.rope.out.name + _where(a.rope.out), a.forms(),
                                     "rejected", "rope on one tensor only: no Q/K pair found",
                                     "pairing"))
                continue
            left.remove(partner)
            q, k = _order(a, partner)
            pairs.append((q, k))
    return pairs


def _independent(a: Chain, b: Chain) -> bool:
    """Neither chain's projection reads the other's rope output: one fused call for both
    would otherwise read its own output (two layers' Q, when their K went unmatched)."""
    return not depends_on(a.src.root, [b.rope.out]) and \
        not depends_on(b.src.root, [a.rope.out])


def _layer_input(root: Node) -> Optional[Node]:
    """For a separate projection (mm), the hidden states it multiplies (through pad_mm's
    row trim and zero padding: Q's matmul may be padded and K's not)."""
    if is_row_trim(root):
        root = root.args[0]
    if is_op(root, aten.mm.default, aten.addmm.default, aten.bmm.default):
        x = root.args[1] if root.target is aten.addmm.default else root.args[0]
        while is_view_node(x) or is_cast(x) or is_op(x, aten.constant_pad_nd.default):
            x = view_input(x) if is_view_node(x) else x.args[0]
        return x
    return None


def _order(a: Chain, b: Chain) -> tuple:
    """(Q, K): K is written to the cache; else K has fewer heads / later columns."""
    if a.cache is not None and b.cache is None:
        return b, a
    if b.cache is not None and a.cache is None:
        return a, b
    if a.heads != b.heads:
        return (a, b) if a.heads > b.heads else (b, a)
    return (a, b) if a.src.layout.col <= b.src.layout.col else (b, a)


def _fuse_pair(graph, fake_mode, q: Chain, k: Chain, v_writes, opts, report, gid) -> int:
    name = f"q:{q.rope.out.name} k:{k.rope.out.name}{_where(q.rope.out)}"
    forms = {"split": f"Q {_split_form(q.src)}, K {_split_form(k.src)}",
             "norm": q.forms()["norm"], "rope": q.forms()["rope"], "cache": _cache_form(k.cache)}
    d = q.src.layout.head_dim
    vw = None
    try:
        guards.device([q.src.root, k.src.root], opts.allow_cpu)
        guards.dtypes([q.src.root, k.src.root])
        guards.head_dim(d)
        guards.heads(q.heads, k.heads)
        guards.rotary(q.rope.rotary_dim, k.rope.rotary_dim, q.rope.is_neox, k.rope.is_neox, d)
        guards.tables(q.rope.cos, k.rope.cos, q.rope.sin, k.rope.sin)
        guards.norms(q.norm, k.norm)
        guards.same_rows(q.src.root, k.src.root, "Q and K")
        gate = guards.head_stride(q.src.layout, d, "Q")
        guards.head_stride(k.src.layout, d, "K")
        if q.norm is not None and not opts.fuse_norm:
            raise GuardFailure("options", "norm fusion is turned off (fuse_norm=False)")
    except GuardFailure as e:
        report.add(Candidate(gid, name, forms, "rejected", e.reason, e.guard))
        return 0
    partial_reason = None
    if k.cache is not None and opts.fuse_cache:
        vw = _find_v_write(k.cache, v_writes, q, k)
        if vw is None:
            partial_reason = "no matching V cache write"
        else:
            try:
                shape_pairs = _cache_guards(k.cache, vw[0], vw[1], k, d)
                _check_orders(k, vw, d)
                guards.assume_equal(shape_pairs)  # last: no shape guard for a chain refused
            except (GuardFailure, token_order.OrderError, LayoutError) as e:
                if isinstance(e, GuardFailure):
                    e = f"{e.guard}: {e.reason}"
                partial_reason = str(e)
                vw = None
    elif k.cache is None:
        partial_reason = "no cache write of K"
    else:
        partial_reason = "cache fusion is turned off (fuse_cache=False)"
    try:
        op_name = _rewrite(graph, fake_mode, q, k, vw, gate, d, opts)
    except (LookupError, ValueError, LayoutError) as e:
        report.add(Candidate(gid, name, forms, "rejected", f"rewrite: {e}", "rewrite"))
        return 0
    if vw is not None:
        forms["cache"] = _cache_form(k.cache)
        report.add(Candidate(gid, name, forms, "fused", op=op_name))
    else:
        report.add(Candidate(gid, name, forms, "fused-partial", partial_reason, "cache",
                             op=op_name))
    return 1


def _find_v_write(kw: CacheWrite, v_writes, q: Chain, k: Chain):
    same = [e for e in v_writes if e[0].slot_kind == kw.slot_kind and
            all(same_value(a, b) for a, b in zip(e[0].slot_args, kw.slot_args))]
    own = [e for e in same  # the V of the same layer first
           if e[1] is k.src.root or _layer_input(e[1]) is _layer_input(k.src.root)]
    for e in own + [e for e in same if e not in own]:
        # a V computed after this layer's rope (a later layer's) cannot join the same call;
        # checked in order, so a model's layers cost one walk each
        if not depends_on(e[1], [q.rope.out, k.rope.out]):
            return e
    return None


def _cache_guards(kw: CacheWrite, vw: CacheWrite, v_root: Node, k: Chain, d: int) -> list:
    """Raises GuardFailure; returns the K/V size pairs to guard on (``guards.cache_shapes``)."""
    pairs = guards.cache_shapes(kw.size, vw.size, kw.layout == vw.layout)
    guards.check("cache", kw.fp8 == vw.fp8 and kw.kv_cache_dtype == vw.kv_cache_dtype,
                 "K and V caches differ in dtype")
    kv = tensor_val(kw.index_put.args[0])
    guards.check("cache", kv.dtype == tensor_val(k.src.root).dtype or kw.fp8 is not None,
                 f"cache dtype {kv.dtype} differs from the activations")
    heads = kw.size[2] if kw.layout == 0 else kw.size[1]
    guards.check("cache", heads == k.heads and kw.size[3] == d,
                 f"cache heads/dim {heads}x{kw.size[3]} do not match K ({k.heads}x{d})")
    guards.same_rows(v_root, k.src.root, "V and K")
    guards.dtypes([v_root, k.src.root])
    return pairs


def _rewrite(graph, fake_mode, q: Chain, k: Chain, vw, gate: int, d: int,
             opts: FusionOptions) -> str:
    outs_q = q.rope.out
    anchor = _insertion_point(graph, [q.rope.out, k.rope.out] +
                              ([k.cache.index_put, vw[0].index_put] if vw else []))
    b = Builder(graph, fake_mode, anchor, q.rope.out.meta.get("stack_trace"))
    try:
        return _build(b, q, k, vw, gate, d, outs_q, opts)
    except Exception:
        for n in reversed(b.created):  # leave the graph as it was
            if not n.users:
                graph.erase_node(n)
        raise


def _build(b: Builder, q: Chain, k: Chain, vw, gate: int, d: int, outs_q,
           opts: FusionOptions) -> str:
    # sizes come from views of the projections only: never keep the unfused chain alive
    providers = [q.src.root, k.src.root, q.src.raw, k.src.raw]
    q_src = b.rows2d(q.src.root)
    k_src = q_src if k.src.root is q.src.root else b.rows2d(k.src.root)
    cos, sin, positions, expanded = _tables(b, q, providers)
    norm = q.norm
    head = (q_src, k_src, None, q.src.layout.col, k.src.layout.col, None,
            q.heads, k.heads, d, gate,
            norm.weight if norm else None, k.norm.weight if norm else None,
            norm is not None, float(norm.eps) if norm else 1e-6,
            float(norm.offset) if norm else 0.0,
            cos, sin, positions, q.rope.rotary_dim, q.rope.is_neox, expanded)
    k_users = [u for u in k.rope.out.users if not _on_value_path(u, k.cache)] if vw else \
        list(k.rope.out.users)
    write_k = bool(k_users)
    if vw is not None:
        w, v_root, v_ops = vw
        v_lay = _v_layout(v_root, v_ops, d)[0]
        v_src = q_src if v_root is q.src.root else (k_src if v_root is k.src.root else
                                                     b.rows2d(v_root))
        head = head[:2] + (v_src,) + head[3:5] + (v_lay.col,) + head[6:]
        slots = _slots(b, k.cache, providers)
        kc = dict(base=k.cache.base, size=k.cache.size, stride=k.cache.stride,
                  offset=k.cache.offset, alias=k.cache.alias)
        vc = dict(base=w.base, size=w.size, stride=w.stride, offset=w.offset, alias=w.alias)
        op = torch.ops.fused_qkv.split_norm_rope_cache.default
        args = head + (None, None, slots, k.cache.layout, False, k.cache.kv_cache_dtype,
                       k.cache.scale, w.scale, True, write_k, False, False)
        outs, new_bases, op_name = _call(b, op, args, opts, kc, vc)
        replace_cache_chain(b, k.cache, new_bases[id(k.cache.base)])
        replace_cache_chain(b, w, new_bases[id(w.base)])
        for cw in (k.cache, w):
            cw.copy_node.replace_input_with(cw.copy_node.args[1], new_bases[id(cw.base)])
    else:
        head = head[:2] + (k_src,) + head[3:5] + (k.src.layout.col,) + head[6:]
        op = torch.ops.fused_qkv.split_norm_rope.default
        outs, _, op_name = _call(b, op, head + (True, write_k, False, False), opts)
    new_q = b.to_head_tensor(outs[0], outs_q, q.src.layout, providers)
    rewire(b, outs_q, new_q)
    if write_k:
        new_k = b.to_head_tensor(outs[1], k.rope.out, k.src.layout, providers)
        rewire(b, k.rope.out, new_k, k_users)
    return op_name


def _call(b: Builder, op, args: tuple, opts: FusionOptions, kc: Optional[dict] = None,
          vc: Optional[dict] = None) -> tuple:
    """Insert the fused call (with the caches ``kc``/``vc``, or without):
    ``(outs[4], {id(cache base): new base}, the report's op name)``.

    With ``opts.inductor_launch``, Inductor's generated code launches the Triton kernel itself
    (no Python of ours per call: ``inductor_launch``); where that path cannot be used (CPU,
    Triton's interpreter, ...) the custom op, through ``auto_functionalized_v2``."""
    def insert(fused, fused_with_cache):  # rewrite's and inductor_launch's take the same args
        if kc is None:
            return fused(b, op, args)[1], {}
        return fused_with_cache(b, op, args, kc, vc)[1:]

    if opts.inductor_launch:
        tiles = dict(dynamic_tiles=opts.dynamic_tiles)
        try:
            return (*insert(functools.partial(inductor_launch.call_fused, **tiles),
                            functools.partial(inductor_launch.call_fused_with_cache, **tiles)),
                    inductor_launch.OP_NAME)
        except inductor_launch.Unsupported as e:
            if tensor_val(args[0]).device.type == "cuda":  # elsewhere the custom op is the plan
                log.debug("Inductor launch not used, custom op instead: %s", e)
        except Exception as e:  # a bug there must not cost the fusion: the custom op still works
            log.warning("Inductor launch failed, custom op instead: %s: %s", type(e).__name__, e,
                        exc_info=log.isEnabledFor(logging.DEBUG))
    return (*insert(call_fused, call_fused_with_cache),
            f"fused_qkv.{op._schema.name.split('::')[-1]}")


def _insertion_point(graph: Graph, nodes) -> Node:
    order = {n: i for i, n in enumerate(graph.nodes)}
    users = [u for n in nodes for u in n.users]
    cands = users + [n for n in nodes if is_op(n, aten.index_put.default)]
    return min(cands, key=lambda u: order[u])


def _tables(b: Builder, q: Chain, providers) -> tuple:
    cs, ss = q.rope.cos, q.rope.sin
    r = q.rope.rotary_dim
    width = r if cs.expanded else r // 2
    if cs.positions is not None and ss.positions is not None:
        guards.check("positions", cs.positions is ss.positions, "cos and sin use other positions")
        cos = b.table_cols(cs.table, cs.col, width)
        sin = b.table_cols(ss.table, ss.col, width)
        pos = b.flat1d(cs.positions)
        pv = tensor_val(pos)
        rows = rows_of(tensor_val(q.src.root))[2]
        if not same_sym(pv.shape[0], rows):
            raise ValueError("positions do not have one entry per token")
        return cos, sin, pos, cs.expanded
    if cs.gathered is None or ss.gathered is None:
        raise ValueError("cos and sin come in different forms")
    cos = b.per_token(cs.gathered, q.rope.x, q.src.layout, providers, cs.unsqueeze)
    sin = b.per_token(ss.gathered, q.rope.x, q.src.layout, providers, ss.unsqueeze)
    return cos, sin, None, cs.expanded


def _on_value_path(u: Node, cw: Optional[CacheWrite]) -> bool:
    """Is user ``u`` of the K rope output only feeding the cache write?"""
    if cw is None:
        return False
    n, seen = u, 0
    while isinstance(n, Node) and seen < 8:
        if n is cw.index_put:
            return True
        if len(n.users) != 1:
            return False
        n, seen = next(iter(n.users)), seen + 1
    return False


def _v_layout(root: Node, ops: list, d: int):
    """Layout (relative to the projection) of the last pure view before any copy."""
    views = []
    for op in ops:
        if not is_view_node(op):
            break
        views.append(op)
    return head_layout(tensor_val(views[-1]), tensor_val(root), d), ops[len(views):]


def _check_orders(k: Chain, vw, d: int) -> None:
    """K and V reach the cache rows in the op's token order (raises OrderError/LayoutError)."""
    kinds = token_order.apply(token_order.kinds_of(k.src.layout),
                              k.cache_ops + k.cache.post_views)
    token_order.check_written_order(kinds, k.cache.value_shape_kind, "K")
    w, root, ops = vw
    lay, rest = _v_layout(root, ops, d)
    kinds = token_order.apply(token_order.kinds_of(lay), rest + w.post_views)
    token_order.check_written_order(kinds, w.value_shape_kind, "V")
    guards.check("layout", lay.head_stride == d or lay.heads == 1,
                 f"V heads are {lay.head_stride} columns apart")


def _slots(b: Builder, cw: CacheWrite, providers) -> Node:
    """Slot per token, in indexing semantics of the replaced write."""
    if cw.slot_kind == "slot":
        return b.flat1d(cw.slot_args[0])
    # a cache's sizes are symbolic after a recompile with another size (a block count, a
    # StaticCache's batch or length): the graph reads them from the cache input itself
    providers = list(providers) + [cw.base]
    if cw.slot_kind == "blk_off":
        blk, off = cw.slot_args
        nb = b.size(cw.size[0], providers)
        bs = b.size(cw.size[1] if cw.layout == 0 else cw.size[2], providers)
        # Negative indices count from the end of their own dim, as indexing does.
        blk, off = _wrap_negative(b, b.flat1d(blk), nb), _wrap_negative(b, b.flat1d(off), bs)
        return b.call(aten.add.Tensor, (b.call(aten.mul.Tensor, (blk, bs)), off))
    # Hugging Face StaticCache: token (b, s) -> b * L + cache_position[s]
    (pos,) = cw.slot_args
    nb, length = b.size(cw.size[0], providers), b.size(cw.size[2], providers)
    pos = _wrap_negative(b, b.flat1d(pos), length)
    pv = tensor_val(pos)
    # prims.iota, not aten.arange: post-grad graphs are already decomposed (Inductor on CUDA
    # refuses an arange node there).
    iota = b.call(torch.ops.prims.iota.default, (nb,),
                  {"start": 0, "step": 1, "dtype": pv.dtype, "device": pv.device,
                   "requires_grad": False})
    starts = b.call(aten.mul.Tensor, (iota, length))
    grid = b.call(aten.add.Tensor, (b.call(aten.unsqueeze.default, (starts, 1)),
                                    b.call(aten.unsqueeze.default, (pos, 0))))
    return b.call(aten.reshape.default, (grid, [-1]))


def _wrap_negative(b: Builder, x: Node, n: int) -> Node:
    """x + n where x < 0: negative indices count from the end, as PyTorch indexing does."""
    neg = b.call(aten.lt.Scalar, (x, 0))
    return b.call(aten.add.Tensor, (x, b.call(aten.mul.Tensor, (neg, n))))
