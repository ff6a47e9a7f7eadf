"""The kernel under ``compute-sanitizer --tool memcheck``: no out-of-bounds access anywhere.

Runs ``tests/sanitizer_script.py`` (-1 / past-the-end / duplicate slots, engine and indexing
mode, NHD and HND, fp8 and uint8 caches, gated Q, multi-token tiles...) in a subprocess under
the sanitizer, with PyTorch's caching allocator off so that each tensor is its own allocation
and memcheck sees an access past a tensor's end.  GPU only; skipped when compute-sanitizer
is not installed.
"""
import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "sanitizer_script.py")


def find_compute_sanitizer():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    cands = ["/usr/local/cuda/bin/compute-sanitizer"]
    cands += sorted(glob.glob("/usr/local/cuda-*/bin/compute-sanitizer"), reverse=True)
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        cands.insert(0, os.path.join(cuda_home, "bin", "compute-sanitizer"))
    for c in cands:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


@pytest.mark.gpu
@pytest.mark.slow
def test_kernel_is_memcheck_clean():
    exe = find_compute_sanitizer()
    if exe is None:
        pytest.skip("compute-sanitizer not found (PATH, /usr/local/cuda/bin)")
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    env.pop("TRITON_INTERPRET", None)
    env.pop("SANITIZER_SCRIPT_DEVICE", None)
    cmd = [exe, "--tool", "memcheck", "--report-api-errors", "no", sys.executable, SCRIPT]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert "sanitizer script: OK" in out, f"the script did not finish:\n{out[-6000:]}"
    assert "ERROR SUMMARY: 0 errors" in out, out[-6000:]
    assert proc.returncode == 0, out[-6000:]
