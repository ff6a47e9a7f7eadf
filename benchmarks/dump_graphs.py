"""GPU diagnostics: post-grad graphs (before the pass) and pass reports for chosen cases."""
import os
import sys
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_op  # noqa: E402
import fusion_pass  # noqa: E402
from tests.model_forms import Form, build  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/out")


class Dump(fusion_pass.FusionPass):
    def __init__(self, name):
        super().__init__()
        self.name = name

    def __call__(self, g):
        with open(os.path.join(OUT, f"graph_{self.name}.txt"), "a") as f:
            f.write(str(g) + "\n")
        super().__call__(g)
        with open(os.path.join(OUT, f"graph_{self.name}.txt"), "a") as f:
            f.write("\n# REPORT\n" + str(self.report) + "\n")


def run(name, fn, args, kwargs):
    torch._dynamo.reset()
    p = Dump(name)
    try:
        with torch._inductor.config.patch(post_grad_custom_post_pass=p, fx_graph_cache=False):
            torch.compile(fn)(*args, **kwargs)
    except Exception:
        with open(os.path.join(OUT, f"graph_{name}.txt"), "a") as f:
            f.write(traceback.format_exc()[-6000:])
    print(name, p.report.summary())


if __name__ == "__main__":
    torch._dynamo.config.recompile_limit = 1024
    inp, kw, _ = bench_op.make_inputs("glm-4.5", 64, False)
    run("glm", bench_op.unfused, inp, dict(kw, opaque=False))
    inp, kw, _ = bench_op.make_inputs("qwen3-8b", 64, True)
    run("hnd", bench_op.unfused, inp, dict(kw, opaque=False))
    for name, form in (("fp32nn", Form(device="cuda", dtype=torch.float32, norm="nn")),
                       ("static", Form(device="cuda", hf=True, cache="static", split="separate",
                                       table="gathered", rope="rotate_half"))):
        fn, args = build(form)
        run(name, fn, args, {})
