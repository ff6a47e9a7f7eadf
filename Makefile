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

demo: install
	$(VENV)/bin/python examples/paged_decode.py

test: install .triton-device/.installed
	$(VENV)/bin/python -m pytest -q tests

.PHONY: install demo test
