"""``torch.compile`` backends: Inductor with the fusion pass."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .options import FusionOptions
from .pass_manager import FusionPass


def make_backend(*, mode: Optional[str] = None, inductor_options: Optional[dict] = None,
                 **options) -> Callable:
    """A ``torch.compile`` backend: Inductor with :class:`FusionPass` as its post-grad pass.

    Args:
        mode: ``"reduce-overhead"`` also captures CUDA graphs (as ``torch.compile``'s mode).
        inductor_options: more ``torch._inductor.config`` settings for these compiles.
        **options: :class:`FusionOptions` fields (``allow_cpu``, ``fuse_cache``, ``fuse_norm``,
            ``inductor_launch``, ``dynamic_tiles``).

    The pass (and its ``report``) is ``backend.fusion_pass``.  Any
    ``post_grad_custom_post_pass`` already configured is replaced for these compiles only.
    """
    fpass = FusionPass(FusionOptions(**options))
    patch = dict(inductor_options or {})
    if mode == "reduce-overhead":
        patch["triton.cudagraphs"] = True
    elif mode not in (None, "default"):
        raise ValueError(f"mode must be None, 'default' or 'reduce-overhead', got {mode!r}")
    patch["post_grad_custom_post_pass"] = fpass

    def backend(gm: torch.fx.GraphModule, example_inputs, **kwargs):
        from torch._inductor.compile_fx import compile_fx

        with torch._inductor.config.patch(patch):
            return compile_fx(gm, example_inputs, **kwargs)

    backend.fusion_pass = fpass
    backend.report = fpass.report
    return backend
