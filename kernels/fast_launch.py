"""A cached low-level launcher for one ``@triton.jit`` kernel.

Why: ``kernel[grid](...)`` runs ``JITFunction.run`` on every call, which binds every argument
in Python, specialises each one (a pybind call per argument), builds and hashes a cache key
of the whole specialisation, and builds launch metadata for the (empty) launch hooks.  With
~40 runtime arguments and ~30 constexprs that is tens of microseconds per call, which
dominates a decode step (T=1) that is not captured in a CUDA graph.

How: the first call for a key goes through the normal ``jit_fn[grid](...)``, which compiles
(or finds) the kernel and returns its ``CompiledKernel``.  We keep that kernel's launcher
under a key at least as fine as Triton's own specialisation (see ``_ARG_KEY``), and a later
call with the same key calls the launcher exactly as ``JITFunction.run`` would, minus the
hook plumbing.  Anything we do not recognise takes the normal path, so the result is always
the kernel Triton itself would have launched.

Normal path, always: Triton's interpreter (``TRITON_INTERPRET=1``), a Triton whose
``JITFunction.run`` launches differently from the call we copy (checked once, on its
source), launch hooks or pre-run hooks set (profilers), a callable grid, an argument type
the key does not cover, and any error while building the key.
"""
from __future__ import annotations

import inspect
import operator
import re
import weakref
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

try:  # the launch path this module copies (Triton 3.x with triton.knobs)
    from triton import knobs as _knobs
    from triton.runtime.jit import JITFunction as _JITFunction
except ImportError:  # pragma: no cover - another Triton: normal path only
    _knobs = _JITFunction = None

# What JITFunction.run does on a cache hit (read in Triton 3.6 and 3.9), whitespace-normalised.
# CompiledKernel.run takes every bound argument, constexprs included, after nine launch args.
_RUN_CALL = ("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, "
             "launch_metadata, knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, "
             "*bound_args.values())")
# knobs read by run() that we handle: launch hooks (must be idle) and the stage-inspection hook
# (must be unset); knobs assigned to kwargs[...] in run() are compile options and join our key.
_HOOK_KNOBS = ("runtime.launch_enter_hook", "runtime.launch_exit_hook")
_UNSET_KNOBS = ("runtime.add_stages_inspection_hook",)

# Per-argument key expressions (``{a}`` the argument, ``{p}`` its data pointer), each at least
# as fine as Triton's specialisation (python/src/specialize.cc): tensor -> dtype, + "D" if
# data_ptr % 16 == 0; int -> constexpr if == 1, else i32 / i64 / u64 by range, + "D" if
# % 16 == 0; float -> fp32; bool -> u1; None -> constexpr.  ``& 15`` (16 classes, not 2) and
# ``>> 31`` (0 or -1 exactly on the int32 range, and distinct from there on) are finer than
# needed but cheaper than comparisons.  ``__class__`` keeps int / bool / float apart (True ==
# 1 == 1.0 as dict keys).  ``is_cuda``: we pass raw pointers, which skip the launcher's "cpu
# tensor?" check, so a CPU tensor must miss and reach Triton, which raises.
_ARG_KEY = {
    "tensor": "{a}.dtype, {p} & 15, {a}.is_cuda",
    "int": "{a}.__class__, {a} == 1, {a} & 15, {a} >> 31",
    "plain": "{a}.__class__",  # float, bool, None: Triton does not specialise on the value
}
_MAX_ENTRIES = 4096  # a safety net; real call sites have a handful of keys


def _probe_run(src: Optional[str] = None) -> tuple[Optional[Callable], Optional[Callable], str]:
    """Once per process: (getter of the compile-option knobs, getter of the hook knobs, why not).

    The getters are None when the installed Triton's run() (or ``src``) differs from what we
    copy."""
    if _JITFunction is None:
        return None, None, "triton.runtime.jit.JITFunction / triton.knobs not found"
    try:
        src = src if src is not None else inspect.getsource(_JITFunction.run)
    except (OSError, TypeError):
        return None, None, "source of JITFunction.run unavailable"
    if _RUN_CALL not in " ".join(src.split()):
        return None, None, "JITFunction.run launches differently in this Triton"
    options, used = [], set()
    for line in src.splitlines():
        refs = re.findall(r"knobs\.(\w+\.\w+)", line)
        used.update(refs)
        if re.match(r"\s*kwargs\[", line):
            options += refs
    unknown = used - set(options) - set(_HOOK_KNOBS) - set(_UNSET_KNOBS)
    if unknown or not options:
        return None, None, f"JITFunction.run reads knobs we do not handle: {sorted(unknown)}"
    # HookChain objects: idle while .calls is empty (a plain function has no .calls: it raises,
    # and the caller takes the normal path); the stage-inspection hook must be None.
    hooks = [f"{h}.calls" for h in _HOOK_KNOBS] + [u for u in _UNSET_KNOBS if u in used]
    return operator.attrgetter(*options), operator.attrgetter(*hooks), ""


_PROBE: Optional[tuple] = None


class CachedLauncher:
    """Launch ``jit_fn`` through a per-key cache of its compiled launcher.

    ``launcher(grid, args, constexprs, num_warps, launch_pdl=False, maxnreg=None, memo=None)``
    does what ``jit_fn[grid](*args, **constexprs, num_warps=num_warps[, launch_pdl=True][,
    maxnreg=maxnreg])`` does.
    ``args``: the runtime (non-constexpr) arguments in kernel order; ``constexprs``: a tuple
    in kernel order (fast) or a dict by name; ``grid``: a tuple of 1 to 3 ints.  ``memo``: a
    list the caller keeps for launches that repeat every argument but the tensors' data
    (same devices, same non-tensor values, constexprs and options; a dtype is checked): the
    first launch fills it, and the later ones skip the key (~70 arguments) and read only the
    tensors' pointers (see ``_relaunch``).  Counters
    ``hits`` / ``misses`` say which path ran (``memo_hits``: the hits through a memo);
    ``why_slow`` says why the fast path is off for good ("" when it is on).

    The cache key covers, per tensor: dtype, address mod 16, CUDA or not; per int: ``== 1``,
    value mod 16, int32 / int64 / uint64 range; every scalar's type; each constexpr's value and
    type; ``num_warps``, ``launch_pdl`` and ``maxnreg``; the current device; the compile-option
    knobs JITFunction.run reads.  Like JITFunction.run, it re-checks the module globals the kernel
    reads (Triton raises when one changed; we then take the normal path so that it does).
    """

    def __init__(self, jit_fn: Any) -> None:
        global _PROBE
        self.fn = jit_fn
        try:
            params = inspect.signature(getattr(jit_fn, "fn", jit_fn)).parameters.values()
        except (TypeError, ValueError):  # a stand-in without a signature (tests): dicts only
            params = ()
        self._is_const = [_is_constexpr(p) for p in params]
        # where runtime argument i sits among all kernel arguments (_make_fill)
        self._pos = tuple(k for k, c in enumerate(self._is_const) if not c)
        self._cnames = tuple(p.name for p, c in zip(params, self._is_const) if c)
        names = self._cnames  # dict -> tuple in kernel order, in one C call
        self._by_name = (operator.itemgetter(*names) if len(names) > 1 else
                         lambda d: tuple(d[n] for n in names))
        self._cache: dict = {}
        self._layout: Optional[tuple] = None  # runtime-argument kinds `_spec` was built for
        self._spec: Optional[Callable] = None
        self._device = self._stream = None
        self.hits = self.misses = self.memo_hits = 0
        self.why_slow = ""
        if _JITFunction is None or not isinstance(jit_fn, _JITFunction):
            self.why_slow = "not a JITFunction (Triton interpreter, autotuner, heuristics)"
        else:
            if _PROBE is None:
                _PROBE = _probe_run()
            self._options, self._hooks, self.why_slow = _PROBE

    def __call__(self, grid: Sequence[int], args: Sequence[Any],
                 constexprs: Union[tuple, Mapping[str, Any]], num_warps: int,
                 launch_pdl: bool = False, maxnreg: Optional[int] = None,
                 memo: Optional[list] = None) -> None:
        if memo and memo[0].owner() is not self:  # filled by a launcher since replaced
            memo.clear()  # (the kernel was swapped and back): this one refills it
        if memo:  # a repeat of the launch that filled it: only the tensors are new
            relaunch = self._relaunch(memo[0], grid, args)
            if relaunch is not None:
                self.hits += 1
                self.memo_hits += 1
                relaunch()
                return
        if self.why_slow or self.fn.pre_run_hooks:
            self._normal(grid, args, constexprs, num_warps, launch_pdl, maxnreg)
            return
        try:
            if any(self._hooks(_knobs)):  # a profiler is listening: it needs launch_metadata
                raise LookupError
            consts = constexprs if type(constexprs) is tuple else self._ordered(constexprs)
            dev, options = self._device(), self._options(_knobs)
            key, vals = self._spec(*args, *consts)
            entry = self._cache[dev, options, num_warps, launch_pdl, maxnreg, key]
            ug = self.fn.used_global_vals
            if ug and any(g.get(n, _MISSING) != v for (n, _), (v, g) in ug.items()):
                raise LookupError  # a global changed: Triton raises, so let it
            n = len(grid)  # a callable grid raises here
            gx, gy, gz = grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1
        except Exception:  # first call, new key, hooks, an argument we do not cover
            self._miss(grid, args, constexprs, num_warps, launch_pdl, maxnreg, memo)
            return
        self.hits += 1
        if memo is not None:  # empty, or its launch did not fit this call
            self._fill(memo, dev, options, entry, args, vals)
        run, function, packed, _ = entry
        # launch_metadata and both hooks None: what the launcher does with idle hooks anyway
        run(gx, gy, gz, self._stream(dev), function, packed, None, None, None, *vals)

    def _ordered(self, constexprs: Mapping[str, Any]) -> tuple:
        if len(constexprs) != len(self._cnames):  # defaults or launch options: normal path
            raise KeyError("constexprs must name every constexpr parameter, and only those")
        return self._by_name(constexprs)

    def _normal(self, grid, args, consts, num_warps: int, launch_pdl: bool = False,
                maxnreg: Optional[int] = None):
        self.misses += 1
        opts = {"num_warps": num_warps}
        if launch_pdl:  # a compile option (the launcher reads it from the kernel's metadata)
            opts["launch_pdl"] = True
        if maxnreg is not None:  # a compile option (NVIDIA only)
            opts["maxnreg"] = maxnreg
        if isinstance(consts, Mapping):
            return self.fn[grid](*args, **consts, **opts)
        if len(consts) != len(self._cnames):
            raise TypeError(f"{len(consts)} constexprs given, the kernel has {self._cnames}")
        return self.fn[grid](*args, **dict(zip(self._cnames, consts)), **opts)

    def _miss(self, grid, args, constexprs, num_warps: int, launch_pdl: bool = False,
              maxnreg: Optional[int] = None, memo: Optional[list] = None) -> None:
        """Launch through the normal path and keep the launcher under the key (and in
        ``memo`` when it is an empty list)."""
        kernel = self._normal(grid, args, constexprs, num_warps, launch_pdl,
                              maxnreg)  # errors propagate
        try:
            consts = constexprs if type(constexprs) is tuple else self._ordered(constexprs)
            if callable(grid) or any(self._hooks(_knobs)) or len(self._cache) >= _MAX_ENTRIES:
                return
            if hasattr(kernel, "result") or getattr(kernel, "function", None) is None:
                return  # an async-compile future, or not a CompiledKernel
            layout = tuple(map(_kind, args))
            if self._spec is None:
                if None in layout or len(args) + len(consts) != len(self._is_const):
                    return
                first = {}  # the packed qkv passed three times, placeholders: one lookup each
                same = {i: first.setdefault(id(a), i) for i, a in enumerate(args)
                        if layout[i] == "tensor"}
                self._spec = _make_spec(self._is_const, layout, same)
                self._layout = layout
                self._device, self._stream = _device_and_stream()
            if layout != self._layout:  # e.g. a tensor where an int was: never cache that
                return
            key, vals = self._spec(*args, *consts)
            dev, options = self._device(), self._options(_knobs)
            # the kernel last: kept for callers that launch it themselves (native_entry)
            entry = (kernel.run, kernel.function, kernel.packed_metadata, kernel)
            self._cache[dev, options, num_warps, launch_pdl, maxnreg, key] = entry
            if memo is not None:
                self._fill(memo, dev, options, entry, args, vals)
        except Exception:
            pass  # the kernel ran; this key just stays on the normal path

    def _fill(self, memo: list, dev, options, entry, args, vals) -> None:
        """Fill an empty memo, or replace one whose launch did not fit a call (another
        device or knobs, a pointer no longer aligned: this call's kernel then stays, which
        takes any alignment), at most ``_MEMO_FILLS`` times (a caller that alternates)."""
        old = memo[0] if memo else None
        if old is not None and (old.entry is entry or old.fills >= _MEMO_FILLS):
            return
        try:
            fill = _make_fill(self._pos, len(self._is_const), args, vals)
        except Exception:
            return  # an argument kind the memo does not cover: the key path every call
        memo[:] = [_Memo(self, dev, options, entry, fill, old.fills + 1 if old else 1)]

    def _relaunch(self, m: "_Memo", grid, args) -> Optional[Callable[[], None]]:
        """The launch of ``args`` through memo ``m`` (None: take the other paths).  It checks
        what may change under a caller that keeps its arguments' types: hooks, the device,
        the compile-option knobs, the kernel's globals, and the alignment of each pointer
        that was a multiple of 16 (Triton compiled for that)."""
        try:
            if self.fn.pre_run_hooks or any(self._hooks(_knobs)) or \
                    self._device() != m.dev or self._options(_knobs) != m.options:
                return None
            ug = self.fn.used_global_vals
            if ug and any(g.get(n, _MISSING) != v for (n, _), (v, g) in ug.items()):
                return None
            vals = m.fill(*args)
            if vals is None:
                return None
            n = len(grid)
            gx, gy, gz = grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1
            run, function, packed, _ = m.entry
            stream = self._stream(m.dev)
        except Exception:  # an argument of another kind than the memo's: the other paths
            return None
        return lambda: run(gx, gy, gz, stream, function, packed, None, None, None, *vals)


_MISSING = object()
_MEMO_FILLS = 8


class _Memo:
    """One kept launch of a ``CachedLauncher``, for a caller whose later calls repeat every
    argument but the tensors, which keep their device (``BoundLaunch`` with a kept plan): the
    launcher entry and ``fill`` (see ``_make_fill``).  Holds no tensor, and its launcher only
    weakly."""

    __slots__ = ("owner", "dev", "options", "entry", "fill", "fills")

    def __init__(self, owner, dev, options, entry, fill, fills: int) -> None:
        self.owner, self.dev, self.options, self.entry, self.fill, self.fills = \
            weakref.ref(owner), dev, options, entry, fill, fills


def _make_fill(pos: tuple, nparams: int, args: Sequence[Any], vals: tuple) -> Callable:
    """Generated ``fill(*args)``: ``vals`` (the launcher's arguments of the call that filled
    the memo: kernel order, constexprs included, pointers as ints) with each tensor's pointer
    read anew; None when a tensor's dtype differs or a pointer that was a multiple of 16 no
    longer is (the kernel was compiled for both).  A tensor that was also an earlier argument
    (the packed qkv three times, the table standing in for absent pointers) is read once
    while it still is.  ``pos[i]``: where runtime argument i sits among the kernel's
    ``nparams`` parameters."""
    if len(pos) != len(args) or len(vals) != nparams:
        raise ValueError("arguments and kernel parameters differ")
    # fill() is made by a factory that takes the values; the factory's code depends only on
    # this shape of call, which repeats for every new T: compiled once (exec ~0.4 ms, and
    # building its source ~50 us, were most of a one-off call's cost)
    tensors, first, dtypes = [], {}, []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            tensors.append((i, first.setdefault(id(a), i), vals[pos[i]] % 16 == 0))
            dtypes.append(a.dtype)
    key = (pos, tuple(tensors))
    make = _FILL_FACTORIES.get(key)
    if make is None:
        if len(_FILL_FACTORIES) >= 64:
            _FILL_FACTORIES.clear()
        make = _FILL_FACTORIES[key] = _fill_factory(len(args), pos, tensors)
    return make(tuple(vals), tuple(dtypes))


def _fill_factory(nargs: int, pos: tuple, tensors: list) -> Callable:
    """``make(vals, dtypes) -> fill`` for ``_make_fill``; ``tensors``: (argument index, index
    of its first occurrence, whether its pointer was 16-aligned) for each tensor argument."""
    body, aligned = [], []
    for i, j, al in tensors:
        body.append(f"        p{i} = a{i}.data_ptr()" if j == i else
                    f"        p{i} = p{j} if a{i} is a{j} else a{i}.data_ptr()")
        body.append(f"        v[{pos[i]}] = p{i}")
        if al:
            aligned.append(f"p{i}")
    dtypes = ", ".join(f"a{i}.dtype" for i, _, _ in tensors)
    src = ("def make(_vals, _dtypes):\n"
           f"    def fill({', '.join(f'a{i}' for i in range(nargs))}):\n" +
           (f"        if ({dtypes},) != _dtypes:\n            return None\n" if tensors else "")
           + "        v = list(_vals)\n" + "".join(line + "\n" for line in body) +
           (f"        if ({' | '.join(aligned)}) & 15:\n            return None\n"
            if aligned else "") +
           "        return v\n    return fill\n")
    ns: dict = {}
    exec(src, ns)
    return ns["make"]


_FILL_FACTORIES: dict = {}  # _make_fill's shape of call -> its compiled factory


def _device_and_stream() -> tuple[Callable[[], int], Callable[[int], int]]:
    """(current device, raw current stream of a device): what JITFunction.run reads, minus
    torch.cuda.current_device's Python wrapper (CUDA is initialised by the first launch)."""
    from triton.runtime.driver import driver

    return torch._C._cuda_getDevice, driver.active.get_current_stream


def _is_constexpr(p: inspect.Parameter) -> bool:
    # annotations are strings under `from __future__ import annotations`, else tl.constexpr
    return "constexpr" in str(p.annotation)


def _kind(x: Any) -> Optional[str]:
    if isinstance(x, torch.Tensor):
        return "tensor"
    if type(x) is int:
        return "int"
    if x is None or type(x) in (float, bool):
        return "plain"
    return None  # tuples, tensor descriptors, numpy scalars...: left to Triton


def _make_spec(is_const: list, layout: tuple, same: Optional[dict] = None) -> Callable:
    """Build ``spec(*args, *constexprs) -> (key, launcher arguments in kernel order)`` for one
    layout of runtime-argument kinds.  ``same[i] = j < i``: tensor i was tensor j when the
    layout was seen; the code then checks ``a_i is a_j`` first (correct either way).
    Generated code: a Python loop over ~70 arguments would cost several microseconds."""
    same = same or {}
    nrt = len(layout)
    names = [f"a{i}" for i in range(len(is_const))]
    body, key, vals = [], [], []
    r, c = 0, nrt  # kernel order interleaves runtime args (first names) and constexprs (last)
    for const in is_const:
        if const:
            a = names[c]
            c += 1
            key += [f"{a}.__class__", a]  # Triton keys on str(value): True, 1 and 1.0 differ
            vals.append(a)  # the launcher takes constexprs too, and skips them
            continue
        i, a, kind = r, names[r], layout[r]
        r += 1
        if kind == "tensor":
            tkey = "(" + _ARG_KEY[kind].format(a=a, p=f"p{i}") + ")"
            j = same.get(i, i)
            if j == i:
                body.append(f"    p{i} = {a}.data_ptr()")
            else:  # True when it is the same object as a_j, whose key is already there
                body.append(f"    p{i} = p{j} if {a} is a{j} else {a}.data_ptr()")
                tkey = f"{a} is a{j} or {tkey}"
            key.append(tkey)
            vals.append(f"p{i}")  # an int: the launcher skips data_ptr() + cuPointerGetAttribute
        else:
            key.append(_ARG_KEY[kind].format(a=a))
            vals.append(a)
    src = (f"def spec({', '.join(names)}):\n" + "".join(line + "\n" for line in body) +
           f"    return ({', '.join(key)},), ({', '.join(vals)},)\n")
    ns: dict = {}
    exec(src, ns)
    return ns["spec"]
