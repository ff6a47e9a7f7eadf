"""The pass on every form of SPEC's family table: the rewrite happens, and numbers match eager.

Each test compiles an unfused function (tests/model_forms.py) with the pass on the CPU
(allow_cpu=True; the op runs the Triton kernel under the interpreter) and checks:
the fused op is in the generated code, no rsqrt / index_put is left in the post-grad graph,
no buffer as large as a cache is allocated (caches written in place), and compiled outputs
and caches equal eager within SPEC's numerics rule against a float64 run.
"""
import pytest
import torch

from .model_forms import Form
from .pass_check import FUSED_CACHE, FUSED_NOCACHE, check_fused

SPLIT = ["split", "chunk", "slice", "narrow", "gated_interleaved", "gated_blocked"]
NORM = ["rms_norm", "nn", "qwen3", "gemma"]
ROPE = ["neox_halves", "rotate_half", "gptj", "gptj_halves"]
CACHE = ["view", "index_put", "index_copy", "nhd", "hnd", "kv_halves", "fp8"]


@pytest.mark.parametrize("split", SPLIT)
def test_split_forms(split):
    kw = dict(hq=2, hkv=2) if split == "chunk" else {}
    check_fused(Form(split=split, **kw))


def test_separate_projections_hf_layout():
    check_fused(Form(split="separate", hf=True))


@pytest.mark.parametrize("norm", NORM)
def test_norm_forms(norm):
    check_fused(Form(norm=norm))


@pytest.mark.parametrize("eps", [1e-5, 1e-6, 3e-4])
def test_norm_eps(eps):
    report, code = check_fused(Form(eps=eps))
    assert "9.99" in code or repr(eps)[:4] in code or "0.0003" in code


def test_fp32_activations_no_casts():
    check_fused(Form(dtype=torch.float32))


def test_rope_in_float32_cast_back_leaves_no_kernel():
    """fp32 cos/sin (vLLM's cos_sin_cache): rope math in fp32, cast back to bf16.  The op
    returns bf16 directly, so the casts go too: the fused op is the only kernel left."""
    _, code = check_fused(Form(rope_fp32=True, return_k=True))
    assert "cpp_fused" not in code, code


def test_fp16_activations():
    check_fused(Form(dtype=torch.float16))


@pytest.mark.parametrize("rope", ROPE)
def test_rope_forms(rope):
    check_fused(Form(rope=rope))


@pytest.mark.parametrize("rope,rotary", [("neox_halves", 0.5), ("rotate_half", 0.25),
                                         ("gptj", 0.5), ("gptj_halves", 0.5)])
def test_partial_rotary(rope, rotary):
    report, _ = check_fused(Form(rope=rope, rotary=rotary))
    assert "partial" in report.fused[0].forms["rope"]


@pytest.mark.parametrize("table", ["cos_sin_cache", "separate", "gathered"])
def test_rope_tables(table):
    check_fused(Form(table=table))


def test_hf_rope_cos_sin_per_token_unsqueeze():
    """Hugging Face: cos/sin [B, S, D] computed in the graph, unsqueeze(1), q in [B, H, S, D]."""
    check_fused(Form(split="separate", hf=True, table="gathered", rope="rotate_half",
                     norm="qwen3"))


@pytest.mark.parametrize("rope", ["rotate_half", "gptj"])
@pytest.mark.parametrize("cache", ["view", "static"])
def test_hf_rope_computed_in_graph_unsqueeze(rope, cache):
    """Hugging Face's rotary embedding: cos/sin [B, S, r] computed from positions in the graph
    (no table to index), ``unsqueeze(1)`` against q [B, H, S, D]: the op reads them per token,
    broadcast the way the code did (not along the heads)."""
    report, _ = check_fused(Form(split="separate", hf=True, table="computed", rope=rope,
                                 norm="qwen3", cache=cache))
    assert "per-token" in report.fused[0].forms["rope"]


@pytest.mark.parametrize("cache", CACHE)
def test_cache_forms(cache):
    report, _ = check_fused(Form(cache=cache))
    assert report.fused[0].status == "fused"


def test_hf_static_cache_index_copy_dim2():
    check_fused(Form(split="separate", hf=True, cache="static", table="gathered",
                     rope="rotate_half"))


def test_return_k_keeps_k_output():
    """When K is also used (prefill attention), the op writes it; otherwise it does not."""
    report, code = check_fused(Form(return_k=True))
    assert "True, True, False, False)" in code  # write_q, write_k


def test_dynamic_tokens():
    check_fused(Form(), dynamic=True)


def test_gqa_and_head_dims():
    check_fused(Form(hq=8, hkv=1, d=128, B=1, S=3))
    check_fused(Form(hq=2, hkv=2, d=80, rotary=0.4))


# ---- partial fallbacks ----
def test_no_cache_write_fuses_split_norm_rope():
    report, code = check_fused(Form(cache="none", return_k=True), expect=FUSED_NOCACHE)
    assert report.fused[0].status == "fused-partial"
    assert FUSED_CACHE not in code


def test_no_norm_fuses_rope_and_cache():
    report, _ = check_fused(Form(norm="none"))
    assert report.fused[0].forms["norm"] is None


def test_cache_fusion_switched_off():
    report, code = check_fused(Form(), expect=FUSED_NOCACHE, fuse_cache=False)
    assert "turned off" in report.fused[0].reason


@pytest.mark.parametrize("cache", ["view", "index_put", "nhd", "hnd", "kv_halves"])
def test_negative_slot_keeps_indexing_semantics(cache):
    """A replaced indexing write keeps PyTorch's meaning of slot -1: the last row."""
    check_fused(Form(cache=cache, negative_slot=True))


def test_block_and_offset_indices_not_from_one_slot():
    """cache[blk, off] where off is not slot % bs (here negative, counted from the block's
    end): the pass rebuilds the slot from both indices with PyTorch's negative-index rule."""
    report, _ = check_fused(Form(cache="nhd_negoff"))
    assert report.fused[0].forms["cache"] == "NHD[blk_off]"
