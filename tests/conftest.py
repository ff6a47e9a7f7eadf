"""Test setup: without a GPU, run the Triton kernel on the CPU under Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported (it is read when @triton.jit
runs), so it happens here, before any test module imports the kernel.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from tests import interpreter_speedup

    interpreter_speedup.install()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running (fuzzing at scale, big caches)")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


# Devices for parametrized kernel tests: the CPU (interpreter) always; CUDA marked gpu.
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


@pytest.fixture(autouse=True)
def _fresh_entry_point():
    """Each test starts with no remembered entry-point calls: a remembered launch keeps the
    module settings (PDL, register budget) it was built under, which some tests change."""
    from kernels import api

    api.forget_calls()
    yield
