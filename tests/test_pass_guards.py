"""Guards, negatives, robustness: the pass leaves what it must not fuse alone, and never breaks."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fusion_pass
from fusion_pass import attention_prep

from .model_forms import Form
from .pass_check import check_unfused


def _reason(report):
    return " | ".join(f"{c.guard}: {c.reason}" for c in report.rejected)


def test_guard_eps_differs():
    report = check_unfused(Form(eps=1e-5, k_eps=1e-6))
    assert "eps differs on Q (1e-05) and K (1e-06)" in _reason(report)


def test_guard_device_cpu_without_allow_cpu():
    report = check_unfused(Form(), allow_cpu=False)
    assert "device" in _reason(report)


def test_guard_head_dim_unsupported():
    report = check_unfused(Form(d=32, hq=2, hkv=1))
    assert "head_dim 32 not in" in _reason(report)


def test_negative_olmo2_whole_projection_norm():
    report = check_unfused(Form(norm="olmo2"))
    assert "OLMo2" in _reason(report)


def test_negative_hunyuan_rope_before_norm():
    report = check_unfused(Form(rope_first=True))
    assert "HunYuan" in _reason(report) or "rope" in _reason(report)


def test_norm_fusion_switched_off():
    report = check_unfused(Form(), fuse_norm=False)
    assert "fuse_norm=False" in _reason(report)


@pytest.mark.parametrize("where", ["match_cache_write", "replace_cache_chain"],
                         ids=["in_a_matcher", "midway_through_rewrite"])
def test_exception_leaves_graph_unfused_and_compiles(monkeypatch, where):
    """A failure while matching, or after the rewrite has started, restores the graph."""
    def boom(*a, **k):
        raise RuntimeError(f"{where} exploded")

    monkeypatch.setattr(attention_prep, where, boom)
    report = check_unfused(Form())
    assert any(f"{where} exploded" in e for e in report.errors)


def test_uuid_is_stable_and_depends_on_options():
    a, b = fusion_pass.FusionPass(), fusion_pass.FusionPass()
    assert a.uuid() == b.uuid()
    assert a.uuid() != fusion_pass.FusionPass(fuse_cache=False).uuid()
    assert a.uuid() != fusion_pass.FusionPass(inductor_launch=False).uuid()
    assert a.uuid() != fusion_pass.FusionPass(dynamic_tiles="prefill").uuid()
    # module switches that change the emitted launch (int32 offsets, the dynamic-T switch)
    from fusion_pass import inductor_launch
    from kernels import triton_kernel
    base = a.uuid()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(triton_kernel, "_INDEX32", not triton_kernel._INDEX32)
        assert fusion_pass.FusionPass().uuid() != base
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inductor_launch, "SWITCH_T", 4)
        assert fusion_pass.FusionPass().uuid() != base
    assert fusion_pass.FusionPass().uuid() == base


def test_dynamic_tiles_option_is_checked():
    with pytest.raises(ValueError, match="dynamic_tiles"):
        fusion_pass.FusionOptions(dynamic_tiles="large")
    with pytest.raises(ValueError, match="dynamic_tiles"):
        fusion_pass.make_backend(dynamic_tiles=None)


@pytest.mark.parametrize("x", [1e-6, 1e-5, 0.0, 1.0, -0.5, 3.4e38, 1e39, 1e-45])
def test_trampoline_floats_travel_as_fp32_bits(x):
    """eps and the weight offset reach Inductor's launch as the int32 bits of their fp32
    rounding (Inductor would type a float fp64): the kernel's bitcast gives back exactly
    what the op's own launch (a Python float, typed fp32) computes with."""
    from fusion_pass.inductor_launch import f32_bits

    bits = f32_bits(x)
    assert isinstance(bits, int) and -2 ** 31 <= bits < 2 ** 31
    back = torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()
    assert back == torch.tensor(x, dtype=torch.float32).item()
    assert f32_bits(-0.0) != f32_bits(0.0)  # the sign bit survives (negative int32)


def test_inductor_launch_failure_falls_back_to_custom_op(monkeypatch, caplog):
    """A bug in the Inductor-launch builder costs the launch path, not the fusion."""
    from fusion_pass import inductor_launch

    from .pass_check import FUSED_CACHE, check_fused

    def boom(*a, **k):
        raise RuntimeError("launch builder exploded")

    monkeypatch.setattr(inductor_launch, "call_fused_with_cache", boom)
    with caplog.at_level("WARNING", logger="fusion_pass"):
        report, _ = check_fused(Form())
    assert report.fused[0].op == FUSED_CACHE and not report.errors, str(report)
    assert "launch builder exploded" in caplog.text


def test_two_models_and_recompile_on_new_shapes():
    """One backend, two different models, then a new token count: all fused, all correct."""
    from .pass_check import assert_numerics
    from .model_forms import build, clone_args

    be = fusion_pass.make_backend(allow_cpu=True)
    torch._dynamo.reset()
    for form in (Form(), Form(split="separate", hf=True, norm="qwen3"), Form(S=5)):
        fn, args = build(form)
        before = clone_args(args)
        with torch._inductor.config.patch(fx_graph_cache=False):  # make the pass run each time
            out = torch.compile(fn, backend=be)(*args)
        assert_numerics(fn, args, out, before)
    assert len(be.report.fused) == 3, str(be.report)


def test_fx_graph_cache_hit_in_fresh_process_still_fused(tmp_path):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path), TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = []
    for _ in range(2):
        p = subprocess.run([sys.executable, "-m", "tests.fx_cache_script"], cwd=root, env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["miss"] >= 1 and first["pass_ran"] and first["fused_in_code"]
    assert first["bypass"] == 0, "the pass made Inductor bypass the FX graph cache"
    assert second["hit"] >= 1 and not second["pass_ran"], second
    assert second["fused_in_code"]
    assert second["max_err_q"] < 0.1 and second["max_err_cache"] < 0.1
