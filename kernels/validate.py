"""Input checks for the eager entry point: every message names the argument and what it expected.

Only host-side metadata is read (shapes, strides, dtypes, devices): no device sync.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .op_schema import (
    ACT_DTYPES,
    FP8_DTYPES,
    KV_CACHE_DTYPES,
    SUPPORTED_HEAD_DIMS,
    TABLE_DTYPES,
)


def tensor(name: str, x, *, optional: bool = False) -> None:
    if x is None and optional:
        return
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def positive_int(name: str, x) -> None:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x <= 0:
        raise ValueError(f"{name} must be positive, got {x}")


def heads(num_q_heads: int, num_kv_heads: int, head_dim: int) -> None:
    positive_int("num_q_heads", num_q_heads)
    positive_int("num_kv_heads", num_kv_heads)
    positive_int("head_dim", head_dim)
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads "
                         f"({num_kv_heads})")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")


def rotary(rotary_dim, head_dim: int) -> None:
    positive_int("rotary_dim", rotary_dim)
    if rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim must be even and <= head_dim ({head_dim}), got {rotary_dim}")


def activation(name: str, x: Tensor, width: int, num_tokens: Optional[int] = None) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [num_tokens, width] after flattening, got shape "
                         f"{tuple(x.shape)}")
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"{name} dtype must be one of {ACT_DTYPES}, got {x.dtype}")
    if x.shape[1] != width:
        raise ValueError(f"{name} last dim must be {width}, got {x.shape[1]}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"{name} must have last-dim stride 1, got stride {x.stride(1)}")
    if num_tokens is not None and x.shape[0] != num_tokens:
        raise ValueError(f"{name} must have {num_tokens} tokens, got {x.shape[0]}")


def same(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.dtype != ref.dtype:
        raise ValueError(f"{name} dtype {x.dtype} must match {ref_name} dtype {ref.dtype}")


def device(names: tuple, tensors: tuple) -> None:
    """tensors[0] is a tensor; the others may be None."""
    dev = tensors[0].device
    for name, x in zip(names, tensors):
        if x is not None and x.device != dev:
            raise ValueError(f"{name} is on {x.device} but {names[0]} is on {dev}: all tensors "
                             f"must be on one device")


def norm_weight(name: str, w: Optional[Tensor], head_dim: int) -> None:
    tensor(name, w, optional=True)
    if w is None:
        return
    if tuple(w.shape) != (head_dim,):
        raise ValueError(f"{name} must have shape ({head_dim},), got {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {w.dtype}")
    if w.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous")


def flag(name: str, x, *, optional: bool = False) -> None:
    if x is None and optional:
        return
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")


def finite(name: str, x) -> None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(x).__name__}")
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x!r}")


def eps_value(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")


def table(name: str, x: Tensor, width: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, width] after flattening, got shape "
                         f"{tuple(x.shape)}")
    if x.dtype not in TABLE_DTYPES:
        raise ValueError(f"{name} dtype must be one of {TABLE_DTYPES}, got {x.dtype}")
    if x.shape[1] < width:
        raise ValueError(f"{name} last dim must be at least {width}, got {x.shape[1]}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"{name} must have last-dim stride 1, got stride {x.stride(1)}")


def index_tensor(name: str, x: Tensor, num_tokens: int, *, at_least: bool) -> None:
    if x.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} dtype must be torch.int32 or torch.int64, got {x.dtype}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
    if x.shape[0] < num_tokens or (not at_least and x.shape[0] != num_tokens):
        want = f"at least {num_tokens}" if at_least else f"{num_tokens}"
        raise ValueError(f"{name} must have {want} entries (one per token), got {x.shape[0]}")
    if x.shape[0] > 1 and x.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous")


def cache(name: str, c: Tensor, layout: str, num_kv_heads: int, head_dim: int,
          act_dtype: torch.dtype, kv_cache_dtype: str) -> None:
    if c.dim() != 4:
        raise ValueError(f"{name} must be 4-D ({layout}), got shape {tuple(c.shape)}")
    h = c.shape[2] if layout == "NHD" else c.shape[1]
    if h != num_kv_heads:
        dim = 2 if layout == "NHD" else 1
        raise ValueError(f"{name} dim {dim} must be num_kv_heads={num_kv_heads} for layout "
                         f"{layout}, got shape {tuple(c.shape)}")
    if c.shape[3] != head_dim:
        raise ValueError(f"{name} last dim must be head_dim={head_dim}, got {c.shape[3]}")
    if c.stride(3) != 1:
        raise ValueError(f"{name} must have last-dim stride 1, got stride {c.stride(3)}")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    if c.dtype == torch.uint8:
        if kv_cache_dtype == "auto":
            raise ValueError(f"{name} is uint8: kv_cache_dtype must say its fp8 format "
                             f"('fp8_e4m3' or 'fp8_e5m2'), got 'auto'")
    elif c.dtype in FP8_DTYPES:
        pass
    elif c.dtype != act_dtype:
        raise ValueError(f"{name} dtype must be the activation dtype {act_dtype}, an fp8 dtype "
                         f"or uint8, got {c.dtype}")


def scale(name: str, s: Optional[Tensor], cache_is_fp8: bool) -> None:
    tensor(name, s, optional=True)
    if s is None:
        return
    if not cache_is_fp8:
        raise ValueError(f"{name} is only meaningful with an fp8 cache; the cache is not fp8")
    if s.numel() != 1 or s.dtype != torch.float32:
        raise ValueError(f"{name} must be a 0-dim float32 tensor, got shape {tuple(s.shape)} "
                         f"dtype {s.dtype}")
