"""Slot-mapping edge cases of the paged KV-cache write (SPEC section 1, step 4).

Semantics under test:

* engine mode (``skip_negative_slots=True``, vLLM/SGLang padding): a slot ``< 0`` or
  ``>= num_blocks * block_size`` writes nothing and corrupts nothing; the token's q/k/v/gate
  outputs are still produced.
* indexing mode: a negative slot counts from the end, as ``cache.view(-1, H, D)[slot]`` does;
  past-the-end slots (and slots below ``-num_slots``) still write nothing.
* duplicate slots: the reference writes with ``index_put`` (on the CPU the last token wins), but
  the kernel's write order for duplicates is NOT defined (on the GPU the programs race, as
  ``index_put`` itself does on CUDA).  The tests only require that each (slot, head) row of a
  duplicated slot holds the row of ONE of the tokens that map to it (on CUDA, where a racing
  write may land sector by sector, each element comes from one of those tokens), and that
  nothing else changed.
* int32 and int64 slot mappings behave identically.
* through the entry point (``kernels.split_norm_rope_cache``) a slot_mapping longer than T is
  allowed and only its first T entries are used.
* in every test, every cache row that no slot addresses is bit-identical afterwards.
"""
import math
import zlib

import pytest
import torch

import kernels
from kernels import reference
from kernels.op_schema import LAYOUT_HND, LAYOUT_NHD
from kernels.triton_kernel import launch

from .cases import Case, clone_args, make_args
from .conftest import DEVICES
from .kernel_check import NAMES, _bits, _float64_args, _rows, storage_rows
from .numerics import assert_spec_close

NAN = float("nan")

# Cache configurations every slot test runs on (n = num_blocks * block_size slots).
CONFIGS = [
    pytest.param(dict(), id="nhd"),
    pytest.param(dict(layout=LAYOUT_HND), id="hnd"),
    pytest.param(dict(cache_dtype="fp8_e4m3"), id="nhd_fp8"),
    pytest.param(dict(layout=LAYOUT_HND, cache_dtype="uint8_e5m2", shared_base=True),
                 id="hnd_uint8_shared"),
    pytest.param(dict(gate=1, block_size=1, num_blocks=20, dtype=torch.float16), id="gated_bs1"),
    pytest.param(dict(layout=LAYOUT_HND, gate=2, block_size=16, num_blocks=2, hq=8, hkv=4,
                      d=80, dtype=torch.float32), id="hnd_gqa_d80_fp32"),
]


# --------------------------------------------------------------------------- helpers

def _make(device, cfg, T=8, **over):
    case = Case(**{**dict(T=T, bad_slots=False), **cfg, **over})
    torch.manual_seed(zlib.crc32(repr(case).encode()))
    return case, make_args(case, device)


def _geometry(args):
    kc, layout = args[21], args[24]
    nb = kc.shape[0]
    bs = kc.shape[1] if layout == LAYOUT_NHD else kc.shape[2]
    return nb, bs, nb * bs


def _with_slots(args, slots, *, index_mode=False, dtype=torch.int64):
    a = list(args)
    a[23] = torch.tensor(slots, dtype=dtype, device=a[0].device)
    a[25] = not index_mode
    return tuple(a)


def _expected_rows(slots, n, index_mode):
    """{row: [tokens writing it, in order]}, computed from SPEC's words with Python ints."""
    rows = {}
    for t, s in enumerate(slots):
        if index_mode and s < 0:
            s += n
        if 0 <= s < n:
            rows.setdefault(s, []).append(t)
    return rows


def _slot_bits(cache, layout, n):
    """Integer view of the cache, one row per slot: [n, H, D]."""
    return _bits(cache, layout).reshape(n, cache.shape[2 if layout == LAYOUT_NHD else 1], -1)


def _run(args):
    """Kernel and reference on copies of ``args``; checks the outputs; returns the copies."""
    start, ref, kern = clone_args(args), clone_args(args), clone_args(args)
    fused = launch(*kern, poison=NAN)
    eager = reference.split_norm_rope_cache(*ref)
    exact_args = _float64_args(args, True)
    exact = reference.split_norm_rope_cache(*exact_args, math_dtype=torch.float64)
    gated = args[9] != 0
    for name, f, e, x in zip(NAMES, fused, eager, exact):
        if name == "gate" and not gated:
            assert f.numel() == 0
            continue
        assert_spec_close(f, e, x, name)  # a skipped cache write still produces the outputs
    return kern, ref, start, exact_args


def _assert_untouched(kern, start, written, n):
    layout = kern[24]
    keep = torch.ones(n, dtype=torch.bool)
    keep[list(written)] = False
    for i, name in ((21, "key_cache"), (22, "value_cache")):
        got = _slot_bits(kern[i], layout, n)[keep]
        want = _slot_bits(start[i], layout, n)[keep]
        bad = keep.nonzero().flatten()[(got != want).flatten(1).any(1)].tolist()
        assert not bad, f"{name}: rows no slot addresses were modified: slots {bad[:10]}"


def _assert_rows_match_reference(kern, ref, exact_args, rows):
    """Rows written by exactly one token: SPEC's numerics rule against the float64 oracle."""
    layout, kvs = kern[24], kern[26]
    n = _geometry(kern)[2]
    idx = torch.tensor(sorted(rows), dtype=torch.long)
    if idx.numel() == 0:
        return
    for i, name in ((21, "key_cache"), (22, "value_cache")):
        # storage dtype (uint8 viewed as its fp8 format): SPEC's "+1 ulp" is the cache dtype's
        got = storage_rows(kern[i], layout, kvs).reshape(n, -1)[idx]
        eag = _rows(ref[i], layout, kvs).reshape(n, -1)[idx]
        ex = _rows(exact_args[i], layout, "auto").reshape(n, -1)[idx]
        dt = got.dtype
        if dt in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale = kern[27 if i == 21 else 28]
            s = 1.0 if scale is None else float(scale)
            fmax = torch.finfo(dt).max
            ex = (ex / s).clamp(-fmax, fmax)
        assert_spec_close(got, eag, ex, name)


def _check(args, slots, *, index_mode=False, dtype=torch.int64):
    """Run with ``slots`` (unique rows); check outputs, written rows and untouched rows."""
    a = _with_slots(args, slots, index_mode=index_mode, dtype=dtype)
    n = _geometry(a)[2]
    rows = _expected_rows(slots, n, index_mode)
    assert all(len(t) == 1 for t in rows.values()), "test bug: duplicate slots here"
    kern, ref, start, exact_args = _run(a)
    _assert_rows_match_reference(kern, ref, exact_args, rows)
    _assert_untouched(kern, start, rows, n)
    return kern


def _assert_caches_bit_equal(a, b, what):
    layout = a[24]
    for i, name in ((21, "key_cache"), (22, "value_cache")):
        assert torch.equal(_bits(a[i], layout), _bits(b[i], layout)), f"{name}: {what}"


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_all_slots_minus_one_write_nothing(cfg, device):
    _, args = _make(device, cfg)
    T = args[0].shape[0]
    _check(args, [-1] * T)
    # any negative value, including ones far below -n, is padding in engine mode
    n = _geometry(args)[2]
    _check(args, [-1, -2, -n, -n - 1, -(2 ** 31), -(2 ** 40), -7, -3][:T])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_mode", [False, True], ids=["engine", "index"])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_slots_past_the_end_write_nothing(cfg, index_mode, device):
    _, args = _make(device, cfg)
    T = args[0].shape[0]
    nb, bs, n = _geometry(args)
    past = [n, n + 1, n + bs, 2 * n, 2 ** 31 - 1, 2 ** 32 + 5, 2 ** 40, n + 3]
    if index_mode:  # below -n: still out of range after counting from the end
        past[6] = -n - 1
    _check(args, past[:T], index_mode=index_mode)
    # mixed with valid slots, including the last row and the first
    slots = [n - 1, n, 0, 2 ** 31 - 1, bs + 2, n + bs, 1, 2 * n][:T]
    _check(args, slots, index_mode=index_mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_index_mode_negative_slots_wrap(cfg, device):
    _, args = _make(device, cfg)
    T = args[0].shape[0]
    nb, bs, n = _geometry(args)
    slots = [-1, -n, 2, -(bs + 2), -n - 1, 5, -2, n][:T]
    wrapped = [s + n if -n <= s < 0 else s for s in slots]
    neg = _check(args, slots, index_mode=True)
    pos = _check(args, wrapped, index_mode=False)
    _assert_caches_bit_equal(neg, pos, "a negative slot in index mode must write exactly where "
                                       "slot + num_slots does")
    # the same negative slots in engine mode are padding: only the non-negative ones write
    _check(args, slots, index_mode=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_mode", [False, True], ids=["engine", "index"])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_int32_slot_mapping(cfg, index_mode, device):
    _, args = _make(device, cfg)
    T = args[0].shape[0]
    nb, bs, n = _geometry(args)
    slots = [3, -1, n - 2, 2 ** 31 - 1, -(2 ** 31), 0, n, bs + 1][:T]
    k32 = _check(args, slots, index_mode=index_mode, dtype=torch.int32)
    k64 = _check(args, slots, index_mode=index_mode, dtype=torch.int64)
    _assert_caches_bit_equal(k32, k64, "int32 and int64 slot mappings must write the same")


def _one_of(row, options, strict):
    """``row`` [D] (bits) is one of ``options`` [k, D]; not strict: each element is one of them
    (a racing write on the GPU, by the kernel or by index_put, may land piece by piece)."""
    if strict:
        return any(torch.equal(row, o) for o in options)
    return bool((row[None] == options).any(0).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_mode", [False, True], ids=["engine", "index"])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_duplicate_slots_write_one_of_the_tokens(cfg, index_mode, device):
    _, args = _make(device, cfg, T=8)
    T = args[0].shape[0]
    nb, bs, n = _geometry(args)
    assert n >= T
    # 5 written twice or more, n-1 through a positive and (index mode) a negative slot,
    # 0 three times, 7 once, plus padding.
    slots = [5, n - 1, 0, 5, -1, 0, 7, 0]
    a = _with_slots(args, slots, index_mode=index_mode)
    rows = _expected_rows(slots, n, index_mode)
    assert any(len(t) > 1 for t in rows.values())
    kern, ref, start, _ = _run(a)
    _assert_untouched(kern, start, rows, n)

    # Each token's own cache row, as the kernel (and the reference) write it: the same inputs,
    # one slot per token.
    own_args = _with_slots(args, list(range(T)))
    cand, ref_cand = clone_args(own_args), clone_args(own_args)
    launch(*cand)
    reference.split_norm_rope_cache(*ref_cand)
    layout = a[24]
    strict = a[0].device.type == "cpu"  # the interpreter runs programs one after another
    for i, name in ((21, "key_cache"), (22, "value_cache")):
        got = _slot_bits(kern[i], layout, n)
        own = _slot_bits(cand[i], layout, n)
        eager, eager_own = _slot_bits(ref[i], layout, n), _slot_bits(ref_cand[i], layout, n)
        for row, toks in rows.items():
            for h in range(got.shape[1]):
                assert _one_of(got[row, h], own[toks, h], strict), (
                    f"{name}: slot {row} head {h} holds none of the rows of tokens {toks} that "
                    f"map to it")
                # The reference (index_put) keeps one of them too: on the CPU the last one.
                assert _one_of(eager[row, h], eager_own[toks, h], strict), \
                    f"reference {name}: slot {row} head {h} holds none of tokens {toks}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout,T,slot_mode", [
    ("NHD", 5, "engine"), ("NHD", 5, "index"), ("HND", 5, "engine"), ("HND", 5, "index"),
    # T >= 1024: tiles of several tokens, the last one partly past T
    ("NHD", 1025, "engine"), ("HND", 1025, "index"),
])
def test_entry_point_uses_only_first_T_slots(layout, T, slot_mode, device):
    """slot_mapping may be longer than T (engines pass a padded buffer): entries past T are
    ignored, even when they are valid slots, or -1 (which index mode would wrap to n-1)."""
    g = torch.Generator().manual_seed(T)
    hq, hkv, d, bs = 2, 1, 64, 16
    nb = math.ceil((T + 24) / bs)
    n = nb * bs
    qkv = (torch.randn(T, (hq + 2 * hkv) * d, generator=g) * 2).to(device, torch.bfloat16)
    w = (torch.randn(2, d, generator=g) * 0.3 + 1).to(device)
    ang = torch.rand(64, d // 2, generator=g) * 2 * math.pi
    csc = torch.cat([ang.cos(), ang.sin()], -1).to(device)
    pos = torch.randint(0, 64, (T,), generator=g).to(device)
    shape = (nb, bs, hkv, d) if layout == "NHD" else (nb, hkv, bs, d)
    kc = (torch.randn(shape, generator=g) * 50).to(device, torch.bfloat16)
    vc = (torch.randn(shape, generator=g) * 50).to(device, torch.bfloat16)
    perm = torch.randperm(n - 1, generator=g)  # n-1 stays free: -1 would wrap onto it
    first, extra_valid = perm[:T], perm[T:T + 6]
    slots = torch.cat([first, extra_valid, torch.tensor([-1, n + 2, 0, 1])]).to(device)
    kc0, vc0 = kc.clone(), vc.clone()
    out = kernels.split_norm_rope_cache(
        qkv, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, q_weight=w[0], k_weight=w[1],
        positions=pos, cos_sin_cache=csc, key_cache=kc, value_cache=vc, slot_mapping=slots,
        cache_layout=layout, slot_mode=slot_mode)

    # the reference on exactly the first T slots
    lay = LAYOUT_NHD if layout == "NHD" else LAYOUT_HND
    args = (qkv, qkv, qkv, 0, hq * d, (hq + hkv) * d, hq, hkv, d, 0, w[0], w[1], True, 1e-6,
            0.0, csc[:, : d // 2], csc[:, d // 2:], pos, d, True, False,
            kc0.clone(), vc0.clone(), slots[:T].clone(), lay, slot_mode == "engine", "auto",
            None, None)
    eager = reference.split_norm_rope_cache(*args)
    exact_args = _float64_args(args, True)
    exact = reference.split_norm_rope_cache(*exact_args, math_dtype=torch.float64)
    for name, f, e, x in zip("qkv", out[:3], eager[:3], exact[:3]):
        assert_spec_close(f, e, x, name)

    written = first.tolist()
    for i, (got, start, eag) in enumerate(((kc, kc0, args[21]), (vc, vc0, args[22]))):
        name = ("key_cache", "value_cache")[i]
        keep = torch.ones(n, dtype=torch.bool)
        keep[written] = False
        gb, sb = _slot_bits(got, lay, n), _slot_bits(start, lay, n)
        assert torch.equal(gb[keep], sb[keep]), \
            f"{name}: a row that only slot_mapping[T:] (or no slot) addresses was modified"
        idx = torch.tensor(written)
        ex = _rows(exact_args[21 + i], lay, "auto").reshape(n, -1)[idx]
        assert_spec_close(storage_rows(got, lay, "auto").reshape(n, -1)[idx],
                          _rows(eag, lay, "auto").reshape(n, -1)[idx], ex, name)
