"""torch.compile fusion pass: QKV split + per-head RMSNorm + RoPE + paged KV-cache write.

    import torch, fusion_pass
    model = torch.compile(model, backend=fusion_pass.backend)
    # or composed with other Inductor options:
    model = torch.compile(model, options={"post_grad_custom_post_pass": fusion_pass.FusionPass()})
"""
import kernels  # noqa: F401  (registers torch.ops.fused_qkv.*)

from .backend import make_backend
from .options import FusionOptions
from .pass_manager import FusionPass
from .report import Candidate, Report

backend = make_backend()

__all__ = ["FusionPass", "FusionOptions", "make_backend", "backend", "Report", "Candidate"]
