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

demo: install
	$(VENV)/bin/python examples/paged_decode.py

test: install
	$(VENV)/bin/python -m pytest -q tests

.PHONY: install demo test
