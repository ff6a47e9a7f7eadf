"""Index math at scale (SPEC: caches over 2^31 elements, T up to 1M, int64 index math).

GPU only: each test allocates 4-10 GB and takes a few seconds on an H200.  Nothing is checked
against a reference computed on the full problem; instead

* (a) a cache of more than 2^31 elements, written by a few hundred tokens whose slots sit at the
  top of the cache and around element offset 2^31: each written row must be bit-identical to
  the row the kernel writes for the same token into a tiny cache (which is itself checked
  against the reference under SPEC's numerics rule), and sampled regions that no slot
  addresses (the top, around 2^31, the start, random rows) must still hold their fill pattern;
* (b) an activation with T * W > 2^31 elements (and a q output over 2^31): sampled token rows
  of the outputs, and the cache rows those tokens write, against the reference evaluated on
  just those rows.

The helpers take the sizes as arguments, so the same code can be dry-run small on the CPU.
"""
import gc
import math

import pytest
import torch

from kernels import reference
from kernels.op_schema import LAYOUT_HND, LAYOUT_NHD, fp8_dtype_of
from kernels.triton_kernel import launch

from .cases import Case, make_args
from .kernel_check import NAMES, _float64_args, index32_choices
from .numerics import assert_spec_close

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

FILL_K, FILL_V = 0x3C, 0x5A  # byte patterns the big caches start with


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------- helpers

def _cache_dtypes(cache_dtype: str, act_dtype: torch.dtype):
    """(torch dtype of the cache tensor, kv_cache_dtype string, fp8 format or None)."""
    if cache_dtype == "auto":
        return act_dtype, "auto", None
    if cache_dtype.startswith("uint8"):
        kvs = "fp8_e4m3" if cache_dtype.endswith("e4m3") else "fp8_e5m2"
        return torch.uint8, kvs, fp8_dtype_of(torch.uint8, kvs)
    dt = torch.float8_e4m3fn if cache_dtype == "fp8_e4m3" else torch.float8_e5m2
    return dt, "auto", dt


def _filled_cache(shape, dtype, byte, device):
    numel = math.prod(shape)
    raw = torch.empty(numel * dtype.itemsize, dtype=torch.uint8, device=device).fill_(byte)
    return raw.view(dtype).view(shape)


def _cache_shape(layout, nb, bs, h, d):
    return (nb, bs, h, d) if layout == LAYOUT_NHD else (nb, h, bs, d)


def _slot_rows(cache, layout, idx):
    """Rows [len(idx), H, D] of the slots ``idx`` (a long tensor), any layout."""
    if layout == LAYOUT_NHD:
        return cache.flatten(0, 1)[idx]
    bs = cache.shape[2]
    return cache[idx // bs, :, idx % bs]


def _as_bytes(x):
    return x.contiguous().view(torch.uint8)


def _check_cache_rows_against_reference(kern_cache, ref_cache, exact_cache, rows, layout,
                                        kvs, scale, name):
    """SPEC's numerics rule on the cache rows ``rows`` (unique slots, one token each)."""
    fp8 = fp8_dtype_of(kern_cache.dtype, kvs)

    def f64(c):
        c = c.view(fp8) if c.dtype == torch.uint8 else c
        return _slot_rows(c, layout, rows).double()

    got = _slot_rows(kern_cache.view(fp8) if kern_cache.dtype == torch.uint8 else kern_cache,
                     layout, rows)
    ex = _slot_rows(exact_cache, layout, rows)
    if fp8 is not None:
        s = 1.0 if scale is None else float(scale)
        fmax = torch.finfo(fp8).max
        ex = (ex / s).clamp(-fmax, fmax)
    assert_spec_close(got, f64(ref_cache), ex, name)


def _check_outputs(fused, eager, exact, gated, rows=None):
    for name, f, e, x in zip(NAMES, fused, eager, exact):
        if name == "gate" and not gated:
            continue
        assert_spec_close(f if rows is None else f[rows], e, x, name)


# ------------------------------------------------------------- (a) cache > 2^31 elements

def run_big_cache(device, *, layout, cache_dtype, idx_dtype, h, d, bs, nb, T, act=torch.bfloat16,
                  boundary_slot=None, seed=0, over_2_31=True):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    n = nb * bs
    case = Case(T=T, hq=2 * h, hkv=h, d=d, dtype=act, cache=False, gate=2)
    head = make_args(case, device)[:21]
    cdt, kvs, fp8 = _cache_dtypes(cache_dtype, act)
    ks = vs = None
    if fp8 is not None:
        ks, vs = torch.tensor(0.7, device=device), torch.tensor(1.9, device=device)

    # slots: the top of the cache, around element offset 2^31, the first rows, and padding
    s0 = boundary_slot if boundary_slot is not None else -(-(2 ** 31) // (h * d))
    special = [n - 1, n - 2, s0 - 2, s0 - 1, s0, s0 + 1, s0 + 2, 0, 1, bs]
    pad = [-1, n, n + 7, 2 ** 31 - 1]
    win = min(8192, n)
    top = (n - win + torch.randperm(win, generator=g)).tolist()
    top = [s for s in top if s not in special][: T - len(special) - len(pad)]
    slots_list = special + pad + top
    assert len(slots_list) == T and len(set(slots_list)) == T
    order = torch.randperm(T, generator=g)
    slots_list = [slots_list[i] for i in order.tolist()]
    slots = torch.tensor(slots_list, dtype=idx_dtype, device=device)

    shape = _cache_shape(layout, nb, bs, h, d)
    kc = _filled_cache(shape, cdt, FILL_K, device)
    vc = _filled_cache(shape, cdt, FILL_V, device)
    assert kc.numel() > 2 ** 31 or device == "cpu" or not over_2_31, \
        "the cache must have over 2^31 elements"
    tail = (layout, True, kvs, ks, vs, True, True, True, True)
    fused = launch(*head, kc, vc, slots, *tail)

    # The same tokens into a tiny cache, one row per token: the bit-exact expectation.
    small_shape = _cache_shape(layout, T, 1, h, d)
    skc = _filled_cache(small_shape, cdt, FILL_K, device)
    svc = _filled_cache(small_shape, cdt, FILL_V, device)
    own = torch.arange(T, device=device)
    small = launch(*head, skc, svc, own, *tail)
    for name, a, b in zip(NAMES, fused, small):
        assert torch.equal(a, b), f"{name} output depends on the cache size"

    valid = torch.tensor([0 <= s < n for s in slots_list], device=device)
    vslots = slots.long()[valid]
    for name, big, sm in (("key_cache", kc, skc), ("value_cache", vc, svc)):
        got = _as_bytes(_slot_rows(big, layout, vslots))
        want = _as_bytes(_slot_rows(sm, layout, own[valid]))
        bad = (got != want).flatten(1).any(1)
        assert not bad.any(), (f"{name}: slots {vslots[bad][:8].tolist()} of the big cache differ "
                               f"from the same tokens written to a small cache")

    # Rows no slot addresses: the top region, around 2^31, the start, random rows.
    lo = max(0, s0 - 4096)
    probe = torch.cat([
        torch.arange(n - win, n), torch.arange(lo, min(n, s0 + 4096)),
        torch.arange(0, min(n, 4096)), torch.randint(0, n, (4096,), generator=g),
    ]).to(device).unique()
    probe = probe[~torch.isin(probe, vslots)]
    for name, big, byte in (("key_cache", kc, FILL_K), ("value_cache", vc, FILL_V)):
        rows = _as_bytes(_slot_rows(big, layout, probe))
        bad = (rows != byte).flatten(1).any(1)
        assert not bad.any(), \
            f"{name}: rows no slot addresses were written: {probe[bad][:8].tolist()}"

    # The tiny-cache run against the reference (values, under SPEC's numerics rule).
    rkc = _filled_cache(small_shape, cdt, FILL_K, device)
    rvc = _filled_cache(small_shape, cdt, FILL_V, device)
    rargs = (*head, rkc, rvc, own, *tail)
    eager = reference.split_norm_rope_cache(*rargs)
    xargs = _float64_args(rargs, True)
    exact = reference.split_norm_rope_cache(*xargs, math_dtype=torch.float64)
    _check_outputs(small, eager, exact, gated=True)
    for name, sm, ref_c, ex_c, sc in (("key_cache", skc, rkc, xargs[21], ks),
                                      ("value_cache", svc, rvc, xargs[22], vs)):
        _check_cache_rows_against_reference(sm, ref_c, ex_c, own, layout, kvs, sc, name)


@pytest.fixture(params=[False, True], ids=["index32_off", "index32_on"])
def index32(request, monkeypatch):
    """With triton_kernel._INDEX32 on, these launches must still pick int64 offsets (and the
    tiny reference launches int32 ones): the same rows either way."""
    from kernels import triton_kernel
    monkeypatch.setattr(triton_kernel, "_INDEX32", request.param)


@pytest.mark.parametrize("layout,cache_dtype,idx_dtype", [
    pytest.param(LAYOUT_NHD, "auto", torch.int64, id="nhd_bf16_i64"),
    pytest.param(LAYOUT_HND, "auto", torch.int32, id="hnd_bf16_i32"),
    pytest.param(LAYOUT_NHD, "uint8_e4m3", torch.int32, id="nhd_uint8fp8_i32"),
])
def test_cache_over_2_31_elements(layout, cache_dtype, idx_dtype, index32):
    # H_kv=8, D=128: 1024 elements per slot; 2^21 + 1024 slots -> 2^31 + 2^20 elements
    # (4.3 GB per bf16 cache, 2.1 GB per fp8 one; two caches).
    h, d, bs = 8, 128, 16
    nb = (2 ** 21 + 1024) // bs
    run_big_cache("cuda", layout=layout, cache_dtype=cache_dtype, idx_dtype=idx_dtype,
                  h=h, d=d, bs=bs, nb=nb, T=256)


def test_int32_offsets_at_their_limit(monkeypatch):
    """_INDEX32 on, a cache just under 2^30 elements, the largest an int32 launch takes: the
    launch must pick int32 offsets, and its top rows land as they do in a tiny cache."""
    seen = index32_choices(monkeypatch)
    h, d, bs = 8, 128, 16
    nb = (2 ** 20 - 2048) // bs  # 2^30 - 2^21 elements a cache
    run_big_cache("cuda", layout=LAYOUT_NHD, cache_dtype="auto", idx_dtype=torch.int64, h=h,
                  d=d, bs=bs, nb=nb, T=256, boundary_slot=nb * bs // 2, over_2_31=False)
    assert seen[0] is False, seen  # the big cache's launch: int32 offsets


# ------------------------------------------------------ (b) activation with T * W > 2^31

def run_big_activation(device, *, T, hq, hkv, d, gate, n_sample=600, seed=0,
                       act=torch.bfloat16):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    q_width = hq * d * (2 if gate else 1)
    W = q_width + 2 * hkv * d
    qkv = torch.randn(T, W, dtype=act, device=device)
    max_pos = 4096
    r = d // 2 if gate else d  # partial rotary for the gated (Qwen3-Next-like) variant
    ang = torch.rand(max_pos, r // 2, generator=g) * 2 * math.pi
    csc = torch.cat([ang.cos(), ang.sin()], -1).to(device)
    cos, sin = csc[:, : r // 2], csc[:, r // 2:]
    positions = torch.randint(0, max_pos, (T,), generator=g, dtype=torch.int32).to(device)
    qw = (torch.randn(d, generator=g) * 0.3).to(device, act)
    kw = (torch.randn(d, generator=g) * 0.3).to(device, act)
    offset = 1.0 if gate else 0.0
    if not gate:
        qw, kw = qw + 1, kw + 1

    # Tokens to check: random ones, the first and last, and those whose activation row /
    # q-output row crosses element offset 2^31.
    t_in, t_out = 2 ** 31 // W, 2 ** 31 // (hq * d)
    special = [0, 1, 2, T - 3, T - 2, T - 1]
    special += [t + i for t in (t_in, t_out) for i in (-2, -1, 0, 1, 2)]
    special = [t for t in special if 0 <= t < T]
    rand = torch.randperm(T, generator=g)[:n_sample]
    idx = torch.unique(torch.cat([rand, torch.tensor(special)])).to(device)
    k = idx.numel()

    # A small cache: only the sampled tokens have a slot, every other token is padding (-1).
    nb, bs = -(-(k + 64) // 16), 16
    shape = (nb, bs, hkv, d)
    kc = torch.randn(shape, generator=g).mul_(50).to(device, act)
    vc = torch.randn(shape, generator=g).mul_(50).to(device, act)
    kc0, vc0 = kc.clone(), vc.clone()
    sub_slots = (torch.randperm(nb * bs, generator=g)[:k]).to(device)
    slots = torch.full((T,), -1, dtype=torch.int64, device=device)
    slots[idx] = sub_slots

    head = (qkv, qkv, qkv, 0, q_width, q_width + hkv * d, hq, hkv, d, gate, qw, kw, True, 1e-6,
            offset, cos, sin, positions, r, True, False)
    assert T * W > 2 ** 31 or device == "cpu", "the activation must have over 2^31 elements"
    fused = launch(*head, kc, vc, slots, LAYOUT_NHD, True, "auto", None, None,
                   True, True, True, True)

    # The reference on the sampled rows only.
    sub = qkv[idx].contiguous()
    sub_head = (sub, sub, sub) + head[3:17] + (positions[idx],) + head[18:]
    rkc, rvc = kc0.clone(), vc0.clone()
    rargs = sub_head + (rkc, rvc, sub_slots, LAYOUT_NHD, True, "auto", None, None)
    eager = reference.split_norm_rope_cache(*rargs)
    xargs = _float64_args(rargs, True)
    exact = reference.split_norm_rope_cache(*xargs, math_dtype=torch.float64)
    _check_outputs(fused, eager, exact, gated=bool(gate), rows=idx)

    written = torch.zeros(nb * bs, dtype=torch.bool, device=device)
    written[sub_slots] = True
    for name, got, start, ref_c, ex_c in (("key_cache", kc, kc0, rkc, xargs[21]),
                                          ("value_cache", vc, vc0, rvc, xargs[22])):
        _check_cache_rows_against_reference(got, ref_c, ex_c, sub_slots, LAYOUT_NHD, "auto",
                                            None, name)
        assert torch.equal(got.flatten(0, 1)[~written], start.flatten(0, 1)[~written]), \
            f"{name}: a padding token (slot -1) or a stray write changed a row"


@pytest.mark.parametrize("hq,hkv,gate", [
    # W = 9216: T * W = 2.43e9; q output T * 64 * 128 = 2.16e9 elements (> 2^31 too).
    pytest.param(64, 4, 0, id="packed_q_out_over_2_31"),
    # gated blocked (Qwen3-Next-like: offset 1, partial rotary): gate columns past 2^31.
    pytest.param(32, 4, 2, id="gated_blocked"),
])
def test_activation_over_2_31_elements(hq, hkv, gate, index32):
    # ~4.9 GB activation + ~4.3 GB (q) or 2 x 2.2 GB (q, gate) outputs, bf16.
    run_big_activation("cuda", T=264_000, hq=hq, hkv=hkv, d=128, gate=gate)
