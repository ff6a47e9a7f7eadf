"""The eager entry point: every form of argument it accepts, and every misuse it rejects."""
import math

import pytest
import torch

import kernels
from kernels import reference, split_norm_rope_cache
from kernels.op_schema import LAYOUT_HND, LAYOUT_NHD

from .conftest import DEVICES
from .numerics import assert_spec_close

T, HQ, HKV, D = 6, 4, 2, 64


def _base(device="cpu", **over):
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(T, (HQ + 2 * HKV) * D, generator=g).to(device, torch.bfloat16)
    ang = torch.rand(32, D // 2, generator=g) * 2 * math.pi
    kw = dict(
        qkv=qkv, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
        q_weight=torch.randn(D, generator=g).to(device), k_weight=torch.randn(D, generator=g).to(device),
        positions=torch.randint(0, 32, (T,), generator=g).to(device),
        cos_sin_cache=torch.cat([ang.cos(), ang.sin()], -1).to(device),
        key_cache=torch.randn(4, 4, HKV, D, generator=g).to(device, torch.bfloat16),
        value_cache=torch.randn(4, 4, HKV, D, generator=g).to(device, torch.bfloat16),
        slot_mapping=torch.randperm(16, generator=g)[:T].to(device),
    )
    kw.update(over)
    return kw


@pytest.mark.parametrize("device", DEVICES)
def test_entry_point_packed_matches_reference(device):
    kw = _base(device)
    kc0, vc0 = kw["key_cache"].clone(), kw["value_cache"].clone()
    out = split_norm_rope_cache(**kw)
    r = kw["cos_sin_cache"].shape[1]
    args = (kw["qkv"], kw["qkv"], kw["qkv"], 0, HQ * D, (HQ + HKV) * D, HQ, HKV, D, 0,
            kw["q_weight"], kw["k_weight"], True, 1e-6, 0.0,
            kw["cos_sin_cache"][:, : r // 2], kw["cos_sin_cache"][:, r // 2:], kw["positions"],
            D, True, False)
    eager = reference.split_norm_rope_cache(*args, kc0, vc0, kw["slot_mapping"], LAYOUT_NHD,
                                            True, "auto", None, None)
    d64 = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    kc64 = torch.zeros(kc0.shape, dtype=torch.float64, device=device)
    vc64 = torch.zeros_like(kc64)
    exact = reference.split_norm_rope_cache(*d64, kc64, vc64, kw["slot_mapping"], LAYOUT_NHD, True,
                                            "auto", None, None, math_dtype=torch.float64)
    for name, f, e, x in zip("qkv", out[:3], eager[:3], exact[:3]):
        assert_spec_close(f, e, x, name)
    s = kw["slot_mapping"].cpu()
    assert_spec_close(kw["key_cache"].view(-1, HKV, D)[s], kc0.view(-1, HKV, D)[s],
                      kc64.view(-1, HKV, D)[s], "key_cache")
    assert out.gate.numel() == 0


def test_entry_point_separate_and_batched_hf_tables():
    """Hugging Face style: q/k/v projections [B, S, *], cos/sin [B, S, D] already gathered."""
    B, S = 2, 3
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, S, HQ * D, generator=g)
    k = torch.randn(B, S, HKV * D, generator=g)
    v = torch.randn(B, S, HKV * D, generator=g)
    ang = torch.rand(B, S, D // 2, generator=g)
    cos = torch.cat([ang.cos(), ang.cos()], -1)
    sin = torch.cat([ang.sin(), ang.sin()], -1)
    out = split_norm_rope_cache(q=q, k=k, v=v, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                                cos=cos, sin=sin)
    qh = q.view(B, S, HQ, D)
    x1, x2 = qh.chunk(2, -1)
    expect = qh * cos.unsqueeze(2) + torch.cat([-x2, x1], -1) * sin.unsqueeze(2)
    torch.testing.assert_close(out.q.view(B, S, HQ, D), expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.v.view(B, S, HKV, D), v.view(B, S, HKV, D))


def test_op_works_inside_torch_compile():
    """The op's fake impl and mutation declaration let Inductor compile a call to it."""
    kw = _base()
    kc0, vc0 = kw["key_cache"].clone(), kw["value_cache"].clone()

    def f(**kw):
        return split_norm_rope_cache(**kw)

    eager = f(**dict(kw, key_cache=kc0, value_cache=vc0))
    compiled = torch.compile(f, fullgraph=True)(**kw)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(kw["key_cache"], kc0)
    torch.testing.assert_close(kw["value_cache"], vc0)


# --- misuse: (id, overrides, exception, words the message must contain) ---
def _bad_cases():
    bf = torch.bfloat16
    return [
        ("qkv_not_tensor", dict(qkv=[1, 2]), TypeError, "qkv"),
        ("qkv_and_q", dict(q=torch.randn(T, HQ * D)), ValueError, "either qkv"),
        ("heads_not_multiple", dict(num_q_heads=3), ValueError, "num_q_heads"),
        ("heads_zero", dict(num_kv_heads=0), ValueError, "num_kv_heads"),
        ("heads_float", dict(num_q_heads=4.0), TypeError, "num_q_heads"),
        ("head_dim_unsupported", dict(head_dim=576), ValueError, "head_dim"),
        ("qkv_width", dict(qkv=torch.randn(T, 7 * D).to(bf)), ValueError, "qkv last dim"),
        ("qkv_dtype_int", dict(qkv=torch.ones(T, 8 * D, dtype=torch.int32)), ValueError, "qkv dtype"),
        ("qkv_last_stride", dict(qkv=torch.randn(8 * D, T).to(bf).t()), ValueError, "stride"),
        ("qkv_rank1", dict(qkv=torch.randn(8 * D).to(bf)), ValueError, "qkv"),
        ("rotary_odd", dict(rotary_dim=63), ValueError, "rotary_dim"),
        ("rotary_too_big", dict(rotary_dim=128), ValueError, "rotary_dim"),
        ("weight_shape", dict(q_weight=torch.randn(D + 1)), ValueError, "q_weight"),
        ("weight_int", dict(k_weight=torch.ones(D, dtype=torch.int64)), ValueError, "k_weight"),
        ("eps_negative", dict(eps=-1.0), ValueError, "eps"),
        ("table_int", dict(cos_sin_cache=torch.ones(32, D, dtype=torch.int32)), ValueError, "cos_sin_cache"),
        ("table_and_cos", dict(cos=torch.randn(32, D)), ValueError, "cos_sin_cache"),
        ("no_positions", dict(positions=None), ValueError, "positions"),
        ("positions_float", dict(positions=torch.zeros(T)), ValueError, "positions"),
        ("positions_short", dict(positions=torch.zeros(T - 1, dtype=torch.long)), ValueError, "positions"),
        ("slot_float", dict(slot_mapping=torch.zeros(T)), ValueError, "slot_mapping"),
        ("slot_short", dict(slot_mapping=torch.zeros(T - 2, dtype=torch.long)), ValueError, "slot_mapping"),
        ("cache_rank", dict(key_cache=torch.randn(16, HKV, D).to(bf)), ValueError, "key_cache"),
        ("cache_heads", dict(value_cache=torch.randn(4, 4, 3, D).to(bf)), ValueError, "value_cache"),
        ("cache_head_dim", dict(key_cache=torch.randn(4, 4, HKV, 32).to(bf)), ValueError, "head_dim"),
        ("cache_dtype", dict(key_cache=torch.randn(4, 4, HKV, D, dtype=torch.float16),
                             value_cache=torch.randn(4, 4, HKV, D, dtype=torch.float16)), ValueError, "dtype"),
        ("cache_mismatch", dict(value_cache=torch.randn(5, 4, HKV, D).to(bf)), ValueError, "value_cache"),
        ("cache_layout_name", dict(cache_layout="BHSD"), ValueError, "cache_layout"),
        ("cache_hnd_shape", dict(cache_layout="HND"), ValueError, "key_cache"),
        ("cache_last_stride", dict(key_cache=torch.randn(4, 4, D, HKV).to(bf).transpose(2, 3),
                                   value_cache=torch.randn(4, 4, D, HKV).to(bf).transpose(2, 3)),
         ValueError, "stride"),
        ("cache_without_slots", dict(slot_mapping=None), ValueError, "slot_mapping"),
        ("uint8_auto", dict(key_cache=torch.zeros(4, 4, HKV, D, dtype=torch.uint8),
                            value_cache=torch.zeros(4, 4, HKV, D, dtype=torch.uint8)), ValueError, "kv_cache_dtype"),
        ("scale_not_fp8", dict(k_scale=torch.tensor(1.0)), ValueError, "k_scale"),
        ("slot_mode", dict(slot_mode="wrap"), ValueError, "slot_mode"),
        ("gate_name", dict(gate="sideways"), ValueError, "gate"),
        ("kv_cache_dtype_name", dict(kv_cache_dtype="int4"), ValueError, "kv_cache_dtype"),
        ("device_mismatch", dict(positions=torch.zeros(T, dtype=torch.long, device="meta")), ValueError, "device"),
    ]


@pytest.mark.parametrize("over,exc,words", [c[1:] for c in _bad_cases()], ids=[c[0] for c in _bad_cases()])
def test_misuse_is_rejected_with_a_clear_error(over, exc, words):
    kw = _base()
    kc0 = kw["key_cache"].clone()
    with pytest.raises(exc) as info:
        split_norm_rope_cache(**dict(kw, **over))
    assert words in str(info.value), str(info.value)
    torch.testing.assert_close(kw["key_cache"], kc0)  # nothing corrupted


def test_signature_lists_every_keyword_and_rejects_unknown_ones():
    import inspect

    from kernels import split_norm_rope_cache
    from kernels.api import prepare
    params = inspect.signature(split_norm_rope_cache).parameters
    assert {"num_q_heads", "cos_sin_cache", "slot_mapping", "return_gate"} <= set(params)
    assert params["eps"].default == inspect.signature(prepare).parameters["eps"].default == 1e-6
    table = torch.randn(8, 8)
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_q_head'"):
        split_norm_rope_cache(torch.randn(2, 48), num_q_heads=2, num_kv_heads=1, head_dim=16,
                              positions=torch.zeros(2, dtype=torch.long), cos_sin_cache=table,
                              num_q_head=1)


def test_cache_versions_bumped_like_an_inplace_op():
    """Autograd's version counter of both caches moves on every write (the entry point's
    direct path and FusedQKVLayer's fast path), as the dispatcher does for a mutated arg."""
    from kernels import FusedQKVLayer, split_norm_rope_cache
    hkv, d, t = 1, 64, 3
    kc, vc = torch.randn(2, 4, hkv, d), torch.randn(2, 4, hkv, d)
    table = torch.randn(8, d)
    kw = dict(num_q_heads=2, num_kv_heads=hkv, head_dim=d, cos_sin_cache=table,
              key_cache=kc, value_cache=vc)
    qkv = torch.randn(t, 4 * d)
    pos, slots = torch.arange(t), torch.arange(t)
    before = kc._version, vc._version
    split_norm_rope_cache(qkv, positions=pos, slot_mapping=slots, **kw)
    after = kc._version, vc._version
    assert after[0] > before[0] and after[1] > before[1]
    layer = FusedQKVLayer(**kw)
    layer(qkv, pos, slots)  # validated
    mid = kc._version, vc._version
    layer(qkv, pos, slots)  # fast path
    assert kc._version > mid[0] and vc._version > mid[1]
