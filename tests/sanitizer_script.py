"""Exercise the Triton kernel's edge cases on CUDA, for ``compute-sanitizer --tool memcheck``.

Run by ``tests/test_sanitizer.py`` (with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so that every
tensor is its own allocation and an out-of-bounds access cannot land silently inside a
neighbour in PyTorch's memory pool).  It can also be run by hand:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \\
        python tests/sanitizer_script.py

Covered: slots -1, far negative, past the end (just past, far past, int32 max, 2^40),
duplicates; engine and indexing mode; int32/int64 slot mappings; NHD and HND; fp8 and uint8
(fp8 bytes) caches with and without scales; gated Q (interleaved, blocked); the caches as the
two halves of one tensor; non-power-of-two head dims; partial rotary, GPT-J; strided rows;
T >= 1024 (multi-token tiles whose last tile runs past T, with a slot_mapping of exactly T
entries, so a read past its end would be caught); output flags off.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# "cpu" (with TRITON_INTERPRET=1) only to dry-run this script without a GPU.
DEVICE = os.environ.get("SANITIZER_SCRIPT_DEVICE", "cuda")

import torch  # noqa: E402

from kernels.op_schema import LAYOUT_HND, LAYOUT_NHD  # noqa: E402
from kernels.triton_kernel import launch  # noqa: E402
from tests.cases import Case, make_args  # noqa: E402

CASES = [
    Case(T=9, layout=LAYOUT_HND, cache_dtype="fp8_e4m3", gate=1),
    Case(T=9, layout=LAYOUT_NHD, cache_dtype="uint8_e5m2", gate=2, scales=False,
         shared_base=True, idx_dtype=torch.int32),
    Case(T=11, hq=8, hkv=2, d=80, layout=LAYOUT_HND, gate=2, rotary_dim=32, is_neox=False,
         block_size=1, num_blocks=16, dtype=torch.float16, row_pad=3),
    Case(T=7, hq=3, hkv=3, d=192, separate=True, row_pad=5, cache_dtype="fp8_e5m2",
         table="gathered_expanded", writes=(True, False, False, True), gate=1),
    Case(T=1027, hq=2, hkv=1, d=64, block_size=16, num_blocks=65, layout=LAYOUT_HND,
         cache_dtype="uint8_e4m3", gate=1),
    Case(T=1025, hq=4, hkv=2, d=96, block_size=16, num_blocks=65, dtype=torch.float32,
         idx_dtype=torch.int32, writes=(False, False, False, False)),
]


def slot_sets(T: int, n: int, big_ok: bool):
    """Slot mappings of length T with edge values (wrapped to T entries)."""
    far = 2 ** 40 if big_ok else 2 ** 31 - 1
    edge = [-1, n, n + 1, 2 * n, 2 ** 31 - 1, far, -n - 1, -(2 ** 31), -1, n - 1, 0]
    dup = [0, 0, n - 1, -1, 3, 3, 3, n, -n]
    allneg = [-1]
    for base in (edge, dup, allneg):
        yield [base[i % len(base)] for i in range(T)]
    yield [(i * 7) % (n + 3) - 1 for i in range(T)]  # a sweep over [-1, n + 1]


def main() -> None:
    if DEVICE == "cuda":
        assert torch.cuda.is_available(), "needs a CUDA GPU"
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    runs = 0
    for case in CASES:
        torch.manual_seed(runs)
        args = list(make_args(case, DEVICE))
        n = case.num_blocks * case.block_size
        for slots in slot_sets(case.T, n, case.idx_dtype == torch.int64):
            for engine in (True, False):
                a = list(args)
                a[23] = torch.tensor(slots, dtype=case.idx_dtype, device=DEVICE)
                a[25] = engine
                out = launch(*a)
                sync()
                for x in out:
                    assert not torch.isnan(x).any(), "NaN in an output"
                runs += 1
        # no cache at all (the split_norm_rope op)
        launch(*args[:21], None, None, None, 0, True, "auto", None, None, *case.writes)
        sync()
        runs += 1
    print(f"sanitizer script: OK ({runs} launches)")


if __name__ == "__main__":
    main()
