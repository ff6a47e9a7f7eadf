"""Property-based fuzzing of the Triton kernel over the op's whole configuration space.

Each example is one ``tests.cases.Case`` (heads, head dim, rotary dim and style, gate layout,
norm offset and weight, table form and dtype, activation dtype, packed/separate, row stride,
cache layout/dtype/sharing, fp8 scales, slot mode, index dtype, T, output flags), checked by
``tests.kernel_check.check_case``: every wanted output against SPEC's numerics rule (float64
oracle, 1.5x the eager reference's error + 1 ulp), the addressed cache rows likewise, and
every other cache row bit-identical to its poisoned start.

CPU (Triton interpreter): database-free shards with fixed seeds, so CI sees the same examples
on every run.  GPU: the same strategy with many more examples, head dim 512 included, and T
large enough to reach the kernel's multi-token tiles.
"""
import math
import zlib

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from kernels.op_schema import ACT_DTYPES, LAYOUT_HND, LAYOUT_NHD, TABLE_DTYPES

from .cases import TABLE_FORMS, Case
from .fuzz_shards import cpu_shards
from .kernel_check import check_case

CPU_HEAD_DIMS = (64, 80, 96, 128, 160, 192, 256)
GPU_HEAD_DIMS = CPU_HEAD_DIMS + (512,)
CACHE_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2", "uint8_e4m3", "uint8_e5m2")
BLOCK_SIZES = (1, 3, 4, 16, 17)

# Measured on 2 CPU cores (Triton interpreter, pytest in one process, 2026-12-02): ~1.5 s per
# example on average, ~0.05 s per program of the grid.  The CPU examples run as CPU_SHARDS
# tests of their own seed, so that pytest-xdist spreads them over its workers.
CPU_EXAMPLES = 500
CPU_SHARDS = 5
GPU_EXAMPLES = int(os.environ.get("FUZZ_GPU_EXAMPLES", "400"))


@st.composite
def cases(draw, head_dims=CPU_HEAD_DIMS, max_t=40, small_t=0):
    """``small_t``: half the draws take T <= small_t (the interpreter's time grows with the
    grid, T x head tiles, while most examples are there for the configuration)."""
    hkv = draw(st.integers(1, 4))
    group = draw(st.integers(1, 4))
    d = draw(st.sampled_from(head_dims))
    # rotary dim: full, the common partial fractions, or any even value in [2, d]
    rotary = draw(st.one_of(
        st.sampled_from([None, d, d // 2, d // 4]),
        st.integers(1, d // 2).map(lambda x: 2 * x),
    ))
    norm = draw(st.sampled_from([None, 0.0, 1.0]))
    t = draw(st.one_of(st.integers(1, small_t), st.integers(1, max_t)) if small_t
             else st.integers(1, max_t))
    block_size = draw(st.sampled_from(BLOCK_SIZES))
    spare = draw(st.integers(0, 9))  # unused slots, so untouched rows exist
    num_blocks = max(1, math.ceil((t + spare) / block_size))
    cache = draw(st.booleans()) or draw(st.booleans())  # 3/4 with a cache
    return Case(
        T=t,
        hq=hkv * group,
        hkv=hkv,
        d=d,
        rotary_dim=rotary,
        is_neox=draw(st.booleans()),
        gate=draw(st.sampled_from([0, 1, 2])),
        norm=norm,
        has_weight=draw(st.booleans()),
        eps=draw(st.sampled_from([1e-6, 1e-5])),
        table=draw(st.sampled_from(TABLE_FORMS)),
        table_dtype=draw(st.sampled_from(TABLE_DTYPES)),
        dtype=draw(st.sampled_from(ACT_DTYPES)),
        separate=draw(st.booleans()),
        row_pad=draw(st.sampled_from([0, 0, 1, 8, 24, 67])),
        cache=cache,
        layout=draw(st.sampled_from([LAYOUT_NHD, LAYOUT_HND])),
        shared_base=draw(st.booleans()),
        block_size=block_size,
        num_blocks=num_blocks,
        cache_dtype=draw(st.sampled_from(CACHE_DTYPES)),
        scales=draw(st.booleans()),
        skip_negative=draw(st.booleans()),
        bad_slots=draw(st.booleans()),
        unique_slots=True,  # duplicate slots have no defined order: see tests/test_slots.py
        idx_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        writes=tuple(draw(st.lists(st.booleans(), min_size=4, max_size=4))),
    )


def run_case(case: Case, device: str) -> None:
    """Seed torch from the case (torch's RNG is not hypothesis's) and check it.

    To reproduce a reported failure: ``run_case(Case(...printed fields...), "cpu")``.
    """
    torch.manual_seed(zlib.crc32(repr(case).encode()))
    check_case(case, device)


# No shrinking: a failing Case prints in full and reproduces on its own (run_case), while
# shrinking a kernel example under the interpreter can take many minutes.
_COMMON = dict(deadline=None, derandomize=True, database=None, print_blob=False,
               phases=(Phase.explicit, Phase.generate),
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


globals().update(cpu_shards("test_fuzz_kernel_cpu", lambda case: run_case(case, "cpu"),
                            cases(small_t=8), CPU_EXAMPLES, CPU_SHARDS, **_COMMON))


@pytest.mark.gpu
@pytest.mark.slow
@settings(max_examples=GPU_EXAMPLES, **_COMMON)
@given(case=st.one_of(cases(GPU_HEAD_DIMS, max_t=40), cases(GPU_HEAD_DIMS, max_t=3000)))
def test_fuzz_kernel_gpu(case):
    run_case(case, "cuda")
