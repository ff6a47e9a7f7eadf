"""The fused attention pre-processing op: reference, Triton kernel, custom op, entry point."""
from . import custom_op, reference  # noqa: F401  (registers torch.ops.fused_qkv.*)
from .api import FusedQKV, split_norm_rope_cache
from .layer import FusedQKVLayer

__all__ = ["FusedQKV", "FusedQKVLayer", "split_norm_rope_cache", "reference"]
