"""User options of the pass."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class FusionOptions:
    """Switches of the fusion pass.

    Attributes:
        allow_cpu: also rewrite graphs on the CPU (the op then runs its reference, or the
            Triton kernel under ``TRITON_INTERPRET=1``); the CPU test-suite relies on it.
        fuse_cache: fuse the paged KV-cache write (else only split + norm + rope).
        fuse_norm: fuse chains that have a per-head norm (else those are left unfused).
        inductor_launch: on CUDA, have Inductor's generated code launch the Triton kernel
            itself (no Python of ours per call; see ``fusion_pass/inductor_launch.py``); where
            that path cannot be used, and with ``False``, the pass inserts the custom op
            (``torch.ops.fused_qkv.*``) instead.  The report's ``op`` says which was used.
    """

    allow_cpu: bool = False
    fuse_cache: bool = True
    fuse_norm: bool = True
    inductor_launch: bool = True
