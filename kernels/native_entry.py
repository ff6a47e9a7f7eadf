"""The entry point's remembered calls handed to C++ (``native_entry.cpp``), on CUDA.

The Python path validates a call, launches it and remembers its signature (``api._KnownCall``).
``remember`` then describes that launch to the C++ module: the kernel, its grid, every kernel
parameter's bits, and for each pointer the entry-point argument it is a view of and the byte
offset.  A later call with the same signature (and the same launch ``state``) is answered by
``module.call`` alone: it reads the tensors' pointers, allocates the outputs and calls
cuLaunchKernel, with none of the Python path's per-call work.

The module is built in a background thread at the first remembered CUDA call (``start``);
until it is loaded, calls stay on the Python path.  ``FUSED_QKV_NATIVE=0`` keeps them there.
"""
from __future__ import annotations

import atexit
import functools
import inspect
import math
import struct
import threading
from types import ModuleType
from typing import Any, Optional, Sequence

import torch

from . import native_build

module: Optional[ModuleType] = None  # the loaded C++ module; api.py reads it on every call
why_not = ""  # why the last remember() did not hand its call over ("" when it did)
_started = False
_failed = False
_lock = threading.Lock()  # guards _started
_build_lock = threading.Lock()  # held while building: only start(wait=True) waits on it
_MISSING = object()
_MASK = (1 << 64) - 1


def _init(mod: ModuleType) -> ModuleType:
    from .api import FusedQKV

    get_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (lambda i: 0)
    mod.init(names(), torch.Tensor, torch.nn.Parameter, FusedQKV, get_stream)
    atexit.register(mod.clear)  # release the entries' Python objects while Python runs
    return mod


@functools.lru_cache(maxsize=None)
def names() -> tuple:
    """The keyword names the module knows, in the order of its input indices (1 + i)."""
    from .api import prepare

    return tuple(n for n, p in inspect.signature(prepare).parameters.items()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY)


def start(wait: bool = False) -> Optional[ModuleType]:
    """Build and load the module once per process, in a background thread (a serving thread
    never waits for the compiler); ``wait``: wait for it here, and return it."""
    global _started
    with _lock:
        first = not _started
        _started = True
    if wait:
        _load()  # waits for a build in progress; once built, only (re)sets ``module``
    elif first:
        threading.Thread(target=_load, name="fused_qkv_native_build", daemon=True).start()
    return module


def _load() -> None:
    global module, why_not, _failed
    with _build_lock:
        mod = native_build.load()
        if mod is None:
            why_not, _failed = native_build.why_not(), True
            return
        try:
            if module is not mod:
                module = _init(mod)
        except Exception as e:  # stay in Python
            why_not, _failed = f"{type(e).__name__}: {e}", True


def forget() -> None:
    """Forget every remembered call."""
    if module is not None:
        module.clear()


def state() -> Optional[tuple]:
    """What a handed-over launch depends on besides the call's own arguments: the launch
    settings (tiles, offsets, registers), the launcher and its compile options.  None: the
    kernel must go through Python now (a launch or pre-run hook, a changed kernel global, the
    Triton interpreter, the cached launcher switched off or swapped)."""
    try:
        tk, knobs = _modules or _import_modules()  # (an import statement per call: ~0.5 us)
    except ImportError:  # no Triton: nothing to launch here
        return None
    launcher = tk._launcher
    if launcher is None or launcher.fn is not tk.fused_qkv_kernel or launcher.why_slow or \
            not (tk._FAST_LAUNCH and tk._LAUNCH_MEMO) or launcher.fn.pre_run_hooks or \
            tk._cached_launcher is not tk._REAL_CACHED_LAUNCHER:
        return None
    try:
        if any(launcher._hooks(knobs)):
            return None
        ug = launcher.fn.used_global_vals
        if ug and any(g.get(n, _MISSING) != v for (n, _), (v, g) in ug.items()):
            return None
        return tk.launch_settings(), launcher._options(knobs), launcher
    except Exception:  # a hook that is a plain function (no .calls), another Triton
        return None


_modules: tuple = ()


def _import_modules() -> tuple:
    global _modules
    from . import triton_kernel

    try:
        from triton import knobs
    except ImportError:  # an older Triton: the cached launcher's fast path is off anyway
        knobs = None

    _modules = (triton_kernel, knobs)
    return _modules


def remember(known, qkv, kwargs: dict, out: Sequence[torch.Tensor],
             st: Optional[tuple] = None) -> None:
    """Hand the call just launched through ``known`` (an ``api._KnownCall``) to the module
    unless it holds it already (this call then missed for a reason of its own, e.g. a pointer
    off the 16-byte grid) or refused it under this launch state (``known.native_refused``).
    So a call evicted from the module, or one that reached Python after the state changed
    (a new launcher), is handed over anew.  It starts the module's build the first time.
    ``why_not`` says why a call was not handed over.  ``st``: ``state()``, when the caller
    has it already."""
    global why_not
    if module is None:
        if not (_failed or torch.version.hip):  # the module launches through CUDA only
            start()  # a later call of this signature tries again once it is built
        return
    st = st if st is not None else state()
    if st is None:  # a hook or a swapped kernel for now: a later call tries again
        why_not = "the launch state does not allow it"
        return
    try:
        if known.native_refused == st or module.holds(qkv, kwargs, st):
            return
        why = register(module, known, qkv, kwargs, out, st)
    except Exception as e:  # the call itself ran: whatever went wrong here stays here
        why = f"{type(e).__name__}: {e}"
    if why and why not in _THIS_CALL:
        known.native_refused = st
    why_not = why


# register()'s answers that depend on the call, not on its signature and launch state: a
# later call of the signature is offered again
_THIS_CALL = ("no kept launch", "the kept launch is not this state's or device's",
              "the kept launch does not fit this call",
              "the dry entry did not take the call it was built from")


def register(mod: ModuleType, known, qkv, kwargs: dict, out: Sequence[torch.Tensor],
             st: Any, dry: bool = False) -> str:
    """Describe ``known``'s launch of this call to ``mod`` under state ``st``: "" when it is
    registered, else why not.  The description comes from the kept launch (its compiled
    kernel and the launcher's arguments); ``dry``: from ``dry_signature``, for an entry that
    launches nothing and returns the parameters it would pass (tests, no GPU)."""
    plan = known.plan
    if not plan:
        return "nothing to launch"
    views = known.views(qkv, kwargs)
    args = known.bound.args_for(*views[:5], tuple(out), views[5])
    from .triton_kernel import IS_CONSTEXPR as is_const
    function, block, shared, dev, kernel = 0, 32 * plan[2], 0, -1, None
    if dry:
        vals, types = dry_signature(known, args)

        def vals_of(*a):
            return dry_signature(known, a)[0]
    else:
        memo = plan[4]
        if not memo:
            return "no kept launch"
        m = memo[0]
        # the launch it keeps must be this state's, on the device of these tensors (the
        # kernel lives in the context it was loaded into)
        if m.owner() is not st[2] or m.options != st[1] or \
                m.dev != known.bound.dev.index or torch.cuda.current_device() != m.dev:
            return "the kept launch is not this state's or device's"
        kernel, vals_of = m.entry[3], m.fill
        vals = vals_of(*args)
        if vals is None:
            return "the kept launch does not fit this call"
        types = list(kernel.src.signature.values())
        meta = kernel.metadata
        if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0) \
                or getattr(meta, "launch_pdl", False) or \
                getattr(meta, "launch_cooperative_grid", False):
            return "the kernel needs scratch memory, PDL or a cooperative launch"
        if getattr(meta, "instrumentation_mode", "") or getattr(meta, "tensordesc_meta", None) \
                or getattr(kernel.run, "gsan_enabled", False):
            return "the launcher adds parameters (instrumentation, tensor descriptors)"
        num_warps, num_ctas, shared = kernel.packed_metadata
        if num_ctas != 1:
            return "a kernel of clusters"
        function, block, dev = kernel.function, 32 * num_warps, m.dev
    try:
        spec = describe(known, qkv, kwargs, args, out, vals, types, is_const)
    except ValueError as e:
        return str(e)
    grid = tuple(plan[0]) + (1,) * (3 - len(plan[0]))
    params, fixes, out_params, out_heads, bumps, like, empty = spec
    aligned = [int(o.data_ptr() % 16 == 0) for o in out]
    entry = [qkv, kwargs, object(), 0, grid, block, shared, dev, params, fixes, out_params,
             out_heads, aligned, views[0].shape[0], known.bound.shape[2], like, bumps, empty,
             kernel]
    # Run the description dry on this very call, under a state no real call has (so that no
    # call can take it meanwhile), and compare the parameters it would pass with those the
    # Python path passes for the same call and the dry call's outputs.
    done = False
    try:
        if not mod.register(*entry):
            return "the module does not cover these arguments"
        answer = mod.call(qkv, kwargs, entry[2])
        if answer is None:
            return "the dry entry did not take the call it was built from"
        outs, params_got = answer
        want = vals_of(*known.bound.args_for(*views[:5], tuple(outs), views[5]))
        if want is None or params_got != _params(types, want) or \
                tuple(x.shape for x in outs) != tuple(x.shape for x in out):
            return "the dry entry's parameters differ from the launch's"
        if dry:
            entry[2] = st
        else:
            entry[2], entry[3] = st, function
        done = mod.register(*entry)  # replaces the dry one
        return "" if done else "the module does not cover these arguments"
    finally:
        if not done:
            mod.forget(qkv, kwargs)


def describe(known, qkv, kwargs: dict, args: list, out: Sequence[torch.Tensor], vals: Sequence,
             types: Sequence[str], is_const: Sequence[bool]) -> tuple:
    """The module's description of a launch: (params, fixes, out_params, out_heads, bumps,
    like, empty); raises ValueError for what it cannot describe."""
    if len(vals) != len(types) or len(types) != len(is_const):
        raise ValueError("the launch's arguments do not match the kernel's signature")
    pos = [k for k, c in enumerate(is_const) if not c]  # runtime argument i: kernel index
    params = _params(types, vals)
    param_of = {k: i for i, k in enumerate(k for k, ty in enumerate(types)
                                           if ty != "constexpr")}
    index = {n: 1 + i for i, n in enumerate(names())}
    index["qkv"] = 0
    roles = known.bound.roles()
    # (empty stays None when every output is made per call)
    fixes, out_params, out_heads, empty = [], [-1] * 4, [-1] * 4, None
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            continue
        role, k = roles.get(i), pos[i]
        if role is None or k not in param_of:
            raise ValueError(f"kernel argument {i} is a tensor of no known role")
        if role.startswith("out"):
            j = int(role[3])
            if a is not out[j]:
                raise ValueError(f"kernel argument {i} is not output {j}")
            if known.bound.wants[j][0]:
                out_params[j], out_heads[j] = param_of[k], a.shape[1]
            else:
                empty = a  # the shared 0-element output: a fixed pointer
            continue
        name = known.sources.get(role, role)
        src = qkv if name == "qkv" else kwargs.get(name)
        if not isinstance(src, torch.Tensor) or \
                a.untyped_storage().data_ptr() != src.untyped_storage().data_ptr():
            raise ValueError(f"{role} is not a view of {name}")
        fixes += [param_of[k], index[name], vals[k] - src.data_ptr(), int(vals[k] % 16 == 0)]
    made = [o for j, o in enumerate(out) if out_heads[j] >= 0]
    like = made[0] if made else out[0]
    bumps = [index["key_cache"], index["value_cache"]]
    return params, fixes, out_params, out_heads, bumps, like, empty


def dry_signature(known, args: Sequence) -> tuple[list, list]:
    """(vals, types) as Triton's launcher would see ``known``'s launch of ``args`` (kernel
    order, pointers as ints, an int equal to 1 specialised into a constexpr), made without a
    compiled kernel: for dry entries (tests, benchmarks on machines without a GPU)."""
    from .triton_kernel import IS_CONSTEXPR

    consts, runtime, vals, types = iter(known.plan[1]), iter(args), [], []
    for const in IS_CONSTEXPR:
        a = next(consts) if const else next(runtime)
        vals.append(a.data_ptr() if isinstance(a, torch.Tensor) else a)
        if const or (type(a) is int and a == 1):
            types.append("constexpr")
        elif isinstance(a, torch.Tensor):
            types.append("*" + str(a.dtype).replace("torch.", ""))
        elif type(a) is float:
            types.append("fp32")
        else:
            types.append("i32" if -2**31 <= a < 2**31 else "i64")
    return vals, types


def _params(types: Sequence[str], vals: Sequence) -> list:
    """The kernel's parameters (its non-constexpr arguments) as the bits the launch passes."""
    return [_bits(ty, v) for ty, v in zip(types, vals) if ty != "constexpr"]


def _bits(ty: str, v: Any) -> int:
    """A kernel parameter's value as the 64 bits the launch passes (its low bytes are read)."""
    if ty.startswith("*"):
        return (v or 0) & _MASK
    if ty[0] in "iu":
        return int(v) & _MASK
    if ty == "fp32":  # out of range: +-inf, as the C cast of Triton's launcher gives
        try:
            return struct.unpack("<I", struct.pack("<f", v))[0]
        except OverflowError:
            return struct.unpack("<I", struct.pack("<f", math.copysign(math.inf, v)))[0]
    if ty == "fp64":
        return struct.unpack("<Q", struct.pack("<d", v))[0]
    if ty == "fp16":
        return struct.unpack("<H", struct.pack("<e", v))[0]
    if ty == "bf16":
        return struct.unpack("<I", struct.pack("<f", v))[0] >> 16
    raise ValueError(f"a kernel parameter of type {ty}")
