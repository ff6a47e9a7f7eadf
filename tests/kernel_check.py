"""Run the Triton kernel on one case and check it against the reference (SPEC's numerics rule).

Checks: every wanted output element was written (outputs are poisoned with NaN first),
values against a float64 oracle within 1.5x the float32 reference's error + 1 ulp, cache rows
that the slots address hold the right values (compared in the cache's storage dtype, so the
ulp is that dtype's), and every other cache row is bit-identical to its poisoned start.
"""
from __future__ import annotations

import torch

from kernels import reference
from kernels.op_schema import LAYOUT_NHD, fp8_dtype_of
from kernels.triton_kernel import launch

from .cases import Case, clone_args, make_args, written_rows
from .numerics import assert_spec_close

NAMES = ("q", "k", "v", "gate")


def _float64_args(args: tuple, has_cache: bool) -> tuple:
    out = list(args)
    for i in (0, 1, 2, 10, 11, 15, 16):  # activations, weights, tables
        if out[i] is not None:
            out[i] = out[i].double()
    if has_cache:
        for i in (21, 22):
            out[i] = torch.zeros(out[i].shape, dtype=torch.float64, device=out[i].device)
        out[26] = "auto"
        out[27] = out[28] = None
    return tuple(out)


def storage_rows(cache: torch.Tensor, layout: int, kv_cache_dtype: str) -> torch.Tensor:
    """Cache as [num_blocks, block_size, H, D] (on the CPU) in its storage dtype: a uint8
    cache viewed as the fp8 format it holds.  Compare fused cache rows in this dtype, so that
    SPEC's "+1 ulp" is the cache dtype's ulp (not float64's)."""
    if cache.dtype == torch.uint8:
        cache = cache.view(fp8_dtype_of(cache.dtype, kv_cache_dtype))
    x = cache.cpu()
    return x if layout == LAYOUT_NHD else x.transpose(1, 2)


def _rows(cache: torch.Tensor, layout: int, kv_cache_dtype: str) -> torch.Tensor:
    """Cache as float64 [num_blocks, block_size, H, D] whatever its layout and dtype."""
    return storage_rows(cache, layout, kv_cache_dtype).double()


def _bits(cache: torch.Tensor, layout: int) -> torch.Tensor:
    x = cache.cpu()
    if x.dtype.itemsize == 1:
        x = x.view(torch.uint8)
    elif x.dtype.itemsize == 2:
        x = x.view(torch.int16)
    elif x.dtype.itemsize == 4:
        x = x.view(torch.int32)
    return x if layout == LAYOUT_NHD else x.transpose(1, 2)


def record_launches(monkeypatch, pick) -> list:
    """Launch through the cached launcher (``_FAST_LAUNCH``) and record, launch by launch,
    ``pick(constexprs by name, launch_pdl, maxnreg)``."""
    from kernels import triton_kernel
    seen = []
    real = triton_kernel._cached_launcher

    def spy():
        launcher = real()

        def call(grid, args, consts, num_warps, launch_pdl=False, maxnreg=None, memo=None):
            seen.append(pick(dict(zip(triton_kernel._CONST_NAMES, consts)), launch_pdl,
                             maxnreg))
            return launcher(grid, args, consts, num_warps, launch_pdl, maxnreg, memo)
        return call

    monkeypatch.setattr(triton_kernel, "_FAST_LAUNCH", True)
    monkeypatch.setattr(triton_kernel, "_cached_launcher", spy)
    return seen


def index32_choices(monkeypatch, on: bool = True) -> list:
    """Turn int32 offsets on or off (``triton_kernel._INDEX32``) and record, launch by launch,
    the ``IDX64`` constexpr the kernel was launched with (False: int32 offsets)."""
    from kernels import triton_kernel
    monkeypatch.setattr(triton_kernel, "_INDEX32", on)
    return record_launches(monkeypatch, lambda consts, pdl, regs: consts["IDX64"])


def check_case(case: Case, device: str = "cpu") -> None:
    args = make_args(case, device)
    has_cache = case.cache
    full = args if has_cache else args[:21] + (None, None, None, 0, True, "auto", None, None) + args[21:]
    check_run(full, lambda: launch(*full, poison=float("nan")), has_cache)


def check_run(full: tuple, run, has_cache: bool = True) -> None:
    """``run()`` must do what the op does with ``full`` (launch()'s arguments; its caches are
    written in place): outputs and cache rows against the reference, other rows untouched."""
    ref_args = clone_args(full) if has_cache else full
    start = clone_args(full) if has_cache else None
    fused = run()
    fn = reference.split_norm_rope_cache if has_cache else reference.split_norm_rope
    rargs = ref_args if has_cache else full[:21] + full[29:]
    eager = fn(*rargs)
    exact = fn(*_float64_args(rargs, has_cache), math_dtype=torch.float64)
    writes, gated = full[29:33], full[9] != 0
    for name, f, e, x, want in zip(NAMES, fused, eager, exact, writes):
        if not want or (name == "gate" and not gated):
            assert f.numel() == 0, f"{name} was not asked for but has shape {tuple(f.shape)}"
            continue
        assert f.dtype == full[0].dtype, f"{name} dtype {f.dtype} != {full[0].dtype}"
        assert_spec_close(f, e, x, name)
    if not has_cache:
        return
    layout, kvs = full[24], full[26]
    wmask = written_rows(full)
    for i, name in ((21, "key_cache"), (22, "value_cache")):
        # fused rows in the cache's storage dtype: the 1 ulp slack is that dtype's
        got, eag = storage_rows(full[i], layout, kvs), _rows(ref_args[i], layout, kvs)
        # The float64 oracle: rerun and take its (unrounded) cache rows.
        ex = _rows(_exact_cache(rargs, i), layout, "auto")
        fp8 = fp8_dtype_of(full[i].dtype, kvs)
        if fp8 is not None:
            scale = full[27 if i == 21 else 28]
            s = 1.0 if scale is None else float(scale)
            fmax = torch.finfo(fp8).max
            ex = (ex / s).clamp(-fmax, fmax)
        assert_spec_close(got[wmask], eag[wmask], ex[wmask], name)
        untouched = ~wmask
        assert torch.equal(_bits(full[i], layout)[untouched], _bits(start[i], layout)[untouched]), \
            f"{name}: rows no slot addresses were modified"


def _exact_cache(rargs: tuple, i: int) -> torch.Tensor:
    a = _float64_args(rargs, True)
    reference.split_norm_rope_cache(*a, math_dtype=torch.float64)
    return a[i]
