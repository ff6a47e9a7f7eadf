"""Real model code: the pass fuses unmodified Hugging Face attention, in every family it covers.

Tiny random-weight configs (2 layers, hidden 128, 4/2 heads x 64; Qwen3-Next: head dim 256) of
the real ``transformers`` model classes, compiled with the pass on the CPU, two ways:

* **paged** (how serving engines run Hugging Face models): a custom attention function,
  registered through transformers' ``AttentionInterface``, writes each layer's K/V into that
  layer's paged cache (``cache.view(-1, H_kv, D)[slot_mapping] = k``, vLLM's flash layout
  ``[num_blocks, block_size, H_kv, D]``), then attends over the cache through each sequence's
  slots, the way a paged-attention kernel does.  The model's own code (projections, q/k norms,
  rotary embedding) is untouched.
* **static**: transformers' own ``StaticCache`` (its update is
  ``keys.index_copy_(2, cache_position, k)``) with the model's own eager attention.

Checks: the report shows one full fusion (cache write included) per attention layer that has
the chain, with the forms that family uses (norm with or without ``1 + w``, partial rotary,
GPT-J pairs, gated Q); the negatives (OLMo2: norm over the whole projection; HunYuan: rope
before the norm) stay unfused, with the reason; logits and every cache equal eager under
SPEC's numerics rule against a float64 run of the same model (``tests/numerics.py``).
On the CPU in float32; on a GPU (``-m gpu``) the same families in bf16, the dtype served there.

Everything is built in code: nothing is downloaded.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Optional

import pytest
import torch
import transformers
from torch._inductor.utils import run_and_get_code

import fusion_pass

from .conftest import DEVICES
from .numerics import assert_spec_close
from .pass_check import (INDUCTOR_LAUNCH, assert_fused_code, assert_launch_graph,
                         force_pad_mm, inductor_launch_on_cpu, launch_path_backend)

ATTN = "fusion_pass_paged_test"  # our attention function's name in AttentionInterface
B, S = 2, 5  # sequences, tokens each (one prefill step)
NUM_BLOCKS, BLOCK_SIZE = 8, 4  # paged cache: 32 slots for the 10 tokens
MAX_CACHE_LEN = 16  # StaticCache

COMMON = dict(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=64,
              max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)


@dataclasses.dataclass(frozen=True)
class Family:
    config: str  # transformers class names
    model: str
    extra: dict
    fused: int  # attention layers with the chain (each must fuse); 0: must stay unfused
    norm: Optional[str] = None  # the report's norm form
    rope: str = ""  # expected in the report's rope form
    split: str = ""  # expected in the report's split form
    reason: str = ""  # negatives: expected in the rejection reason


FAMILIES = {
    # no QK norm: RoPE + cache only
    "llama": Family("LlamaConfig", "LlamaForCausalLM", {}, 2, None, "rotate-half(r=64)"),
    # per-head Qwen3RMSNorm (cast back before * weight)
    "qwen3": Family("Qwen3Config", "Qwen3ForCausalLM", {}, 2, "rms_norm", "rotate-half(r=64)"),
    "qwen3_moe": Family("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                        dict(MOE, decoder_sparse_step=1), 2, "rms_norm", "rotate-half(r=64)"),
    # (1 + w) norm in float32, a sliding and a full layer (two rotary tables)
    "gemma3": Family("Gemma3TextConfig", "Gemma3ForCausalLM",
                     dict(layer_types=["sliding_attention", "full_attention"],
                          sliding_window=MAX_CACHE_LEN, query_pre_attn_scalar=64),
                     2, "rms_norm(1+w)", "rotate-half(r=64)"),
    # partial rotary 0.5 (NeoX halves of the first 32 dims), QK norm on
    "glm4_moe": Family("Glm4MoeConfig", "Glm4MoeForCausalLM",
                       dict(use_qk_norm=True, n_routed_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=64, first_k_dense_replace=1),
                       2, "rms_norm", "rotate-half+partial(r=32)"),
    "glm4_moe_no_qk_norm": Family("Glm4MoeConfig", "Glm4MoeForCausalLM",
                                  dict(use_qk_norm=False, n_routed_experts=4,
                                       num_experts_per_tok=2, moe_intermediate_size=64,
                                       first_k_dense_replace=1),
                                  2, None, "rotate-half+partial(r=32)"),
    # GLM-4 dense: GPT-J interleaved pairs (stack/flatten, repeat_interleave'd cos), partial 0.5
    "glm4": Family("Glm4Config", "Glm4ForCausalLM", {}, 2, None, "gptj-stack+partial(r=32)"),
    # gated Q interleaved per head (view(..., H, 2D).chunk(2)), (1 + w), partial 0.25, D 256;
    # layer 0 is linear attention (Gated DeltaNet): not this op, only layer 1 counts
    "qwen3_next": Family("Qwen3NextConfig", "Qwen3NextForCausalLM",
                         dict(MOE, head_dim=256, shared_expert_intermediate_size=64,
                              layer_types=["linear_attention", "full_attention"],
                              linear_key_head_dim=32, linear_value_head_dim=32,
                              linear_num_key_heads=2, linear_num_value_heads=4),
                         1, "rms_norm(1+w)", "rotate-half+partial(r=64)", "Q cols 0+4x512"),
    # negatives: not this op
    "olmo2": Family("Olmo2Config", "Olmo2ForCausalLM", {}, 0, reason="OLMo2 style"),
    "hunyuan": Family("HunYuanDenseV1Config", "HunYuanDenseV1ForCausalLM", {}, 0,
                      reason="HunYuan style"),
}


@pytest.fixture(scope="module", autouse=True)
def setup():
    """One intra-op thread (tiny model, busy 2-core machine); compile for real every time
    (an FX/AOT cache hit would skip the pass and leave nothing to report)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------ the models

def build(name: str, attn: str):
    fam = FAMILIES[name]
    cfg_cls = getattr(transformers, fam.config, None)
    model_cls = getattr(transformers, fam.model, None)
    if cfg_cls is None or model_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {fam.model}")
    cfg = cfg_cls(**{**COMMON, **fam.extra})
    cfg._attn_implementation = attn
    cfg._experts_implementation = "batched_mm"  # MoE: one graph (eager loops break it), fp64 ok
    torch.manual_seed(0)
    model = model_cls(cfg).eval().requires_grad_(False)
    with torch.no_grad():  # norm weights away from their init (1, or 0 for 1 + w)
        for pname, p in model.named_parameters():
            if "norm" in pname or "layernorm" in pname:
                p.add_(0.3 * torch.randn_like(p))
    return fam, cfg, model


def attention_layers(cfg) -> list:
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    return [i for i, t in enumerate(types) if t != "linear_attention"]


def repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    b, h, l, d = x.shape
    return x if n == 1 else x[:, :, None].expand(b, h, n, l, d).reshape(b, h * n, l, d)


def paged_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """An attention function as a serving engine plugs it in: write this step's K/V into the
    layer's paged cache, then attend over the cache through each sequence's slots."""
    key_cache, value_cache = kwargs["kv_caches"][module.layer_idx]
    slots, context, qpos = kwargs["slot_mapping"], kwargs["context_slots"], kwargs["query_pos"]
    b, hkv, s, d = key.shape
    key_cache.view(-1, hkv, d)[slots] = key.transpose(1, 2).reshape(b * s, hkv, d)
    value_cache.view(-1, hkv, d)[slots] = value.transpose(1, 2).reshape(b * s, hkv, d)
    groups = query.shape[1] // hkv
    k = repeat_kv(key_cache.view(-1, hkv, d)[context].transpose(1, 2), groups)  # [B, H, L, D]
    v = repeat_kv(value_cache.view(-1, hkv, d)[context].transpose(1, 2), groups)
    scores = torch.matmul(query, k.transpose(2, 3)).float() * scaling
    # context slot j holds position j of the sequence: causal is j <= position
    visible = torch.arange(context.shape[1], device=query.device)[None, None, :] <= qpos[:, :, None]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    out = torch.matmul(scores.softmax(-1).to(v.dtype), v)
    return out.transpose(1, 2).contiguous(), None


transformers.AttentionInterface.register(ATTN, paged_attention)


def paged_steps(cfg) -> list:
    """A prefill of S tokens per sequence, then one decode step: model inputs and the cache
    slots (scattered over the blocks, as an allocator hands them out) of each step."""
    g = torch.Generator().manual_seed(1)
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=g)[: B * (S + 1)]
    prefill, decode = slots[: B * S], slots[B * S:]
    context = torch.cat([prefill.view(B, S), decode.view(B, 1)], 1)  # slot of each position
    pos = torch.arange(S + 1).expand(B, S + 1)
    ids = torch.randint(3, cfg.vocab_size, (B, S + 1), generator=g)
    return [dict(input_ids=ids[:, :S], position_ids=pos[:, :S].contiguous(), use_cache=False,
                 slot_mapping=prefill, context_slots=context[:, :S].contiguous(),
                 query_pos=pos[:, :S].contiguous()),
            dict(input_ids=ids[:, S:], position_ids=pos[:, S:].contiguous(), use_cache=False,
                 slot_mapping=decode, context_slots=context,
                 query_pos=pos[:, S:].contiguous())]


def paged_caches(cfg) -> list:
    """One (key_cache, value_cache) pair per layer, NHD; random contents (slots the steps do
    not write must come out unchanged)."""
    g = torch.Generator().manual_seed(2)
    shape = (NUM_BLOCKS, BLOCK_SIZE, cfg.num_key_value_heads, cfg.head_dim)
    return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
            for _ in range(cfg.num_hidden_layers)]


def run_paged(model, cfg, dtype: torch.dtype, device: str = "cpu", init=torch.float32):
    """Logits of every step, and every cache after the last one.  ``init``: the dtype the
    caches' random contents are rounded to first (the model's, also in the float64 run, so that
    both start from the same values and the slots nobody writes add no error)."""
    caches = [(k.to(init).to(device, dtype), v.to(init).to(device, dtype))
              for k, v in paged_caches(cfg)]
    logits = []
    with torch.no_grad():
        for step in paged_steps(cfg):
            step = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in step.items()}
            logits.append(model(**step, kv_caches=caches).logits)
    return logits, [t for pair in caches for t in pair]


def run_static(model, cfg, dtype: torch.dtype, device: str = "cpu", init=None):
    """Prefill then one decode step through one StaticCache; logits of every step, and the
    caches of the attention layers after the last one (they start as zeros: ``init`` unused)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (B, S + 1), generator=g).to(device)
    cache = transformers.StaticCache(config=cfg, max_cache_len=MAX_CACHE_LEN)
    cache.early_initialization(B, cfg.num_key_value_heads, cfg.head_dim, dtype,
                               torch.device(device))
    # the cache argument is ``cache`` from transformers 5.24 (``past_key_values`` before, and
    # kept as a deprecated alias until 5.40); a name forward() lacks would be silently swallowed
    # by its **kwargs and run the model with no cache at all.  _orig_mod: a compiled model
    params = inspect.signature(getattr(model, "_orig_mod", model).forward).parameters
    kw = "cache" if "cache" in params else "past_key_values"
    assert kw in params, f"{type(model).__name__}.forward takes neither cache nor past_key_values"
    logits = []
    with torch.no_grad():
        for step_ids in (ids[:, :S], ids[:, S:]):
            logits.append(model(input_ids=step_ids, use_cache=True, **{kw: cache}).logits)
    caches = [t for i in attention_layers(cfg) for t in (cache.layers[i].keys,
                                                         cache.layers[i].values)]
    return logits, caches


def compiled(model, device: str = "cpu", dynamic: Optional[bool] = None):
    torch._dynamo.reset()
    backend = fusion_pass.make_backend(allow_cpu=device == "cpu")
    return torch.compile(model, backend=backend, dynamic=dynamic), backend


# ------------------------------------------------------------------------ checks

def check_report(fam: Family, cfg, report, code: str, device: str = "cpu") -> None:
    """Each step's graph (prefill, decode) fused every attention layer, cache write included
    (on CUDA: launched by Inductor's code, see ``pass_check.assert_fused_code``)."""
    print(report)  # shown with -s
    steps = 2
    fused = [c for c in report.candidates if c.status == "fused"]
    partial = [c for c in report.candidates if c.status == "fused-partial"]
    if fam.fused == 0:
        assert not fused and not partial and "fused_qkv" not in code, str(report)
        assert any(fam.reason in (c.reason or "") for c in report.candidates), str(report)
        return
    assert fam.fused == len(attention_layers(cfg))
    assert len(fused) == steps * fam.fused and not partial, \
        f"{len(fused)} of {steps} x {fam.fused} attention layers fused with their cache " \
        f"write:\n{report}"
    assert_fused_code(code, report, cache=True, device=device)
    for c in fused:
        assert c.forms["norm"] == fam.norm, str(report)
        assert fam.rope in c.forms["rope"], str(report)
        assert fam.split in c.forms["split"], str(report)
        assert c.forms["cache"], str(report)
    # a chain candidate left unfused would be a missed layer (lone non-cache index_puts of
    # MoE routing are reported too, as rejected cache writes: those are fine)
    missed = [c for c in report.candidates if c.status == "rejected" and c.forms.get("rope")]
    assert not missed, str(report)


def check_numerics(fam: Family, got, eager, exact, what: str) -> None:
    """Fused: SPEC's rule against the float64 run.  Negatives (nothing fused): what stock
    Inductor does to the rest of the model is not the pass's rule to keep; a tight float32
    match is (in bf16/fp16 no tight match exists: there SPEC's rule, whose ulp is the dtype's)."""
    logits, caches = got
    assert len(logits) == len(eager[0]) and len(caches) == len(eager[1]) == len(exact[1])
    names = [f"{what} step {i} logits" for i in range(len(logits))] + \
        [f"{what} cache {i}" for i in range(len(caches))]
    for name, g, e, x in zip(names, logits + caches, eager[0] + eager[1], exact[0] + exact[1]):
        if fam.fused or g.dtype != torch.float32:
            assert_spec_close(g, e, x, name)
        else:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------ tests

def check(name: str, attn: str, run, device: str = "cpu", dtype=torch.float32,
          dynamic: Optional[bool] = None, fam: Optional[Family] = None):
    """``dtype``: the model's weights and activations (the float64 run starts from the same,
    rounded, weights and caches).  ``dynamic``: torch.compile's; ``fam``: what to expect, if
    not the family's own.  Returns the pass's report and the model's config."""
    fam_, cfg, model = build(name, attn)
    fam = fam or fam_
    model = model.to(device, dtype)
    eager = run(model, cfg, dtype, device, dtype)
    exact = run(copy.deepcopy(model).double(), cfg, torch.float64, device, dtype)
    fn, backend = compiled(model, device, dynamic)
    got, codes = run_and_get_code(run, fn, cfg, dtype, device, dtype)
    check_report(fam, cfg, backend.report, "\n".join(codes), device)
    check_numerics(fam, got, eager, exact, name)
    return backend.report, cfg


@pytest.mark.parametrize("name", list(FAMILIES))
def test_paged_cache(name):
    """Serving-engine style: per-layer paged caches written by the attention function."""
    check(name, ATTN, run_paged)


STATIC = [n for n in FAMILIES if n != "glm4_moe_no_qk_norm"]


@pytest.mark.parametrize("name", STATIC)
def test_static_cache(name):
    """Hugging Face's own StaticCache (``index_copy_(2, cache_position, k)``), eager attention."""
    check(name, "eager", run_static)


@pytest.mark.parametrize("device", DEVICES)
def test_dynamic_true_fuses_with_floats_specialized(device):
    """``torch.compile(dynamic=True)``: Dynamo passes each norm's float ``variance_epsilon`` in
    as a 0-d tensor, whose value the pass cannot know.  The chain is matched and refused by
    the eps guard, which names the inputs and the fix, and the model still runs right; with
    ``torch._dynamo.config.specialize_float = True`` the same compile fuses every layer."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    refused = dataclasses.replace(FAMILIES["qwen3"], fused=0,
                                  reason="specialize_float = True")
    report, cfg = check("qwen3", "eager", run_static, device, dtype, dynamic=True, fam=refused)
    chains = [c for c in report.candidates if c.forms.get("rope")]
    assert len(chains) == 2 * len(attention_layers(cfg)), str(report)  # prefill, decode
    assert all(c.guard == "eps" and c.forms["norm"] == "rms_norm(eps tensor)" for c in chains), \
        str(report)
    with torch._dynamo.config.patch(specialize_float=True):
        check("qwen3", "eager", run_static, device, dtype, dynamic=True)


# --------------------------------------------------- projections padded by Inductor's pad_mm
# On CUDA, Inductor pads a matmul to aligned rows where its own benchmark says so, per shape
# and so per process: ``mm(pad(h), w)[:T]``.  Forced here: every matmul, or every other one
# (Q's padded and K's not, or the reverse: the mix that once failed a whole GPU run).

FUSING = [n for n, f in FAMILIES.items() if f.fused]


def check_padded(name: str, policy: str, monkeypatch, device: str = "cpu",
                 dtype=torch.float32) -> None:
    """The caches (the fused op's own outputs) against eager by SPEC's rule; the logits against
    stock Inductor with the same padding, the unfused code the pass rewrote: a padded matmul
    rounds differently from eager's, downstream of the op."""
    padded = force_pad_mm(monkeypatch, policy)
    fam, cfg, model = build(name, ATTN)
    model = model.to(device, dtype)
    eager = run_paged(model, cfg, dtype, device, dtype)
    exact = run_paged(copy.deepcopy(model).double(), cfg, torch.float64, device, dtype)
    torch._dynamo.reset()
    stock = run_paged(torch.compile(model), cfg, dtype, device, dtype)
    assert any(padded), "no matmul was padded"
    stock_pads, padded[:] = list(padded), []  # the same calls, in the same order, again
    fn, backend = compiled(model, device)
    got, codes = run_and_get_code(run_paged, fn, cfg, dtype, device, dtype)
    assert padded == stock_pads
    check_report(fam, cfg, backend.report, "\n".join(codes), device)
    check_numerics(fam, got, (stock[0], eager[1]), exact, name)


PADDED = [("alternate", n) for n in FUSING] + [("all", "llama"), ("all", "qwen3_next")]


@pytest.mark.parametrize("policy,name", PADDED)
def test_paged_cache_padded_matmuls(name, policy, monkeypatch):
    check_padded(name, policy, monkeypatch)


# ------------------------------------------- the CUDA launch path, on the CPU (interpreter)
# On CUDA the pass has Inductor launch the kernel (fusion_pass/inductor_launch.py).  These run
# that graph rewrite on every family's real graphs here: Inductor's post-grad pipeline, then
# the graph eagerly, the kernel under Triton's interpreter.


def check_launch_path(name: str, attn: str, run, monkeypatch) -> None:
    inductor_launch_on_cpu(monkeypatch)
    fam, cfg, model = build(name, attn)
    eager = run(model, cfg, torch.float32)
    exact = run(copy.deepcopy(model).double(), cfg, torch.float64, "cpu", torch.float32)
    fp, graphs = fusion_pass.FusionPass(allow_cpu=True, inductor_launch=True), []
    torch._dynamo.reset()
    got = run(torch.compile(model, backend=launch_path_backend(fp, graphs)), cfg, torch.float32)
    fused = [c for c in fp.report.candidates if c.status == "fused"]
    assert len(fused) == 2 * fam.fused and not fp.report.errors, str(fp.report)
    assert all(c.op == INDUCTOR_LAUNCH for c in fused), str(fp.report)
    assert len(graphs) == 2, f"{len(graphs)} graphs (prefill and decode expected)"
    for g in graphs:
        assert_launch_graph(g, fam.fused)
    check_numerics(fam, got, eager, exact, name)


@pytest.mark.parametrize("name", FUSING)
def test_paged_cache_launch_path(name, monkeypatch):
    check_launch_path(name, ATTN, run_paged, monkeypatch)


@pytest.mark.parametrize("name", [n for n in FUSING if n in STATIC])
def test_static_cache_launch_path(name, monkeypatch):
    check_launch_path(name, "eager", run_static, monkeypatch)


# ------------------------------------------------------------------ the same on the GPU
# In bf16, what models are served in on a GPU: weights, activations and caches (float32 is the
# CPU tests' dtype, and the fp32 kernel on CUDA is test_pass_gpu's).  SPEC's rule scales with
# the dtype (1 ulp of bf16 at the tensor's largest magnitude on top of 1.5 x eager's error).

GPU_DTYPES = [pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_paged_cache_cuda(name, dtype):
    check(name, ATTN, run_paged, "cuda", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("policy,name", PADDED)
def test_paged_cache_padded_matmuls_cuda(name, policy, dtype, monkeypatch):
    """Inductor's own pad_mm on CUDA, with its benchmark's answer forced."""
    check_padded(name, policy, monkeypatch, "cuda", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("name", STATIC)
def test_static_cache_cuda(name, dtype):
    check(name, "eager", run_static, "cuda", dtype)
