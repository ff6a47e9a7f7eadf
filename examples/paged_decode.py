"""A tiny paged-attention decode engine (a few hundred lines of "vLLM") on a Qwen3-like model.

The model is written the way serving engines write it, deliberately UNFUSED, so that the
fusion pass has something to find in every attention layer:

    qkv = qkv_proj(x)                                        # one packed matmul
    q, k, v = qkv.split([q_size, kv_size, kv_size], -1)      # split
    q = F.rms_norm(q.view(T, H_q, D), (D,), w_q, eps)        # per-head RMSNorm (Q and K)
    cos, sin = cos_sin_cache[positions].chunk(2, -1)         # NeoX RoPE, vLLM table
    key_cache.view(-1, H_kv, D)[slot_mapping] = k            # paged KV-cache write (K and V)

followed by a plain-PyTorch paged attention that reads each sequence's K/V back from the cache
through its block table.  Weights are random; generation is greedy, so the tokens are a
deterministic fingerprint of the numerics: eager, stock Inductor and Inductor + fusion pass
must produce the same ones in float32.

    python examples/paged_decode.py                  # eager vs inductor vs fused, CPU or CUDA
    python examples/paged_decode.py --mode eager --steps 32 --layers 2

Reusable from tests:

    model, engine = build_engine("cpu", torch.float32, num_layers=2)
    tokens = generate(engine, model, steps=16)                    # eager, [batch, 1 + steps]
    fast = generate(engine, torch.compile(model, dynamic=True), steps=16)
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Running as a script puts examples/ on sys.path, not the project root that holds fusion_pass.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


# --------------------------------------------------------------------------------- sizes

@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Qwen3-style decoder (GQA, per-head Q/K RMSNorm, NeoX RoPE)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position: int = 4096

    def __post_init__(self) -> None:
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads ({self.num_q_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")


@dataclass(frozen=True)
class EngineConfig:
    """Batch and cache shape: how many prompts, how long, how the KV cache is paged."""

    batch_size: int
    min_prompt: int
    max_prompt: int
    block_size: int = 16
    max_new_tokens: int = 64  # cache capacity per sequence beyond its prompt
    # A serving engine allocates its cache once and never reshapes it: tell the compiler, or
    # dynamic=True makes num_blocks and block_size symbolic too (symbolic index math, more
    # guards).  False gives the pass the harder, all-symbolic graph.
    static_cache_shape: bool = True


# Small enough that a CPU run with two compiles stays well under a minute.
CPU_SIZES: dict[str, Any] = dict(
    vocab_size=1024, hidden_size=256, intermediate_size=768, num_layers=4,
    num_q_heads=8, num_kv_heads=2, head_dim=64,
    batch_size=4, min_prompt=8, max_prompt=40,
)
# Roughly a Qwen3-1.7B layer (fewer of them), so the GPU timings mean something.
CUDA_SIZES: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=6144, num_layers=8,
    num_q_heads=16, num_kv_heads=4, head_dim=128,
    batch_size=8, min_prompt=64, max_prompt=256,
)


# --------------------------------------------------------------------------------- model

class RMSNorm(nn.Module):
    """RMSNorm over the last dim; used on the hidden state and, per head, on Q and K."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (self.dim,), self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """NeoX-style RoPE with a vLLM-style ``cos_sin_cache[max_position, head_dim]`` table.

    Row ``p`` holds ``cos(p * f)`` for the D/2 frequencies, then ``sin(p * f)``.  The table is
    kept in float32 whatever the model dtype (see :func:`build_model`); the gathered rows are
    cast to the activation dtype right before use, so the arithmetic stays in that dtype.
    """

    def __init__(self, head_dim: int, max_position: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_position, self.theta = head_dim, max_position, theta
        self.register_buffer("cos_sin_cache", self.compute_table(torch.device("cpu")),
                             persistent=False)

    def compute_table(self, device: torch.device) -> Tensor:
        inv_freq = 1.0 / self.theta ** (
            torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim)
        pos = torch.arange(self.max_position, dtype=torch.float32, device=device)
        freqs = torch.outer(pos, inv_freq)
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1)

    @staticmethod
    def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        # Pairs (i, i + D/2): rotate the two halves against each other.
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def forward(self, positions: Tensor, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """``q [T, H_q, D]``, ``k [T, H_kv, D]`` -> both rotated by their token's position."""
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)
        cos = cos.unsqueeze(-2).to(q.dtype)  # [T, 1, D/2]: broadcast over heads
        sin = sin.unsqueeze(-2).to(q.dtype)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)


class AttentionMetadata(NamedTuple):
    """What attention needs to know about the batch beyond the tokens themselves."""

    slot_mapping: Tensor  # [T] int64: cache slot (block * block_size + offset) of each new token
    block_tables: Tensor  # [B, max_blocks] int64: cache blocks of each sequence, padded
    token_to_seq: Tensor  # [T] int64: row of block_tables that each token belongs to


def paged_attention(q: Tensor, key_cache: Tensor, value_cache: Tensor, positions: Tensor,
                    meta: AttentionMetadata, scale: float) -> Tensor:
    """Causal GQA attention of each token over its own sequence, read through the block table.

    ``q [T, H_q, D]``; caches ``[num_blocks, block_size, H_kv, D]`` already holding this step's
    K/V.  Token ``t`` at position ``p`` attends to positions ``0..p`` of its sequence, which
    are the first ``p + 1`` slots of the blocks its block table lists, in order.

    Plain PyTorch and deliberately simple: it gathers, for every query token, its sequence's
    whole (padded) context, ``[T, max_blocks * block_size, H_kv, D]``.  Real engines stream
    the blocks inside a kernel instead; here memory is cheap and correctness is the point.
    """
    t, hq, d = q.shape
    block_size, hkv = key_cache.shape[1], key_cache.shape[2]
    group = hq // hkv

    tables = meta.block_tables[meta.token_to_seq]               # [T, max_blocks]
    k = key_cache[tables].flatten(1, 2)                         # [T, L, H_kv, D]
    v = value_cache[tables].flatten(1, 2)
    ctx_len = k.shape[1]

    # GQA: view the query heads as [H_kv, group] so each KV head serves its group, no repeat.
    qg = q.view(t, hkv, group, d)
    scores = torch.einsum("thgd,tlhd->thgl", qg, k).float() * scale
    # Context slot j holds position j of the sequence, so causality is simply j <= p; it also
    # hides the padding past the sequence's end and the null blocks of the table.
    visible = torch.arange(ctx_len, device=q.device)[None, :] <= positions[:, None]  # [T, L]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    out = torch.einsum("thgl,tlhd->thgd", probs, v)
    return out.reshape(t, hq * d)


class Qwen3Attention(nn.Module):
    """Packed QKV projection, per-head Q/K RMSNorm, RoPE, paged cache write, paged attention."""

    def __init__(self, cfg: ModelConfig, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.num_q_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim)
        self.q_size = cfg.num_q_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_eps)
        self.rotary_emb = rotary_emb  # shared by all layers, like vLLM's cached get_rope()

    def forward(self, positions: Tensor, hidden: Tensor, key_cache: Tensor, value_cache: Tensor,
                meta: AttentionMetadata) -> Tensor:
        t = hidden.shape[0]
        hq, hkv, d = self.num_q_heads, self.num_kv_heads, self.head_dim

        # --- the chain the fusion pass replaces with one kernel -----------------------
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.view(t, hq, d))   # F.rms_norm(q.view(T, H, D), (D,), w, eps)
        k = self.k_norm(k.view(t, hkv, d))
        q, k = self.rotary_emb(positions, q, k)
        v = v.view(t, hkv, d)
        key_cache.view(-1, hkv, d)[meta.slot_mapping] = k
        value_cache.view(-1, hkv, d)[meta.slot_mapping] = v
        # -------------------------------------------------------------------------------

        # Prefill and decode alike read K/V back from the cache: one code path, and the
        # cache write is always observable.
        out = paged_attention(q, key_cache, value_cache, positions, meta, self.scale)
        return self.o_proj(out)


class Qwen3MLP(nn.Module):
    """SwiGLU MLP with a packed gate/up projection (vLLM's MergedColumnParallelLinear)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Qwen3DecoderLayer(nn.Module):
    """Pre-norm residual block: attention, then MLP."""

    def __init__(self, cfg: ModelConfig, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = Qwen3Attention(cfg, rotary_emb)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = Qwen3MLP(cfg)

    def forward(self, positions: Tensor, hidden: Tensor, key_cache: Tensor, value_cache: Tensor,
                meta: AttentionMetadata) -> Tensor:
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden), key_cache,
                                         value_cache, meta)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Qwen3ForCausalLM(nn.Module):
    """The whole model; stateless: the engine owns the KV caches and passes them in."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope_theta)
        self.layers = nn.ModuleList(
            Qwen3DecoderLayer(cfg, self.rotary_emb) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: Tensor, positions: Tensor,
                kv_caches: list[tuple[Tensor, Tensor]], attn_metadata: AttentionMetadata,
                logits_indices: Tensor) -> Tensor:
        """Run ``T`` flattened tokens of a batch; float32 logits ``[len(logits_indices), V]``.

        ``kv_caches[i] = (key_cache, value_cache)`` of layer ``i``, written in place.
        """
        hidden = self.embed_tokens(input_ids)
        for layer, (key_cache, value_cache) in zip(self.layers, kv_caches):
            hidden = layer(positions, hidden, key_cache, value_cache, attn_metadata)
        # Only the tokens we sample from need the final norm and the (big) LM head.
        hidden = self.norm(hidden[logits_indices])
        return self.lm_head(hidden).float()


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> Qwen3ForCausalLM:
    """Random weights, deterministic for a seed; inference only."""
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        # Norm weights away from 1, so code that forgets to apply one gives different tokens.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.to(device=device, dtype=dtype).requires_grad_(False).eval()
    # Module.to(dtype) casts buffers too; recompute the RoPE table so it stays float32.
    model.rotary_emb.cos_sin_cache = model.rotary_emb.compute_table(torch.device(device))
    return model


# -------------------------------------------------------------------------------- engine

NULL_BLOCK = 0  # never handed out: pads block tables, like vLLM's null block


class BlockAllocator:
    """Hands out fixed-size KV-cache blocks from a free list.

    The free list is shuffled so that a sequence's blocks are scattered through the cache:
    code that silently assumed a contiguous cache would produce wrong tokens, not pass.
    """

    def __init__(self, num_blocks: int, seed: int = 0) -> None:
        self._free = list(range(1, num_blocks))
        random.Random(seed).shuffle(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("out of KV-cache blocks")
        return self._free.pop()

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)


@dataclass
class Sequence:
    """One request: its tokens so far, how many of them are in the cache, and where."""

    token_ids: list[int]
    prompt_len: int
    num_cached: int = 0
    block_table: list[int] = field(default_factory=list)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]


class StepInput(NamedTuple):
    """The tensors of one forward pass (all sequences' new tokens flattened into T)."""

    input_ids: Tensor       # [T]
    positions: Tensor       # [T]
    attn_metadata: AttentionMetadata
    logits_indices: Tensor  # [B]: the last new token of each sequence, the one we sample from


@dataclass
class RunStats:
    """Timings and logits of the last :func:`generate` call."""

    prefill_ms: float = float("nan")
    decode_ms: list[float] = field(default_factory=list)
    logits: list[Tensor] = field(default_factory=list)  # one [B, V] per step, prefill first


ForwardFn = Callable[[Tensor, Tensor, list, AttentionMetadata, Tensor], Tensor]


class PagedEngine:
    """A fixed batch of prompts, a paged KV cache per layer, and greedy stepping."""

    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig,
                 prompts: list[list[int]], device: torch.device, dtype: torch.dtype,
                 seed: int = 0) -> None:
        self.model_cfg, self.engine_cfg = model_cfg, engine_cfg
        self.prompts = prompts
        self.device, self.dtype, self.seed = torch.device(device), dtype, seed
        bs = engine_cfg.block_size
        max_len = max(len(p) for p in prompts) + engine_cfg.max_new_tokens
        # Fixed block-table width: the tensors keep one shape across steps (fewer guards).
        self.max_blocks_per_seq = math.ceil(max_len / bs)
        self.num_blocks = 1 + len(prompts) * self.max_blocks_per_seq  # + the null block
        shape = (self.num_blocks, bs, model_cfg.num_kv_heads, model_cfg.head_dim)
        self.kv_caches: list[tuple[Tensor, Tensor]] = [
            (torch.zeros(shape, device=self.device, dtype=dtype),
             torch.zeros(shape, device=self.device, dtype=dtype))
            for _ in range(model_cfg.num_layers)]
        if engine_cfg.static_cache_shape:
            for cache in (c for pair in self.kv_caches for c in pair):
                torch._dynamo.mark_static(cache)
        self.stats = RunStats()
        self.reset()

    def reset(self) -> None:
        """Forget all generated tokens and start again from the prompts, cache zeroed."""
        for key_cache, value_cache in self.kv_caches:
            key_cache.zero_()
            value_cache.zero_()
        self.allocator = BlockAllocator(self.num_blocks, self.seed)
        self.seqs = [Sequence(list(p), len(p)) for p in self.prompts]

    def _slot(self, seq: Sequence, pos: int) -> int:
        """Cache slot of ``seq``'s token at ``pos``, growing its block table on demand."""
        bs = self.engine_cfg.block_size
        while len(seq.block_table) <= pos // bs:
            if len(seq.block_table) == self.max_blocks_per_seq:
                raise RuntimeError(f"sequence longer than the cache allows "
                                   f"({self.max_blocks_per_seq * bs} tokens)")
            seq.block_table.append(self.allocator.allocate())
        return seq.block_table[pos // bs] * bs + pos % bs

    def prepare_step(self) -> StepInput:
        """Batch every sequence's not-yet-cached tokens: the whole prompt on the first step
        (prefill), then the one token sampled last (decode)."""
        ids, pos, slots, owner, last = [], [], [], [], []
        for row, seq in enumerate(self.seqs):
            for p in range(seq.num_cached, len(seq.token_ids)):
                ids.append(seq.token_ids[p])
                pos.append(p)
                slots.append(self._slot(seq, p))
                owner.append(row)
            last.append(len(ids) - 1)
        tables = [s.block_table + [NULL_BLOCK] * (self.max_blocks_per_seq - len(s.block_table))
                  for s in self.seqs]

        def as_tensor(x: list) -> Tensor:
            return torch.tensor(x, dtype=torch.int64, device=self.device)

        meta = AttentionMetadata(as_tensor(slots), as_tensor(tables), as_tensor(owner))
        return StepInput(as_tensor(ids), as_tensor(pos), meta, as_tensor(last))

    def step(self, forward_fn: ForwardFn) -> Tensor:
        """One forward pass and greedy sampling; returns the step's logits ``[B, V]``."""
        inp = self.prepare_step()
        logits = forward_fn(inp.input_ids, inp.positions, self.kv_caches, inp.attn_metadata,
                            inp.logits_indices)
        # .tolist() waits for the device; an engine needs the tokens on the host anyway to
        # schedule the next step.
        next_ids = logits.argmax(dim=-1).tolist()
        for seq, tok in zip(self.seqs, next_ids):
            seq.num_cached = len(seq.token_ids)
            seq.token_ids.append(tok)
        return logits


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(engine: PagedEngine, forward_fn: ForwardFn, steps: int) -> Tensor:
    """Prefill all prompts, then ``steps`` decode steps; greedy.

    ``forward_fn`` is the model or a compiled version of it.  Returns the generated token ids
    ``[batch, 1 + steps]`` (the token sampled from the prefill logits, then one per decode
    step).  Timings and per-step logits land in ``engine.stats``.
    """
    if steps > engine.engine_cfg.max_new_tokens:
        raise ValueError(f"steps ({steps}) exceeds the engine's max_new_tokens "
                         f"({engine.engine_cfg.max_new_tokens})")
    engine.reset()
    stats = RunStats()
    for i in range(steps + 1):
        _sync(engine.device)
        t0 = time.perf_counter()
        logits = engine.step(forward_fn)
        _sync(engine.device)
        ms = (time.perf_counter() - t0) * 1e3
        if i == 0:
            stats.prefill_ms = ms
        else:
            stats.decode_ms.append(ms)
        stats.logits.append(logits)
    engine.stats = stats
    return torch.tensor([seq.output_ids for seq in engine.seqs], dtype=torch.int64)


def build_engine(device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None, *,
                 seed: int = 0, **sizes: Any) -> tuple[Qwen3ForCausalLM, PagedEngine]:
    """A random Qwen3-like model and an engine holding a batch of random prompts.

    ``sizes`` override the device's defaults (:data:`CPU_SIZES` / :data:`CUDA_SIZES`): any
    field of :class:`ModelConfig` (``num_layers``, ``hidden_size``, ``head_dim``...) or of
    :class:`EngineConfig` (``batch_size``, ``min_prompt``, ``max_prompt``, ``block_size``,
    ``max_new_tokens``, ``static_cache_shape``).  ``dtype`` defaults to float32 on CPU,
    bfloat16 on CUDA.
    """
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    merged = dict(CUDA_SIZES if device.type == "cuda" else CPU_SIZES)
    merged.update({k: v for k, v in sizes.items() if v is not None})
    model_keys = {f.name for f in fields(ModelConfig)}
    engine_keys = {f.name for f in fields(EngineConfig)}
    unknown = set(merged) - model_keys - engine_keys
    if unknown:
        raise TypeError(f"unknown size arguments: {sorted(unknown)}")
    model_cfg = ModelConfig(**{k: v for k, v in merged.items() if k in model_keys})
    engine_cfg = EngineConfig(**{k: v for k, v in merged.items() if k in engine_keys})
    if not 1 <= engine_cfg.min_prompt <= engine_cfg.max_prompt:
        raise ValueError("need 1 <= min_prompt <= max_prompt")
    if engine_cfg.max_prompt + engine_cfg.max_new_tokens > model_cfg.max_position:
        raise ValueError("max_prompt + max_new_tokens exceeds the RoPE table (max_position)")

    model = build_model(model_cfg, device, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    lens = torch.randint(engine_cfg.min_prompt, engine_cfg.max_prompt + 1,
                         (engine_cfg.batch_size,), generator=gen).tolist()
    prompts = [torch.randint(0, model_cfg.vocab_size, (n,), generator=gen).tolist()
               for n in lens]
    return model, PagedEngine(model_cfg, engine_cfg, prompts, device, dtype, seed)


# ------------------------------------------------------------------------- compile modes

def inductor_forward(model: nn.Module) -> ForwardFn:
    """Stock torch.compile (Inductor), dynamic shapes: prefill and decode share a graph."""
    torch._dynamo.reset()  # a fresh start: no code cached from another backend
    return torch.compile(model, dynamic=True)


def fused_forward(model: nn.Module, device: torch.device) -> tuple[ForwardFn, Any]:
    """torch.compile with the fusion pass's backend; returns ``(forward_fn, backend)``.

    Raises ImportError when ``fusion_pass`` (or its ``make_backend``) is not available.
    """
    import fusion_pass  # noqa: PLC0415  (optional: the example runs without it)

    if not hasattr(fusion_pass, "make_backend"):
        raise ImportError("fusion_pass has no make_backend (not finished yet?)")
    backend = fusion_pass.make_backend(allow_cpu=(torch.device(device).type == "cpu"))
    torch._dynamo.reset()
    return torch.compile(model, backend=backend, dynamic=True), backend


def pass_report(backend: Any) -> Optional[str]:
    """The pass's account of what it fused, if this version of fusion_pass exposes one:
    ``backend.report``, or the ``.report`` of an object the backend holds (the pass)."""
    try:
        candidates = [backend] + list(getattr(backend, "__dict__", {}).values())
        candidates += list(getattr(backend, "keywords", {}).values())  # functools.partial
        for obj in candidates:
            report = getattr(obj, "report", None)
            if report is not None and not callable(report):
                return str(report)
    except Exception as exc:  # a demo must not die on a report it only prints
        return f"(could not read the report: {exc!r})"
    return None


@contextlib.contextmanager
def _no_compile_caches():
    """Compile for real: a cache hit would skip the pass, leaving it nothing to report."""
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(Exception):
            stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
        with contextlib.suppress(Exception):
            stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
        yield


# ---------------------------------------------------------------------------------- main

@dataclass
class ModeResult:
    name: str
    tokens: Optional[Tensor] = None
    first_run_s: float = float("nan")
    prefill_ms: float = float("nan")
    decode_ms: float = float("nan")
    max_logit_diff: float = float("nan")


def _time_mode(name: str, engine: PagedEngine, fn: ForwardFn, steps: int, repeats: int,
               first_run: Optional[Callable[[], Any]] = None) -> ModeResult:
    """First run (pays for compilation), then ``repeats`` timed runs; medians."""
    t0 = time.perf_counter()
    with first_run() if first_run else contextlib.nullcontext():
        generate(engine, fn, steps)
    res = ModeResult(name, first_run_s=time.perf_counter() - t0)
    prefill, decode = [], []
    for _ in range(repeats):
        res.tokens = generate(engine, fn, steps)
        prefill.append(engine.stats.prefill_ms)
        decode.extend(engine.stats.decode_ms)
    res.prefill_ms = statistics.median(prefill)
    res.decode_ms = statistics.median(decode) if decode else float("nan")
    return res


def _same_tokens(got: Tensor, ref: Tensor) -> str:
    """'yes', or 'NO (step k)' with the first step at which some sequence diverged."""
    if torch.equal(got, ref):
        return "yes"
    step = int((got != ref).any(dim=0).nonzero()[0])
    return f"NO (step {step})"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--steps", type=int, default=16, help="decode steps (default 16)")
    ap.add_argument("--mode", choices=["eager", "inductor", "fused", "all"], default="all")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per mode (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int,
                    help="CPU intra-op threads (default: torch's); 1 is best for the tiny CPU "
                         "model on a busy machine, where OpenMP threads wait on each other")
    ap.add_argument("--dynamic-cache", action="store_true",
                    help="let dynamic=True make the KV-cache shape symbolic too "
                         "(a harder graph for the pass)")
    size_flags = {  # flag -> build_engine keyword; unset flags keep the device's default
        "layers": "num_layers", "hidden": "hidden_size", "intermediate": "intermediate_size",
        "vocab": "vocab_size", "q_heads": "num_q_heads", "kv_heads": "num_kv_heads",
        "head_dim": "head_dim", "batch": "batch_size", "min_prompt": "min_prompt",
        "max_prompt": "max_prompt", "block_size": "block_size",
    }
    for flag in size_flags:
        ap.add_argument("--" + flag.replace("_", "-"), type=int, dest=flag)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = {kw: getattr(args, flag) for flag, kw in size_flags.items()}
    sizes["static_cache_shape"] = not args.dynamic_cache
    sizes["max_new_tokens"] = max(args.steps, 1)
    t_start = time.perf_counter()
    model, engine = build_engine(device, dtype, seed=args.seed, **sizes)
    mc, ec = engine.model_cfg, engine.engine_cfg
    lens = [len(p) for p in engine.prompts]
    print(f"paged_decode on {device} {str(engine.dtype).replace('torch.', '')}: "
          f"{mc.num_layers} layers, hidden {mc.hidden_size}, heads {mc.num_q_heads}/"
          f"{mc.num_kv_heads} x {mc.head_dim}, vocab {mc.vocab_size}; batch {ec.batch_size}, "
          f"prompts {min(lens)}..{max(lens)} tokens (T={sum(lens)} at prefill), "
          f"block {ec.block_size}, {args.steps} decode steps")

    modes = ["eager", "inductor", "fused"] if args.mode == "all" else [args.mode]
    # Eager is the reference for the token comparison, so it always runs (untimed if unasked).
    ref = _time_mode("eager", engine, model, args.steps,
                     args.repeats if "eager" in modes else 1)
    ref_logits = [x.clone() for x in engine.stats.logits]
    results: list[ModeResult] = [ref] if "eager" in modes else []
    report: Optional[str] = None

    for mode in modes:
        if mode == "eager":
            continue
        first_run = None
        if mode == "inductor":
            fn = inductor_forward(model)
        else:
            try:
                fn, backend = fused_forward(model, device)
            except Exception as exc:  # not written yet, or broken: the rest still runs
                print(f"fused: skipped, fusion_pass is not usable: "
                      f"{type(exc).__name__}: {exc}")
                continue
            first_run = _no_compile_caches
        res = _time_mode(mode, engine, fn, args.steps, args.repeats, first_run)
        # Once a token differs the inputs differ too: compare logits up to that step only.
        diverged = (res.tokens != ref.tokens).any(dim=0).nonzero()
        last = int(diverged[0]) if len(diverged) else len(ref_logits) - 1
        res.max_logit_diff = max((a - b).abs().max().item() for a, b in
                                 zip(engine.stats.logits[:last + 1], ref_logits[:last + 1]))
        if mode == "fused":
            report = pass_report(backend)
        results.append(res)

    print(f"\n{'mode':<10}{'tokens == eager':>16}{'prefill ms':>12}{'decode ms/step':>16}"
          f"{'max |dlogit|':>14}{'1st run s':>11}")
    for r in results:
        same = "(ref)" if r.name == "eager" else _same_tokens(r.tokens, ref.tokens)
        diff = "" if r.name == "eager" else f"{r.max_logit_diff:.2e}"
        print(f"{r.name:<10}{same:>16}{r.prefill_ms:>12.2f}{r.decode_ms:>16.2f}{diff:>14}"
              f"{r.first_run_s:>11.1f}")
    print("(times: medians; a step is the whole engine step: batch building, forward, "
          "sampling; '1st run' includes compilation.  max |dlogit|: vs eager, up to the "
          "first differing token)")
    print(f"sequence 0: prompt of {lens[0]} tokens -> generated {ref.tokens[0].tolist()}")
    if "fused" in modes and any(r.name == "fused" for r in results):
        print("\nfusion pass report:")
        print(report if report else "(this version of fusion_pass exposes no report)")
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s")
    mismatch = [r.name for r in results
                if r.name != "eager" and not torch.equal(r.tokens, ref.tokens)]
    if mismatch and engine.dtype != torch.float32:
        print("note: in reduced precision a compiled graph rounds differently (fused ops keep "
              "float32 intermediates), which can flip a near-tie greedy choice; float32 must "
              "match exactly (--dtype float32)")
        return 0
    return 1 if mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
