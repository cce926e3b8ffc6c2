# Two entry points: `make demo` (the main job) and `make test` (what CI runs). Each creates the venv and
# installs what it needs on first use. torch==2.13.0 is the CPU build on local disk on our dev/CI machines.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.etspec-installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 executorch==1.5.1 transformers==5.17.0 triton==3.9.0
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m etspec.models.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
