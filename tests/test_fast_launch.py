"""kernels/fast_launch.py on the CPU: the interpreter fallback, the cache key, the hit path.

The hit path needs a compiled kernel, so here it runs against a stub JITFunction whose
``run`` returns a fake CompiledKernel that records the low-level launch; the real launch is
checked on the GPU by ``benchmarks/profile_launch.py``.
"""
import math

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

import kernels
from kernels import fast_launch, triton_kernel
from kernels.fast_launch import CachedLauncher, _make_spec

HQ, HKV, D, T = 4, 2, 64, 3


def _inputs(device="cpu"):
    g = torch.Generator().manual_seed(3)
    ang = torch.rand(16, D // 2, generator=g) * 2 * math.pi
    return dict(
        qkv=torch.randn(T, (HQ + 2 * HKV) * D, generator=g).to(device, torch.bfloat16),
        num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
        q_weight=torch.randn(D, generator=g).to(device),
        k_weight=torch.randn(D, generator=g).to(device),
        positions=torch.randint(0, 16, (T,), generator=g).to(device),
        cos_sin_cache=torch.cat([ang.cos(), ang.sin()], -1).to(device),
        key_cache=torch.randn(2, 4, HKV, D, generator=g).to(device, torch.bfloat16),
        value_cache=torch.randn(2, 4, HKV, D, generator=g).to(device, torch.bfloat16),
        slot_mapping=torch.tensor([5, 0, 7]).to(device),
    )


class _Capture:
    """Stands in for fused_qkv_kernel: records what launch() passes, launches nothing."""

    def __init__(self):
        self.calls = []
        self.fn = triton_kernel.fused_qkv_kernel.fn  # its signature: the constexpr names

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((grid, args, kw))


def _bits(t):  # compare bit patterns: unwritten outputs may hold NaN
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(as_int[t.element_size()])


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter path: CPU only")
def test_interpreter_fallback_matches_normal_launch(monkeypatch):
    assert not isinstance(triton_kernel.fused_qkv_kernel, JITFunction)  # TRITON_INTERPRET=1
    cap = _Capture()
    monkeypatch.setattr(triton_kernel, "fused_qkv_kernel", cap)
    kernels.split_norm_rope_cache(**_inputs())
    monkeypatch.undo()
    (grid, args, kw), = cap.calls
    kw = dict(kw)
    num_warps = kw.pop("num_warps")
    kern = triton_kernel.fused_qkv_kernel
    launcher = CachedLauncher(kern)
    assert launcher.why_slow and set(launcher._cnames) == set(kw)

    def fresh():  # a copy of every storage, same views (strides, offsets, aliasing)
        copies = {}

        def copy(a):
            st = a.untyped_storage()
            new = copies.setdefault(st.data_ptr(), st.clone())
            return torch.empty(0, dtype=a.dtype).set_(new, a.storage_offset(), a.size(),
                                                      a.stride())
        return tuple(copy(a) if isinstance(a, torch.Tensor) else a for a in args)

    ref = fresh()
    kern[grid](*ref, **kw, num_warps=num_warps)
    for consts in (tuple(kw[n] for n in launcher._cnames), kw):  # tuple or dict
        got = fresh()
        launcher(grid, got, consts, num_warps)
        for r, g in zip(ref, got):
            if isinstance(r, torch.Tensor):
                assert torch.equal(_bits(r), _bits(g))
    assert (launcher.hits, launcher.misses) == (0, 2)


# ---- the key ---------------------------------------------------------------------------------

def _spec_for(*args, consts=(True, 4)):
    """A spec for params (runtime args..., C0: constexpr, C1: constexpr)."""
    layout = tuple(map(fast_launch._kind, args))
    return _make_spec([False] * len(args) + [True, True], layout)(*args, *consts)


def test_key_tensor_dtype_and_alignment():
    x = torch.zeros(64, dtype=torch.bfloat16)
    k = _spec_for(x)[0]
    assert _spec_for(x[8:])[0] == k                      # +16 bytes: still aligned
    assert _spec_for(torch.zeros(64, dtype=torch.bfloat16))[0] == k  # another buffer
    assert _spec_for(x[1:])[0] != k                      # +2 bytes: misaligned
    assert _spec_for(x[1:])[0] == _spec_for(x[9:])[0]
    assert _spec_for(x.view(torch.float16))[0] != k      # dtype
    assert _spec_for(x.float())[0] != k


def _triton_int_class(v):
    """Triton's specialisation of a Python int (python/src/specialize.cc, handle_long_type)."""
    if v == 1:
        return "constexpr"
    ty = "i32" if -2**31 <= v < 2**31 else "i64" if -2**63 <= v < 2**63 else "u64"
    return ty, v % 16 == 0


def test_key_int_specialisation():
    edges = [0, 1, -1, 2, 3, 15, 16, 17, 32, -16, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16,
             -2**31, -2**31 + 16, -2**31 - 16, -2**31 - 1, 2**63 - 16, 2**63 - 1, 2**63,
             2**63 + 16, -2**63, -2**63 + 16, 2**64 - 16, 2**64 - 1]
    keys = {v: _spec_for(v)[0] for v in edges}
    for a in edges:  # equal keys -> equal Triton specialisation
        for b in edges:
            if keys[a] == keys[b]:
                assert _triton_int_class(a) == _triton_int_class(b), (a, b)
    assert keys[2] != keys[1] != keys[17] and keys[16] != keys[3]
    assert keys[16] != keys[2**31 + 16] != keys[2**63 + 16]
    assert _spec_for(35)[0] == keys[3] and _spec_for(2**31 - 32)[0] == keys[16]  # bounded


def test_key_scalar_types_and_constexprs():
    assert _spec_for(1.0)[0] == _spec_for(3.5)[0]        # fp32: value not specialised
    assert _spec_for(1.0)[0] != _spec_for(True)[0]
    base = _spec_for(7)[0]
    assert _spec_for(7, consts=(False, 4))[0] != base
    assert _spec_for(7, consts=(1, 4))[0] != base        # True == 1, but Triton tells them apart
    assert _spec_for(7, consts=(True, 4.0))[0] != base
    assert _spec_for(7, consts=(True, 4))[0] == base


def test_launch_args_are_in_kernel_order_with_raw_pointers():
    x = torch.zeros(8)
    # kernel order: (x, C0, n, C1)
    spec = _make_spec([False, True, False, True], ("tensor", "int"))
    _, vals = spec(x, 5, "c0", "c1")
    assert vals == (x.data_ptr(), "c0", 5, "c1")


def test_aliased_tensors_are_checked_every_call():
    """Built when args 0 and 1 were one tensor (packed qkv); later calls may differ."""
    spec = _make_spec([False, False], ("tensor", "tensor"), {0: 0, 1: 0})
    x, z = torch.zeros(32), torch.zeros(32)
    k_same, vals = spec(x, x)
    assert vals == (x.data_ptr(), x.data_ptr())
    k_two, vals = spec(x, z)
    assert vals == (x.data_ptr(), z.data_ptr()) and k_two != k_same
    assert spec(x, torch.zeros(8))[0] == k_two
    assert spec(x, z[1:])[0] != k_two and spec(x, z.double())[0] != k_two


# ---- the hit path, against a stub CompiledKernel --------------------------------------------

def _stub_kernel(x, n, f, C0: tl.constexpr, C1: tl.constexpr):
    pass


class _FakeCompiled:
    function, packed_metadata = 1234, (4, 1, 0)

    def __init__(self):
        self.launches = []

    def run(self, *a):
        self.launches.append(a)


@pytest.fixture
def stub(monkeypatch):
    jf = JITFunction(_stub_kernel)
    compiled = _FakeCompiled()
    normal = []

    def run(*args, grid, warmup, **kw):
        normal.append((grid, args, kw))
        return compiled

    jf.run = run
    monkeypatch.setattr(fast_launch, "_device_and_stream", lambda: (lambda: 0, lambda dev: 77))
    return jf, compiled, normal


def test_hit_path_calls_the_launcher_like_jit_run(stub):
    jf, compiled, normal = stub
    launch = CachedLauncher(jf)
    assert launch.why_slow == ""
    x = torch.zeros(32)
    launch((2, 3), (x, 48, 0.5), (True, 8), 4)
    assert normal == [((2, 3), (x, 48, 0.5), dict(C0=True, C1=8, num_warps=4))]
    assert compiled.launches == []
    launch((5,), (x, 64, 1.5), {"C1": 8, "C0": True}, 4)  # same key: the low-level launcher
    assert len(normal) == 1 and (launch.hits, launch.misses) == (1, 1)
    assert compiled.launches == [(5, 1, 1, 77, 1234, (4, 1, 0), None, None, None,
                                  x.data_ptr(), 64, 1.5, True, 8)]
    for args, consts, warps in [((x[1:], 48, 0.5), (True, 8), 4),  # misaligned
                                ((x, 1, 0.5), (True, 8), 4),       # int == 1
                                ((x, 48, 0.5), (True, 9), 4),      # constexpr
                                ((x, 48, 0.5), (True, 8), 8)]:     # num_warps
        launch((1,), args, consts, warps)
        assert len(normal) == 1 + launch.misses - 1
    assert launch.misses == 5
    launch((1,), (x[1:], 48, 0.5), (True, 8), 4)  # now cached too
    assert launch.misses == 5


def test_register_budget_is_a_compile_option_and_joins_the_key(stub):
    jf, compiled, normal = stub
    launch = CachedLauncher(jf)
    x = torch.zeros(32)
    args, consts = (x, 48, 0.5), (True, 8)
    launch((1,), args, consts, 4)
    launch((1,), args, consts, 4, False, 64)  # another budget: another compile
    assert normal[0][2] == dict(C0=True, C1=8, num_warps=4)  # no budget: no option (HIP)
    assert normal[-1] == ((1,), args, dict(C0=True, C1=8, num_warps=4, maxnreg=64))
    assert (launch.hits, launch.misses) == (0, 2)
    launch((1,), args, consts, 4, False, 64)
    launch((1,), args, consts, 4)
    assert (launch.hits, launch.misses) == (2, 2) and len(compiled.launches) == 2


def test_normal_path_when_hooks_grid_or_types_say_so(stub):
    from triton import knobs

    jf, compiled, normal = stub
    launch = CachedLauncher(jf)
    x = torch.zeros(32)
    args, consts = (x, 48, 0.5), (True, 8)
    launch((1,), args, consts, 4)
    launch((1,), args, consts, 4)
    assert launch.hits == 1

    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        launch((1,), args, consts, 4)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    jf.add_pre_run_hook(lambda *a, **k: None)
    launch((1,), args, consts, 4)
    jf.pre_run_hooks.clear()
    launch(lambda meta: (1,), args, consts, 4)   # callable grid
    launch((1,), (x, 48, 2), consts, 4)          # an int where a float was
    launch((1,), (x, x, 0.5), consts, 4)         # a tensor where an int was: never cached
    launch((1,), (x, x, 0.5), consts, 4)
    assert launch.hits == 1 and launch.misses == 7
    launch((1,), args, consts, 4)
    assert launch.hits == 2 and len(launch._cache) == 1


def test_probe_refuses_an_unknown_launch_call():
    import inspect

    src = inspect.getsource(JITFunction.run)
    assert fast_launch._probe_run(src)[2] == ""
    changed = src.replace("*bound_args.values())", "*non_constexpr_vals)")
    assert "launches differently" in fast_launch._probe_run(changed)[2]
    extra = src.replace('kwargs["debug"]', 'x = knobs.runtime.new_thing\n        kwargs["debug"]')
    assert "knobs we do not handle" in fast_launch._probe_run(extra)[2]


# ---- the memo: a kept launch whose later calls only bring new tensors -----------------------

def test_memo_relaunches_with_new_pointers_only(stub):
    jf, compiled, normal = stub
    launch = CachedLauncher(jf)
    x, y = torch.zeros(32), torch.zeros(32)
    memo = []
    launch((2,), (x, 48, 0.5), (True, 8), 4, memo=memo)  # first call: normal path, fills it
    assert len(normal) == 1 and len(memo) == 1 and compiled.launches == []
    z = torch.zeros(64)
    launch((2,), (z, 48, 0.5), (True, 8), 4, memo=memo)
    assert compiled.launches == [(2, 1, 1, 77, 1234, (4, 1, 0), None, None, None,
                                  z.data_ptr(), 48, 0.5, True, 8)]
    assert (launch.hits, launch.memo_hits, launch.misses) == (1, 1, 1)
    # a memo filled on a key hit works alike
    memo2 = []
    launch((3,), (y, 48, 0.5), (True, 8), 4, memo=memo2)
    launch((3,), (x, 48, 0.5), (True, 8), 4, memo=memo2)
    assert len(memo2) == 1 and (launch.hits, launch.misses) == (3, 1)
    assert compiled.launches[-1][9] == x.data_ptr()


def test_memo_gives_way_when_alignment_dtype_or_hooks_change(stub):
    from triton import knobs

    jf, compiled, normal = stub
    launch = CachedLauncher(jf)
    x = torch.zeros(32)
    memo = []
    launch((1,), (x, 48, 0.5), (True, 8), 4, memo=memo)
    first = memo[0]
    launch((1,), (x.double(), 48, 0.5), (True, 8), 4, memo=memo)  # another dtype: a new key
    assert len(normal) == 2 and compiled.launches == []
    assert memo[0] is not first  # the memo now holds the launch that ran last
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        launch((1,), (x, 48, 0.5), (True, 8), 4, memo=memo)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(normal) == 3 and compiled.launches == []
    launch((1,), (x, 48, 2), (True, 8), 4, memo=[])  # an int where a float was: not cached
    launch((1,), (x, 48, 2), (True, 8), 4, memo=[])
    assert len(normal) == 5 and compiled.launches == []


def test_a_memo_that_does_not_fit_is_replaced_a_bounded_number_of_times(stub):
    """A pointer that lost its alignment, another current device: the key path launches the
    right kernel and the memo takes it (for an unaligned pointer that kernel takes any), at
    most _MEMO_FILLS times, so a caller that alternates does not rebuild it every call."""
    jf, compiled, normal = stub
    launch = CachedLauncher(jf)
    x = torch.zeros(32)
    memo = []
    launch((1,), (x, 48, 0.5), (True, 8), 4, memo=memo)
    launch((1,), (x[1:], 48, 0.5), (True, 8), 4, memo=memo)  # unaligned: its own kernel
    assert len(normal) == 2 and memo[0].fills == 2
    launch((1,), (x, 48, 0.5), (True, 8), 4, memo=memo)  # the unaligned kernel takes it
    assert launch.memo_hits == 1 and len(normal) == 2
    dev = [0]
    launch._device = lambda: dev[0]
    for k in range(1, 20):  # another current device each call: its own kernel load
        dev[0] = k % 2 + 1
        launch((1,), (x, 48, 0.5), (True, 8), 4, memo=memo)
    assert memo[0].fills == fast_launch._MEMO_FILLS


def test_a_memo_repeats_the_non_tensor_arguments_it_was_filled_with(stub):
    """The memo's contract: its caller keeps ints, floats, constexprs and options; the memo
    reads only the tensors (BoundLaunch keeps a memo per plan, which fixes all of those)."""
    jf, compiled, normal = stub
    launch = CachedLauncher(jf)
    x, y = torch.zeros(32), torch.zeros(32)
    memo = []
    launch((1,), (x, 48, 0.5), (True, 8), 4, memo=memo)
    launch((1,), (y, 64, 1.5), (True, 8), 4, memo=memo)
    assert compiled.launches[-1][9:] == (y.data_ptr(), 48, 0.5, True, 8)


def test_a_memo_of_a_replaced_launcher_is_refilled(stub):
    """The kernel swapped out and back (profile_launch.py, tests) gives a new launcher: it
    must not launch through the old one's memo, nor leave it stale for good, nor keep the
    old launcher alive."""
    import gc
    import weakref

    jf, compiled, normal = stub
    old, new = CachedLauncher(jf), CachedLauncher(jf)
    x = torch.zeros(32)
    memo = []
    old((1,), (x, 48, 0.5), (True, 8), 4, memo=memo)
    first = memo[0]
    new((1,), (x, 48, 0.5), (True, 8), 4, memo=memo)  # its own first launch: refills it
    assert new.misses == 1 and len(memo) == 1 and memo[0] is not first
    new((1,), (x, 48, 0.5), (True, 8), 4, memo=memo)
    assert (new.hits, new.memo_hits) == (1, 1) and memo[0].owner() is new
    assert len(compiled.launches) == 1
    gone = weakref.ref(old)
    del old
    gc.collect()
    assert gone() is None and first.owner() is None


def test_memo_of_an_unaligned_pointer_takes_any(stub):
    jf, compiled, normal = stub
    launch = CachedLauncher(jf)
    x = torch.zeros(32)
    memo = []
    launch((1,), (x[1:], 48, 0.5), (True, 8), 4, memo=memo)  # compiled without alignment
    launch((1,), (x, 48, 0.5), (True, 8), 4, memo=memo)
    launch((1,), (x[3:], 48, 0.5), (True, 8), 4, memo=memo)
    assert len(normal) == 1 and [a[9] for a in compiled.launches] == [
        x.data_ptr(), x[3:].data_ptr()]


def _stub_kernel3(a, b, c, n, C0: tl.constexpr):
    pass


def test_memo_reads_each_tensor_even_where_one_was_passed_twice(monkeypatch):
    jf = JITFunction(_stub_kernel3)
    compiled = _FakeCompiled()
    jf.run = lambda *args, grid, warmup, **kw: compiled
    monkeypatch.setattr(fast_launch, "_device_and_stream", lambda: (lambda: 0, lambda dev: 77))
    launch = CachedLauncher(jf)
    x, y, z = torch.zeros(32), torch.zeros(32), torch.zeros(32)
    memo = []
    launch((1,), (x, x, y, 16), (4,), 2, memo=memo)  # a and b: one tensor, as the packed qkv
    launch((1,), (y, z, z, 16), (4,), 2, memo=memo)
    launch((1,), (z, z, x, 16), (4,), 2, memo=memo)
    assert [a[9:13] for a in compiled.launches] == [
        (y.data_ptr(), z.data_ptr(), z.data_ptr(), 16), (z.data_ptr(), z.data_ptr(),
                                                         x.data_ptr(), 16)]
    assert launch.hits == 2
    with pytest.raises(AttributeError):  # what a fill does with a non-tensor: the key path
        memo[0].fill(x, 3, y, 16)


def test_fill_code_is_compiled_once_per_shape_of_call(stub, monkeypatch):
    """A memo's fill() of a new signature with the same argument layout (an eager prefill's
    new T) reuses the code compiled for the first (exec took ~0.4 ms a one-off call), with
    its own values, and a new layout (another alignment) compiles its own."""
    jf, compiled, normal = stub
    compiles = []
    real_exec = exec
    monkeypatch.setattr(fast_launch, "_FILL_FACTORIES", {})
    monkeypatch.setattr(fast_launch, "exec", lambda src, ns: compiles.append(src) or
                        real_exec(src, ns), raising=False)
    launch = CachedLauncher(jf)
    x, y = torch.zeros(32), torch.zeros(32)
    for n, t in ((48, x), (64, y)):  # two plans: another int, the same layout
        memo = []
        launch((1,), (t, n, 0.5), (True, 8), 4, memo=memo)
        launch((1,), (t, n, 0.5), (True, 8), 4, memo=memo)
        assert compiled.launches[-1][9:] == (t.data_ptr(), n, 0.5, True, 8)
    fills = [s for s in compiles if "def make(" in s]
    assert len(fills) == 1
    memo = []
    launch((1,), (x[1:], 48, 0.5), (True, 8), 4, memo=memo)  # unaligned: no alignment check
    assert len([s for s in compiles if "def make(" in s]) == 2
    got = memo[0].fill(x[3:], 48, 0.5)
    assert got is not None and got[0] == x[3:].data_ptr()
