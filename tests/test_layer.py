"""FusedQKVLayer: the op bound to one layer equals the entry point, and still validates."""
import pytest
import torch

import kernels
from kernels import layer as layer_mod
from kernels.layer import FusedQKVLayer

from .conftest import DEVICES


@pytest.fixture(autouse=True)
def _python_path(monkeypatch):
    """These tests cover the layer's own path; on CUDA the C++ module would take its calls
    (tests/test_native_entry.py covers that)."""
    from kernels import native_entry
    monkeypatch.setattr(native_entry, "module", None)


def _inputs(device, t, hq=4, hkv=2, d=64, nb=6, bs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(device, torch.bfloat16)
    pos = torch.randint(0, 32, (t,), generator=g).to(device)
    slots = torch.randperm(nb * bs, generator=g)[:t].to(device)
    return qkv, pos, slots


def _bound(device, hq=4, hkv=2, d=64, nb=6, bs=4):
    g = torch.Generator().manual_seed(1)
    ang = torch.rand(32, d // 2, generator=g) * 6.28
    table = torch.cat([ang.cos(), ang.sin()], -1).to(device)
    caches = [torch.randn(nb, bs, hkv, d, generator=g).to(device, torch.bfloat16)
              for _ in range(2)]
    return dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, eps=1e-6,
                q_weight=torch.randn(d, generator=g).to(device, torch.bfloat16),
                k_weight=torch.randn(d, generator=g).to(device, torch.bfloat16),
                cos_sin_cache=table, key_cache=caches[0], value_cache=caches[1])


@pytest.mark.parametrize("device", DEVICES)
def test_layer_equals_entry_point_over_steps(device, monkeypatch):
    kw = _bound(device, nb=80)
    ref_kw = {k: (v.clone() if k.endswith("cache") and k != "cos_sin_cache" else v)
              for k, v in kw.items()}
    layer = FusedQKVLayer(**kw)
    full_calls, bound_calls = [], []
    real = layer_mod.prepare
    monkeypatch.setattr(layer_mod, "prepare", lambda *a, **k: full_calls.append(1) or real(*a, **k))
    # 300 tokens: another tile plan (T >= 256) through the same bound launch
    for step, t in enumerate((5, 1, 300, 3, 1)):
        qkv, pos, slots = _inputs(device, t, seed=step, nb=80)
        version = kw["key_cache"]._version
        got = layer(qkv, pos, slots)
        if step == 0:  # count the launches through the layer's own bound launch from now on
            bound = layer._bound
            assert bound is not None, "the Triton path should bind the launch"
            spy = lambda *a, **k: bound_calls.append(1) or bound(*a, **k)  # noqa: E731
            spy.plan, spy.stale = bound.plan, bound.stale
            layer._bound = spy
        assert kw["key_cache"]._version > version, "autograd must see the cache written"
        want = kernels.split_norm_rope_cache(qkv, positions=pos, slot_mapping=slots, **ref_kw)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        assert torch.equal(kw["key_cache"], ref_kw["key_cache"])
        assert torch.equal(kw["value_cache"], ref_kw["value_cache"])
    assert len(full_calls) == 1, "only the first call should take the validated path"
    assert len(bound_calls) == 4, "later calls should launch through the bound launch"


@pytest.mark.parametrize("device", DEVICES)
def test_layer_still_rejects_bad_inputs(device):
    kw = _bound(device)
    layer = FusedQKVLayer(**kw)
    qkv, pos, slots = _inputs(device, 3)
    layer(qkv, pos, slots)
    before = kw["key_cache"].clone()
    with pytest.raises(ValueError, match="positions"):
        layer(qkv, pos.float(), slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        layer(qkv, pos, slots[:2])
    with pytest.raises(ValueError, match="qkv"):
        layer(qkv[:, :-1], pos, slots)
    assert torch.equal(kw["key_cache"], before), "a rejected call wrote the cache"


def test_layer_revalidates_after_in_place_cache_change(monkeypatch):
    """A bound cache resized in place (fewer blocks) must not be written with the old
    geometry: the call goes through validation again and writes where the entry point does."""
    kw = _bound("cpu", nb=8)
    layer = FusedQKVLayer(**kw)
    layer(*_inputs("cpu", 3, nb=8))
    full_calls = _count_validations(monkeypatch)
    for name in ("key_cache", "value_cache"):
        c = kw[name]
        c.set_(c[:4].clone())  # 4 blocks of 4 slots, same tensor object
    _step_equals_entry_point(layer, kw, *_inputs("cpu", 3, nb=4, seed=5))
    assert full_calls == [1], "the changed cache must be validated again"


def _count_validations(monkeypatch) -> list:
    """A list that gets an item per call of the layer that goes through validation."""
    full_calls = []
    real = layer_mod.prepare
    monkeypatch.setattr(layer_mod, "prepare", lambda *a, **k: full_calls.append(1) or real(*a, **k))
    return full_calls


def _step_equals_entry_point(layer, kw, qkv, pos, slots) -> None:
    """One layer call writes and returns what the entry point does with the same arguments
    (on copies of the caches)."""
    want_kw = {k: (v.clone() if k in ("key_cache", "value_cache") else v) for k, v in kw.items()}
    got = layer(qkv, pos, slots)
    want = kernels.split_norm_rope_cache(qkv, positions=pos, slot_mapping=slots, **want_kw)
    assert torch.equal(got.q, want.q)
    assert torch.equal(kw["key_cache"], want_kw["key_cache"])
    assert torch.equal(kw["value_cache"], want_kw["value_cache"])


@pytest.mark.parametrize("device", DEVICES)
def test_layer_revalidates_after_a_weight_changed_in_place(device, monkeypatch):
    """``module.to(dtype)`` swaps a bound weight's data in place: the layer's kept launch was
    compiled for the old dtype (and on the GPU re-reads only pointers), so the next call must
    be validated again and compute what the entry point computes with the new weight."""
    kw = _bound(device, nb=8)
    kw["q_weight"] = kw["q_weight"].float()  # fp32 norm weights with bf16 activations
    layer = FusedQKVLayer(**kw)
    for seed in (0, 1):  # the second call takes the kept launch
        layer(*_inputs(device, 3, nb=8, seed=seed))
    full_calls = _count_validations(monkeypatch)
    w = kw["q_weight"]
    w.data = (w.data * 1.5).to(torch.bfloat16)  # same tensor object, new dtype and data
    _step_equals_entry_point(layer, kw, *_inputs(device, 3, nb=8, seed=5))
    assert full_calls == [1], "the changed weight must be validated again"


def test_layer_follows_a_uint8_cache_swapped_in_place():
    """A uint8 (fp8 bytes) cache is launched through an fp8 view of it: when the user swaps the
    cache's storage for another of the same geometry, the writes must land in the new one."""
    g = torch.Generator().manual_seed(2)
    kw = _bound("cpu")
    kw.update(kv_cache_dtype="fp8_e4m3", k_scale=torch.tensor(0.5), v_scale=torch.tensor(2.0))
    for name in ("key_cache", "value_cache"):
        kw[name] = torch.randint(0, 100, kw[name].shape, generator=g).to(torch.uint8)
    layer = FusedQKVLayer(**kw)
    layer(*_inputs("cpu", 3))
    for name in ("key_cache", "value_cache"):
        kw[name].set_(torch.randint(0, 100, kw[name].shape, generator=g).to(torch.uint8))
    want_kw = {k: (v.clone() if k in ("key_cache", "value_cache") else v) for k, v in kw.items()}
    qkv, pos, slots = _inputs("cpu", 3, seed=7)
    layer(qkv, pos, slots)
    kernels.split_norm_rope_cache(qkv, positions=pos, slot_mapping=slots, **want_kw)
    assert torch.equal(kw["key_cache"], want_kw["key_cache"])
    assert torch.equal(kw["value_cache"], want_kw["value_cache"])


def test_layer_keeps_no_step_tensors():
    """The validated call is kept without the first step's qkv/positions/slots (a prefill's
    qkv must not live as long as the layer)."""
    import gc
    import weakref
    kw = _bound("cpu")
    layer = FusedQKVLayer(**kw)
    qkv, pos, slots = _inputs("cpu", 5)
    refs = [weakref.ref(x) for x in (qkv, pos, slots)]
    out = layer(qkv, pos, slots)
    del qkv, pos, slots, out
    gc.collect()
    assert all(r() is None for r in refs)
    layer(*_inputs("cpu", 2, seed=3))  # and the fast path still works


def test_layer_binding_errors():
    kw = _bound("cpu")
    with pytest.raises(TypeError, match="positions"):
        FusedQKVLayer(positions=torch.zeros(1), **kw)
    kw.pop("key_cache")
    with pytest.raises(ValueError, match="key_cache"):
        FusedQKVLayer(**kw)
