# The two commands a newcomer needs are `make book` and `make test` (see README.md).
# Every target works from a fresh clone: the first one creates .venv and installs the
# package with its extras under constraints.txt (the exact, tested environment).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUILD_FLAGS := -W -n --keep-going
PYTEST_BOOK := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=600

# TensorFlow prints C++ log lines on import that land in notebook outputs and break nbval.
export TF_CPP_MIN_LOG_LEVEL := 3
export TF_ENABLE_ONEDNN_OPTS := 0
export PYTHONHASHSEED := 0
export PYDEVD_DISABLE_FILE_VALIDATION := 1
# Hugging Face models are built from configurations; nothing may reach the hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: help setup book test test-second-machine test-package notebooks lab bench clean \
	translations

help:
	@echo "make book       build the website into _build/html, the Chinese edition into"
	@echo "                _build/html/zh (creates .venv on first use)"
	@echo "make translations  after editing a notebook: refresh the Chinese catalogs"
	@echo "make test       package tests + strict nbval of every notebook + book build with -W"
	@echo "                + the notebooks again as on another CPU (make test-second-machine)"
	@echo "make notebooks  re-execute every notebook in place and store its outputs"
	@echo "make lab        open the notebooks in JupyterLab"
	@echo "make clean      remove _build and caches (keeps .venv; rm -rf .venv to start over)"

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	@touch $@

setup: $(STAMP)

book: $(STAMP)
	$(VENV)/bin/jupyter-book build . $(BUILD_FLAGS)
	$(PY) tools/i18n.py build
	@echo
	@echo "The book is built. Open: file://$(CURDIR)/_build/html/index.html"
	@echo "中文版 (Chinese edition): file://$(CURDIR)/_build/html/zh/index.html"

# After editing a notebook: extract the English prose again and merge it into
# locale/zh_CN/LC_MESSAGES (changed sentences become fuzzy and show in English until
# translated again); then `tools/i18n.py check` reports what is left.
translations: $(STAMP)
	$(PY) tools/i18n.py update
	$(PY) tools/i18n.py check

# One pytest run, one summary: package tests, every notebook cell under strict nbval,
# the book build (-W -n --keep-going) and the checks of the built site, and the
# second-machine run: the notebooks that train, time or measure memory run again as
# on another CPU (tools/second_machine.py; issue 21). pytest-xdist spreads files over
# JOBS workers (each notebook stays in one worker; the site is built once).
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
test: $(STAMP)
	$(PY) -m pytest -n $(JOBS) --dist loadfile tests book $(PYTEST_BOOK) --build-book \
		--second-machine

# Strict nbval of NOTEBOOKS (default: the CPU-dependent ones) as if on another machine:
# a lower instruction set, another L2 size, one thread; each setting is verified first.
test-second-machine: $(STAMP)
	$(PY) tools/second_machine.py $(NOTEBOOKS)

test-package: $(STAMP)
	$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) -m companion.bench $(BENCH_ARGS)

notebooks: $(STAMP)
	$(PY) tools/execute_notebooks.py $(NOTEBOOKS)

lab: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[lab]"
	$(VENV)/bin/jupyter lab book/

clean:
	rm -rf _build .pytest_cache .hypothesis
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
	find book -name .ipynb_checkpoints -prune -exec rm -rf {} +
