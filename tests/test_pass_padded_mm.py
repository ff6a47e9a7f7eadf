"""Projections that Inductor's ``pad_mm`` padded: ``mm(pad(h), w)[:T]``.

On CUDA Inductor pads a matmul to aligned rows (and columns) where its own benchmark says so,
per shape and so per process: a layer's Q matmul may come padded and its K matmul not.  Here
the benchmark's answer is forced (on the CPU the pass is never offered), with T = 6 tokens
(padded to 8): the pass must read the trimmed rows as the projection, pair Q and K across a
padded and an unpadded matmul, and never pair two chains where one reads the other's output.
"""
import pytest
import torch

import fusion_pass
from fusion_pass import attention_prep
from fusion_pass.graph_util import depends_on, is_row_trim

from .model_forms import Form, _rotate
from .numerics import assert_spec_close
from .pass_check import check_fused, force_pad_mm


@pytest.fixture
def pad(monkeypatch):
    """``pad(policy)``: every matmul padded ("all"), or every other one ("alternate").
    Returns the list of row trims the pass saw in its graphs (``is_row_trim``)."""
    trims = []
    run = attention_prep.run

    def spy(graph, opts, report):
        trims.extend(n for n in graph.nodes if is_row_trim(n))
        return run(graph, opts, report)

    def force(policy):
        force_pad_mm(monkeypatch, policy)
        monkeypatch.setattr(attention_prep, "run", spy)
        return trims
    return force


# 2 Q heads: each padded projection stays smaller than a cache (the no-copy check's measure)
FORMS = [Form(split="separate", hq=2), Form(split="separate", hq=2, hf=True),
         Form(split="packed_linear", hq=2), Form(split="packed_linear", hq=2, cache="hnd",
                                                norm="gemma")]


@pytest.mark.parametrize("policy", ["all", "alternate"])
@pytest.mark.parametrize("form", FORMS, ids=["separate", "separate_hf", "packed", "packed_hnd"])
def test_padded_projection_fuses(form, policy, pad):
    trims = pad(policy)
    report, code = check_fused(form)
    assert trims, "no matmul was padded"
    assert len([c for c in report.candidates if c.status == "fused"]) == 1, str(report)
    assert "Q cols 0+2x64, K cols " in report.candidates[0].forms["split"], str(report)


# ------------------------------------------------ never pair chains that depend on each other

T, H, D = 6, 2, 32


def _two_layers(x, wq1, wk1, wq2, wk2, cos_sin, pos):
    """Two layers whose K is computed (scaled) before its rope: no K chain matches, and the two
    Q chains, which share cos/sin, are the only ropes left.  Layer 2's Q reads layer 1's."""
    cos, sin = cos_sin[pos].chunk(2, -1)
    cos, sin = cos[:, None], sin[:, None]
    h = x
    outs = []
    for wq, wk in ((wq1, wk1), (wq2, wk2)):
        q = _rotate("neox_halves", (h @ wq).view(T, H, D), cos, sin, D)
        k = _rotate("neox_halves", (h @ wk).view(T, H, D) * 0.5, cos, sin, D)
        att = torch.softmax(torch.einsum("thd,shd->hts", q, k), -1)
        h = torch.einsum("hts,shd->thd", att, k).reshape(T, H * D)
        outs.append(q)
    return outs[0], h


def test_chains_of_two_layers_are_never_paired():
    g = torch.Generator().manual_seed(5)
    w = lambda: torch.randn(H * D, H * D, generator=g) * 0.2  # noqa: E731
    ang = torch.rand(16, D // 2, generator=g) * 6.28
    args = (torch.randn(T, H * D, generator=g), w(), w(), w(), w(),
            torch.cat([ang.cos(), ang.sin()], -1), torch.randint(0, 16, (T,), generator=g))
    seen = []

    class Spy(fusion_pass.FusionPass):
        def __call__(self, graph):
            ropes = [n for n in graph.nodes if n.target is torch.ops.aten.cat.default]
            if len(ropes) >= 2:  # layer 2's rope reads layer 1's: what pairing must check
                seen.append(depends_on(ropes[-1], [ropes[0]]))
            super().__call__(graph)

    fp = Spy(allow_cpu=True)
    torch._dynamo.reset()
    with torch._inductor.config.patch(post_grad_custom_post_pass=fp, fx_graph_cache=False):
        got = torch.compile(_two_layers)(*args)
    assert seen == [True]
    assert not fp.report.errors, str(fp.report)
    assert not [c for c in fp.report.candidates if c.status.startswith("fused")], str(fp.report)
    assert any("no Q/K pair" in (c.reason or "") for c in fp.report.candidates), str(fp.report)
    exact = _two_layers(*[a.double() if a.is_floating_point() else a for a in args])
    for name, gt, e, x in zip(("q1", "out"), got, _two_layers(*args), exact):
        assert_spec_close(gt, e, x, name)
