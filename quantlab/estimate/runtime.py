"""Runtime memory of a hybrid (Gated DeltaNet + full attention) model at a context and batch.

    total = weights + KV cache + DeltaNet state + prefill activations + matmul workspace   (allocated)
          + allocator overhead (share of allocated) + CUDA context                          (device)

- KV cache: only full-attention layers keep one: 2 (K and V) × kv_heads × head_dim × bytes per
  token and layer, for every token of every sequence.
- DeltaNet state, per sequence and DeltaNet layer: the recurrent state v_heads × k_dim × v_dim and
  the conv state (kernel − 1) × conv_dim, in the state dtype (float32 by default, as llama.cpp
  keeps it and as the config's mamba_ssm_dtype says). It does not grow with context.
- Prefill activations: the live tensors of the most demanding layer for one prefill chunk of
  chunk × batch tokens (the whole prompt at once in transformers, as quantlab measures), plus the
  logits of the last position only. Per token, at activation width a bytes (bf16: 2):
    DeltaNet layer (transformers' torch chunked kernel, no flash-linear-attention): float32
      q, k, k·β, decayed k·β, k_cumdecay (5 × v_heads × k_dim), v, v·β, new values, output
      (4 × v_heads × v_dim), three 64 × 64 chunk matrices per head (3 × v_heads × 64), plus at a
      bytes the conv output, q and k repeated to v_heads, z, and the residual stream (2 × hidden);
    full-attention layer: a × (2 × hidden + q_proj output (× 2 with the gate) + q, rotated q,
      attention output (3 × heads × head_dim) + k, rotated k, v and their repeat for the
      heads (4 × kv_heads × head_dim + 2 × heads × head_dim));
    MLP: a × (2 × hidden + 3 × intermediate) (gate, up and their product); MoE: the shared
      expert's, plus the top-k experts' intermediates and the float32 router logits.
  Checked on the CPU with the torch profiler for two small qwen3_5 configs: within 3%.
- Matmul workspace (quantized methods): the largest quantized tensor dequantized to 2-byte floats
  (bnb 4-bit, AWQ torch kernels and llama.cpp's batched matmuls do this one tensor at a time);
  LLM.int8 instead holds int8 activations and int32 outputs for the chunk.
- CUDA context and allocator overhead: calibrated from GPU records when there are some, stated
  assumptions otherwise (see calibration.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from quantlab.errors import QuantlabError
from quantlab.estimate.hybrid import HybridShape
from quantlab.estimate.weights import WeightsEstimate
from quantlab.recipe import MAX_CONTEXT

# Bytes per element of the KV cache and state dtypes the estimator knows. q8_0 is llama.cpp's
# 8-bit cache (32 values in 34 bytes).
CACHE_DTYPE_BYTES = {"f32": 4.0, "float32": 4.0, "bf16": 2.0, "bfloat16": 2.0, "fp16": 2.0, "float16": 2.0,
                     "fp8": 1.0, "q8_0": 34 / 32}
DELTANET_CHUNK = 64  # transformers' torch_chunk_gated_delta_rule chunk size
MAX_BATCH = 4096


@dataclass(frozen=True)
class RuntimeAssumptions:
    kv_dtype: str = "bf16"
    state_dtype: str = "float32"
    activation_bytes: int = 2
    prefill_chunk: int | None = None  # tokens per prefill forward; None: the whole prompt at once
    cuda_context_bytes: int = 500_000_000
    allocator_overhead: float = 0.05  # reserved beyond allocated, as a share of allocated
    overheads_source: str = "assumed"  # "assumed" or e.g. "fitted on 4 GPU records"
    profile: str = "transformers"
    # llama.cpp keeps token_embd in host memory whatever -ngl says ("always keep it on the CPU": a step reads one
    # row of it): its bytes are not the device's
    embeddings_on_host: bool = False

    def __post_init__(self) -> None:
        for name in ("kv_dtype", "state_dtype"):
            if getattr(self, name) not in CACHE_DTYPE_BYTES:
                raise QuantlabError(f"{name} '{getattr(self, name)}': choose from {', '.join(CACHE_DTYPE_BYTES)}")
        if self.prefill_chunk is not None and not 1 <= self.prefill_chunk <= MAX_CONTEXT:
            raise QuantlabError(f"prefill chunk must be between 1 and {MAX_CONTEXT:,} tokens, got {self.prefill_chunk}")


# Named runtime profiles: what differs between the stacks the article and quantlab talk about.
PROFILES = {
    # quantlab's own measurements: one forward over the whole prompt, PyTorch's caching allocator.
    "transformers": RuntimeAssumptions(),
    # llama.cpp defaults: 512-token micro-batches (n_ubatch), fixed ggml buffers (no allocator
    # slack), f16 KV cache (2 bytes, like bf16), f32 DeltaNet state.
    "llama.cpp": RuntimeAssumptions(kv_dtype="fp16", prefill_chunk=512, allocator_overhead=0.0, profile="llama.cpp",
                                    embeddings_on_host=True),
}


def runtime_profile(name: str, **overrides) -> RuntimeAssumptions:
    if name not in PROFILES:
        raise QuantlabError(f"unknown runtime profile '{name}': choose from {', '.join(PROFILES)}")
    return replace(PROFILES[name], **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class MemoryBreakdown:
    context: int
    batch: int
    weights: int
    kv_cache: int
    deltanet_state: int
    activations: int
    workspace: int
    allocator_overhead: int
    cuda_context: int
    host_weights: int = 0  # weights the runtime keeps in host memory, not counted above (llama.cpp's token_embd)

    @property
    def allocated(self) -> int:
        """What torch.cuda.max_memory_allocated would show at the prefill peak."""
        return self.weights + self.kv_cache + self.deltanet_state + self.activations + self.workspace

    @property
    def total(self) -> int:
        """What nvidia-smi would show for the process."""
        return self.allocated + self.allocator_overhead + self.cuda_context


def kv_bytes_per_token(shape: HybridShape, kv_dtype: str) -> float:
    return shape.full_attention_layers * 2 * shape.kv_heads * shape.head_dim * CACHE_DTYPE_BYTES[kv_dtype]


def deltanet_state_bytes(shape: HybridShape, state_dtype: str) -> float:
    """Per sequence, all DeltaNet layers: recurrent state plus conv state."""
    recurrent = shape.v_heads * shape.k_dim * shape.v_dim
    conv = (shape.conv_kernel - 1) * shape.conv_dim
    return shape.deltanet_layers * (recurrent + conv) * CACHE_DTYPE_BYTES[state_dtype]


def activation_bytes_per_token(shape: HybridShape, a: int) -> int:
    """Live bytes per prompt token in the most demanding layer during prefill (see module docstring)."""
    residual = 2 * shape.hidden * a
    candidates = [residual + _mlp_bytes(shape, a)]
    if shape.full_attention_layers:
        q_width = shape.heads * shape.head_dim * (2 if shape.attention_gate else 1)
        attn = q_width + 3 * shape.heads * shape.head_dim + 4 * shape.kv_heads * shape.head_dim
        if shape.kv_heads != shape.heads:
            attn += 2 * shape.heads * shape.head_dim  # K and V repeated for the query heads
        candidates.append(residual + attn * a)
    if shape.deltanet_layers:
        fp32 = 5 * shape.v_heads * shape.k_dim + 4 * shape.v_heads * shape.v_dim + 3 * shape.v_heads * DELTANET_CHUNK
        low = shape.conv_dim + 2 * shape.v_heads * shape.k_dim + shape.v_heads * shape.v_dim
        candidates.append(residual + 4 * fp32 + low * a)
    return max(candidates)


def _mlp_bytes(shape: HybridShape, a: int) -> int:
    if not shape.is_moe:
        return 3 * shape.intermediate * a
    routed = 3 * shape.expert_intermediate * shape.experts_per_token * a
    return routed + 3 * shape.shared_expert_intermediate * a + 4 * shape.experts


def workspace_bytes(weights: WeightsEstimate, shape: HybridShape, tokens: int) -> int:
    method = weights.scheme.method
    if method == "none":
        return 0
    if method == "bnb_int8":
        widest = max(shape.hidden, shape.intermediate, shape.conv_dim, shape.heads * shape.head_dim * 2)
        return tokens * widest * (1 + 4)
    return 2 * weights.largest_quantized_numel


def check_point(context: int, batch: int) -> None:
    if not 1 <= context <= MAX_CONTEXT:
        raise QuantlabError(f"context must be between 1 and {MAX_CONTEXT:,} tokens, got {context:,}")
    if not 1 <= batch <= MAX_BATCH:
        raise QuantlabError(f"batch must be between 1 and {MAX_BATCH:,}, got {batch:,}")


def memory_at(
    weights: WeightsEstimate, weight_bytes: int, shape: HybridShape, context: int, batch: int, rt: RuntimeAssumptions
) -> MemoryBreakdown:
    check_point(context, batch)
    host = embedding_bytes(weights) if rt.embeddings_on_host else 0
    weight_bytes -= host
    chunk_tokens = min(context, rt.prefill_chunk or context) * batch
    kv = round(kv_bytes_per_token(shape, rt.kv_dtype) * context * batch)
    state = round(deltanet_state_bytes(shape, rt.state_dtype) * batch)
    logits = batch * shape.vocab * (rt.activation_bytes + 4)
    activations = chunk_tokens * activation_bytes_per_token(shape, rt.activation_bytes) + logits
    workspace = workspace_bytes(weights, shape, chunk_tokens)
    allocated = weight_bytes + kv + state + activations + workspace
    return MemoryBreakdown(
        context=context,
        batch=batch,
        weights=weight_bytes,
        kv_cache=kv,
        deltanet_state=state,
        activations=activations,
        workspace=workspace,
        allocator_overhead=round(allocated * rt.allocator_overhead),
        cuda_context=rt.cuda_context_bytes,
        host_weights=host,
    )


def embedding_bytes(weights: WeightsEstimate) -> int:
    table = weights.component("embed_tokens")
    return table.bytes if table is not None else 0


@dataclass(frozen=True)
class ContextFit:
    """The longest context that fits a memory budget, and what stopped it."""

    tokens: int  # 0: not even one token fits
    limit: str  # "memory" or "max context (1,048,576)"
    budget_bytes: int


def max_context(
    weights: WeightsEstimate, weight_bytes: int, shape: HybridShape, budget_bytes: int, batch: int, rt: RuntimeAssumptions
) -> ContextFit:
    """The longest context that fits `budget_bytes` (longest_fitting)."""

    tokens = longest_fitting(lambda c: memory_at(weights, weight_bytes, shape, c, batch, rt).total <= budget_bytes)
    limit = f"max context ({MAX_CONTEXT:,})" if tokens == MAX_CONTEXT else "memory"
    return ContextFit(tokens, limit, budget_bytes)


def longest_fitting(fits: Callable[[int], bool]) -> int:
    """The longest context (≤ MAX_CONTEXT) for which `fits` holds, 0 when not even one token does. Binary
    search: memory only grows with context, so the answer is exact to the token."""
    if not fits(1):
        return 0
    if fits(MAX_CONTEXT):
        return MAX_CONTEXT
    low, high = 1, MAX_CONTEXT  # fits(low), not fits(high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
