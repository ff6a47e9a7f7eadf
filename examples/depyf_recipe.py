"""Debugging the fusion pass with depyf: see the fused op in the code torch.compile produced.

    python examples/depyf_recipe.py [DUMP_DIR]        # default ./depyf_debug_fusion

compiles a small vLLM-style attention layer (packed QKV projection, per-head RMSNorm on Q
and K, NeoX RoPE from ``cos_sin_cache[positions]``, paged KV-cache write) with the pass under
``depyf.prepare_debug(DUMP_DIR)``, then lists the dumped files and prints the lines that call
``fused_qkv.split_norm_rope*`` (the custom op: on the CPU, or with ``inductor_launch=False``) or
launch ``fused_qkv_inductor_kernel`` (on CUDA Inductor's code launches the Triton kernel itself;
the post-grad graph then holds a ``triton_kernel_wrapper_functional`` node instead of the op).
depyf (0.20, torch 2.13) writes, per compiled graph N:

    __transformed_code_0_for_<fn>.py        the bytecode Dynamo produced, decompiled
    full_code_for_<fn>_0.py                 everything below, in one readable file
    __compiled_fn_N.BEFORE_PRE_GRAD.0.py    the captured FX graph (unfused)
    __compiled_fn_N.Forward_graph.0.py      the AOT (functionalized ATen) graph (unfused)
    __compiled_fn_N.AFTER_POST_GRAD.0.py    after the post-grad passes, ours included:
                                            torch.ops.fused_qkv.split_norm_rope_cache...
    __compiled_fn_N.kernel_0.py             Inductor's output code: calls the fused op

Without a GPU it runs on the CPU (the op runs its reference, or the Triton kernel under
``TRITON_INTERPRET=1``).  The FX graph cache is turned off for the compile: on a cache hit
the pass does not run and no post-grad graph is dumped.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import fusion_pass  # noqa: E402

# the custom op (matches split_norm_rope_cache too), and the kernel Inductor launches on CUDA
FUSED = ("fused_qkv.split_norm_rope", "fused_qkv_inductor_kernel")


class QKNormRopeCache(torch.nn.Module):
    """vLLM-style attention pre-processing of one layer (Qwen3-like), unfused."""

    def __init__(self, hidden=128, num_heads=4, num_kv_heads=2, head_dim=64, max_pos=256,
                 eps=1e-6, dtype=torch.bfloat16, device="cpu"):
        super().__init__()
        self.hq, self.hkv, self.d = num_heads, num_kv_heads, head_dim
        width = (num_heads + 2 * num_kv_heads) * head_dim
        self.qkv_proj = torch.nn.Linear(hidden, width, bias=False, dtype=dtype, device=device)
        self.q_norm = torch.nn.RMSNorm(head_dim, eps=eps, dtype=dtype, device=device)
        self.k_norm = torch.nn.RMSNorm(head_dim, eps=eps, dtype=dtype, device=device)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, device=device) / head_dim)
        ang = torch.arange(max_pos, device=device)[:, None] * inv_freq[None]
        self.register_buffer("cos_sin_cache", torch.cat([ang.cos(), ang.sin()], -1))

    def _rope(self, x, cos, sin):  # NeoX: rotate halves
        x1, x2 = x.chunk(2, -1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    def forward(self, positions, hidden_states, key_cache, value_cache, slot_mapping):
        q, k, v = self.qkv_proj(hidden_states).split(
            [self.hq * self.d, self.hkv * self.d, self.hkv * self.d], -1)
        q = self.q_norm(q.view(-1, self.hq, self.d))
        k = self.k_norm(k.view(-1, self.hkv, self.d))
        cos, sin = self.cos_sin_cache[positions].chunk(2, -1)
        cos, sin = cos.unsqueeze(-2).to(q.dtype), sin.unsqueeze(-2).to(q.dtype)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        key_cache.view(-1, self.hkv, self.d)[slot_mapping] = k
        value_cache.view(-1, self.hkv, self.d)[slot_mapping] = v.view(-1, self.hkv, self.d)
        return q.flatten(1)  # attention would follow, reading K and V from the cache


def example_inputs(layer: QKNormRopeCache, tokens=5, num_blocks=8, block_size=16):
    dev, dt = layer.cos_sin_cache.device, layer.qkv_proj.weight.dtype
    hidden = torch.randn(tokens, layer.qkv_proj.in_features, device=dev, dtype=dt)
    positions = torch.arange(tokens, device=dev)
    cache = [torch.zeros(num_blocks, block_size, layer.hkv, layer.d, device=dev, dtype=dt)
             for _ in range(2)]
    slots = torch.randperm(num_blocks * block_size, device=dev)[:tokens]
    return positions, hidden, cache[0], cache[1], slots


def dump_with_depyf(dump_dir, device: str = "cpu"):
    """Compile + run the layer under ``depyf.prepare_debug(dump_dir)``.

    Returns ``(files, hits, report)``: the dumped files, ``{file name: [lines calling the
    fused op]}``, and the pass's :class:`fusion_pass.Report`."""
    import depyf

    dump_dir = Path(dump_dir).resolve()
    torch.manual_seed(0)
    layer = QKNormRopeCache(device=device).eval()
    inputs = example_inputs(layer)
    backend = fusion_pass.make_backend(allow_cpu=(device == "cpu"))
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False), torch.no_grad():
        with depyf.prepare_debug(str(dump_dir)):
            compiled = torch.compile(layer, backend=backend)
            compiled(*inputs)
    torch._dynamo.reset()
    files = sorted(p for p in dump_dir.rglob("*") if p.is_file())
    hits = {}
    for p in files:
        try:
            lines = p.read_text(errors="replace").splitlines()
        except OSError:
            continue
        found = [ln.strip() for ln in lines if any(f in ln for f in FUSED)]
        if found:
            hits[str(p.relative_to(dump_dir))] = found
    return files, hits, backend.report


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    dump_dir = Path(argv[0] if argv else "depyf_debug_fusion")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    files, hits, report = dump_with_depyf(dump_dir, device)
    print(report)
    print(f"\ndepyf dumped {len(files)} file(s) into {dump_dir}/:")
    for p in files:
        print("   ", p.relative_to(dump_dir.resolve()))
    print(f"\nlines calling {' or '.join(FUSED)}*:")
    for name, lines in hits.items():
        print(f"  {name}:")
        for ln in lines:
            print("      " + (ln if len(ln) <= 160 else ln[:157] + "..."))
    if not hits:
        print("  (none: the pass did not fuse; see the report above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
