"""The Triton kernel against the reference, feature by feature (CPU interpreter and GPU)."""
import os
import zlib

import pytest
import torch

from kernels.op_schema import LAYOUT_HND, LAYOUT_NHD

from .cases import Case, make_args
from .conftest import DEVICES
from .kernel_check import check_case, index32_choices, record_launches

# Each entry: (id, Case).  Small shapes; T=1, odd T, GQA and MHA, D = 64/80/128/256.
CASES = [
    ("base", Case()),
    ("T1", Case(T=1)),
    ("mha", Case(hq=3, hkv=3, T=5)),
    ("gqa8", Case(hq=8, hkv=1, T=3)),
    ("d80", Case(d=80)),
    ("d128", Case(d=128, T=3)),
    ("d256", Case(d=256, T=2, hq=2, hkv=1)),
    ("d96_partial", Case(d=96, rotary_dim=32)),
    ("gptj", Case(is_neox=False)),
    ("gptj_partial", Case(is_neox=False, d=128, rotary_dim=64, T=3)),
    ("partial_quarter", Case(d=256, rotary_dim=64, T=3, hq=2, hkv=1)),
    ("no_norm", Case(norm=None)),
    ("gemma_offset1", Case(norm=1.0)),
    ("norm_no_weight", Case(has_weight=False)),
    ("eps1e-5", Case(eps=1e-5)),
    ("gate_interleaved", Case(gate=1)),
    ("gate_blocked", Case(gate=2)),
    ("separate", Case(separate=True)),
    ("row_stride", Case(row_pad=24, separate=False)),
    ("separate_row_stride", Case(separate=True, row_pad=8)),
    ("table_front", Case(table="front")),
    ("table_expanded_neox", Case(table="expanded")),
    ("table_expanded_gptj", Case(table="expanded", is_neox=False)),
    ("gathered_front", Case(table="gathered_front")),
    ("gathered_expanded", Case(table="gathered_expanded")),
    ("table_bf16", Case(table_dtype=torch.bfloat16)),
    ("table_fp16", Case(table_dtype=torch.float16, dtype=torch.float16)),
    ("fp16", Case(dtype=torch.float16)),
    ("fp32", Case(dtype=torch.float32)),
    ("hnd", Case(layout=LAYOUT_HND)),
    ("shared_base_nhd", Case(shared_base=True)),
    ("shared_base_hnd", Case(shared_base=True, layout=LAYOUT_HND)),
    ("fp8_e4m3", Case(cache_dtype="fp8_e4m3")),
    ("fp8_e5m2", Case(cache_dtype="fp8_e5m2")),
    ("fp8_no_scale", Case(cache_dtype="fp8_e4m3", scales=False)),
    ("uint8_e4m3", Case(cache_dtype="uint8_e4m3")),
    ("uint8_e5m2_hnd", Case(cache_dtype="uint8_e5m2", layout=LAYOUT_HND)),
    ("index_mode", Case(skip_negative=False, unique_slots=True)),
    ("int32_idx", Case(idx_dtype=torch.int32)),
    ("no_cache", Case(cache=False)),
    ("no_cache_gated", Case(cache=False, gate=1)),
    ("skip_kv_out", Case(writes=(True, False, False, True))),
    ("skip_gate_out", Case(gate=2, writes=(True, True, True, False))),
    ("bigger_T", Case(T=37, num_blocks=12, block_size=4)),
    ("block_size_16", Case(T=9, block_size=16, num_blocks=2)),
    # an odd tail (48 of 80) from T=32: the heuristic's whole-row tail tiles (its large-T tile,
    # one warp of four heads, is VARIANTS' (1, 4, 1, ...): T=1030 took 44 s interpreted)
    ("row_tail_t33", Case(d=80, rotary_dim=32, T=33, num_blocks=12)),
    ("gptj_odd_tail_t40", Case(is_neox=False, d=80, rotary_dim=32, T=40, num_blocks=12)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[i for i, _ in CASES])
def test_kernel_matches_reference(case, device):
    torch.manual_seed(zlib.crc32(str(case).encode()))
    check_case(case, device)


# Tile shapes and rope paths the tuning script sweeps: (BLOCK_T, BLOCK_H, warps, pairs); pairs
# runs NeoX through partner loads on one full-row tile.  Several token tiles per program, and
# head tiles that do not divide the heads, over gated rows (the gate rides in Q programs).
# A fifth entry sets EARLY (table and weight loads before the norm; default: on at small T), a
# sixth ROW_TAIL (the tail tile spans the whole row; only with a tail and without pairs).
VARIANTS = [(2, 1, 2, False), (4, 2, 2, False), (1, 1, 2, True), (4, 2, 4, True), (2, 4, 1, True),
            (2, 4, 1, False),  # the mid-T pick for many-head models
            (2, 1, 2, False, False), (1, 1, 2, True, False),  # the large-T load order
            (4, 2, 4, False, False, True), (1, 2, 2, False, True, True),  # whole-row tail
            (1, 4, 1, False, False, True)]  # the large-T whole-row tile
VARIANT_CASES = [
    ("gate_interleaved", Case(gate=1, T=7, hq=3)),
    ("gate_blocked_fp8", Case(gate=2, T=5, cache_dtype="fp8_e4m3")),
    ("partial_quarter", Case(d=256, rotary_dim=64, T=3, hq=2, hkv=1, gate=1)),
    ("partial_d96", Case(d=96, rotary_dim=32, T=6)),
    ("odd_tail", Case(d=80, rotary_dim=32, T=4)),  # a 48-wide tail
    ("expanded_quarter", Case(d=256, rotary_dim=64, T=3, hq=2, hkv=1, table="expanded")),
    ("skip_gate_out", Case(gate=1, writes=(True, True, True, False))),
    ("gate_only", Case(gate=1, writes=(False, False, False, True), cache=False)),
    ("norm_no_weight", Case(has_weight=False, d=128, rotary_dim=64, T=3)),
    ("no_norm", Case(norm=None, T=3)),
    ("gptj_partial", Case(is_neox=False, d=128, rotary_dim=64, T=3)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
@pytest.mark.parametrize("case", [c for _, c in VARIANT_CASES], ids=[i for i, _ in VARIANT_CASES])
def test_tile_variants_match_reference(case, variant, device):
    from kernels import triton_kernel
    torch.manual_seed(zlib.crc32(str(case).encode()))
    triton_kernel.set_block_override(variant)
    try:
        plan = triton_kernel.tile_plan(case.T, case.hq, case.hkv, case.d,
                                       case.rotary_dim or case.d, True, True, True, True,
                                       case.is_neox)
        c = plan.constexprs
        assert (plan.block_t, c["BLOCK_H"], plan.num_warps, c["PAIRS"]) == variant[:4]
        assert c["EARLY"] == (variant[4] if len(variant) > 4 else True)  # small T: on
        has_tail = case.rotary_dim is not None and case.rotary_dim < case.d
        row_tail = (len(variant) > 5 and variant[5] and has_tail and not variant[3]
                    and case.is_neox)
        assert c["ROW_TAIL"] == row_tail
        assert c["BLOCK_TAIL"] == (c["BLOCK_D"] if row_tail else
                                   triton_kernel._pow2(case.d - (case.rotary_dim or case.d)))
        check_case(case, device)
    finally:
        triton_kernel.set_block_override(None)


def test_odd_tail_heuristic_pairs_below_t32_row_tail_above():
    """An unrotated tail that is not a power of two: partner loads below T=32, the whole-row
    tail tile from there on (and one token of 1024 elements a program, one warp, from T=1024);
    dynamic-T graphs take the whole-row tail.  Power-of-two tails keep half/half/tail."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from fusion_pass import inductor_launch
    from kernels.triton_kernel import tile_plan
    def plan(t, d, r):
        p = tile_plan(t, 16, 2, d, r, True, True, True, True)
        c = p.constexprs
        return c["PAIRS"], c["ROW_TAIL"], (p.block_t, c["BLOCK_H"], p.num_warps)
    assert plan(1, 256, 64)[:2] == (True, False)  # Qwen3-Next: a 192-wide tail
    assert plan(31, 256, 64)[:2] == (True, False)
    assert plan(32, 256, 64) == (False, True, (1, 2, 2))
    assert plan(63, 256, 64) == (False, True, (1, 2, 2))
    assert plan(64, 256, 64) == (False, True, (2, 2, 4))  # two tokens from T=64
    assert plan(255, 256, 64) == (False, True, (2, 2, 4))
    assert plan(1023, 256, 64) == (False, True, (2, 2, 4))
    assert plan(1024, 256, 64) == (False, True, (1, 4, 1))
    # early loads up to T=1024 on the whole-row tail tile (256 elsewhere)
    assert [tile_plan(t, 16, 2, 256, 64, True, True, True, True).constexprs["EARLY"]
            for t in (255, 256, 1023, 1024)] == [True, True, True, False]
    assert not tile_plan(256, 32, 8, 128, 128, True, True, True, False).constexprs["EARLY"]
    # a whole-row tail tile of more than 512 elements a token keeps one token (8 KV heads)
    assert tile_plan(300, 16, 8, 256, 64, True, True, True, False).block_t == 1
    assert plan(65536, 256, 64) == (False, True, (1, 4, 1))
    for t in (1, 64, 65536):
        assert plan(t, 128, 64)[:2] == (False, False)  # GLM-4.5: a 64-wide tail
        assert plan(t, 128, 128)[:2] == (False, False)  # full rotary
        # GPT-J has no half/half/tail tiles: its tiles stay as they were (GPT-J-6B: 192 tail)
        gptj = tile_plan(t, 16, 16, 256, 64, True, True, True, False, is_neox=False)
        assert not gptj.constexprs["PAIRS"] and not gptj.constexprs["ROW_TAIL"]
        full = tile_plan(t, 16, 16, 256, 256, True, True, True, False)  # no tail at all
        assert gptj[:3] == full[:3]
        assert gptj.constexprs["BLOCK_H"] == full.constexprs["BLOCK_H"]
    # the large-T whole-row tile has no more heads than the Q heads
    one = tile_plan(4096, 1, 1, 256, 64, True, True, True, False)
    assert one.constexprs["ROW_TAIL"] and one.constexprs["BLOCK_H"] == 1
    kw = dict(hq=16, hkv=2, d=256, rotary_dim=64, write_q=True, run_k=True, run_v=True,
              write_gate=False)
    dyn = inductor_launch.plan(ShapeEnv().create_unbacked_symint(), **kw)
    assert (dyn.switch_t, dyn.big_block_t) == (inductor_launch.MID_SWITCH_T, 2)
    dyn = dyn.tiles
    assert dyn.constexprs["ROW_TAIL"] and not dyn.constexprs["PAIRS"] and dyn.block_t == 1


@pytest.mark.parametrize("shape", [(16, 2, 256, 64), (32, 8, 128, 128), (96, 8, 128, 64)],
                         ids=["qwen3_next", "qwen3_8b", "glm45"])
def test_dynamic_tiles_modes_take_their_plans(shape):
    """FusionOptions.dynamic_tiles: a dynamic T gets the T=32 plan ("decode") or the T=1024
    one ("prefill"), both with the late loads (EARLY off) and no switch; "auto" the T=32 plan
    below T=1024 (T=128 for GLM-4.5 and Qwen3-Next, see MID_SWITCH_T) and from there the same
    head tiles and warps with 2 tokens a program (16 elements a thread): the T=1024 plan
    itself for the dense shapes."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from fusion_pass import inductor_launch
    from kernels.triton_kernel import tile_plan
    hq, hkv, d, r = shape
    kw = dict(hq=hq, hkv=hkv, d=d, rotary_dim=r, write_q=True, run_k=True, run_v=True,
              write_gate=False)
    t = ShapeEnv().create_unbacked_symint()
    for mode, at in (("decode", 32), ("prefill", 1024)):
        got = inductor_launch.plan(t, **kw, dynamic_tiles=mode)
        assert got.switch_t == 0 and got.idx64
        got = got.tiles
        want = tile_plan(at, hq, hkv, d, r, True, True, True, False)
        assert got._replace(constexprs=None) == want._replace(constexprs=None)
        assert got.constexprs == {**want.constexprs, "EARLY": False}
    auto = inductor_launch.plan(t, **kw)
    assert auto.tiles == tile_plan(32, hq, hkv, d, r, True, True, True, False)
    switch = 1024 if hq == 32 else 128  # GLM-4.5 and Qwen3-Next: MID_SWITCH_T
    assert (auto.switch_t, auto.big_block_t) == (switch, 2)
    if d == 128:  # dense shapes: the big branch is exactly the plan from the switch on
        for at in (switch, 1024):
            big = tile_plan(at, hq, hkv, d, r, True, True, True, False)
            assert (big.block_t, big.head_tiles, big.num_warps) == \
                (2, auto.tiles.head_tiles, auto.tiles.num_warps)
        # below launch()'s own change of tiles (T=64 for GLM-4.5, whose switch comes later:
        # MID_SWITCH_T) the decode tiles are launch()'s
        from kernels.triton_kernel import large_tiles_from
        below = tile_plan(large_tiles_from(d, hq, hkv) - 1, hq, hkv, d, r, True, True, True,
                          False)
        assert below[:3] == auto.tiles[:3]


# Element offsets of both widths (triton_kernel._INDEX32, on by default): with it on each case
# must launch with IDX64 off; with it off (int64, what launches too large for int32 run) with
# IDX64 on; both must match the reference.  Slot/position tensors of both widths, negative and
# past-the-end slots (an int64 slot past 2^31 must be skipped, not wrapped into range).
INDEX32_CASES = [
    ("base", Case()),
    ("gate_fp8_uint8", Case(gate=1, cache_dtype="uint8_e4m3")),
    ("hnd_index_mode", Case(layout=LAYOUT_HND, skip_negative=False, unique_slots=True)),
    ("int32_idx", Case(idx_dtype=torch.int32)),
    ("separate_row_stride", Case(separate=True, row_pad=8)),
    ("row_tail_tiles", Case(d=256, rotary_dim=64, T=40, hq=4, hkv=2, num_blocks=12)),
    ("gptj_partial", Case(is_neox=False, d=128, rotary_dim=64, T=3)),
    ("shared_base_hnd", Case(shared_base=True, layout=LAYOUT_HND)),
    ("t1030_masked_rows", Case(T=1030, block_size=16, num_blocks=70)),  # BLOCK_T > 1
    ("gathered_expanded", Case(table="gathered_expanded")),  # no positions: table row = t
    ("gate_blocked_expanded", Case(gate=2, table="expanded")),
    ("no_cache_separate", Case(cache=False, separate=True, row_pad=8)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [c for _, c in INDEX32_CASES], ids=[i for i, _ in INDEX32_CASES])
def test_int32_offsets_match_reference(case, device, monkeypatch):
    seen = index32_choices(monkeypatch)
    torch.manual_seed(zlib.crc32(str(case).encode()))
    check_case(case, device)
    assert seen == [False]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [c for i, c in INDEX32_CASES if c.T < 1024],
                         ids=[i for i, c in INDEX32_CASES if c.T < 1024])
def test_int64_offsets_match_reference(case, device, monkeypatch):
    seen = index32_choices(monkeypatch, on=False)
    torch.manual_seed(zlib.crc32(str(case).encode()) + 1)
    check_case(case, device)
    assert seen == [True]  # the launch kept int64 offsets


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for _, c in INDEX32_CASES], ids=[i for i, _ in INDEX32_CASES])
def test_pdl_launch_matches_reference(case, monkeypatch):
    """Programmatic dependent launch (``triton_kernel._PDL``, off by default: it pays only in
    back-to-back replays of the op itself, benchmarks/pdl_bench.py): launched with it, the
    kernel still matches the reference."""
    from kernels import triton_kernel
    monkeypatch.setattr(triton_kernel, "_PDL", True)
    seen = record_launches(monkeypatch, lambda consts, pdl, regs: (pdl, consts["PDL"]))
    torch.manual_seed(zlib.crc32(str(case).encode()) + 2)
    check_case(case, "cuda")
    want = triton_kernel._pdl_ok(torch.device("cuda", torch.cuda.current_device()))
    assert want == (torch.version.cuda is not None and
                    torch.cuda.get_device_capability()[0] >= 9)  # on for sm_90+ (NVIDIA)
    assert seen == [(want, want)]


BUDGET_CASES = [(i, c) for i, c in INDEX32_CASES if i in (
    "base", "gate_fp8_uint8", "row_tail_tiles", "gptj_partial", "t1030_masked_rows")]


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for i, c in BUDGET_CASES], ids=[i for i, _ in BUDGET_CASES])
def test_launches_take_the_register_budget(case, monkeypatch):
    """Launches with early loads (small T) compile with ptxas's register budget
    ``_EARLY_MAX_REGS`` (see test_small_t_loads_issue_before_the_reduction), those with late
    loads and a small grid of at most 16 elements a thread (T=1030 here) with
    ``_LATE_MAX_REGS``; every budgeted kernel keeps within its budget, and the kernel
    matches the reference."""
    from kernels import triton_kernel
    seen = record_launches(monkeypatch, lambda consts, pdl, regs: (consts["EARLY"], regs))
    torch.manual_seed(zlib.crc32(str(case).encode()) + 3)
    check_case(case, "cuda")
    (early, _), = seen
    assert early == (case.T < triton_kernel._T_MID)  # (no case is a row tail at T >= 256)
    want = triton_kernel._EARLY_MAX_REGS if early else triton_kernel._LATE_MAX_REGS
    assert want is not None
    assert seen == [(early, want)]
    kernels = [k for cache in triton_kernel.fused_qkv_kernel.device_caches.values()
               for k in cache[0].values() if k.metadata.maxnreg]
    assert any(k.metadata.maxnreg == want for k in kernels)
    assert all(0 < k.n_regs <= k.metadata.maxnreg for k in kernels)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the GPU image's Triton, installed beside the venv's by `make test` (see the Makefile)
DEVICE_TRITON = os.path.join(ROOT, ".triton-device")


def _sass_stats(*argv: str, triton_dir: str = "") -> str:
    """stdout of ``benchmarks/sass_stats.py *argv``: an sm_90 compile, no GPU needed (the
    kernel is the real JIT function: no TRITON_INTERPRET in the child), with the Triton
    installed in ``triton_dir`` if given, else the venv's."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [triton_dir, ROOT])),
               TRITON_DEFAULT_FP_FUSION="1")
    p = subprocess.run([sys.executable, "benchmarks/sass_stats.py", *argv], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_idx64_off_compiles_to_int32_index_math():
    """The sm_90 compile (benchmarks/sass_stats.py, no GPU needed) of a launch with int32
    offsets has next to no 64-bit integer arithmetic left; with int64 ones, dozens: the
    kernel obeys IDX64 (the reference comparisons above pass either way)."""
    import re
    got = {}
    for flag in ("--int64", ""):
        out = _sass_stats("qwen3-8b", "64", *([flag] if flag else []))
        m = re.search(r"idx64=(\d): .*i64_ops=(\d+)", out)
        assert m, out
        got[flag] = int(m.group(1)), int(m.group(2))
    (idx_on, ops_on), (idx_off, ops_off) = got["--int64"], got[""]
    assert (idx_on, idx_off) == (1, 0)
    assert ops_off * 4 < ops_on, got


@pytest.mark.parametrize("triton_build", ["venv", "device"])
@pytest.mark.parametrize("shape", ["qwen3-8b", "glm-4.5"])
def test_inductor_trampoline_takes_no_more_registers_than_the_op(shape, triton_build):
    """The sm_90 compile (no GPU needed) of the Inductor launch's kernel for a dynamic T (small-T
    and large-T branches, int32 and int64 copies) takes no more registers a thread than the
    op's own kernel at T=65536, with the venv's Triton and with the GPU image's (3.6).
    Qwen3-8B took 44 against 40 (48 once allocated: one block less a multiprocessor) with
    runtime cache offsets; GLM-4.5 42 on the H200 (43 here with Triton 3.6, 40 with 3.9) with
    eps and the weight offset as constexprs (T=16384: 242 against the op's 229 us)."""
    import re
    triton_dir = ""
    if triton_build == "device":
        if not os.path.isdir(os.path.join(DEVICE_TRITON, "triton")):
            pytest.skip("the GPU image's Triton is not installed (`make test` installs it)")
        triton_dir = DEVICE_TRITON
    out = _sass_stats(shape, "65536", "--trampoline", triton_dir=triton_dir)
    assert triton_build == "venv" or "# triton 3.6." in out, out
    regs = [int(x) for x in re.findall(r": regs=(\d+) ", out)]
    assert len(regs) == 2, out
    op, trampoline = regs
    assert trampoline <= op, out


@pytest.mark.parametrize("triton_build", ["venv", "device"])
def test_small_t_loads_issue_before_the_reduction(triton_build):
    """The sm_90 compile (no GPU needed) of small-T launches, as the op makes them (with
    ``_EARLY_MAX_REGS``): in every exit path all global loads issue before the norm's first
    shuffle, one memory round trip.  Without the budget ptxas held the kernel to 32 registers
    and issued table and weight loads after the shuffles (Qwen3-Next T=64 K programs: after
    the reduction's input arrived), with the venv's Triton and the GPU image's (3.6)."""
    import re
    triton_dir = ""
    if triton_build == "device":
        if not os.path.isdir(os.path.join(DEVICE_TRITON, "triton")):
            pytest.skip("the GPU image's Triton is not installed (`make test` installs it)")
        triton_dir = DEVICE_TRITON
    sunk = 0
    for shape, t in (("qwen3-8b", "16"), ("glm-4.5", "64"), ("qwen3-next", "64")):
        for budget in ([], ["--max-regs", "none"]):
            out = _sass_stats(shape, t, *budget, triton_dir=triton_dir)
            order = re.search(r"order=(\S+)", out).group(1)
            paths = order.split("/")
            assert len(paths) == 3, out  # Q, K and V programs
            late = [p for p in paths if "s" in p and "L" in p[p.index("s"):]]
            if budget:
                sunk += len(late)
            else:
                assert not late, out
    assert sunk >= 3, "ptxas no longer sinks loads without the budget: is it still needed?"


def test_int64_slot_past_2_31_is_skipped_with_int32_offsets(monkeypatch):
    """A slot of 2^32 + 1 in an int64 slot tensor is out of range: nothing is written (with
    int32 arithmetic a truncating cast would have turned it into slot 1)."""
    from kernels import triton_kernel
    from .cases import make_args
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CPU runs the kernel only under Triton's interpreter")
    monkeypatch.setattr(triton_kernel, "_INDEX32", True)
    case = Case(T=3, bad_slots=False)
    args = list(make_args(case, "cpu"))
    args[23] = torch.tensor([2**32 + 1, 2**32 + 2, 2**32 + 3], dtype=torch.int64)
    before = args[21].clone(), args[22].clone()
    triton_kernel.launch(*args)
    assert torch.equal(args[21], before[0]) and torch.equal(args[22], before[1])


def test_needs_int64_at_the_int32_limit():
    from kernels.triton_kernel import _INT32_SPAN, _needs_int64
    meta = dict(device="meta", dtype=torch.bfloat16)
    small = torch.empty(1024, 4096, **meta)
    assert not _needs_int64(1024, 4, (small,) * 3, 32 * 128, 1 << 20)
    big = torch.empty(2**18, 4096, **meta)  # 2^30 elements
    assert _needs_int64(2**18, 4, (big, small, small), 32 * 128, 1 << 20)
    assert _needs_int64(1024, 4, (small,) * 3, 2**20, 1 << 20)  # the outputs
    assert _needs_int64(1, 1, (small[:1],) * 3, 128, _INT32_SPAN)  # a cache


def test_plan_constexprs_in_kernel_order():
    """BoundLaunch passes the plan's constexprs as a tuple, in the dict's order."""
    from fusion_pass import inductor_launch
    from kernels.triton_kernel import _CONST_NAMES, _TILE_CONSTS, fused_qkv_kernel, tile_plan
    import inspect
    sig = inspect.signature(fused_qkv_kernel.fn)  # a JITFunction or the interpreter's wrapper
    names = [n for n, p in sig.parameters.items() if "constexpr" in str(p.annotation)]
    assert names == list(_CONST_NAMES)
    assert list(tile_plan(5, 8, 2, 64, 64, True, True, True, True).constexprs) == list(_TILE_CONSTS)
    kw = dict(hq=8, hkv=2, d=64, rotary_dim=64, write_q=True, run_k=True, run_v=True,
              write_gate=False)
    assert list(inductor_launch.plan(5, **kw).tiles.constexprs) == list(_TILE_CONSTS)


def test_bound_launch_constexpr_values_by_name():
    """BoundLaunch's constexpr tuple, read back by name, says what the call asked for (a swap
    of two flags would only show in a case like this one: one scale, one weight)."""
    from kernels import api
    from kernels.triton_kernel import _CONST_NAMES, BoundLaunch
    g = torch.Generator().manual_seed(0)
    hq, hkv, d, r = 6, 2, 64, 32
    call = api.prepare(
        torch.randn(3, (2 * hq + 2 * hkv) * d, generator=g), num_q_heads=hq, num_kv_heads=hkv,
        head_dim=d, gate="interleaved", q_weight=torch.randn(d, generator=g), rotary_dim=r,
        is_neox=False, positions=torch.tensor([0, 1, 2]),
        cos_sin_cache=torch.randn(8, r, generator=g),
        key_cache=torch.zeros(4, 4, hkv, d, dtype=torch.uint8),
        value_cache=torch.zeros(4, 4, hkv, d, dtype=torch.uint8), kv_cache_dtype="fp8_e4m3",
        slot_mapping=torch.tensor([0, 5, 9]), k_scale=torch.tensor(2.0),
        return_k=False, return_gate=False)
    b = BoundLaunch(*call.head, *call.cache, *call.flags)
    got = dict(zip(_CONST_NAMES, b.consts))
    assert got == dict(HQ=hq, HKV=hkv, D=d, R=r, GATE=1, HAS_NORM=True, HAS_QW=True,
                       HAS_KW=False, IS_NEOX=False, EXPANDED=False, HAS_POS=True,
                       HAS_CACHE=True, SKIP_NEG=True, IS_FP8=True, HAS_KS=True, HAS_VS=False,
                       FP8_MAX=448.0, WRITE_Q=True, WRITE_K=False, WRITE_V=True,
                       WRITE_G=False)


def test_auto_switches_even_without_bigger_tiles():
    """D=256 with 8 KV heads (Gemma-like): a row of head tiles already holds 16 elements a
    thread, so from T=1024 a program keeps one token, but the switch still turns the early
    loads off there."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from fusion_pass import inductor_launch
    kw = dict(hq=16, hkv=8, d=256, rotary_dim=256, write_q=True, run_k=True, run_v=True,
              write_gate=False)
    auto = inductor_launch.plan(ShapeEnv().create_unbacked_symint(), **kw)
    assert (auto.switch_t, auto.big_block_t) == (1024, 1)
    assert auto.tiles.block_t == 1 and auto.tiles.constexprs["EARLY"]


def test_grid_follows_the_branch_the_trampoline_takes():
    """The Inductor launch's grid (``_grid_x``: for a static T, and the expression it builds
    for a dynamic one, evaluated at T) is cdiv(T, tokens a program) of the branch
    ``fused_qkv_inductor_kernel`` takes at T, for every kind of plan: no switch; a switch
    with an int64 large-T branch; an int32 bound at or below the switch (a lowered cap); an
    int32 copy, then the int64 one on the small-T tile."""
    import fractions

    import triton

    from fusion_pass import inductor_launch as il
    from kernels import triton_kernel as tk

    class Evaluate:  # stands in for the graph builder: runs each op on numbers
        @staticmethod
        def call(f, args):
            return f(*args)

    def kernel_block_t(p, t):  # the trampoline's branches, as the kernel writes them
        if p.switch_t > 0 and t >= p.switch_t:
            return p.wide_block_t if t >= p.big_int32_below else p.big_block_t
        return p.tiles.block_t

    for bt in (1, 2):
        tiles = tk.tile_plan(32, 8, 2, 128, 128, True, True, True, False, True)
        tiles = tiles._replace(block_t=bt, constexprs={**tiles.constexprs, "BLOCK_T": bt})
        for switch, below, big, wide in [(0, 0, 1, 1), (4, 0, 8, 8), (4, 3, 8, bt),
                                         (4, 10, 8, bt), (1024, 74897, 2, bt)]:
            p = il.Plan(tiles, switch, big, False, below, wide)
            for t in [*range(1, 40), 1023, 1024, 1025, 74896, 74897, 100001]:
                want = triton.cdiv(t, kernel_block_t(p, t))
                assert il._grid_x(None, t, p) == want, (p, t)
                # not an int: the symbolic path (its ops evaluated on a Fraction)
                assert il._grid_x(Evaluate, fractions.Fraction(t), p) == want, (p, t)


def test_large_t_branch_keeps_int32_offsets_up_to_the_exact_bound(monkeypatch):
    """A dynamic-T Inductor launch: the large-T branch runs int32 offsets for T below
    ``big_int32_below`` and int64 from there; the bound is the first T at which launch()'s
    own check (``_needs_int64``) asks for int64.  With int32 turned off: int64 everywhere."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from fusion_pass import inductor_launch as il
    from kernels import triton_kernel as tk
    hq, hkv, d = 96, 8, 128
    w = (hq + 2 * hkv) * d
    qkv = torch.empty(4, w, device="meta", dtype=torch.bfloat16)
    cache = torch.empty(4096, 16, hkv, d, device="meta", dtype=torch.bfloat16)
    table = torch.empty(4096, 64, device="meta")
    a = dict(q_src=qkv, k_src=qkv, v_src=qkv, cos=table[:, :32], sin=table[:, 32:],
             num_q_heads=hq, num_kv_heads=hkv, head_dim=d)
    t_sym = ShapeEnv().create_unbacked_symint()
    launch = il.plan(t_sym, hq=hq, hkv=hkv, d=d, rotary_dim=64, write_q=True, run_k=True,
                     run_v=True, write_gate=False)
    got = il._offset_widths(a, dict(base=cache), dict(base=cache), t_sym, launch)
    bound = got.big_int32_below
    assert not got.idx64 and bound > launch.switch_t

    def needs64(t):
        return tk._needs_int64(t, launch.big_block_t, (torch.empty(t, w, device="meta"),),
                               hq * d, max(cache.numel(), tk._span(table)))
    assert not needs64(bound - 1) and needs64(bound)
    monkeypatch.setattr(tk, "_INDEX32", False)
    got = il._offset_widths(a, dict(base=cache), dict(base=cache), t_sym, launch)
    assert got.idx64 and got.big_int32_below == 0


def test_int32_bound_counts_per_token_tables_and_big_caches():
    """Hugging Face tables have one row per token (first dim the symbolic T): their span grows
    with T and can set the bound; a cache of 2^31 elements never fits int32 (bound 0)."""
    from torch._subclasses import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from fusion_pass import inductor_launch as il
    from kernels import triton_kernel as tk
    hq, hkv, d = 32, 8, 128
    w, row = (hq + 2 * hkv) * d, 8192  # a table row wider than a qkv row
    env = ShapeEnv()
    t_sym = env.create_unbacked_symint()
    with FakeTensorMode(shape_env=env):
        qkv = torch.empty(t_sym, w, dtype=torch.bfloat16)
        cos = torch.empty(t_sym, row)[:, :64]
        cache = torch.empty(4096, 16, hkv, d, dtype=torch.bfloat16)
        big = torch.empty(1 << 17, 16, hkv, d, dtype=torch.bfloat16)
    a = dict(q_src=qkv, k_src=qkv, v_src=qkv, cos=cos, sin=cos, num_q_heads=hq,
             num_kv_heads=hkv, head_dim=d)
    launch = il.plan(t_sym, hq=hq, hkv=hkv, d=d, rotary_dim=128, write_q=True, run_k=True,
                     run_v=True, write_gate=False)
    bound = il._offset_widths(a, dict(base=cache), dict(base=cache), t_sym,
                              launch).big_int32_below

    def needs64(t):
        srcs = [((t - 1) * w + w, w)]
        return tk.needs_int64_spans(t, launch.big_block_t, srcs, hq * d,
                                    max(cache.numel(), (t - 1) * row + 64))
    assert launch.switch_t < bound < (1 << 30) // w  # the table, not the sources, sets it
    assert not needs64(bound - 1) and needs64(bound)
    got = il._offset_widths(a, dict(base=big), dict(base=big), t_sym, launch)
    assert got.idx64 and got.big_int32_below == 0


def test_early_loads_only_for_static_small_t():
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from fusion_pass import inductor_launch
    from kernels.triton_kernel import tile_plan
    def early(t):
        return tile_plan(t, 96, 8, 128, 64, True, True, True, False).constexprs["EARLY"]
    assert early(1) and early(255)
    assert not early(256) and not early(65536)
    kw = dict(hq=96, hkv=8, d=128, rotary_dim=64, write_q=True, run_k=True, run_v=True,
              write_gate=False)
    assert inductor_launch.plan(64, **kw).tiles.constexprs["EARLY"]
    t = ShapeEnv().create_unbacked_symint()
    dyn = inductor_launch.plan(t, **kw, dynamic_tiles="decode").tiles
    assert not dyn.constexprs["EARLY"] and dyn.block_t == 1  # small-T tiles, late loads
    # "auto": early loads below T=1024 (the large-T branch has them off, in the trampoline)
    assert inductor_launch.plan(t, **kw).tiles.constexprs["EARLY"]


def test_register_budget_goes_to_launches_that_fit(monkeypatch):
    """A register budget goes to launches of at most ``_BUDGET_WARPS_PER_SM`` warps an SM and
    16 elements a thread: ``_EARLY_MAX_REGS`` with early loads, ``_LATE_MAX_REGS`` with late
    ones.  GLM-4.5 on 132 multiprocessors takes it at T=32 (448 programs of 4 warps, one token
    each), T=64 and T=192 (448 and 1344 programs of two tokens, early loads) and T=256 (1792
    programs: 54 warps an SM, late loads), but not at T=768 (163 warps an SM), nor Qwen3-Next's
    one-warp tiles of 32 elements a thread at T=1024, nor early-load tiles of 32 elements a
    thread (D=512 with 8 KV heads, T=16).  No device without the option (the CPU) takes
    either."""
    from kernels import triton_kernel
    seen = []

    def spy():
        def call(grid, args, consts, num_warps, launch_pdl=False, maxnreg=None, memo=None):
            seen.append((grid[0], maxnreg))
        return call

    monkeypatch.setattr(triton_kernel, "_FAST_LAUNCH", True)
    monkeypatch.setattr(triton_kernel, "_cached_launcher", spy)
    glm = dict(hq=96, hkv=8, d=128, rotary_dim=64, num_blocks=40, block_size=16)
    triton_kernel.launch(*make_args(Case(T=64, **glm)))
    monkeypatch.setattr(triton_kernel, "_maxnreg_ok", lambda dev: True)
    monkeypatch.setattr(triton_kernel, "_sm_count", lambda dev: 132)
    for t in (32, 64, 192, 256):
        triton_kernel.launch(*make_args(Case(T=t, **glm)))
    triton_kernel.launch(*make_args(Case(T=768, **dict(glm, num_blocks=100))))
    nxt = dict(hq=16, hkv=2, d=256, rotary_dim=64, num_blocks=130, block_size=16)
    triton_kernel.launch(*make_args(Case(T=1024, **nxt)))
    wide = dict(hq=16, hkv=8, d=512, rotary_dim=512, num_blocks=8, block_size=16)
    triton_kernel.launch(*make_args(Case(T=16, **wide)))
    budget, late = triton_kernel._EARLY_MAX_REGS, triton_kernel._LATE_MAX_REGS
    assert budget is not None and late is not None
    assert seen == [(448, None), (448, budget), (448, budget), (1344, budget), (1792, late),
                    (5376, None), (6144, None), (64, None)]


def test_mid_t_tiles_for_many_head_models():
    """From T=64 many heads a token at D=128 (GLM-4.5) take the large-T tile, 2 tokens of 8
    heads, with early loads below T=256; at other D from T=256, as before (untimed)."""
    from kernels.triton_kernel import _pick_blocks, tile_plan
    assert _pick_blocks(64, 128, 96, 8) == (2, 8, 128, 4)  # GLM-4.5
    assert _pick_blocks(256, 128, 96, 8) == (2, 8, 128, 4)
    assert _pick_blocks(1023, 128, 96, 8) == (2, 8, 128, 4)
    assert _pick_blocks(63, 128, 96, 8) == (1, 8, 128, 4)  # decode sizes unchanged
    assert _pick_blocks(256, 128, 32, 8) == (1, 8, 128, 4)  # Qwen3-8B keeps one token
    assert _pick_blocks(1024, 128, 96, 8) == (2, 8, 128, 4)  # large T unchanged
    assert _pick_blocks(64, 64, 96, 8)[0] == 1 and _pick_blocks(256, 64, 96, 8)[0] == 4  # D=64
    for t, early in ((64, True), (255, True), (256, False)):  # the buckets around T=64
        plan = tile_plan(t, 96, 8, 128, 64, True, True, True, False)
        assert (plan.block_t, plan.constexprs["EARLY"]) == (2, early)
    assert tile_plan(63, 96, 8, 128, 64, True, True, True, False).block_t == 1
