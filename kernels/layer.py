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

from . import api, native_entry
from .api import FusedQKV, OpCall, _tracing, prepare, run
from .custom_op import _use_triton


class FusedQKVLayer:
    """``split_norm_rope_cache`` with a packed ``qkv`` and one layer's fixed arguments bound.

    Takes the keyword arguments of :func:`kernels.split_norm_rope_cache` except ``qkv``, ``q``,
    ``k``, ``v``, ``positions`` and ``slot_mapping`` (``cos_sin_cache``, ``key_cache`` and
    ``value_cache`` are required).  ``layer(qkv, positions, slot_mapping)`` returns what the
    entry point returns.  The first call, any call whose tensors differ in dtype, device,
    width or layout from the first one, and any call under tracing go through the full,
    validated entry point (so a bad argument still raises a ``ValueError`` naming it); the
    others only check shapes and launch.  On CUDA, once the C++ module is built
    (``native_entry``), a step geometry it does not hold goes at its second call through the
    entry point, which hands it over, and later calls of it are the module's (its first call
    stays here: many never repeat, e.g. eager prefills with a new T every step).
    """

    def __init__(self, **kwargs) -> None:
        for name in ("qkv", "q", "k", "v", "positions", "slot_mapping"):
            if name in kwargs:
                raise TypeError(f"FusedQKVLayer: {name} is passed per call, not bound")
        for name in ("cos_sin_cache", "key_cache", "value_cache"):
            if kwargs.get(name) is None:
                raise ValueError(f"FusedQKVLayer: {name} is required")
        self._kw = kwargs
        # every bound tensor the launch reads (the weights and scales too: their dtype picks
        # the compiled kernel, and a kept launch re-reads only their pointers)
        self._geo_tensors = [kwargs[n] for n in ("key_cache", "value_cache", "cos_sin_cache",
                                                 "q_weight", "k_weight", "k_scale", "v_scale")
                             if isinstance(kwargs.get(n), torch.Tensor)]
        self._geom: Optional[list] = None
        self._sig: Optional[tuple] = None  # what the validated call looked like
        self._call: Optional[OpCall] = None  # that call, validated by the entry point
        self._bound = None  # its kernel launch with the fixed arguments resolved (Triton only)
        self._plans: dict = {}  # (T, qkv row stride) -> the bound launch's plan for them
        self._refused: dict = {}  # step geometry -> the state the C++ module refused it in
        self._seen: dict = {}  # step geometries called once, not yet offered to the module

    def __call__(self, qkv: Tensor, positions: Tensor, slot_mapping: Tensor) -> FusedQKV:
        native = native_entry.module
        if native is not None and not _tracing():  # CUDA: a call the C++ module remembers
            state = native_entry.state()
            if state is not None:
                kw = self._kw.copy()
                kw["positions"], kw["slot_mapping"] = positions, slot_mapping
                out = native.call(qkv, kw, state)
                if out is not None:
                    return out
                # Not held (new, or dropped): from its second call, the entry point
                # validates the call and hands it to the module, unless the module refused
                # this step geometry under this state already (this layer's own path is then
                # faster).
                step = (qkv.shape, qkv.stride(), qkv.dtype, qkv.device, positions.shape,
                        positions.dtype, slot_mapping.shape, slot_mapping.dtype)
                if self._refused.get(step) != state and not native.holds(qkv, kw, state):
                    if self._seen.pop(step, None) is not None:
                        out = api._python_call(qkv, kw, state, offer_first=True)
                        if not native.holds(qkv, kw, state):
                            if len(self._refused) >= 64:
                                self._refused.clear()
                            self._refused[step] = state
                        return out
                    if len(self._seen) >= 64:
                        self._seen.clear()
                    self._seen[step] = True
        sig = self._sig
        if sig is not None and qkv.dim() == 2 and positions.dim() == 1 and \
                slot_mapping.dim() == 1 and (qkv.dtype, qkv.device, qkv.shape[1], qkv.stride(1),
                                             positions.dtype, positions.device,
                                             slot_mapping.dtype, slot_mapping.device) == sig:
            t = qkv.shape[0]
            if positions.shape[0] == t and slot_mapping.shape[0] >= t and \
                    (t < 2 or positions.stride(0) == 1 and slot_mapping.stride(0) == 1) and \
                    self._geometry() == self._geom and not _tracing() and \
                    (self._bound is None or not self._bound.stale()):
                return self._launch(qkv, positions, slot_mapping, t)
        call = prepare(qkv, positions=positions, slot_mapping=slot_mapping, **self._kw)
        out = run(call)
        if call.direct and qkv.dim() == 2:  # validated: later calls like it take the fast path
            # keep the fixed arguments only: this step's tensors (a prefill's qkv can be
            # hundreds of MB) must not live as long as the layer
            self._call = call.with_step(None, None, None)
            self._bound = None
            self._plans = {}
            if call.cache is not None and _use_triton(qkv.device):
                from .triton_kernel import BoundLaunch  # triton is imported lazily

                self._bound = BoundLaunch(*call.head, *call.cache, *call.flags,
                                          share_empty=True)
            self._sig = (qkv.dtype, qkv.device, qkv.shape[1], qkv.stride(1), positions.dtype,
                         positions.device, slot_mapping.dtype, slot_mapping.device)
            self._geom = self._geometry()
        return out

    def _geometry(self) -> list:
        """Memory, shape, strides and dtype of the bound caches, table, weights and scales:
        the validated call holds views of them (the table's halves, a uint8 cache as fp8) and
        the bound launch their geometry and the kernel compiled for their dtypes, so an
        in-place change (``resize_``, ``set_``, ``.data =``, ``module.to()``) must send the
        next call through validation, not write through the old views."""
        return [(x.data_ptr(), x.shape, x.stride(), x.dtype) for x in self._geo_tensors]

    def _launch(self, qkv, positions, slot_mapping, t) -> FusedQKV:
        """The validated call with this step's tensors swapped in."""
        slots = slot_mapping if slot_mapping.shape[0] == t else slot_mapping[:t]
        if self._bound is None:
            return run(self._call.with_step(qkv, positions, slots))
        key = (t, qkv.stride(0))  # with the bound width, all a plan depends on
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 64:
                self._plans.clear()
            plan = self._plans[key] = self._bound.plan(qkv, qkv, qkv)
        out = FusedQKV(*self._bound(qkv, qkv, qkv, positions, slots, plan=plan))
        cache = self._call.cache  # what the dispatcher would do for the mutated caches
        torch.autograd.graph.increment_version((cache[0], cache[1]))
        return out
