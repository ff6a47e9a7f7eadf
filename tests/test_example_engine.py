"""The example paged-decode engine (examples/paged_decode.py): correct attention, and greedy
tokens that survive torch.compile unchanged (stock Inductor, and Inductor + the fusion pass)."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
import torch.nn.functional as F

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "examples", "paged_decode.py")
_spec = importlib.util.spec_from_file_location("paged_decode", _PATH)
pd = importlib.util.module_from_spec(_spec)
sys.modules["paged_decode"] = pd  # dataclasses look their module up there
_spec.loader.exec_module(pd)

STEPS = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The CPU model is tiny: intra-op threads buy nothing, and on a busy 2-core machine
    OpenMP's threads wait on each other (10x slower).  Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engine_and_eager():
    """Default CPU sizes (4 layers, hidden 256, 8/2 heads x 64), float32, and eager tokens."""
    model, engine = pd.build_engine("cpu", torch.float32)
    tokens = pd.generate(engine, model, STEPS)
    logits = [x.clone() for x in engine.stats.logits]
    return model, engine, tokens, logits


def dense_forward(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """Logits at every position of ONE sequence, no KV cache: the same weights through
    textbook math (explicit RMSNorm, RoPE from theta, SDPA causal attention)."""
    cfg = model.config
    s, hq, hkv, d = len(token_ids), cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_eps) * w

    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.outer(torch.arange(s, dtype=torch.float64), inv_freq)
    cos = torch.cat([ang.cos(), ang.cos()], -1).float()[:, None, :]  # [S, 1, D]
    sin = torch.cat([ang.sin(), ang.sin()], -1).float()[:, None, :]

    def rope(x):  # rotate-half form, not the engine's chunk/cat form
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    h = model.embed_tokens(torch.tensor(token_ids))
    for layer in model.layers:
        attn = layer.self_attn
        x = norm(h, layer.input_layernorm.weight)
        q, k, v = attn.qkv_proj(x).split([hq * d, hkv * d, hkv * d], -1)
        q = rope(norm(q.reshape(s, hq, d), attn.q_norm.weight))
        k = rope(norm(k.reshape(s, hkv, d), attn.k_norm.weight))
        v = v.reshape(s, hkv, d)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                           v.transpose(0, 1), is_causal=True, enable_gqa=True)
        h = h + attn.o_proj(o.transpose(0, 1).reshape(s, hq * d))
        x = norm(h, layer.post_attention_layernorm.weight)
        gate, up = layer.mlp.gate_up_proj(x).chunk(2, -1)
        h = h + layer.mlp.down_proj(F.silu(gate) * up)
    return model.lm_head(norm(h, model.norm.weight))


@torch.no_grad()
def test_paged_attention_matches_dense(engine_and_eager):
    model, engine, tokens, logits = engine_and_eager
    assert tokens.shape == (len(engine.prompts), STEPS + 1)

    # Prefill, logits at EVERY prompt token (not only the last): ragged prompts flattened into
    # T, written through scattered blocks, read back through the block tables.
    engine.reset()
    inp = engine.prepare_step()
    t = inp.input_ids.shape[0]
    assert t == sum(len(p) for p in engine.prompts)
    all_logits = model(inp.input_ids, inp.positions, engine.kv_caches, inp.attn_metadata,
                       torch.arange(t))
    owner = inp.attn_metadata.token_to_seq
    for b, prompt in enumerate(engine.prompts):
        torch.testing.assert_close(all_logits[owner == b], dense_forward(model, prompt),
                                   atol=1e-4, rtol=1e-4)

    # Decode: each step's logits equal the dense model's at that position of the full text.
    for b, prompt in enumerate(engine.prompts):
        out = tokens[b].tolist()
        ref = dense_forward(model, prompt + out[:-1])[len(prompt) - 1:]
        got = torch.stack([step[b] for step in logits])
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        assert ref.argmax(-1).tolist() == out


def test_inductor_tokens_match_eager(engine_and_eager):
    model, engine, tokens, logits = engine_and_eager
    compiled = pd.inductor_forward(model)
    got = pd.generate(engine, compiled, STEPS)
    assert torch.equal(got, tokens)
    for a, b in zip(engine.stats.logits, logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_fusion_pass_tokens_match_eager(engine_and_eager):
    fusion_pass = pytest.importorskip("fusion_pass")
    if not hasattr(fusion_pass, "make_backend"):
        pytest.skip("fusion_pass.make_backend not available yet")
    model, engine, tokens, logits = engine_and_eager
    compiled, backend = pd.fused_forward(model, torch.device("cpu"))
    with pd._no_compile_caches():  # a cache hit would skip the pass: nothing to check
        got = pd.generate(engine, compiled, STEPS)
    assert torch.equal(got, tokens)
    for a, b in zip(engine.stats.logits, logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # The pass must have actually fired: one full fusion (cache write included) per layer.
    report = getattr(backend, "report", None)
    candidates = getattr(report, "candidates", None)
    if candidates is not None:
        full = [c for c in candidates if getattr(c, "status", None) == "fused"]
        assert len(full) == model.config.num_layers, str(report)


@pytest.mark.gpu
def test_fusion_pass_tokens_match_eager_cuda():
    """The same greedy check on a GPU, float32, the engine's CUDA sizes: the pass fuses every
    layer through Inductor's own launch of the kernel, and the tokens do not move."""
    from fusion_pass.inductor_launch import OP_NAME
    model, engine = pd.build_engine("cuda", torch.float32)
    tokens = pd.generate(engine, model, STEPS)
    compiled, backend = pd.fused_forward(model, torch.device("cuda"))
    with pd._no_compile_caches():
        got = pd.generate(engine, compiled, STEPS)
    assert torch.equal(got, tokens)
    full = [c for c in backend.report.candidates if c.status == "fused"]
    assert len(full) == model.config.num_layers, str(backend.report)
    assert all(c.op == OP_NAME for c in full), str(backend.report)
