"""What reading every other 512-byte run costs: Qwen3-Next's gate-less Q read, as a plain copy.

A compiled Qwen3-Next chain keeps the gate as a view of ``qkv``, so the fused op reads only
the Q half of each interleaved ``[q_h | g_h]`` pair (512 of every 1024 bytes) and reached
60-70% of its bytes floor.  This script times two Triton copies of the same bytes, one read
with that stride and one read contiguously, each writing a contiguous output, so the
difference is the access pattern alone (no norm, no rope, no cache).

    python benchmarks/strided_read.py [--tokens 4096,16384,65536]
"""
import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_op  # noqa: E402


@triton.jit
def _copy_heads(src, dst, n_rows, src_row_stride, src_head_stride,
                H: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr):
    """dst[(t, h), :] = src[t * src_row_stride + h * src_head_stride + :D]."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, D)
    m = (r < n_rows)[:, None]
    t, h = (r // H).to(tl.int64), r % H
    x = tl.load(src + (t * src_row_stride + h * src_head_stride)[:, None] + d[None, :], mask=m)
    tl.store(dst + r.to(tl.int64)[:, None] * D + d[None, :], x, mask=m)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="4096,16384,65536")
    a = ap.parse_args()
    hq, d = 16, 256  # Qwen3-Next's Q: 16 heads of 256, each followed by its 256-wide gate
    bw = bench_op.copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()}  triton {triton.__version__}  copy bandwidth "
          f"{bw / 1e12:.2f} TB/s; each copy reads T*{hq}*{d} bf16 and writes as much")
    print(f"{'T':>6} | {'strided us':>10} {'%bw':>5} | {'contig us':>9} {'%bw':>5} | "
          f"{'torch us':>8} {'%bw':>5}")
    for t in map(int, a.tokens.split(",")):
        packed = torch.randn(t, hq * 2 * d, device="cuda", dtype=torch.bfloat16)
        flat = torch.randn(t, hq * d, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(t, hq * d, device="cuda", dtype=torch.bfloat16)
        n, rows = t * hq, 8
        grid = (triton.cdiv(n, rows),)
        res = []
        for src, row_stride, head_stride in ((packed, hq * 2 * d, 2 * d), (flat, hq * d, d)):
            call = lambda: _copy_heads[grid](src, out, n, row_stride, head_stride,  # noqa: E731
                                             H=hq, D=d, ROWS=rows, num_warps=4)
            call()
            ref = src.view(t, hq, -1)[:, :, :d].reshape(t, hq * d)
            assert torch.equal(out, ref), "copy kernel is wrong"
            res.append(bench_op.bench(call, True) * 1e3)
        res.append(bench_op.bench(lambda: out.copy_(flat), True) * 1e3)
        nbytes = 2 * out.numel() * out.element_size()
        print(f"{t:>6} | " + " | ".join(f"{us:10.2f} {nbytes / (us * 1e-6) / bw:5.1%}"
                                         for us in res), flush=True)


if __name__ == "__main__":
    main()
