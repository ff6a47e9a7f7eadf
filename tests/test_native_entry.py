"""The entry point's remembered calls in C++ (kernels/native_entry.cpp).

On the CPU the module is built and its entries run dry: everything but the launch (the key,
the pointers, the outputs, the version counters), and the kernel parameters it would pass are
compared with those the Python path builds for the same call.  On the GPU the entry point's
calls go through it and are checked against the reference.
"""
import gc
import os
import weakref
from pathlib import Path

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
    why = native_entry.register(native, known, qkv, rest, out, state, dry=True)
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
    answer = native.call(qkv, rest, ("dry",))
    assert answer is not None, "a call of the remembered signature missed"
    got, params = answer
    assert type(got) is api.FusedQKV and native.stats()["dry"] == dry + 1
    for name, g, w in zip("qkvg", got, first_out):
        assert (g.shape, g.dtype, g.device) == (w.shape, w.dtype, w.device), name
        if w.numel():
            assert g.data_ptr() != w.data_ptr(), f"{name}: not a new output"
    assert params == _expected_params(known, qkv, rest, got)
    assert (rest["key_cache"]._version, rest["value_cache"]._version) == \
        (versions[0] + 1, versions[1] + 1), "autograd must see both caches written"


def test_outputs_not_asked_for_are_the_shared_empty_tensor(native):
    _, kw, out = _dry_entry(native, "vllm")  # return_k=False, return_v=False
    qkv, rest = _split(kw)
    got, _ = native.call(qkv, rest, ("dry",))
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
    api._KNOWN.clear()  # the Python path's memory; the module keeps its entry
    api._HALVES.clear()
    gc.collect()
    assert native.stats()["entries"] == 1
    alive = [n for n, r in zip(names, refs) if r() is not None]
    assert not alive, f"kept alive by the module's entry: {alive}"


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
    why = native_entry.register(native, known, qkv, rest, out, ("dry",), dry=True)
    assert "differ" in why, why
    assert native.stats()["entries"] == 0


def test_the_state_follows_the_launch_settings(monkeypatch):
    """The state an entry must match changes with the launch settings and the compile
    options, and is None while a launch hook listens, a kernel global changed, the launcher
    is swapped or off: the module then steps aside."""
    from types import SimpleNamespace

    from kernels import triton_kernel as tk
    kernel = SimpleNamespace(pre_run_hooks=[], used_global_vals={})
    hooks, options = [[], []], ["opt"]
    launcher = SimpleNamespace(fn=kernel, why_slow="", _hooks=lambda k: hooks,
                               _options=lambda k: tuple(options))
    monkeypatch.setattr(tk, "fused_qkv_kernel", kernel)
    monkeypatch.setattr(tk, "_launcher", launcher)
    monkeypatch.setattr(tk, "_FAST_LAUNCH", True)
    monkeypatch.setattr(tk, "_LAUNCH_MEMO", True)
    first = native_entry.state()
    assert first is not None and first == native_entry.state()
    monkeypatch.setattr(tk, "_BLOCK_OVERRIDE", (2, 8, 4))
    assert native_entry.state() not in (None, first)
    monkeypatch.setattr(tk, "_BLOCK_OVERRIDE", None)
    options[0] = "another"
    assert native_entry.state() not in (None, first)
    options[0] = "opt"
    assert native_entry.state() == first
    hooks[0].append(print)  # a profiler's launch hook
    assert native_entry.state() is None
    hooks[0].clear()
    g = {"X": 1}
    kernel.used_global_vals = {("X", 0): (1, g)}
    assert native_entry.state() == first
    g["X"] = 2  # a global the kernel read changed: Triton raises on the next launch
    assert native_entry.state() is None
    kernel.used_global_vals = {}
    monkeypatch.setattr(tk, "_LAUNCH_MEMO", False)
    assert native_entry.state() is None
    monkeypatch.setattr(tk, "_LAUNCH_MEMO", True)
    monkeypatch.setattr(tk, "_cached_launcher", lambda: launcher)  # a test's spy
    assert native_entry.state() is None


def test_an_error_while_registering_leaves_no_entry(native):
    """The dry check runs under a state of its own and is undone on any error: a real call
    never meets a dry or half-made entry."""
    from types import SimpleNamespace
    kw = dict(_fixed("cpu", "vllm", 0), **_step("cpu", "vllm", 1))
    out = split_norm_rope_cache(**kw)
    (known,) = api._KNOWN.values()
    qkv, rest = _split(kw)
    seen = []

    def failing_call(*a):
        seen.append(native.stats()["entries"])
        raise MemoryError("out of memory in the dry call")
    mod = SimpleNamespace(register=native.register, forget=native.forget, call=failing_call)
    with pytest.raises(MemoryError):
        native_entry.register(mod, known, qkv, rest, out, ("dry",), dry=True)
    assert seen == [1] and native.stats()["entries"] == 0


def test_remember_keeps_its_errors(native, monkeypatch):
    """remember() runs after the call launched: an error in it must not reach the caller."""
    kw = dict(_fixed("cpu", "vllm", 0), **_step("cpu", "vllm", 1))
    out = split_norm_rope_cache(**kw)
    (known,) = api._KNOWN.values()
    qkv, rest = _split(kw)
    monkeypatch.setattr(native_entry, "state", lambda: ("dry",))

    def boom(*a, **k):
        raise OverflowError("a parameter out of range")
    monkeypatch.setattr(native_entry, "register", boom)
    native_entry.remember(known, qkv, rest, out)
    assert "OverflowError" in native_entry.why_not and known.native_refused == ("dry",)


def test_an_fp32_parameter_out_of_range_is_infinity():
    """Triton's launcher casts a Python float to float32 in C: 1e39 becomes inf."""
    assert _bits("fp32", 1e39) == 0x7F800000 and _bits("fp32", -1e39) == 0xFF800000
    assert _bits("fp32", 1.0) == 0x3F800000 and _bits("i32", -1) == (1 << 64) - 1
    assert _bits("fp32", 3.4028235e38) == 0x7F7FFFFF  # rounds down to the largest float32


def test_a_process_with_entries_exits_cleanly(native):
    """Entries hold Python objects (their launch state, the shared empty output): the module
    must let go of them while Python still runs, not in a static destructor after it."""
    import subprocess
    import sys
    root = str(Path(__file__).resolve().parents[1])
    script = ("from kernels import native_entry\n"
              "from tests.test_native_entry import _dry_entry\n"
              "_dry_entry(native_entry.start(wait=True), 'vllm', state=(object(),))\n"
              "print('done')\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "done" in done.stdout, done.stderr[-2000:]


def test_the_build_does_not_block_callers(monkeypatch):
    """While the module builds in the background, calls go on in Python without waiting."""
    import threading
    import time
    release = threading.Event()
    real = native_entry.native_build.load

    def slow_load():
        release.wait(30)
        return real()
    monkeypatch.setattr(native_entry.native_build, "load", slow_load)
    monkeypatch.setattr(native_entry, "_started", False)
    monkeypatch.setattr(native_entry, "module", None)
    t0 = time.perf_counter()
    assert native_entry.start() is None
    assert native_entry.start() is None  # a second caller, the build still running
    assert time.perf_counter() - t0 < 1.0
    release.set()
    assert native_entry.start(wait=True) is not None


def test_inference_tensors_are_written_without_a_version(native):
    """Tensors made under inference_mode have no version counter: as
    torch.autograd.graph.increment_version, the module leaves them be."""
    with torch.inference_mode():
        known, kw, _ = _dry_entry(native, "vllm")
    qkv, rest = _split(kw)
    assert rest["key_cache"].is_inference()
    assert native.call(qkv, rest, ("dry",)) is not None  # outside inference_mode: no bump


# ---------------------------------------------------------------- GPU: the real launches


@pytest.mark.gpu
@pytest.mark.parametrize("form", FORMS)
def test_entry_point_calls_go_through_the_module(native, form):
    first = dict(_fixed("cuda", form, 0), **_step("cuda", form, 1))
    split_norm_rope_cache(**first)  # validated and remembered; a first call stays in Python
    assert native.stats()["entries"] == 0
    split_norm_rope_cache(**first)  # its second call hands it to the module
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
    split_norm_rope_cache(**first)  # held from its second call
    assert native.stats()["entries"] == 1, native_entry.why_not
    kw = dict(_fixed("cuda", "vllm", 2), **_step("cuda", "vllm", 3))
    buf = torch.randn(kw["qkv"].numel() + 1, device="cuda").to(torch.bfloat16)
    kw["qkv"] = buf[1:].view(kw["qkv"].shape).copy_(kw["qkv"])
    hits = native.stats()["hits"]
    check_run(_launch_args(kw), lambda: split_norm_rope_cache(**kw))
    assert native.stats()["hits"] == hits


@pytest.mark.gpu
def test_a_cuda_graph_captures_the_module_launch_on_a_side_stream(native):
    """The module launches on torch's current stream: a call captured on a side stream into
    a CUDA graph replays with the data later copied into the same inputs."""
    kw = dict(_fixed("cuda", "vllm", 0), **_step("cuda", "vllm", 1))
    split_norm_rope_cache(**kw)  # remembered
    split_norm_rope_cache(**kw)  # handed to the module
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        hits = native.stats()["hits"]
        split_norm_rope_cache(**kw)  # warm-up on the side stream
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            out = split_norm_rope_cache(**kw)
        assert native.stats()["hits"] == hits + 2, "capture did not go through the module"
    torch.cuda.current_stream().wait_stream(side)
    new = dict(_fixed("cuda", "vllm", 2), **_step("cuda", "vllm", 3))
    for name in ("qkv", "positions", "slot_mapping", "q_weight", "k_weight", "cos_sin_cache",
                 "key_cache", "value_cache"):
        kw[name].copy_(new[name])
    full = _launch_args(kw)
    check_run(full, lambda: (graph.replay(), out)[1])


@pytest.mark.gpu
def test_a_launch_hook_sends_calls_back_to_python(native):
    """A profiler's launch hook must see every launch: the module steps aside."""
    from triton import knobs
    first = dict(_fixed("cuda", "vllm", 0), **_step("cuda", "vllm", 1))
    split_norm_rope_cache(**first)
    split_norm_rope_cache(**first)  # held from its second call
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
    stays in Python and is offered again at its next call, not given up.  A refusal for the
    signature holds for one launch state; one for this call only (its pointers do not fit
    the kept launch) does not."""
    kw = dict(_fixed("cpu", "vllm", 0), **_step("cpu", "vllm", 1))
    out = split_norm_rope_cache(**kw)
    (known,) = api._KNOWN.values()
    qkv, rest = _split(kw)
    answers = []
    monkeypatch.setattr(native_entry, "register", lambda *a, **k: answers.pop(0))
    monkeypatch.setattr(native_entry, "state", lambda: None)
    native_entry.remember(known, qkv, rest, out)
    assert known.native_refused is None and "state" in native_entry.why_not
    monkeypatch.setattr(native_entry, "state", lambda: ("dry",))
    answers.append("the kept launch does not fit this call")
    native_entry.remember(known, qkv, rest, out)
    assert known.native_refused is None and "fit" in native_entry.why_not
    answers.append("a kernel of clusters")
    native_entry.remember(known, qkv, rest, out)
    assert known.native_refused == ("dry",) and native_entry.why_not == "a kernel of clusters"
    native_entry.remember(known, qkv, rest, out)  # refused under this state: not again
    assert answers == []
    monkeypatch.setattr(native_entry, "state", lambda: ("another",))  # e.g. a new launcher
    answers.append("")
    native_entry.remember(known, qkv, rest, out)
    assert answers == [] and native_entry.why_not == ""


class _AsIfCuda(api._KnownCall):
    """A remembered call offered to the module as a CUDA call would be (CPU calls never are)."""

    __slots__ = ()

    def __init__(self, *args):
        super().__init__(*args)
        self.on_cpu = False


def _record_offers(monkeypatch, module):
    offered = []
    monkeypatch.setattr(api, "_KnownCall", _AsIfCuda)
    monkeypatch.setattr(native_entry, "module", module)
    monkeypatch.setattr(native_entry, "state", lambda: None)  # no C++ call first
    monkeypatch.setattr(native_entry, "remember", lambda known, *a: offered.append(known))
    return offered


def test_a_signature_is_offered_to_the_module_from_its_second_call(native, monkeypatch):
    """Describing a launch to the module costs ~0.2 ms, more than a signature that never
    repeats (an eager prefill with a new T every step) would save: its first call stays in
    Python, its second is offered.  Without a module yet, the first call starts the build."""
    offered = _record_offers(monkeypatch, native)
    kw = dict(_fixed("cpu", "vllm", 0), **_step("cpu", "vllm", 1))
    out = split_norm_rope_cache(**kw)
    assert offered == []
    check_run(_launch_args(kw), lambda: split_norm_rope_cache(**kw))
    (known,) = api._KNOWN.values()
    assert offered == [known]
    assert out.q.shape[0] == 5
    monkeypatch.setattr(native_entry, "module", None)
    new = dict(_fixed("cpu", "vllm", 2), **_step("cpu", "vllm", 3))
    new["qkv"], new["positions"] = new["qkv"][:3], new["positions"][:3]  # another T
    split_norm_rope_cache(**new)
    assert len(offered) == 2 and offered[1] is not known  # remember() starts the build
    assert len(api._KNOWN) == 2


def test_a_signature_is_offered_at_its_second_call_after_python_forgot_it(native, monkeypatch):
    """A cycle through more signatures than the entry point remembers (``_KNOWN_MAX``)
    evicts each remembered call before its next call: that call validates again, and it is
    still the signature's second call, offered (a helper's review: otherwise such a cycle
    never reached the module).  So is a call re-validated because the settings changed."""
    offered = _record_offers(monkeypatch, native)
    monkeypatch.setattr(_AsIfCuda, "__call__", lambda self, qkv, kw: None)  # no launches
    kw = dict(_fixed("cpu", "vllm", 0), **_step("cpu", "vllm", 1))
    n = api._KNOWN_MAX + 6
    for round_ in range(2):
        for i in range(n):
            split_norm_rope_cache(**dict(kw, eps=1e-6 * (i + 1)))  # n signatures
        assert len(offered) == n * round_
    assert len(api._KNOWN) == api._KNOWN_MAX
    split_norm_rope_cache(**dict(kw, eps=1.0))
    (known,) = [k for k in api._KNOWN.values() if k not in offered]
    monkeypatch.setattr(known.bound, "stale", lambda: True)  # e.g. a tile override
    split_norm_rope_cache(**dict(kw, eps=1.0))
    assert len(offered) == n + 1 and offered[-1] is not known


def test_the_layer_offers_a_step_geometry_at_its_second_call(native, monkeypatch):
    """FusedQKVLayer: a step geometry the module does not hold runs the layer's own path at
    its first call and goes through the entry point, offered at once, at its second."""
    from kernels import FusedQKVLayer

    class Misses:  # a module that holds nothing
        def call(self, *a):
            return None

        def holds(self, *a):
            return False

    offered = _record_offers(monkeypatch, Misses())
    monkeypatch.setattr(native_entry, "state", lambda: ("dry",))
    kw = _fixed("cpu", "vllm", 0)
    layer = FusedQKVLayer(**kw)
    for seed, want in ((1, 0), (3, 1), (5, 1), (7, 1), (9, 2)):
        step = _step("cpu", "vllm", seed)
        ref = dict(kw, **step, key_cache=kw["key_cache"].clone(),
                   value_cache=kw["value_cache"].clone())
        got = layer(*step.values())
        expect = api.run(api.prepare(**ref))
        assert torch.equal(got.q, expect.q) and torch.equal(kw["key_cache"], ref["key_cache"])
        # 3: the second call, offered; 5: refused (not held), the layer's own path; under a
        # new state (a new launcher, say) 7 is a first call again and 9 is offered
        assert len(offered) == want, seed
        if seed == 5:
            monkeypatch.setattr(native_entry, "state", lambda: ("another",))


def test_a_call_the_module_holds_is_not_described_again(native, monkeypatch):
    """A held call that reached Python missed for a reason of its own (a misaligned pointer):
    no new description; once the module dropped it (evicted), the next call hands it over."""
    known, kw, out = _dry_entry(native, "vllm", state=("dry",))
    qkv, rest = _split(kw)
    described = []
    monkeypatch.setattr(native_entry, "state", lambda: ("dry",))
    monkeypatch.setattr(native_entry, "register", lambda *a, **k: described.append(1) or "")
    native_entry.remember(known, qkv, rest, out)
    assert described == []
    native.forget(qkv, rest)
    native_entry.remember(known, qkv, rest, out)
    assert described == [1]


@pytest.mark.gpu
def test_layer_calls_go_through_the_module(native):
    """FusedQKVLayer hands each step geometry to the module through the entry point at its
    second call; its later calls are the module's, and a weight changed in place
    (``module.to()``) sends the call back to the validated path."""
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
        assert native.stats()["hits"] == hits + (seed > 3), native_entry.why_not
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
