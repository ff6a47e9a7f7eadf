"""User options of the pass."""
from __future__ import annotations

import dataclasses

DYNAMIC_TILES = ("auto", "decode", "prefill")


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
        dynamic_tiles: the kernel's tiles where the token count is dynamic and Inductor
            launches the kernel (compiled once for every T): ``"auto"`` (default) one token
            a program below T = 1024 (T = 128 with 64 or more heads a token at D = 128,
            GLM-4.5, and for Qwen3-Next's whole-row tail tile; see ``inductor_launch.plan``), and
            from there 16 elements a thread (2 tokens for Qwen3 / GLM-4.5 shapes) with late
            loads (a uniform branch in the kernel; the grid follows T), ``"decode"`` the
            small-T tiles for every T, ``"prefill"`` the T >= 1024 tiles for every T.  On an
            H200, Qwen3-Next's compiled chain at T = 65536 takes ~400 us with "decode", ~355
            with "auto", ~340 with "prefill", which costs 2.14 against 1.91 us at T = 1.
            Static T always gets the tiles for its T.
    """

    allow_cpu: bool = False
    fuse_cache: bool = True
    fuse_norm: bool = True
    inductor_launch: bool = True
    dynamic_tiles: str = "auto"

    def __post_init__(self):
        if self.dynamic_tiles not in DYNAMIC_TILES:
            raise ValueError(f"dynamic_tiles must be one of {DYNAMIC_TILES}, "
                             f"got {self.dynamic_tiles!r}")
