# vlm2om: `make export MODEL=minigpt4` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
MODEL ?= minigpt4
OUT ?= build/$(MODEL)
CHECKPOINT ?=
PROMPT ?= Describe this image in detail.
IMAGE ?= examples/sample.png
BENCH_MODEL ?= minigpt4
# The CPU build of torch; a looser spec would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.vlm2om-installed
BENCH_STAMP := $(VENV)/.vlm2om-bench-installed

.PHONY: help setup export test bench bench-7b clean

help:
	@echo "make export MODEL=minigpt4 [CHECKPOINT=dir]   export a bundle to $(OUT) and answer one prompt"
	@echo "make test                                      run the test suite"
	@echo "make bench                                     decode and prefill vs onnxruntime-genai and transformers (same weights)"
	@echo "make bench-7b [BENCH_MODEL=visualglm]          full-size export: wall time and peak memory (~32 GB disk)"

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[export,dev]"
	touch $@

export: $(STAMP)
ifeq ($(strip $(CHECKPOINT)),)
	$(BIN)/vlm2om export $(MODEL) --preset tiny --out $(OUT)
	$(BIN)/vlm2om run $(OUT) --image $(IMAGE) --prompt "$(PROMPT)" --max-new-tokens 32 --stats
else
	$(BIN)/vlm2om export $(MODEL) --checkpoint $(CHECKPOINT) --out $(OUT)
endif

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The bench extra (onnxruntime-genai and its model builder's onnx_ir), installed once beside the rest.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]"
	touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench_decode.py $(BENCH_ARGS)

bench-7b: $(STAMP)
	$(BIN)/python benchmarks/bench_export_7b.py --model $(BENCH_MODEL)

clean:
	rm -rf build .pytest_cache
