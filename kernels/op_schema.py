"""Constants and small helpers shared by the reference, the kernel, the op and the pass.

The op's low-level arguments (one flat list, so that a custom-op schema can hold them):

* ``q_src, k_src, v_src``: 2-D ``[T, *]`` tensors with last-dim stride 1, any row stride.
  They may all be the same packed ``qkv`` tensor; ``q_col, k_col, v_col`` are the column
  where each region starts.  A gated Q region is ``2 * H_q * D`` wide (``gate_layout``).
* ``cos, sin``: 2-D tables ``[rows, C]`` (any row stride, last stride 1).  With ``positions``
  the row of token t is ``positions[t]`` (negative counts from the end, as indexing does);
  without, it is ``t`` (already gathered per token).  ``table_expanded`` False: C >= r/2, one
  value per rotary pair ("front part"); True: C >= r, one value per rotary element (the table
  was already expanded to ``cat(c, c)`` for NeoX or ``repeat_interleave(c, 2)`` for GPT-J,
  and each element reads its own entry, which keeps the exact semantics of the code replaced).
* caches: 4-D, NHD ``[num_blocks, block_size, H_kv, D]`` or HND ``[num_blocks, H_kv,
  block_size, D]``, any strides with last stride 1.
"""
from __future__ import annotations

from typing import Optional

import torch

GATE_NONE, GATE_INTERLEAVED, GATE_BLOCKED = 0, 1, 2
GATE_LAYOUTS = {None: GATE_NONE, "none": GATE_NONE, "interleaved": GATE_INTERLEAVED,
                "blocked": GATE_BLOCKED}

LAYOUT_NHD, LAYOUT_HND = 0, 1
CACHE_LAYOUTS = {"NHD": LAYOUT_NHD, "HND": LAYOUT_HND}

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 160, 192, 256, 512)
ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


def fp8_dtype_of(cache_dtype: torch.dtype, kv_cache_dtype: str) -> Optional[torch.dtype]:
    """The fp8 format the cache stores, or None for a plain bf16/fp16/fp32 cache.

    ``uint8`` caches hold fp8 bytes (vLLM); their format comes from ``kv_cache_dtype``.
    """
    if cache_dtype in FP8_DTYPES:
        return cache_dtype
    if cache_dtype == torch.uint8:
        if kv_cache_dtype in ("fp8", "fp8_e4m3"):
            return torch.float8_e4m3fn
        if kv_cache_dtype == "fp8_e5m2":
            return torch.float8_e5m2
        raise ValueError(
            f"kv_cache_dtype must be 'fp8', 'fp8_e4m3' or 'fp8_e5m2' for a uint8 cache, "
            f"got {kv_cache_dtype!r}")
    return None


def cache_geometry(cache: torch.Tensor, layout: int) -> tuple[int, int, int, int, int, int]:
    """(num_blocks, block_size, stride_block, stride_slot, stride_head, stride_dim)."""
    s = cache.stride()
    if layout == LAYOUT_NHD:
        return cache.shape[0], cache.shape[1], s[0], s[1], s[2], s[3]
    return cache.shape[0], cache.shape[2], s[0], s[2], s[1], s[3]
