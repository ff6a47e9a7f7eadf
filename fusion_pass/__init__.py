"""torch.compile fusion pass: QKV split + per-head RMSNorm + RoPE + paged KV-cache write.

    import torch, fusion_pass
    model = torch.compile(model, backend=fusion_pass.backend)
    # or composed with other Inductor options:
    model = torch.compile(model, options={"post_grad_custom_post_pass": fusion_pass.FusionPass()})

    print(fusion_pass.explain(model, *example_inputs))   # what was fused, and why not

Logs go to the ``fusion_pass`` logger (INFO: one line per compiled graph, DEBUG: one per
candidate); ``TORCH_LOGS=+fusion_pass`` turns them on through torch's logging.
"""
import kernels  # noqa: F401  (registers torch.ops.fused_qkv.*)

from .backend import make_backend
from .explain import ExplainReport, explain
from .options import FusionOptions
from .pass_manager import FusionPass
from .report import Candidate, Report

backend = make_backend()

__all__ = ["FusionPass", "FusionOptions", "make_backend", "backend", "explain", "ExplainReport",
           "Report", "Candidate"]
