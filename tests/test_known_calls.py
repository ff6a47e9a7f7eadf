"""The entry point's remembered calls: a call with the signature of a validated one skips
validation and the launch's set-up, yet writes through this call's own tensors, holds none of
them afterwards, and anything that differs from the validated call is validated again."""
import gc
import math
import weakref

import pytest
import torch

from kernels import api, split_norm_rope_cache

from .conftest import DEVICES
from .kernel_check import check_run


def _fixed(device, form, seed):
    """One layer's tensors that stay across steps (weights, tables, caches), drawn fresh."""
    g = torch.Generator().manual_seed(seed)
    hq, hkv, d = 4, 2, 64
    kw = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d)
    if form == "vllm":  # packed qkv, table + positions, bf16 NHD cache
        ang = torch.rand(40, d // 2, generator=g) * 2 * math.pi
        kw.update(cos_sin_cache=torch.cat([ang.cos(), ang.sin()], -1).to(device), eps=1e-6,
                  q_weight=torch.randn(d, generator=g).to(device, torch.bfloat16),
                  k_weight=torch.randn(d, generator=g).to(device, torch.bfloat16),
                  return_k=False, return_v=False)
        shape, dtype = (6, 4, hkv, d), torch.bfloat16
    elif form == "fp8":  # gated Qwen3-Next style: uint8 fp8 HND cache with scales, Gemma norm
        ang = torch.rand(40, 16, generator=g) * 2 * math.pi
        kw.update(cos_sin_cache=torch.cat([ang.cos(), ang.sin()], -1).to(device),
                  rotary_dim=32, gate="interleaved", weight_offset=1.0, eps=1e-5,
                  q_weight=torch.randn(d, generator=g).to(device),
                  k_weight=torch.randn(d, generator=g).to(device),
                  cache_layout="HND", kv_cache_dtype="fp8_e4m3",
                  k_scale=(torch.rand((), generator=g) + 0.5).to(device),
                  v_scale=(torch.rand((), generator=g) + 0.5).to(device))
        shape, dtype = (6, hkv, 4, d), torch.uint8
    else:  # "hf": separate q/k/v [B, S, *], per-token cos/sin, no norm, fp16 cache
        shape, dtype = (6, 4, hkv, d), torch.float16
    if dtype == torch.uint8:
        kw["key_cache"], kw["value_cache"] = (
            torch.randint(0, 120, shape, generator=g, dtype=torch.uint8).to(device)
            for _ in range(2))
    else:
        kw["key_cache"], kw["value_cache"] = (
            torch.randn(shape, generator=g).to(device, dtype) for _ in range(2))
    return kw


def _step(device, form, seed):
    """One step's tensors: T = 5 tokens, fresh random data."""
    g = torch.Generator().manual_seed(seed)
    hq, hkv, d, t = 4, 2, 64, 5
    if form == "hf":
        ang = torch.rand(1, t, d // 2, generator=g) * 2 * math.pi
        return dict(q=torch.randn(1, t, hq * d, generator=g).to(device, torch.float16),
                    k=torch.randn(1, t, hkv * d, generator=g).to(device, torch.float16),
                    v=torch.randn(1, t, hkv * d, generator=g).to(device, torch.float16),
                    cos=torch.cat([ang.cos()] * 2, -1).to(device),
                    sin=torch.cat([ang.sin()] * 2, -1).to(device),
                    slot_mapping=torch.randperm(24, generator=g)[:t].to(device))
    width = (2 * hq + 2 * hkv) * d if form == "fp8" else (hq + 2 * hkv) * d
    slots = torch.randperm(24, generator=g)[:t + 2]
    if form == "fp8":
        slots[1] = -1  # a padded token: writes nothing
    return dict(qkv=torch.randn(t, width, generator=g).to(device, torch.bfloat16),
                positions=torch.randint(0, 40, (t,), generator=g).to(
                    device, torch.int32 if form == "fp8" else torch.int64),
                slot_mapping=slots.to(device))  # longer than T: the first T count


def _launch_args(kw):
    """launch()'s arguments for these keyword arguments, as the validated path builds them."""
    call = api.prepare(**kw)
    return call.head + call.cache + call.flags


@pytest.mark.parametrize("form", ["vllm", "fp8", "hf"])
@pytest.mark.parametrize("device", DEVICES)
def test_a_known_call_writes_through_its_own_tensors(device, form, monkeypatch):
    first = dict(_fixed(device, form, 0), **_step(device, form, 1))
    split_norm_rope_cache(**first)  # validated and remembered
    assert len(api._KNOWN) == 1
    before = [first["key_cache"].clone(), first["value_cache"].clone()]
    # other weights, table, caches and step tensors of the same geometry
    kw = dict(_fixed(device, form, 2), **_step(device, form, 3))
    full = _launch_args(kw)  # for the reference
    validated = []
    real = api.prepare
    monkeypatch.setattr(api, "prepare", lambda *a, **k: validated.append(1) or real(*a, **k))
    check_run(full, lambda: split_norm_rope_cache(**kw))
    assert validated == [], "a call with a validated signature was validated again"
    assert torch.equal(first["key_cache"], before[0]), "wrote into the first call's cache"
    assert torch.equal(first["value_cache"], before[1]), "wrote into the first call's cache"


def test_known_calls_keep_no_tensors_alive():
    kw = dict(_fixed("cpu", "fp8", 0), **_step("cpu", "fp8", 1))
    split_norm_rope_cache(**kw)
    split_norm_rope_cache(**kw)  # a remembered call
    assert len(api._KNOWN) == 1
    names = ("key_cache", "value_cache", "cos_sin_cache", "q_weight", "k_scale", "qkv")
    refs = [weakref.ref(kw[n]) for n in names]
    del kw
    api._HALVES.clear()  # the table's cached halves (at most 16 tables) hold the table
    gc.collect()
    alive = [n for n, r in zip(names, refs) if r() is not None]
    assert not alive, f"kept alive after the call: {alive}"


@pytest.mark.parametrize("over,exc,words", [
    (dict(eps=True), ValueError, "eps"),  # True == 1.0 and hashes alike: the type must count
    (dict(positions=torch.zeros(5)), ValueError, "positions"),
    (dict(slot_mapping=torch.zeros(4, dtype=torch.long)), ValueError, "slot_mapping"),
    (dict(positions=[0, 1, 2, 3, 4]), TypeError, "positions"),  # unhashable
    (dict(key_cache=torch.randn(6, 4, 2, 64).to(torch.bfloat16)[:, :, :, :32]), ValueError,
     "head_dim"),
], ids=["eps_bool", "positions_float", "slots_short", "positions_list", "cache_view"])
def test_what_differs_from_a_known_call_is_validated(over, exc, words):
    kw = dict(_fixed("cpu", "vllm", 0), **_step("cpu", "vllm", 1), eps=1.0)
    split_norm_rope_cache(**kw)
    split_norm_rope_cache(**kw)
    kc0 = kw["key_cache"].clone()
    with pytest.raises(exc) as info:
        split_norm_rope_cache(**dict(kw, **over))
    assert words in str(info.value), str(info.value)
    assert torch.equal(kw["key_cache"], kc0), "a rejected call wrote the cache"


def test_known_calls_are_bounded():
    kw = _fixed("cpu", "vllm", 0)
    for t in range(1, api._KNOWN_MAX + 3):  # each T is a new signature
        g = torch.Generator().manual_seed(t)
        split_norm_rope_cache(torch.randn(t, 512, generator=g).to(torch.bfloat16),
                              positions=torch.randint(0, 40, (t,), generator=g),
                              slot_mapping=torch.full((t,), -1), **kw)  # no writes
        assert 1 <= len(api._KNOWN) <= api._KNOWN_MAX
