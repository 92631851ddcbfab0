# quantlab: `make run` measures the bundled model, `make test` runs the tests.
# Both set up .venv first (once, and again when pyproject.toml changes).

PYTHON ?= python3
# The CPU wheel on machines without a GPU (pip finds it locally here); the CUDA wheel on a GPU box.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RECIPE ?= recipes/bundled-bf16.yaml

.PHONY: setup run test validate report bench-overhead gpu-check bundled-model clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@echo "setting up $(VENV) (torch, transformers, ...): a few minutes the first time"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: setup  ## the main job: measure the bundled model (CPU when there is no GPU), then the report
	$(BIN)/quantlab run $(RECIPE)

test: setup
	$(BIN)/python -m pytest -q

validate: setup
	$(BIN)/quantlab validate recipes/*.yaml

report: setup
	$(BIN)/quantlab report

bench-overhead: setup  ## harness decode tok/s vs a bare loop, same model, same run
	$(BIN)/python scripts/bench_overhead.py

gpu-check: setup  ## full-size synthetic Qwen3.6-27B at BF16 on a GPU; records go to measurements/
	bash scripts/gpu_check.sh

bundled-model: setup  ## rebuild the bundled model (deterministic, ~8 min on 2 cores)
	$(BIN)/python -m quantlab.bundled.build

clean:
	rm -rf $(VENV) .pytest_cache
