# Two commands for a newcomer: `make demo` and `make test`.
# The venv pins the CPU build of torch 2.13.0 (an unpinned torch pulls a multi-GB CUDA build).
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The GPU image's Triton (3.6) beside the venv's newer one: the register tests also compile
# the kernel for sm_90 with it, since the two versions give different register counts.
DEVICE_TRITON ?= triton==3.6.0
.triton-device/.installed: $(VENV)/.installed
	rm -rf .triton-device  # pip --target does not replace an older install
	$(VENV)/bin/pip install -q --no-deps --target .triton-device "$(DEVICE_TRITON)"
	touch $@

# The GPU image's torch and Triton (2.11, 3.6) on this CPU machine, to catch what CI's torch 2.13
# would not: the CUDA wheel of torch imports without a GPU (~3.5 GB with its CUDA libraries, so
# not part of `make test` or CI). `make test-device-versions` runs the CPU suite with them.
DEVICE_TORCH ?= torch==2.11.0
.venv-device/.installed: pyproject.toml
	$(PY) -m venv .venv-device
	.venv-device/bin/pip install -q --upgrade pip
	.venv-device/bin/pip install -q "$(DEVICE_TORCH)" "$(DEVICE_TRITON)"
	.venv-device/bin/pip install -q -e ".[test]"
	touch $@

test-device-versions: .venv-device/.installed
	.venv-device/bin/python -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal tests

demo: install
	$(VENV)/bin/python examples/paged_decode.py

# One pytest worker a core (pytest-xdist): the CPU suite is single-threaded Python (the Triton
# interpreter, Inductor's compiles); worksteal evens out the long tests.
PYTEST_WORKERS ?= auto
test: install .triton-device/.installed
	$(VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal tests

.PHONY: install demo test test-device-versions
