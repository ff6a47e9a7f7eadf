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
    """

    allow_cpu: bool = False
    fuse_cache: bool = True
    fuse_norm: bool = True
