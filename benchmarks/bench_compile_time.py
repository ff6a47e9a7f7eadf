"""How much the pass adds to compiling a 4-layer model (examples/paged_decode.py's Qwen3-like).

Times the first call (trace + compile + run) of stock Inductor and of Inductor + fusion_pass,
with every compile cache off, and the time spent inside the pass itself.

    python benchmarks/bench_compile_time.py [--device cpu|cuda] [--repeats 3]
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import torch  # noqa: E402

import fusion_pass  # noqa: E402
from paged_decode import build_engine  # noqa: E402


class TimedPass(fusion_pass.FusionPass):
    """The pass, accumulating its own wall time."""

    seconds = 0.0

    def __call__(self, graph):
        t0 = time.perf_counter()
        super().__call__(graph)
        TimedPass.seconds += time.perf_counter() - t0


def first_call_seconds(model, engine, with_pass: bool, device: str) -> float:
    torch._dynamo.reset()
    patch = {"fx_graph_cache": False}
    if with_pass:
        patch["post_grad_custom_post_pass"] = TimedPass(allow_cpu=device == "cpu")
    with torch._inductor.config.patch(patch), torch.no_grad():
        torch._functorch.config.enable_autograd_cache = False
        fn = torch.compile(model)
        t0 = time.perf_counter()
        from paged_decode import generate

        generate(engine, fn, steps=1)  # prefill and one decode step: both graphs compile
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    model, engine = build_engine(a.device, torch.float32, num_layers=4)
    base, fused = [], []
    for _ in range(a.repeats):
        base.append(first_call_seconds(model, engine, False, a.device))
        TimedPass.seconds = 0.0
        fused.append(first_call_seconds(model, engine, True, a.device))
        pass_s = TimedPass.seconds
    b, f = statistics.median(base), statistics.median(fused)
    print(f"4-layer model, {a.device}: first call stock {b:.2f} s, with pass {f:.2f} s "
          f"({(f / b - 1) * 100:+.1f}%); time inside the pass {pass_s * 1e3:.0f} ms "
          f"({pass_s / f * 100:.1f}% of the compile)")


if __name__ == "__main__":
    main()
