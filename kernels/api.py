"""The documented eager entry point for engines that call the fused op by hand."""
from __future__ import annotations

import inspect
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import native_entry, validate
from .custom_op import (
    _use_triton,
    split_norm_rope_cache_direct,
    split_norm_rope_cache_op,
    split_norm_rope_impl,
    split_norm_rope_op,
)
from .op_schema import CACHE_LAYOUTS, GATE_LAYOUTS, fp8_dtype_of


class FusedQKV(NamedTuple):
    """Outputs ``[T, H, D]``; an output that was not asked for is an empty tensor."""

    q: Tensor
    k: Tensor
    v: Tensor
    gate: Tensor


def _flat(name: str, x: Tensor) -> Tensor:
    validate.tensor(name, x)
    if x.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dims [..., width], got shape "
                         f"{tuple(x.shape)}")
    return _rows(x)


def _rows(x: Tensor) -> Tensor:
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # a reshape costs ~1 us


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


_HALVES: dict = {}  # (table identity and layout, r) -> its cos and sin views


def _halves(table: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """cos_sin_cache[:, :r/2], [:, r/2:r], made once per table (two views cost ~2 us a call).
    The key pins the memory and layout; the cached views keep that memory alive."""
    key = (id(table), table.data_ptr(), table.dtype, table.shape, table.stride(), r)
    views = _HALVES.get(key)
    if views is None:
        if len(_HALVES) >= 16:
            _HALVES.clear()
        views = _HALVES[key] = (table[:, : r // 2], table[:, r // 2: r])
    return views


class OpCall(NamedTuple):
    """A validated call of the op: its arguments in schema order, ready to launch."""

    direct: bool  # plain eager: the op's Python impl, skipping the dispatcher
    head: tuple  # q_src ... table_expanded (the arguments both ops share)
    cache: Optional[tuple]  # key_cache ... v_scale; None: the op without a cache write
    flags: tuple  # return_q, return_k, return_v, return_gate

    def with_step(self, qkv, positions, slots) -> "OpCall":
        """The same call for another step's packed ``qkv``, ``positions`` and ``slots`` (None:
        drop them, so that a kept call holds only the fixed arguments)."""
        h, c = self.head, self.cache
        return OpCall(self.direct, (qkv, qkv, qkv) + h[3:_POSITIONS] + (positions,) +
                      h[_POSITIONS + 1:], c[:_SLOTS] + (slots,) + c[_SLOTS + 1:], self.flags)


# Where the per-step tensors sit in OpCall.head / .cache (head[0:3] are q_src, k_src, v_src)
_POSITIONS = 17
_SLOTS = 2


def run(call: OpCall) -> FusedQKV:
    """Launch a validated call (``prepare``'s result, or one with new tensors swapped in)."""
    if call.cache is not None:
        fn = split_norm_rope_cache_direct if call.direct else split_norm_rope_cache_op
        out = fn(*call.head, *call.cache, *call.flags)
        if call.direct:  # what the dispatcher would do for a mutated argument
            torch.autograd.graph.increment_version((call.cache[0], call.cache[1]))
    else:
        fn = split_norm_rope_impl if call.direct else split_norm_rope_op
        out = fn(*call.head, *call.flags)
    return FusedQKV(*out)


# Validated eager calls with a cache, by signature: a later call with the same signature is
# valid too and launches the same kernel, so it skips validation and the launch's set-up
# (~60% of the entry point's host time).  At most _KNOWN_MAX; the least recently used goes
# first.
_KNOWN: dict = {}
_KNOWN_MAX = 64
# Signatures called before (keys only, no tensors), kept longer than _KNOWN: a signature's
# second call is offered to the C++ module even where a cycle through more signatures than
# _KNOWN holds evicted its remembered call meanwhile.
_CALLED: dict = {}
_CALLED_MAX = 1024
_TENSOR_ARGS = frozenset(("q", "k", "v", "q_weight", "k_weight", "positions", "cos_sin_cache",
                          "cos", "sin", "key_cache", "value_cache", "slot_mapping", "k_scale",
                          "v_scale"))
_PLAIN = (bool, int, str, type(None))


def _signature(qkv, kwargs: dict) -> Optional[tuple]:
    """All that validation and the launch read: each tensor argument's dtype, device, shape
    and strides, and each other argument's type and value (``True``, ``1`` and ``1.0`` must
    not share a key, nor ``0.0`` and ``-0.0``).  None: a call not to remember (a tensor where
    a scalar goes, or another type than bool, int, float, str and None)."""
    key = [(qkv.dtype, qkv.device, qkv.shape, qkv.stride()) if isinstance(qkv, Tensor)
           else qkv]
    for n, v in kwargs.items():
        if isinstance(v, Tensor):
            if n not in _TENSOR_ARGS:
                return None
            key.append((n, v.dtype, v.device, v.shape, v.stride()))
        elif type(v) is float:
            key.append((n, float, v, math.copysign(1.0, v)))
        elif type(v) in _PLAIN:
            key.append((n, type(v), v))
        else:
            return None
    return tuple(key)


class _KnownCall:
    """The launch of a validated call, for later calls of its signature: it rebuilds only the
    views that ``prepare`` makes and refills the kept launch's tensors, which it does not
    hold (a kept launch must not keep caches alive)."""

    __slots__ = ("bound", "plan", "rotary_dim", "on_cpu", "sources", "native_refused")

    def __init__(self, call: OpCall, packed: bool, table: bool) -> None:
        from .triton_kernel import BoundLaunch  # triton is imported lazily

        self.on_cpu = call.head[0].device.type == "cpu"  # Triton only while TRITON_INTERPRET=1
        self.bound = BoundLaunch(*call.head, *call.cache, *call.flags, share_empty=True)
        self.plan = self.bound.plan(*call.head[:3])  # the signature fixes T and the strides
        self.bound.unbind()
        self.rotary_dim = call.head[18]
        # the entry-point argument each of the launch's tensors is a view of (see views())
        self.sources = {"q_src": "qkv" if packed else "q", "k_src": "qkv" if packed else "k",
                        "v_src": "qkv" if packed else "v",
                        "cos": "cos_sin_cache" if table else "cos",
                        "sin": "cos_sin_cache" if table else "sin"}
        self.native_refused = None  # the launch state native_entry.register refused it under

    def __call__(self, qkv: Optional[Tensor], kw: dict) -> FusedQKV:
        views = self.views(qkv, kw)
        fixed = views[5]
        out = self.bound(*views[:5], plan=self.plan, fixed=fixed)
        torch.autograd.graph.increment_version((fixed[4], fixed[5]))  # as the dispatcher would
        return FusedQKV(*out)

    def views(self, qkv: Optional[Tensor], kw: dict) -> tuple:
        """The launch's tensors for a call of this signature: (q_src, k_src, v_src, positions,
        slots, fixed), each a view of the argument ``sources`` names (or of its own name)."""
        if qkv is not None:
            q_src = k_src = v_src = _rows(qkv)
        else:
            q_src, k_src, v_src = _rows(kw["q"]), _rows(kw["k"]), _rows(kw["v"])
        table = kw.get("cos_sin_cache")
        if table is not None:
            cos, sin = _halves(table, self.rotary_dim)
        else:
            cos, sin = _rows(kw["cos"]), _rows(kw["sin"])
        positions = kw.get("positions")
        if positions is not None and positions.dim() != 1:
            positions = positions.reshape(-1)
        slots, t = kw["slot_mapping"], q_src.shape[0]
        if slots.shape[0] != t:
            slots = slots[:t]
        return q_src, k_src, v_src, positions, slots, (
            kw.get("q_weight"), kw.get("k_weight"), cos, sin, kw["key_cache"],
            kw["value_cache"], kw.get("k_scale"), kw.get("v_scale"))


def forget_calls() -> None:
    """Forget the remembered calls (tests that patch what a launch is built from)."""
    _KNOWN.clear()
    _CALLED.clear()
    native_entry.forget()


_CPU = torch.device("cpu")


def split_norm_rope_cache(qkv: Optional[Tensor] = None, **kwargs) -> FusedQKV:
    """Split Q/K/V, RMSNorm Q and K per head, apply RoPE, write K and V into a paged cache.

    Args:
        qkv: packed projection ``[..., W]`` (vLLM style); or pass ``q``, ``k``, ``v``
            separately (Hugging Face style).  Any row stride, last-dim stride 1; leading dims
            are flattened into T tokens.
        gate: ``None``, ``"interleaved"`` (per head ``[q_h | g_h]``) or ``"blocked"``
            (``[q_all | g_all]``): the Q region is twice as wide and a gate is returned.
        q_weight, k_weight: RMSNorm weights ``[head_dim]``; the norm multiplies by
            ``weight + weight_offset`` (offset 1 for Gemma / Qwen3-Next).  ``apply_norm``
            defaults to True when a weight is given (False: RoPE + cache only, e.g. Llama).
        positions: ``[T]`` int32/int64 row of each token in the table.  Without it, the tables
            are already per token (Hugging Face ``cos, sin`` of shape ``[..., T, C]``).
        cos_sin_cache: vLLM table ``[max_pos, rotary_dim]``, cos half then sin half.
        cos, sin: separate tables, last dim ``rotary_dim / 2`` or ``rotary_dim`` (expanded).
        rotary_dim: rotated dims per head (default: the table's width, else head_dim).
        is_neox: NeoX rotate-half pairs ``(i, i + r/2)``; False: GPT-J pairs ``(2i, 2i+1)``.
        key_cache, value_cache: ``[num_blocks, block_size, H_kv, D]`` ("NHD") or
            ``[num_blocks, H_kv, block_size, D]`` ("HND"); strided views allowed.  fp8 caches
            (or uint8 with ``kv_cache_dtype="fp8_e4m3"/"fp8_e5m2"``) store ``x / scale``.
        slot_mapping: ``[T]`` cache slot per token.  ``slot_mode="engine"``: a slot < 0 or past
            the end writes nothing; ``"index"``: a negative slot counts from the end.

    Returns:
        ``FusedQKV(q, k, v, gate)`` with shapes ``[T, H, D]``.

    Raises:
        ValueError / TypeError naming the offending argument.
    """
    if _tracing():
        return run(prepare(qkv, **kwargs))
    state = None
    native = native_entry.module
    if native is not None:  # remembered calls, in C++ (CUDA only)
        state = native_entry.state()
        if state is not None:
            out = native.call(qkv, kwargs, state)
            if out is not None:
                return out
    return _python_call(qkv, kwargs, state)


def _python_call(qkv: Optional[Tensor], kwargs: dict, state: Optional[tuple],
                 offer_first: bool = False) -> FusedQKV:
    """The entry point outside tracing, less the C++ module: a remembered signature's launch,
    else validation (which remembers the signature).  A signature is offered to the module
    (``native_entry.remember``; ``state``: ``native_entry.state()``, if read) from its second
    call, or from its first with ``offer_first``: describing a launch costs ~0.2 ms, more
    than a one-off signature would save there (an eager prefill with a new T every step)."""
    try:
        key = _signature(qkv, kwargs)
        known = _KNOWN.get(key) if key is not None else None
    except Exception:  # unhashable, no strides...: validation below names the argument
        key = known = None
    # the tile, offset and register settings are module globals that benchmarks change
    if known is not None and not known.bound.stale() and \
            not (known.on_cpu and not _use_triton(_CPU)):
        _KNOWN.pop(key, None)  # the most recently used goes last (pop: no KeyError if
        _KNOWN[key] = known    # another thread evicted it meanwhile)
        return _known_call(known, qkv, kwargs, state, True)
    call = prepare(qkv, **kwargs)
    if key is None or not call.direct or call.cache is None or \
            not _use_triton(call.head[0].device):
        return run(call)
    known = _remember(key, call, qkv is not None, kwargs.get("cos_sin_cache") is not None)
    offer = offer_first or key in _CALLED
    if not offer:
        if len(_CALLED) >= _CALLED_MAX:
            _CALLED.clear()
        _CALLED[key] = None
    return _known_call(known, qkv, kwargs, state, offer)  # later calls' path, from now


def _known_call(known: _KnownCall, qkv: Optional[Tensor], kwargs: dict,
                state: Optional[tuple], offer: bool) -> FusedQKV:
    out = known(qkv, kwargs)
    # hand it to the C++ path (``offer``), or at least start building that (its first call)
    if not known.on_cpu and (offer or native_entry.module is None):
        native_entry.remember(known, qkv, kwargs, out, state)
    return out


def _remember(key: tuple, call: OpCall, packed: bool, table: bool) -> _KnownCall:
    known = _KnownCall(call, packed, table)
    _KNOWN.pop(key, None)
    if len(_KNOWN) >= _KNOWN_MAX:
        del _KNOWN[next(iter(_KNOWN))]
    _KNOWN[key] = known
    return known


def prepare(
    qkv: Optional[Tensor] = None,
    *,
    q: Optional[Tensor] = None,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    gate: Optional[str] = None,
    q_weight: Optional[Tensor] = None,
    k_weight: Optional[Tensor] = None,
    apply_norm: Optional[bool] = None,
    eps: float = 1e-6,
    weight_offset: float = 0.0,
    positions: Optional[Tensor] = None,
    cos_sin_cache: Optional[Tensor] = None,
    cos: Optional[Tensor] = None,
    sin: Optional[Tensor] = None,
    rotary_dim: Optional[int] = None,
    is_neox: bool = True,
    key_cache: Optional[Tensor] = None,
    value_cache: Optional[Tensor] = None,
    slot_mapping: Optional[Tensor] = None,
    cache_layout: str = "NHD",
    slot_mode: str = "engine",
    kv_cache_dtype: str = "auto",
    k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
    return_q: bool = True,
    return_k: bool = True,
    return_v: bool = True,
    return_gate: bool = True,
) -> OpCall:
    """Validate the arguments of :func:`split_norm_rope_cache` (the same names and defaults)
    and return the op call, without launching it (``FusedQKVLayer`` keeps it for later steps).

    Returns:
        The :class:`OpCall`; :func:`run` launches it.

    Raises:
        ValueError / TypeError naming the offending argument.
    """
    # Plain eager: skip the dispatcher (its Python path costs ~200 us for ops that mutate).
    # Anything tracing (torch.compile, make_fx, fake tensors) goes through the registered op.
    direct = not _tracing()
    validate.heads(num_q_heads, num_kv_heads, head_dim)
    if gate not in GATE_LAYOUTS:
        raise ValueError(f"gate must be None, 'interleaved' or 'blocked', got {gate!r}")
    gate_layout = GATE_LAYOUTS[gate]
    hq, hkv, d = num_q_heads, num_kv_heads, head_dim
    q_width = hq * d * (2 if gate_layout else 1)
    kv_width = hkv * d

    # --- activations: packed or separate ---
    if qkv is not None:
        if q is not None or k is not None or v is not None:
            raise ValueError("pass either qkv or q/k/v, not both")
        src = _flat("qkv", qkv)
        validate.activation("qkv", src, q_width + 2 * kv_width)
        q_src = k_src = v_src = src
        q_col, k_col, v_col = 0, q_width, q_width + kv_width
    else:
        if q is None or k is None or v is None:
            raise ValueError("pass qkv, or all three of q, k and v")
        q_src, k_src, v_src = _flat("q", q), _flat("k", k), _flat("v", v)
        validate.activation("q", q_src, q_width)
        validate.activation("k", k_src, kv_width, q_src.shape[0])
        validate.activation("v", v_src, kv_width, q_src.shape[0])
        validate.same("k", k_src, "q", q_src)
        validate.same("v", v_src, "q", q_src)
        q_col = k_col = v_col = 0
    t = q_src.shape[0]

    # --- norm ---
    validate.norm_weight("q_weight", q_weight, d)
    validate.norm_weight("k_weight", k_weight, d)
    validate.flag("apply_norm", apply_norm, optional=True)
    validate.finite("weight_offset", weight_offset)
    for name, x in (("is_neox", is_neox), ("return_q", return_q), ("return_k", return_k),
                    ("return_v", return_v), ("return_gate", return_gate)):
        validate.flag(name, x)
    if apply_norm is None:
        apply_norm = q_weight is not None or k_weight is not None
    validate.eps_value(eps)

    # --- rope tables ---
    if cos_sin_cache is not None:
        if cos is not None or sin is not None:
            raise ValueError("pass either cos_sin_cache or cos/sin, not both")
        validate.tensor("cos_sin_cache", cos_sin_cache)
        if positions is None:
            raise ValueError("positions is required with cos_sin_cache")
        r = cos_sin_cache.shape[-1] if rotary_dim is None else rotary_dim
        validate.rotary(r, d)
        validate.table("cos_sin_cache", cos_sin_cache, r)
        if direct:
            cos_t, sin_t = _halves(cos_sin_cache, r)
        else:  # fake tensors have no data_ptr
            cos_t, sin_t = cos_sin_cache[:, : r // 2], cos_sin_cache[:, r // 2: r]
        expanded = False
    else:
        if cos is None or sin is None:
            raise ValueError("pass cos_sin_cache, or both cos and sin")
        validate.tensor("cos", cos)
        validate.tensor("sin", sin)
        if tuple(cos.shape) != tuple(sin.shape) or cos.dtype != sin.dtype:
            raise ValueError(f"sin must match cos in shape and dtype: cos {tuple(cos.shape)} "
                             f"{cos.dtype}, sin {tuple(sin.shape)} {sin.dtype}")
        cos_t, sin_t = _flat("cos", cos), _flat("sin", sin)
        width = cos_t.shape[1]
        r = rotary_dim if rotary_dim is not None else min(d, 2 * width)
        validate.rotary(r, d)
        if width == r // 2:
            expanded = False
        elif width == r:
            expanded = True
        else:
            raise ValueError(f"cos last dim must be rotary_dim/2 ({r // 2}) or rotary_dim ({r}), "
                             f"got {width}")
        validate.table("cos", cos_t, width)
        validate.table("sin", sin_t, width)
    if positions is not None:
        validate.tensor("positions", positions)
        if positions.dim() != 1:
            positions = positions.reshape(-1)
        validate.index_tensor("positions", positions, t, at_least=False)
    elif cos_t.shape[0] != t:
        raise ValueError(f"without positions, cos/sin must have one row per token ({t}), got "
                         f"{cos_t.shape[0]}")

    # --- cache ---
    if cache_layout not in CACHE_LAYOUTS:
        raise ValueError(f"cache_layout must be 'NHD' or 'HND', got {cache_layout!r}")
    if slot_mode not in ("engine", "index"):
        raise ValueError(f"slot_mode must be 'engine' or 'index', got {slot_mode!r}")
    has_cache = key_cache is not None or value_cache is not None or slot_mapping is not None
    fp8 = None
    if has_cache:
        for name, x in (("key_cache", key_cache), ("value_cache", value_cache),
                        ("slot_mapping", slot_mapping)):
            if x is None:
                raise ValueError(f"{name} is required when any of key_cache, value_cache, "
                                 f"slot_mapping is given")
            validate.tensor(name, x)
        validate.cache("key_cache", key_cache, cache_layout, hkv, d, q_src.dtype, kv_cache_dtype)
        validate.cache("value_cache", value_cache, cache_layout, hkv, d, q_src.dtype,
                       kv_cache_dtype)
        if key_cache.shape != value_cache.shape or key_cache.dtype != value_cache.dtype:
            raise ValueError(f"value_cache must match key_cache in shape and dtype: "
                             f"{tuple(key_cache.shape)} {key_cache.dtype} vs "
                             f"{tuple(value_cache.shape)} {value_cache.dtype}")
        validate.index_tensor("slot_mapping", slot_mapping, t, at_least=True)
        fp8 = fp8_dtype_of(key_cache.dtype, kv_cache_dtype)
    validate.scale("k_scale", k_scale, fp8 is not None)
    validate.scale("v_scale", v_scale, fp8 is not None)
    validate.device(("q_src", "k_src", "v_src", "q_weight", "k_weight", "cos", "sin",
                     "positions", "key_cache", "value_cache", "slot_mapping", "k_scale",
                     "v_scale"),
                    (q_src, k_src, v_src, q_weight, k_weight, cos_t, sin_t, positions,
                     key_cache, value_cache, slot_mapping, k_scale, v_scale))

    head = (q_src, k_src, v_src, q_col, k_col, v_col, hq, hkv, d, gate_layout,
            q_weight, k_weight, bool(apply_norm), float(eps), float(weight_offset),
            cos_t, sin_t, positions, r, bool(is_neox), expanded)
    flags = (return_q, return_k, return_v, return_gate)
    cache = None
    if has_cache:
        if k_scale is not None:
            k_scale = k_scale.reshape(())
        if v_scale is not None:
            v_scale = v_scale.reshape(())
        slots = slot_mapping if slot_mapping.shape[0] == t else slot_mapping[:t]
        cache = (key_cache, value_cache, slots, CACHE_LAYOUTS[cache_layout],
                 slot_mode == "engine", kv_cache_dtype, k_scale, v_scale)
    return OpCall(direct, head, cache, flags)


# help() and IDEs show the full keyword list on the entry point
split_norm_rope_cache.__signature__ = inspect.signature(prepare).replace(
    return_annotation="FusedQKV")
