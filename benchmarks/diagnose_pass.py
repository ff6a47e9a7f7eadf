"""Print what the pass does to the benchmark's unfused chain, per shape (GPU diagnostics)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_op  # noqa: E402
import fusion_pass  # noqa: E402


def main():
    torch._inductor.config.fx_graph_cache = False
    torch._dynamo.config.recompile_limit = 1024
    for name in bench_op.SHAPES:
        for hnd in (False, True):
            be = fusion_pass.make_backend()
            f = torch.compile(bench_op.unfused, backend=be)
            for t in (1, 64):
                inp, kw, _ = bench_op.make_inputs(name, t, hnd)
                f(*inp, **kw, opaque=False)
            print(name, "HND" if hnd else "NHD")
            print(be.report)
            if not all(c.status == "fused" for c in be.report.candidates):
                _dump(name, hnd)


def _dump(name, hnd):
    class Dump:
        def __call__(self, g):
            print("\n".join(str(n.format_node()) for n in g.nodes
                            if n.op != "placeholder")[:6000])

        def uuid(self):
            return None

    torch._dynamo.reset()
    with torch._inductor.config.patch(post_grad_custom_post_pass=Dump()):
        inp, kw, _ = bench_op.make_inputs(name, 64, hnd)
        torch.compile(bench_op.unfused)(*inp, **kw, opaque=False)


if __name__ == "__main__":
    main()
