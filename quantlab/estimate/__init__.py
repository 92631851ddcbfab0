"""`quantlab estimate`: a hybrid-aware memory model of Qwen3.6-27B-style models, from a config alone.

- inventory.py: every tensor, from a meta-device instantiation (+ MTP from the config), by role;
- schemes.py + data/quant_schemes.yaml: bytes per tensor per quantization scheme; gguf_mix.py: Q4_K_M;
- weights.py: bytes per component and method;
- hybrid.py + runtime.py: KV cache, DeltaNet state, activations, overheads; the longest context;
- vllm_cache.py: vLLM's own KV-cache accounting (blocks, padded state pages, groups, KV tokens, concurrency), which
  the vLLM tensor-parallel rows (tensor_parallel.py, multi_gpu.py) and `--vllm-kv-gib` rest on;
- mtp_draft.py (+ mtp_command.py, `--mtp-draft K`): what llama.cpp's MTP speculative decoding adds (the MTP block's
  weights, the draft context's KV cache and compute buffer, the target's DeltaNet state snapshots), held to llama.cpp's
  own plan (scripts/mtp_full_size.py); with `--vllm-kv-gib`, vLLM's accounting with the MTP drafter (vllm_cache.py);
- overheads.py: overheads fitted on GPU records; against_records.py: the estimate vs those records;
- claims.py (with quantlab/claims.py and data/estimate_claims.yaml): the article's claims;
  estimator.py / command.py / cli.py: the command; its result is quantlab/schema/estimate.py;
- render.py, plot.py, report_section.py: text, Markdown, memory.png and the report's section.
"""

ESTIMATES_NAME = "estimates.json"  # what `quantlab estimate` writes beside the records
PLOT_NAME = "memory.png"

DEFAULT_CONTEXTS = (4096, 32768, 65536, 131072, 262144)
DEFAULT_METHODS = "bf16,int8,nf4,nf4-dq,awq-g128,q8_0,q6_k,q4_k_m"
