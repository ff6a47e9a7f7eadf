"""``torch.compile`` backends: Inductor with the fusion pass."""
from __future__ import annotations

from typing import Callable

import torch

from .options import FusionOptions
from .pass_manager import FusionPass


def make_backend(**options) -> Callable:
    """A ``torch.compile`` backend: Inductor with :class:`FusionPass` as its post-grad pass.

    ``options`` are :class:`FusionOptions` fields (``allow_cpu``, ``fuse_cache``,
    ``fuse_norm``).  The pass (and its ``report``) is ``backend.fusion_pass``.  Any
    ``post_grad_custom_post_pass`` already configured is replaced for these compiles only.
    """
    fpass = FusionPass(FusionOptions(**options))

    def backend(gm: torch.fx.GraphModule, example_inputs, **kwargs):
        from torch._inductor.compile_fx import compile_fx

        with torch._inductor.config.patch(post_grad_custom_post_pass=fpass):
            return compile_fx(gm, example_inputs, **kwargs)

    backend.fusion_pass = fpass
    backend.report = fpass.report
    return backend
