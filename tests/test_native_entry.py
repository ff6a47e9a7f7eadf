"""The entry point's remembered calls in C++ (kernels/native_entry.cpp).

On the CPU the module is built and its entries run dry: everything but the launch (the key,
the pointers, the outputs, the version counters), and the kernel parameters it would pass are
compared with those the Python path builds for the same call.  On the GPU the entry point's
calls go through it and are checked against the reference.
"""
import gc
import weakref

import pytest
import torch

from kernels import api, native_entry, split_norm_rope_cache
from kernels.native_entry import _bits, dry_signature

from .kernel_check import check_run
from .test_known_calls import _fixed, _launch_args, _step

FORMS = ["vllm", "fp8", "hf"]


@pytest.fixture(scope="module")
def native():
    mod = native_entry.start(wait=True)
    assert mod is not None, f"the C++ module did not build: {native_entry.why_not}"
    return mod


@pytest.fixture(autouse=True)
def _clear(native):
    native.clear()
    yield
    native.clear()


def _expected_params(known, qkv, kw, outs):
    """The parameters the Python path would launch with for this call and these outputs."""
    views = known.views(qkv, kw)
    vals, types = dry_signature(known, known.bound.args_for(*views[:5], tuple(outs), views[5]))
    return [_bits(t, v) for t, v in zip(types, vals) if t != "constexpr"]


def _split(kw):
    kw = dict(kw)
    return kw.pop("qkv", None), kw


def _dry_entry(native, form, state=("dry",)):
    """Remember a CPU call, then describe it to the module as a dry entry."""
    kw = dict(_fixed("cpu", form, 0), **_step("cpu", form, 1))
    out = split_norm_rope_cache(**kw)
    (known,) = api._KNOWN.values()
    qkv, rest = _split(kw)
    views = known.views(qkv, rest)
    vals, types = dry_signature(known, known.bound.args_for(*views[:5], tuple(out), views[5]))
    why = native_entry.register(native, known, qkv, rest, out, state, vals=vals, types=types)
    assert why == "", why
    return known, kw, out


@pytest.mark.parametrize("form", FORMS)
def test_a_dry_entry_passes_what_the_python_path_passes(native, form):
    known, first, first_out = _dry_entry(native, form)
    # other weights, tables, caches and step tensors of the same geometry
    kw = dict(_fixed("cpu", form, 2), **_step("cpu", form, 3))
    qkv, rest = _split(kw)
    versions = rest["key_cache"]._version, rest["value_cache"]._version
    dry = native.stats()["dry"]
    got = native.call(qkv, rest, ("dry",))
    assert got is not None, "a call of the remembered signature missed"
    assert type(got) is api.FusedQKV and native.stats()["dry"] == dry + 1
    for name, g, w in zip("qkvg", got, first_out):
        assert (g.shape, g.dtype, g.device) == (w.shape, w.dtype, w.device), name
        if w.numel():
            assert g.data_ptr() != w.data_ptr(), f"{name}: not a new output"
    assert native.dry_params() == _expected_params(known, qkv, rest, got)
    assert (rest["key_cache"]._version, rest["value_cache"]._version) == \
        (versions[0] + 1, versions[1] + 1), "autograd must see both caches written"


def test_outputs_not_asked_for_are_the_shared_empty_tensor(native):
    _, kw, out = _dry_entry(native, "vllm")  # return_k=False, return_v=False
    qkv, rest = _split(kw)
    got = native.call(qkv, rest, ("dry",))
    assert got.k is out.k and got.v is out.v and got.gate is out.gate
    assert got.k.numel() == 0 and got.q.shape == out.q.shape


class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("change", [
    "other_t", "qkv_dtype", "eps", "eps_sign", "int_for_bool", "state", "subclass",
    "unknown_name", "misaligned", "cache_stride", "missing_arg", "string_value"])
def test_what_differs_from_the_entry_misses(native, change):
    """Anything the validated call did not have takes the Python path (None), and a miss
    writes nothing."""
    _, kw, _ = _dry_entry(native, "vllm")
    qkv, rest = _split(kw)
    state = ("dry",)
    assert native.call(qkv, rest, state) is not None
    if change == "other_t":
        qkv, rest["positions"] = qkv[:4], rest["positions"][:4]
    elif change == "qkv_dtype":
        qkv = qkv.half()
    elif change == "eps":
        rest["eps"] = 1e-5
    elif change == "eps_sign":
        rest["eps"] = -0.0 if rest["eps"] == 0.0 else -rest["eps"]
    elif change == "int_for_bool":
        rest["return_k"] = 0
    elif change == "state":
        state = ("another",)
    elif change == "subclass":
        qkv = qkv.as_subclass(_Sub)
    elif change == "unknown_name":
        rest["bogus"] = 1
    elif change == "misaligned":  # same shape and strides, 2 bytes off the 16-byte grid
        buf = torch.randn(qkv.numel() + 1).to(qkv.dtype)
        qkv = buf[1:].view(qkv.shape)
    elif change == "cache_stride":
        rest["key_cache"] = torch.randn(6, 4, 2, 128).to(torch.bfloat16)[..., :64]
    elif change == "missing_arg":
        del rest["k_weight"]
    elif change == "string_value":
        rest["cache_layout"] = "NHD "
    kc = rest["key_cache"].clone()
    version = rest["key_cache"]._version
    assert native.call(qkv, rest, state) is None, f"{change}: should miss"
    assert torch.equal(rest["key_cache"], kc) and rest["key_cache"]._version == version


def test_an_equal_string_that_is_not_interned_still_hits(native):
    _, kw, _ = _dry_entry(native, "fp8")  # cache_layout="HND", kv_cache_dtype="fp8_e4m3"
    qkv, rest = _split(kw)
    built = "".join(["H", "N", "D"])  # an equal str object made at run time
    names = {"".join(list(n)): v for n, v in rest.items()}  # keyword names made at run time
    names["cache_layout"] = built
    assert native.call(qkv, names, ("dry",)) is not None


def test_entries_keep_no_tensors_alive(native):
    _, kw, _ = _dry_entry(native, "fp8")
    names = [n for n, v in kw.items() if isinstance(v, torch.Tensor)]
    refs = [weakref.ref(kw[n]) for n in names]
    del kw
    api.forget_calls()
    api._HALVES.clear()
    gc.collect()
    assert native.stats()["entries"] == 1 or native.stats()["entries"] == 0
    alive = [n for n, r in zip(names, refs) if r() is not None]
    assert not alive, f"kept alive by the module: {alive}"


def test_forget_calls_clears_the_module(native):
    _dry_entry(native, "vllm")
    assert native.stats()["entries"] == 1
    api.forget_calls()
    assert native.stats()["entries"] == 0


def test_a_description_that_does_not_fit_is_refused(native, monkeypatch):
    """register() runs its description dry on the call it is built from and compares the
    parameters with the launch's; a wrong one (here a pointer's offset) is refused, and the
    module keeps nothing."""
    real = native_entry.describe

    def off_by_16(*a):
        spec = real(*a)
        spec[1][2] += 16  # the first pointer's byte offset
        return spec
    monkeypatch.setattr(native_entry, "describe", off_by_16)
    kw = dict(_fixed("cpu", "vllm", 0), **_step("cpu", "vllm", 1))
    out = split_norm_rope_cache(**kw)
    (known,) = api._KNOWN.values()
    qkv, rest = _split(kw)
    views = known.views(qkv, rest)
    vals, types = dry_signature(known, known.bound.args_for(*views[:5], tuple(out), views[5]))
    why = native_entry.register(native, known, qkv, rest, out, ("dry",), vals=vals, types=types)
    assert "differ" in why, why
    assert native.stats()["entries"] == 0


def test_the_state_follows_the_launch_settings(monkeypatch):
    from kernels import triton_kernel as tk
    monkeypatch.setattr(tk, "_launcher", None)
    assert native_entry.state() is None  # no launcher yet (and on the CPU: the interpreter)


# ---------------------------------------------------------------- GPU: the real launches


@pytest.mark.gpu
@pytest.mark.parametrize("form", FORMS)
def test_entry_point_calls_go_through_the_module(native, form):
    first = dict(_fixed("cuda", form, 0), **_step("cuda", form, 1))
    split_norm_rope_cache(**first)  # validated, remembered, handed to the module
    assert native.stats()["entries"] == 1, native_entry.why_not
    before = [first["key_cache"].clone(), first["value_cache"].clone()]
    for seed in (2, 4):  # fresh tensors of the same geometry, twice
        kw = dict(_fixed("cuda", form, seed), **_step("cuda", form, seed + 1))
        full = _launch_args(kw)
        hits = native.stats()["hits"]
        versions = kw["key_cache"]._version, kw["value_cache"]._version
        check_run(full, lambda: split_norm_rope_cache(**kw))
        assert native.stats()["hits"] == hits + 1, "the call did not go through the module"
        assert kw["key_cache"]._version > versions[0] and \
            kw["value_cache"]._version > versions[1]
    assert torch.equal(first["key_cache"], before[0]), "wrote into the first call's cache"
    assert torch.equal(first["value_cache"], before[1]), "wrote into the first call's cache"


@pytest.mark.gpu
def test_a_misaligned_call_takes_the_python_path_and_is_right(native):
    first = dict(_fixed("cuda", "vllm", 0), **_step("cuda", "vllm", 1))
    split_norm_rope_cache(**first)
    kw = dict(_fixed("cuda", "vllm", 2), **_step("cuda", "vllm", 3))
    buf = torch.randn(kw["qkv"].numel() + 1, device="cuda").to(torch.bfloat16)
    kw["qkv"] = buf[1:].view(kw["qkv"].shape).copy_(kw["qkv"])
    hits = native.stats()["hits"]
    check_run(_launch_args(kw), lambda: split_norm_rope_cache(**kw))
    assert native.stats()["hits"] == hits


@pytest.mark.gpu
def test_a_launch_hook_sends_calls_back_to_python(native):
    """A profiler's launch hook must see every launch: the module steps aside."""
    from triton import knobs
    first = dict(_fixed("cuda", "vllm", 0), **_step("cuda", "vllm", 1))
    split_norm_rope_cache(**first)
    seen = []
    knobs.runtime.launch_enter_hook.add(lambda meta: seen.append(1))
    try:
        hits = native.stats()["hits"]
        split_norm_rope_cache(**first)
        assert native.stats()["hits"] == hits and seen == [1]
    finally:
        knobs.runtime.launch_enter_hook.calls.clear()


def test_a_call_remembered_under_a_hook_is_handed_over_later(native, monkeypatch):
    """While the launch state forbids the module (a profiler hook, say), a remembered call
    stays in Python and is offered again at its next call, not given up."""
    kw = dict(_fixed("cpu", "vllm", 0), **_step("cpu", "vllm", 1))
    out = split_norm_rope_cache(**kw)
    (known,) = api._KNOWN.values()
    qkv, rest = _split(kw)
    monkeypatch.setattr(native_entry, "state", lambda: None)
    native_entry.remember(known, qkv, rest, out)
    assert not known.native_tried and "state" in native_entry.why_not
    monkeypatch.setattr(native_entry, "state", lambda: ("dry",))
    native_entry.remember(known, qkv, rest, out)  # on the CPU: no kept launch to describe
    assert known.native_tried and native_entry.why_not == "no kept launch"


@pytest.mark.gpu
def test_layer_calls_go_through_the_module(native):
    """FusedQKVLayer hands each step geometry to the module through the entry point once;
    its later calls are the module's, and a weight changed in place (``module.to()``) sends
    the call back to the validated path."""
    from kernels import FusedQKVLayer
    kw = _fixed("cuda", "vllm", 0)
    kw["q_weight"] = kw["q_weight"].float()
    layer = FusedQKVLayer(**kw)
    for seed in (1, 3, 5):
        step = _step("cuda", "vllm", seed)
        hits = native.stats()["hits"]
        ref = dict(kw, **step, key_cache=kw["key_cache"].clone(),
                   value_cache=kw["value_cache"].clone())
        got = layer(*step.values())
        want = api.run(api.prepare(**ref))
        assert native.stats()["hits"] == hits + (seed > 1), native_entry.why_not
        assert torch.equal(got.q, want.q)
        assert torch.equal(kw["key_cache"], ref["key_cache"])
        assert torch.equal(kw["value_cache"], ref["value_cache"])
    w = kw["q_weight"]
    w.data = (w.data * 1.5).to(torch.bfloat16)  # same tensor object, new dtype and data
    step = _step("cuda", "vllm", 7)
    ref = dict(kw, **step, key_cache=kw["key_cache"].clone(),
               value_cache=kw["value_cache"].clone())
    hits = native.stats()["hits"]
    got = layer(*step.values())
    want = api.run(api.prepare(**ref))
    assert native.stats()["hits"] == hits, "the old entry took a call with a bf16 weight"
    assert torch.equal(got.q, want.q) and torch.equal(kw["key_cache"], ref["key_cache"])
