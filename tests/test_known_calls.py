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
    from kernels import native_entry
    monkeypatch.setattr(native_entry, "module", None)  # the Python path (test_native_entry)
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
    versions = kw["key_cache"]._version, kw["value_cache"]._version
    if device == "cuda":  # the launch of a kept plan repeats through the launcher's memo
        from kernels import triton_kernel
        launcher = triton_kernel._cached_launcher()
        counts = launcher.memo_hits, launcher.misses
    check_run(full, lambda: split_norm_rope_cache(**kw))
    if device == "cuda":
        (known,) = api._KNOWN.values()
        assert len(known.plan[4]) == 1, "the first call should have filled the memo"
        assert (launcher.memo_hits, launcher.misses) == (counts[0] + 1, counts[1])
    assert validated == [], "a call with a validated signature was validated again"
    assert kw["key_cache"]._version > versions[0] and kw["value_cache"]._version > versions[1], \
        "autograd must see both caches written"
    assert torch.equal(first["key_cache"], before[0]), "wrote into the first call's cache"
    assert torch.equal(first["value_cache"], before[1]), "wrote into the first call's cache"


@pytest.mark.parametrize("form", ["vllm", "fp8", "hf"])
def test_known_calls_keep_no_tensors_alive(form):
    kw = dict(_fixed("cpu", form, 0), **_step("cpu", form, 1))
    split_norm_rope_cache(**kw)
    split_norm_rope_cache(**kw)  # a remembered call
    assert len(api._KNOWN) == 1
    names = [n for n, v in kw.items() if isinstance(v, torch.Tensor)]
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
    (dict(weight_offset=torch.tensor(1.0)), TypeError, "weight_offset"),  # no value in key
    (dict(is_neox=torch.tensor(False)), TypeError, "is_neox"),
    (dict(apply_norm=(torch.ones(1),)), TypeError, "apply_norm"),
    (dict(weight_offset=float("nan")), ValueError, "weight_offset"),
], ids=["eps_bool", "positions_float", "slots_short", "positions_list", "cache_view",
        "weight_offset_tensor", "is_neox_tensor", "apply_norm_tuple", "weight_offset_nan"])
def test_what_differs_from_a_known_call_is_validated(over, exc, words):
    kw = dict(_fixed("cpu", "vllm", 0), **_step("cpu", "vllm", 1), eps=1.0)
    split_norm_rope_cache(**kw)
    split_norm_rope_cache(**kw)
    kc0 = kw["key_cache"].clone()
    with pytest.raises(exc) as info:
        split_norm_rope_cache(**dict(kw, **over))
    assert words in str(info.value), str(info.value)
    assert torch.equal(kw["key_cache"], kc0), "a rejected call wrote the cache"


def test_known_calls_are_bounded_and_the_least_recently_used_goes():
    kw = _fixed("cpu", "vllm", 0)

    def call(t):  # each eps is a new signature (T = 1: a small grid under the interpreter)
        g = torch.Generator().manual_seed(t)
        split_norm_rope_cache(torch.randn(1, 512, generator=g).to(torch.bfloat16),
                              positions=torch.randint(0, 40, (1,), generator=g),
                              slot_mapping=torch.full((1,), -1),
                              **dict(kw, eps=1e-6 * (1 + t / 256)))  # no writes
        return next(reversed(api._KNOWN))  # the key just used

    keys = [call(t) for t in range(1, api._KNOWN_MAX + 1)]
    assert len(api._KNOWN) == api._KNOWN_MAX
    assert call(1) == keys[0]  # a hit: T = 1 is now the most recently used
    last = call(api._KNOWN_MAX + 1)
    assert len(api._KNOWN) == api._KNOWN_MAX
    assert keys[0] in api._KNOWN and last in api._KNOWN
    assert keys[1] not in api._KNOWN, "the least recently used signature should go first"


def test_signature_keeps_apart_what_validation_tells_apart():
    import numpy as np
    t = torch.zeros(3, 4)
    sig = api._signature
    assert len({sig(t, dict(eps=v)) for v in (True, 1, 1.0)}) == 3
    assert sig(t, dict(eps=0.0)) != sig(t, dict(eps=-0.0))
    assert sig(t, dict(gate=None)) != sig(t, dict(gate="None"))
    assert sig(t, dict(eps=np.float32(1e-6))) is None  # no key: validated every time
    assert sig(t, dict(weight_offset=torch.tensor(1.0))) is None  # a tensor as a scalar
    assert sig(t, dict(q_weight=torch.ones(4))) != sig(t, dict(q_weight=torch.ones(4).half()))
    assert sig(t, dict(q_weight=torch.ones(4))) != sig(t, dict(q_weight=torch.ones(8)[::2]))


def test_every_launch_setting_counts():
    from kernels import triton_kernel
    names = ("_BLOCK_OVERRIDE", "_INDEX32", "_EARLY_MAX_REGS", "_PDL", "_BUDGET_WARPS_PER_SM",
             "_LATE_MAX_REGS")
    base = triton_kernel.launch_settings()
    for name, other in zip(names, ((4, 2, 4), not triton_kernel._INDEX32, 48, True, 8, 40),
                           strict=True):
        old = getattr(triton_kernel, name)
        setattr(triton_kernel, name, other)
        try:
            assert triton_kernel.launch_settings() != base, name
        finally:
            setattr(triton_kernel, name, old)


def test_first_call_takes_the_remembered_path(monkeypatch):
    """So every entry-point test with a cache on a Triton device covers that path."""
    seen = []
    real = api._KnownCall.__call__
    monkeypatch.setattr(api._KnownCall, "__call__",
                        lambda self, *a: seen.append(1) or real(self, *a))
    split_norm_rope_cache(**_fixed("cpu", "vllm", 0), **_step("cpu", "vllm", 1))
    assert seen == [1]


def test_a_cpu_known_call_follows_triton_interpret(monkeypatch):
    """On the CPU the op runs the Triton kernel only under TRITON_INTERPRET=1: once unset, a
    remembered CPU call must run the reference, as a new call would."""
    from .kernel_check import record_launches
    seen = record_launches(monkeypatch, lambda c, pdl, regs: 1)
    kw = dict(_fixed("cpu", "vllm", 0), **_step("cpu", "vllm", 1))
    split_norm_rope_cache(**kw)
    split_norm_rope_cache(**kw)
    assert seen == [1, 1]
    monkeypatch.delenv("TRITON_INTERPRET")
    kc, vc = kw["key_cache"].clone(), kw["value_cache"].clone()
    want = api.run(api.prepare(**dict(kw, key_cache=kc, value_cache=vc)))  # the reference
    got = split_norm_rope_cache(**kw)
    assert seen == [1, 1], "a remembered CPU call launched Triton without TRITON_INTERPRET"
    assert torch.equal(got.q, want.q)
    assert torch.equal(kw["key_cache"], kc)


def _rerun_validated(kw):
    """``run(prepare(...))`` on copies of the caches: the validated path, for comparison."""
    kc, vc = kw["key_cache"].clone(), kw["value_cache"].clone()
    out = api.run(api.prepare(**dict(kw, key_cache=kc, value_cache=vc)))
    return out, kc, vc


@pytest.mark.parametrize("form,over", [
    ("vllm", dict(is_neox=False)), ("vllm", dict(eps=1e-5)),
    ("vllm", dict(weight_offset=1.0)), ("vllm", dict(rotary_dim=32)),
    ("vllm", dict(slot_mode="index")), ("vllm", dict(return_q=False, return_k=True)),
    ("vllm", dict(apply_norm=False)), ("fp8", dict(gate="blocked")),
    ("fp8", dict(kv_cache_dtype="fp8_e5m2")), ("fp8", dict(return_gate=False)),
], ids=lambda x: x if isinstance(x, str) else "-".join(f"{k}={v}" for k, v in x.items()))
def test_a_changed_valid_value_is_not_a_known_call(form, over):
    """Each value counts: a call that differs from a remembered one in one valid value does
    what the validated path does with it, not what the remembered call did."""
    kw = dict(_fixed("cpu", form, 0), **_step("cpu", form, 1))
    split_norm_rope_cache(**kw)
    split_norm_rope_cache(**kw)  # remembered
    kw2 = dict(kw, **over)
    want, kc, vc = _rerun_validated(kw2)
    got = split_norm_rope_cache(**kw2)
    for name, a, b in zip("qkvg", got, want):
        assert torch.equal(a, b), f"{name} differs from the validated path with {over}"
    assert torch.equal(kw2["key_cache"], kc) and torch.equal(kw2["value_cache"], vc)
    assert len(api._KNOWN) == 2


def test_known_calls_follow_the_launch_settings(monkeypatch):
    """Benchmarks change the tile, offset and register settings between calls with the same
    arguments: a remembered call (and FusedQKVLayer's plans) must launch with the new ones."""
    from kernels import FusedQKVLayer, triton_kernel

    from .kernel_check import record_launches
    seen = record_launches(monkeypatch, lambda c, pdl, regs: (c["BLOCK_T"], c["IDX64"]))
    kw = dict(_fixed("cpu", "vllm", 0), **_step("cpu", "vllm", 1))
    step = {n: kw.pop(n) for n in ("qkv", "positions", "slot_mapping")}
    layer = FusedQKVLayer(**kw)
    for _ in range(2):
        split_norm_rope_cache(**kw, **step)
        layer(*step.values())
    assert seen == [(1, False)] * 4, seen
    monkeypatch.setattr(triton_kernel, "_BLOCK_OVERRIDE", (4, 2, 4))
    monkeypatch.setattr(triton_kernel, "_INDEX32", False)
    split_norm_rope_cache(**kw, **step)
    layer(*step.values())
    assert seen[4:] == [(4, True)] * 2, seen


def test_kept_plans_hand_the_launcher_one_memo_each(monkeypatch):
    """A remembered call and FusedQKVLayer pass the launcher the memo of their kept plan,
    the same list at every call of that plan, so that on the GPU a repeat reads only the
    tensors' pointers; the validated path, whose plan is new every call, passes none."""
    from kernels import FusedQKVLayer, triton_kernel
    memos = []

    def spy():
        return lambda grid, args, consts, warps, pdl=False, regs=None, memo=None: \
            memos.append(memo)
    monkeypatch.setattr(triton_kernel, "_FAST_LAUNCH", True)
    monkeypatch.setattr(triton_kernel, "_cached_launcher", spy)
    kw = dict(_fixed("cpu", "vllm", 0), **_step("cpu", "vllm", 1))
    step = {n: kw.pop(n) for n in ("qkv", "positions", "slot_mapping")}
    split_norm_rope_cache(**kw, **step)
    split_norm_rope_cache(**kw, **step)
    assert memos[0] == [] and memos[1] is memos[0]
    api.run(api.prepare(**kw, **step))
    assert memos[2] is None
    layer = FusedQKVLayer(**kw)
    qkv, pos, slots = step.values()
    for _ in range(3):
        layer(qkv, pos, slots)
    assert memos[3] is None and memos[4] == [] and memos[5] is memos[4]
    assert memos[4] is not memos[0]
    layer(qkv[:2], pos[:2], slots)  # another T: another plan
    layer(qkv[:2], pos[:2], slots)
    assert memos[6] == [] and memos[7] is memos[6] and memos[6] is not memos[4]


def test_tracing_never_takes_a_known_call():
    """Under tracing the entry point must put the registered op in the graph, even for a
    signature it remembers."""
    from torch.fx.experimental.proxy_tensor import make_fx
    kw = dict(_fixed("cpu", "vllm", 0), **_step("cpu", "vllm", 1))
    names = [n for n, v in kw.items() if isinstance(v, torch.Tensor)]
    split_norm_rope_cache(**kw)
    assert len(api._KNOWN) == 1

    def f(*tensors):
        return split_norm_rope_cache(**dict(kw, **dict(zip(names, tensors)))).q

    gm = make_fx(f)(*(kw[n] for n in names))
    assert "fused_qkv.split_norm_rope_cache" in gm.code, gm.code
