"""SPEC's numerics rule, as a test assertion.

Against a float64 evaluation, the fused output's largest absolute error must be at most 1.5x
that of the unfused eager code it replaced, plus one unit in the last place of the output
dtype at the tensor's largest magnitude.  NaN never passes.
"""
from __future__ import annotations

import torch


def ulp(dtype: torch.dtype, magnitude: float) -> float:
    """Spacing of ``dtype`` numbers at ``magnitude``."""
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        mant = 3 if dtype == torch.float8_e4m3fn else 2
    else:
        # eps = 2**-mantissa_bits for IEEE-like formats
        mant = -int(round(torch.log2(torch.tensor(torch.finfo(dtype).eps)).item()))
    if magnitude <= 0:
        return float(torch.finfo(dtype).tiny) if dtype.is_floating_point else 0.0
    exp = torch.floor(torch.log2(torch.tensor(magnitude, dtype=torch.float64))).item()
    return 2.0 ** (exp - mant)


def assert_spec_close(fused: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor,
                      name: str = "output") -> None:
    """``exact`` is the float64 evaluation; ``eager`` the unfused code's result."""
    assert fused.shape == exact.shape, f"{name}: shape {tuple(fused.shape)} != {tuple(exact.shape)}"
    f = fused.double().cpu()
    e = eager.double().cpu()
    x = exact.double().cpu()
    assert not torch.isnan(f).any(), f"{name}: NaN in fused output"
    if f.numel() == 0:
        return
    err_f = (f - x).abs().max().item()
    err_e = (e - x).abs().max().item()
    tol = 1.5 * err_e + ulp(fused.dtype, x.abs().max().item())
    assert err_f <= tol, (f"{name}: fused max error {err_f:.3g} > 1.5 x eager error "
                          f"{err_e:.3g} + 1 ulp (tolerance {tol:.3g})")
