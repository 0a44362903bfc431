# One-command entry points. Each creates .venv and installs raymetric into it on first use.
#   make demo    train on the bundled demo data (generated on first use); last line: run: <directory>
#   make test    the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/train.py --config configs/demo.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)
