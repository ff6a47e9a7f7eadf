"""Run in a fresh process: compile a form with the pass, print whether it was fused and cached.

Usage: python -m tests.fx_cache_script [cuda]  (TORCHINDUCTOR_CACHE_DIR set by the caller)
"""
import json
import os
import re
import sys

if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    import fusion_pass
    from tests.model_forms import Form, build, clone_args

    torch._inductor.config.fx_graph_cache = True
    fn, args = build(Form(device=device))
    eager_args = clone_args(args)
    be = fusion_pass.make_backend(allow_cpu=device == "cpu")
    out, codes = run_and_get_code(torch.compile(fn, backend=be), *args)
    eager = fn(*eager_args)
    code = "\n".join(codes)
    # CUDA: Inductor's code launches the kernel itself (fusion_pass/inductor_launch.py)
    launched = re.search(r"fused_qkv_inductor_kernel_\d+\.run\(", code) is not None
    print(json.dumps({
        "hit": counters["inductor"]["fxgraph_cache_hit"],
        "miss": counters["inductor"]["fxgraph_cache_miss"],
        "bypass": counters["inductor"]["fxgraph_cache_bypass"],
        "pass_ran": len(be.report.candidates) > 0,
        "fused_in_code": "fused_qkv.split_norm_rope_cache" in code or launched,
        "inductor_launch": launched,
        "max_err_q": (out[0].float() - eager[0].float()).abs().max().item(),
        "max_err_cache": (args[7].float() - eager_args[7].float()).abs().max().item(),
    }))
