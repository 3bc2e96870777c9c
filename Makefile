# Two entry points: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.metaopt-installed

.PHONY: demo test lint install clean-venv bench

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# Writes under the git-ignored out/demo/; the README figure results/maml/demo.png is
# regenerated only on purpose: $(PY) scripts/maml_sinusoid_demo.py --out results/maml/demo.png
demo: $(STAMP)
	$(PY) scripts/maml_sinusoid_demo.py --out out/demo/maml_sinusoid.png

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pytest -q -m slow

clean-venv:
	rm -rf $(VENV)
