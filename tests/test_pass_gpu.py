"""The pass on the GPU: real Triton kernel, CUDA tensors, CUDA graphs (reduce-overhead).

By default (``inductor_launch=True``) Inductor's generated code launches the kernel itself:
``check_fused`` requires ``fused_qkv_inductor_kernel`` launched, no ``fused_qkv`` custom op
called and no cache copied (``REQUIRE_INDUCTOR_LAUNCH=0`` accepts the custom op as well).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import fusion_pass

from .model_forms import Form, build
from .pass_check import (FUSED_CACHE, FUSED_NOCACHE, INDUCTOR_LAUNCH, LAUNCH_RE,
                         REQUIRE_INDUCTOR_LAUNCH, check_fused)

pytestmark = pytest.mark.gpu

GPU_FORMS = [
    dict(),
    dict(split="gated_interleaved", rotary=0.25, d=256, hq=4, hkv=1, norm="gemma", cache="fp8"),
    dict(split="separate", hf=True, table="gathered", rope="rotate_half", norm="qwen3"),
    dict(hf=True, cache="static", split="separate", table="gathered", rope="rotate_half"),
    dict(rope="gptj", rotary=0.5, norm="none", cache="hnd"),
    dict(cache="kv_halves", d=128, hq=8, hkv=2),
    dict(dtype=torch.float16, cache="nhd"),
    dict(dtype=torch.float32, norm="qwen3"),
]


@pytest.mark.parametrize("kw", GPU_FORMS, ids=[str(i) for i in range(len(GPU_FORMS))])
def test_pass_fuses_on_cuda(kw):
    check_fused(Form(device="cuda", **kw))


def test_pass_dynamic_tokens_on_cuda():
    check_fused(Form(device="cuda"), dynamic=True)


@pytest.mark.parametrize("hq, switch, tokens, cap", [(8, 1024, (40, 1100, 1023), None),
                                                     (48, 128, (40, 300, 127, 1100), None),
                                                     (48, 128, (40, 300, 1100, 127), 600)],
                         ids=["switch_1024", "many_heads_128", "many_heads_int64_from_600"])
def test_dynamic_tokens_across_the_tile_switch_on_cuda(hq, switch, tokens, cap, monkeypatch):
    """One dynamic-T graph (``dynamic_tiles="auto"``) run on both sides of the tile switch: the
    kernel's small-T branch, its large-T one (4 tokens a program at 8 Q heads) and the small-T
    branch again just below the switch, each against eager, with no recompile in between.
    With 64 heads a token (48 Q + 2 x 8 KV, GLM-4.5-like, D=128) the switch is at T=128.
    ``cap`` lowers the large-T branch's int32 bound (``INT32_BELOW_CAP``): T=1100 then runs
    its int64 copy, one token a program (a third grid step)."""
    import re

    from fusion_pass import inductor_launch
    from .model_forms import clone_args, resize_caches
    from .pass_check import RecordingPass, assert_numerics
    monkeypatch.setattr(inductor_launch, "INT32_BELOW_CAP", cap)

    form = Form(device="cuda", d=128, hq=hq, hkv=2 if hq == 8 else 8)
    fn, args0 = build(form)
    args0 = resize_caches(args0, 300)  # 1200 slots
    g = torch.Generator().manual_seed(3)
    fpass = RecordingPass(allow_cpu=True)
    torch._dynamo.reset()
    compiled = None
    with torch._inductor.config.patch(post_grad_custom_post_pass=fpass, fx_graph_cache=False):
        for t in tokens:
            args = list(args0)
            args[0] = torch.randn(1, t, args0[0].shape[-1], generator=g).to(args0[0])
            args[4] = torch.randint(0, 64, (1, t), generator=g).cuda()
            args[5] = torch.randperm(1200, generator=g)[:t].cuda()
            if compiled is None:
                torch._dynamo.mark_dynamic(args[0], 1)
                torch._dynamo.mark_dynamic(args[4], 1)
                torch._dynamo.mark_dynamic(args[5], 0)
                compiled = torch.compile(fn)
                before = clone_args(args)
                out, codes = run_and_get_code(compiled, *args)
                code = "\n".join(codes)
                # the grid's step (2T) // (T + switch)
                assert re.search(rf"//\s*\({switch} \+ ", code), "no tile switch in the grid"
                assert cap is None or re.search(rf"//\s*\({cap} \+ ", code), "no int64 step"
            else:
                before = clone_args(args)
                out = compiled(*args)
            assert_numerics(fn, args, out, before)
    assert len(fpass.graphs) == 1, "recompiled"
    assert {c.op for c in fpass.report.fused} == {INDUCTOR_LAUNCH}, str(fpass.report)


def test_no_cache_on_cuda():
    check_fused(Form(device="cuda", cache="none", return_k=True), expect=FUSED_NOCACHE)
    check_fused(Form(device="cuda", cache="none", return_k=True), expect=FUSED_NOCACHE,
                dynamic=True)


@pytest.mark.parametrize("kw", [dict(), dict(cache="none", return_k=True)], ids=["cache", "none"])
def test_inductor_launch_off_uses_custom_op(kw):
    """``inductor_launch=False``: the custom op, as before the Inductor launch existed."""
    expect = FUSED_NOCACHE if kw else FUSED_CACHE
    report, code = check_fused(Form(device="cuda", **kw), expect=expect, inductor_launch=False)
    assert {c.op for c in report.fused} == {expect}, str(report)
    assert not LAUNCH_RE.search(code)


class _Layer(torch.nn.Module):
    """A module holding its caches as buffers, as engines do (CUDA graphs need static inputs)."""

    def __init__(self, form):
        super().__init__()
        self.fn, args = build(form)
        self.qw = torch.nn.Parameter(args[1], requires_grad=False)
        self.kw = torch.nn.Parameter(args[2], requires_grad=False)
        self.register_buffer("cos_sin", args[3])
        self.register_buffer("kc", args[7])
        self.register_buffer("vc", args[8])
        self.args = args

    def forward(self, x, pos, slots, cache_pos):
        return self.fn(x, self.qw, self.kw, self.cos_sin, pos, slots, cache_pos, self.kc, self.vc)


def replay_reduce_overhead(backend, steps: int = 4) -> None:
    """Compile a ``_Layer`` with ``backend`` (mode="reduce-overhead") and replay ``steps`` steps
    with fresh tokens and slots, each checked against eager (outputs and the K cache)."""
    form = Form(device="cuda")
    layer = _Layer(form).cuda()
    ref = _Layer(form).cuda()
    ref.load_state_dict(layer.state_dict())
    compiled = torch.compile(layer, backend=backend)
    with torch.no_grad():
        for _ in range(steps):
            _, args = build(Form(device="cuda"))
            x, pos = args[0], args[4]
            slots = torch.randperm(32, device="cuda")[: form.T]
            out = compiled(x, pos, slots, args[6])
            eager = ref(x, pos, slots, args[6])
            torch.testing.assert_close(out[0].float(), eager[0].float(), atol=0.07, rtol=0.02)
            torch.testing.assert_close(layer.kc.float(), ref.kc.float(), atol=0.07, rtol=0.02)


def test_reduce_overhead_cuda_graphs_fused_and_correct():
    from torch._dynamo.utils import counters

    be = fusion_pass.make_backend(mode="reduce-overhead")
    counters.clear()
    # no FX-graph cache: a hit (an earlier test compiled this form) skips the pass and its report
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        replay_reduce_overhead(be)
    assert be.report.fused, str(be.report)
    if REQUIRE_INDUCTOR_LAUNCH:
        assert {c.op for c in be.report.fused} == {INDUCTOR_LAUNCH}, str(be.report)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


def test_fx_graph_cache_hit_in_fresh_process_cuda(tmp_path):
    """Second process: an FX-graph-cache hit (the pass does not run) whose code still launches
    the fused kernel, with correct results; the launch path must not bypass the cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = []
    for _ in range(2):
        p = subprocess.run([sys.executable, "-m", "tests.fx_cache_script", "cuda"], cwd=root,
                           env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["miss"] >= 1 and first["pass_ran"] and first["fused_in_code"], first
    assert first["bypass"] == 0, "the pass made Inductor bypass the FX graph cache"
    if REQUIRE_INDUCTOR_LAUNCH:
        assert first["inductor_launch"] and second["inductor_launch"], runs
    assert second["hit"] >= 1 and not second["pass_ran"], second
    assert second["fused_in_code"]
    assert second["max_err_q"] < 0.1 and second["max_err_cache"] < 0.1
