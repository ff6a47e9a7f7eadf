"""The pass on the GPU: real Triton kernel, CUDA tensors, CUDA graphs (reduce-overhead)."""
import pytest
import torch

import fusion_pass

from .model_forms import Form, build, clone_args
from .pass_check import FUSED_CACHE, assert_numerics, check_fused

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


def test_reduce_overhead_cuda_graphs_fused_and_correct():
    from torch._dynamo.utils import counters

    form = Form(device="cuda")
    layer = _Layer(form).cuda()
    ref = _Layer(form).cuda()
    ref.load_state_dict(layer.state_dict())
    be = fusion_pass.make_backend(mode="reduce-overhead")
    compiled = torch.compile(layer, backend=be)
    counters.clear()
    with torch.no_grad():
        for step in range(4):  # fresh tokens and slots every step, replayed from the graph
            _, args = build(Form(device="cuda"))
            x, pos = args[0], args[4]
            slots = torch.randperm(32, device="cuda")[: form.T]
            out = compiled(x, pos, slots, args[6])
            eager = ref(x, pos, slots, args[6])
            torch.testing.assert_close(out[0].float(), eager[0].float(), atol=0.07, rtol=0.02)
            torch.testing.assert_close(layer.kc.float(), ref.kc.float(), atol=0.07, rtol=0.02)
    assert be.report.fused, str(be.report)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
