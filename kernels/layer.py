"""The op bound to one attention layer: validate the fixed arguments once, not every step.

An engine calls the op once per layer per step with the same norm weights, rope table and KV
caches; only the projection, the positions and the slot mapping change.  Without a CUDA graph
(eager decode) the host time of each call is what the step pays, so ``FusedQKVLayer`` checks
everything once, through the full entry point, and afterwards only what can change.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .api import FusedQKV, _tracing, split_norm_rope_cache
from .custom_op import split_norm_rope_cache_direct
from .op_schema import CACHE_LAYOUTS, GATE_LAYOUTS


class FusedQKVLayer:
    """``split_norm_rope_cache`` with a packed ``qkv`` and one layer's fixed arguments bound.

    Takes the keyword arguments of :func:`kernels.split_norm_rope_cache` except ``qkv``, ``q``,
    ``k``, ``v``, ``positions`` and ``slot_mapping`` (``cos_sin_cache``, ``key_cache`` and
    ``value_cache`` are required).  ``layer(qkv, positions, slot_mapping)`` returns what the
    entry point returns.  The first call, any call whose tensors differ in dtype, device,
    width or layout from the first one, and any call under tracing go through the full,
    validated entry point (so a bad argument still raises a ``ValueError`` naming it); the
    others only check shapes and launch.
    """

    def __init__(self, **kwargs) -> None:
        for name in ("qkv", "q", "k", "v", "positions", "slot_mapping"):
            if name in kwargs:
                raise TypeError(f"FusedQKVLayer: {name} is passed per call, not bound")
        for name in ("cos_sin_cache", "key_cache", "value_cache"):
            if kwargs.get(name) is None:
                raise ValueError(f"FusedQKVLayer: {name} is required")
        self._kw = kwargs
        self._sig: Optional[tuple] = None  # what the validated call looked like
        self._args: Optional[tuple] = None  # the op's arguments around (qkv, positions, slots)

    def __call__(self, qkv: Tensor, positions: Tensor, slot_mapping: Tensor) -> FusedQKV:
        sig = self._sig
        if sig is not None and qkv.dim() == 2 and positions.dim() == 1 and \
                slot_mapping.dim() == 1 and (qkv.dtype, qkv.device, qkv.shape[1], qkv.stride(1),
                                             positions.dtype, positions.device,
                                             slot_mapping.dtype, slot_mapping.device) == sig:
            t = qkv.shape[0]
            if positions.shape[0] == t and slot_mapping.shape[0] >= t and \
                    (t < 2 or positions.stride(0) == 1 and slot_mapping.stride(0) == 1) and \
                    not _tracing():
                return self._launch(qkv, positions, slot_mapping, t)
        out = split_norm_rope_cache(qkv, positions=positions, slot_mapping=slot_mapping,
                                    **self._kw)
        if not _tracing() and qkv.dim() == 2:  # validated: later calls like it take the fast path
            self._bind(qkv, positions, slot_mapping)
        return out

    def _bind(self, qkv: Tensor, positions: Tensor, slot_mapping: Tensor) -> None:
        kw = self._kw
        hq, hkv, d = kw["num_q_heads"], kw["num_kv_heads"], kw["head_dim"]
        gate = GATE_LAYOUTS[kw.get("gate")]
        q_width = hq * d * (2 if gate else 1)
        table = kw["cos_sin_cache"]
        r = kw.get("rotary_dim") or table.shape[-1]
        q_w, k_w = kw.get("q_weight"), kw.get("k_weight")
        apply_norm = kw.get("apply_norm")
        if apply_norm is None:
            apply_norm = q_w is not None or k_w is not None
        ks, vs = kw.get("k_scale"), kw.get("v_scale")
        head = (0, q_width, q_width + hkv * d, hq, hkv, d, gate, q_w, k_w, bool(apply_norm),
                float(kw.get("eps", 1e-6)), float(kw.get("weight_offset", 0.0)),
                table[:, : r // 2], table[:, r // 2: r])
        tail = (r, bool(kw.get("is_neox", True)), False, kw["key_cache"], kw["value_cache"])
        cache = (CACHE_LAYOUTS[kw.get("cache_layout", "NHD")],
                 kw.get("slot_mode", "engine") == "engine", kw.get("kv_cache_dtype", "auto"),
                 None if ks is None else ks.reshape(()), None if vs is None else vs.reshape(()),
                 kw.get("return_q", True), kw.get("return_k", True), kw.get("return_v", True),
                 kw.get("return_gate", True))
        self._args = (head, tail, cache)
        self._sig = (qkv.dtype, qkv.device, qkv.shape[1], qkv.stride(1), positions.dtype,
                     positions.device, slot_mapping.dtype, slot_mapping.device)

    def _launch(self, qkv, positions, slot_mapping, t) -> FusedQKV:
        head, tail, cache = self._args
        slots = slot_mapping if slot_mapping.shape[0] == t else slot_mapping[:t]
        out = split_norm_rope_cache_direct(qkv, qkv, qkv, *head, positions, *tail, slots, *cache)
        torch.autograd.graph.increment_version((tail[3], tail[4]))
        return FusedQKV(*out)
