"""Per-GPU memory of a Qwen3.5 / Qwen3.6 model served by vLLM with tensor parallelism (TP = 1, 2, 4, 8, ...).

Every tensor of the text model is cut the way vLLM cuts it; the per-rank tensors are then priced by the
same scheme table as the single-GPU estimate (weights.estimate_weights on a per-rank inventory), so a split
AWQ tensor is counted with its own per-rank groups and a replicated tensor whole on every rank.

vLLM's rules (read from vllm-project/vllm main, 2026-11; re-check before building on them):
- embed_tokens / lm_head: VocabParallelEmbedding / ParallelLMHead (layers/vocab_parallel_embedding.py) pad
  the vocab to a multiple of 64 (DEFAULT_VOCAB_PADDING_SIZE, pad_vocab_size), then give each rank
  padded / tp rows (`divide`, which asserts). 248,320 is already a multiple of 64: no padding here.
- full attention (models/qwen3_next.py Qwen3NextAttention, used by models/qwen3_5.py):
  q/k/v → QKVParallelLinear (layers/linear.py). q_proj carries the output gate (2 × heads × head_dim rows)
  and is split by heads: `divide(total_num_heads, tp)`, and Qwen3NextAttention asserts heads % tp == 0
  (config/model.py ModelConfig.verify_with_parallel_config raises it first). KV heads: when tp >= total_kv_heads each rank keeps ONE KV head,
  num_kv_head_replicas = divide(tp, total_kv_heads) ranks hold the same head (its k/v rows and its KV cache);
  otherwise each rank keeps total_kv_heads / tp (Qwen3NextAttention asserts the divisibility either way).
  o_proj → RowParallelLinear: input dim / tp. q_norm, k_norm (per head_dim): replicated.
- Gated DeltaNet (layers/mamba/gdn/qwen_gdn_linear_attn.py QwenGatedDeltaNetAttention, Qwen3.5 layout
  gqa_interleaved_layout=False): in_proj_qkv + in_proj_z → MergedColumnParallelLinear in_proj_qkvz
  (output sizes [key, key, value, value], each % tp asserted); in_proj_b + in_proj_a →
  MergedColumnParallelLinear in_proj_ba, split by tp, EXCEPT on CUDA with an AWQ / GPTQ / INC quant config
  (`maybe_disable_tp`, vllm#35924: Marlin needs >= 64 output columns per rank), where it is replicated;
  conv1d → ColumnParallelLinear (conv_dim / tp, loaded by mamba_v2_sharded_weight_loader);
  A_log, dt_bias → v_heads / tp (`divide`, sharded_weight_loader(0)); norm (RMSNormGated over head_v_dim):
  replicated; out_proj → RowParallelLinear.
  State (layers/mamba/mamba_utils.py MambaStateShapeCalculator.gated_delta_net_state_shape): conv state
  (kernel − 1) × conv_dim / tp and recurrent state v_heads / tp × v_dim × k_dim per layer and sequence.
- dense MLP (models/qwen2_moe.py Qwen2MoeMLP): gate/up → MergedColumnParallelLinear gate_up_proj,
  down → RowParallelLinear.
- MoE (models/qwen3_next.py Qwen3NextSparseMoeBlock): router `gate` and `shared_expert_gate` are
  ReplicatedLinear with quant_config=None: whole on every rank and never quantized, so they are priced at
  the model dtype whatever the scheme (quantlab's AWQ table would quantize the router); routed experts →
  FusedMoE (layers/fused_moe/layer.py): without expert parallelism every rank keeps all experts with
  intermediate_size_per_partition = moe_intermediate_size // tp (asserted), i.e. w13 split on its output
  and w2 on its input; the shared expert is a Qwen2MoeMLP (or fused into FusedMoE): split the same way
  (`_should_replicate_misaligned_shared_expert` raises when its intermediate size is not divisible by tp);
  tp > num_experts raises.
- layer norms, the final norm: replicated.

Quantized splits: a split tensor costs what the scheme charges for its per-rank shape. AWQ groups run
along the input dim, so a row-parallel split needs (input dim / tp) % group size == 0: vLLM's AWQ
create_weights raises "The input size is not aligned with the quantized weight shape" otherwise, and so
does this module. Output packing (8 per int32) and Marlin's tile minimums are not checked. GGUF schemes
are refused (vLLM 0.32.0 has no GGUF loader at all); bitsandbytes' per-tensor state is counted on every rank.

The KV cache and the DeltaNet state are vLLM's own accounting (quantlab/estimate/vllm_cache.py, checked against
vLLM's CPU build by scripts/check_vllm_accounting.py): a pool of equal blocks, each holding `block_size` tokens of
every attention layer of a group or one sequence's state of every DeltaNet layer of a group, the mamba page padded
to the attention page; a request at max_model_len holds cdiv(max_model_len, block_size) blocks per attention group
and, with prefix caching on (vLLM's default, mamba cache mode 'align'), 2 blocks per DeltaNet group; one block is
the pool's null block. The SSM state is in the config's mamba_ssm_dtype (float32 for Qwen3.6-27B; vLLM's
Qwen3_5ForConditionalGenerationConfig reads it) unless --mamba-ssm-cache-dtype (`ssm_cache_dtype`) says
otherwise; the conv state in the model dtype.

Scope and assumptions (keep in mind when comparing with a GPU):
- text model only: no vision tower, no MTP (vLLM skips `mtp.*` without speculative decoding);
- no expert parallelism, no pipeline parallelism, no speculative tokens (they add conv-state rows);
- vLLM allocates A_log in float32; it is counted at the model dtype here (4.6 KB for the 27B);
- FlashAttention-style kernel blocks of multiples of 16 tokens (not FA4's head-dim-256 pages on Blackwell);
- what a rank holds besides the KV pool (`fixed_bytes`): weights, activations, workspace, allocator overhead and
  CUDA context from runtime.py's model (transformers-profile activations at the per-rank widths for vLLM's profile
  run of one prefill chunk of VLLM_RUNTIME.prefill_chunk tokens, full-vocab logits as gathered by the driver).
  NCCL buffers and CUDA graphs are inside the assumed CUDA context. vLLM gives the KV pool everything else of
  gpu_memory_utilization × the GPU (its default --gpu-memory-utilization is 0.9).
- `max_context`: the longest --max-model-len vLLM starts with (`batch` requests of it at once fit the pool), at
  most the config's max_position_embeddings, which vLLM refuses to exceed unless the config scales RoPE.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from quantlab.architecture import ROLES, UNQUANTIZED_ROLES
from quantlab.errors import QuantlabError
from quantlab.estimate.hybrid import HybridShape
from quantlab.estimate.inventory import ModelInventory, TensorGroup
from quantlab.estimate.runtime import (
    ContextFit,
    MemoryBreakdown,
    RuntimeAssumptions,
    check_point,
    kv_bytes_per_token,
)
from quantlab.estimate.runtime import memory_at as runtime_memory_at
from quantlab.estimate.schemes import Scheme
from quantlab.estimate.vllm_cache import VllmCache, longest_model_len, mamba_state_bytes, state_dtypes, vllm_cache
from quantlab.estimate.weights import ComponentBytes, WeightsEstimate, estimate_weights
from quantlab.recipe import MAX_CONTEXT

if TYPE_CHECKING:
    from quantlab.estimate.model import EstimationModel

VOCAB_PADDING = 64  # vllm vocab_parallel_embedding.DEFAULT_VOCAB_PADDING_SIZE
GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default --gpu-memory-utilization
# Quant methods whose vLLM config replicates in_proj_ba (QwenGatedDeltaNetAttention.maybe_disable_tp).
BA_REPLICATED_METHODS = frozenset({"awq"})
SKIPPED_ROLES = frozenset({"vision", "mtp"})

# vLLM defaults as far as memory goes: KV cache in the model dtype (bf16), chunked prefill of 8192 tokens
# (assumed: --max-num-batched-tokens depends on the version and usage context). The DeltaNet state's dtypes are
# vLLM's own rule (vllm_cache.state_dtypes), not state_dtype here.
VLLM_RUNTIME = RuntimeAssumptions(kv_dtype="bf16", state_dtype="bfloat16", prefill_chunk=8192, profile="vllm")
DEFAULT_MAX_NUM_SEQS = 256  # it sizes nothing in the cache (vllm_cache.py); only reported

# (tensor name pattern, kind, split dim): "split" cuts `dim` by tp; "kv" keeps kv heads per rank;
# "vocab" cuts the padded vocab; "ba" splits unless the quant method replicates it; "replicated": whole
# on every rank; "unquantized": whole on every rank and kept at the model dtype under any scheme.
SHARDING_RULES: tuple[tuple[str, str, int], ...] = (
    (r"(^|\.)embed_tokens\.weight$|^lm_head\.weight$", "vocab", 0),
    (r"\.self_attn\.q_proj\.weight$", "split", 0),
    (r"\.self_attn\.(k|v)_proj\.weight$", "kv", 0),
    (r"\.self_attn\.o_proj\.weight$", "split", 1),
    (r"\.linear_attn\.(in_proj_qkv|in_proj_z)\.weight$", "split", 0),
    (r"\.linear_attn\.in_proj_(a|b)\.weight$", "ba", 0),
    (r"\.linear_attn\.(conv1d\.weight|A_log|dt_bias)$", "split", 0),
    (r"\.linear_attn\.out_proj\.weight$", "split", 1),
    (r"\.mlp\.experts\.gate_up_proj$", "split", 1),  # [experts, 2 × moe_intermediate, hidden]
    (r"\.mlp\.experts\.down_proj$", "split", 2),  # [experts, hidden, moe_intermediate]
    (r"\.mlp\.(shared_expert\.)?(gate|up)_proj\.weight$", "split", 0),
    (r"\.mlp\.(shared_expert\.)?down_proj\.weight$", "split", 1),
    (r"\.mlp\.(gate|shared_expert_gate)\.weight$", "unquantized", 0),
    (r"norm\.weight$", "replicated", 0),
)


@dataclass(frozen=True)
class TensorParallelEstimate:
    """One rank (GPU) of a TP group; every byte figure is per rank."""

    model: str
    scheme: str
    tp: int
    weight_bytes: int  # everything the rank loads: its shards plus the replicated tensors
    replicated_bytes: int  # the part of weight_bytes every rank holds whole (norms, routers, ...)
    padded_vocab: int  # embedding / lm_head rows over all ranks
    q_heads_per_rank: int
    kv_heads_per_rank: int
    kv_replicas: int  # ranks holding the same KV head (1: KV heads are split, not copied)
    kv_bytes_per_token: float  # KV cache per token of one sequence, on this rank (before vLLM's blocks)
    deltanet_state_bytes: float  # DeltaNet conv + recurrent state per sequence, on this rank (before padding)
    weights: WeightsEstimate  # the per-rank tensors by role (sums to weight_bytes)
    shape: HybridShape  # the per-rank widths (hidden, vocab and the expert count stay whole)
    runtime: RuntimeAssumptions
    conv_dtype: str = "bfloat16"  # the DeltaNet state's dtypes, as vLLM picks them (vllm_cache.state_dtypes)
    ssm_dtype: str = "float32"
    prefix_caching: bool = True  # vLLM's default: mamba cache mode 'align', two state blocks per request

    def cache(self, kv_cache_bytes: int, max_model_len: int, max_num_seqs: int = DEFAULT_MAX_NUM_SEQS) -> VllmCache:
        """vLLM's accounting of `kv_cache_bytes` of KV pool on this rank (vllm_cache.py)."""
        return vllm_cache(self.shape, max(1, kv_cache_bytes), max_model_len, max_num_seqs, self.prefix_caching,
                          self.runtime.kv_dtype, self.conv_dtype, self.ssm_dtype, tp=1, device="gpu")

    def fixed_bytes(self) -> int:
        """What the rank holds besides the KV pool: weights, vLLM's profile-run activations (one prefill chunk),
        workspace, the allocator's overhead on them and the CUDA context."""
        point = self._profile_point()
        allocated = point.weights + point.activations + point.workspace
        return allocated + round(allocated * self.runtime.allocator_overhead) + self.runtime.cuda_context_bytes

    def kv_space(self, gpu_bytes: int, gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION) -> int:
        """The KV pool vLLM sizes on this rank: gpu_memory_utilization of the GPU less fixed_bytes (≤ 0: none)."""
        if not 0 < gpu_memory_utilization <= 1:
            raise QuantlabError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        return round(gpu_bytes * gpu_memory_utilization) - self.fixed_bytes()

    def memory_at(self, context: int, batch: int = 1) -> MemoryBreakdown:
        """The least a rank needs for vLLM to start with --max-model-len `context` and hold `batch` such requests
        at once: fixed_bytes plus the blocks they take (attention blocks and the null block as kv_cache, the
        padded state blocks as deltanet_state)."""
        check_point(context, batch)
        layout = self.cache(1, context)
        attention_blocks = layout.blocks_per_request - layout.state_blocks_per_request
        point = self._profile_point()
        allocated = point.weights + point.activations + point.workspace
        kv, state = (batch * attention_blocks + 1) * layout.bytes_per_block, batch * layout.state_bytes_per_request
        return replace(point, context=context, batch=batch, kv_cache=kv, deltanet_state=state,
                       allocator_overhead=round(allocated * self.runtime.allocator_overhead))

    def max_context(
        self, gpu_bytes: int, batch: int = 1, gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION
    ) -> ContextFit:
        """The longest --max-model-len vLLM starts with on `gpu_memory_utilization` of each rank's GPU, `batch`
        requests of it fitting the pool at once; at most the config's max_position_embeddings."""
        budget = round(gpu_bytes * gpu_memory_utilization)
        space = self.kv_space(gpu_bytes, gpu_memory_utilization)
        tokens = longest_model_len(self.cache(space, 1), batch) if space > 0 else 0
        positions = self.shape.max_positions
        if positions and tokens > positions:
            why = (f"max_position_embeddings ({positions:,}): vLLM refuses a longer --max-model-len without RoPE "
                   f"scaling; the pool would hold {batch} request{'s' if batch > 1 else ''} of {tokens:,}")
            return ContextFit(positions, why, budget)
        if tokens >= MAX_CONTEXT:
            return ContextFit(MAX_CONTEXT, f"max context ({MAX_CONTEXT:,})", budget)
        return ContextFit(tokens, "memory", budget)

    def _profile_point(self) -> MemoryBreakdown:
        """runtime.py's breakdown at one prefill chunk (vLLM's profile run), before any cache."""
        chunk = self.runtime.prefill_chunk or VLLM_RUNTIME.prefill_chunk
        point = runtime_memory_at(self.weights, self.weight_bytes, self.shape, chunk, 1, self.runtime)
        return replace(point, kv_cache=0, deltanet_state=0)


def tensor_parallel_estimate(
    model: EstimationModel,
    scheme: Scheme,
    tp: int,
    runtime: RuntimeAssumptions = VLLM_RUNTIME,
    dtype: str = "bfloat16",
    ssm_cache_dtype: str | None = None,
    prefix_caching: bool = True,
) -> TensorParallelEstimate:
    """Per-rank weights, KV cache and DeltaNet state of `model` under `scheme`, split over `tp` GPUs.
    `ssm_cache_dtype`: vLLM's --mamba-ssm-cache-dtype (None: the config's mamba_ssm_dtype, else the model dtype)."""
    check_tp(model.shape, tp, model.name)
    if scheme.is_gguf:
        raise QuantlabError(f"{scheme.key}: vLLM 0.32.0 has no GGUF loader (a GGUF does not load at all); use bf16, "
                            "fp16, AWQ or bitsandbytes")
    weights, replicated = rank_weights(model.inventory, model.shape, scheme, tp, dtype)
    shape = rank_shape(model.shape, tp)
    kv_heads, replicas = kv_layout(model.shape.kv_heads, tp)
    conv_dtype, ssm_dtype = state_dtypes(dtype, "gpu", model.shape.ssm_dtype, ssm_cache_dtype)
    return TensorParallelEstimate(
        model=model.name,
        scheme=scheme.key,
        tp=tp,
        weight_bytes=weights.bytes(),
        replicated_bytes=replicated,
        padded_vocab=padded_vocab(model.shape.vocab),
        q_heads_per_rank=model.shape.heads // tp,
        kv_heads_per_rank=kv_heads,
        kv_replicas=replicas,
        kv_bytes_per_token=kv_bytes_per_token(shape, runtime.kv_dtype),
        deltanet_state_bytes=shape.deltanet_layers * mamba_state_bytes(shape, conv_dtype, ssm_dtype),
        weights=weights,
        shape=shape,
        runtime=runtime,
        conv_dtype=conv_dtype,
        ssm_dtype=ssm_dtype,
        prefix_caching=prefix_caching,
    )


def padded_vocab(vocab: int, pad_to: int = VOCAB_PADDING) -> int:
    """vllm pad_vocab_size: the vocab rounded up to a multiple of 64."""
    return -(-vocab // pad_to) * pad_to


def kv_layout(kv_heads: int, tp: int) -> tuple[int, int]:
    """(KV heads per rank, ranks sharing each KV head), as QKVParallelLinear computes them."""
    if tp >= kv_heads:
        return 1, tp // kv_heads
    return kv_heads // tp, 1


def tp_problems(shape: HybridShape, tp: int) -> list[str]:
    """Why vLLM would refuse this TP size for this shape (empty: it accepts it)."""
    problems = []

    def divides(count: int, what: str) -> None:
        if count % tp:
            problems.append(f"{count:,} {what} are not divisible by {tp}")

    divides(shape.heads, "attention heads (Qwen3NextAttention, QKVParallelLinear)")
    if (shape.kv_heads >= tp and shape.kv_heads % tp) or (shape.kv_heads < tp and tp % shape.kv_heads):
        problems.append(f"{shape.kv_heads} KV heads: TP must divide them or be a multiple of them (QKVParallelLinear)")
    if shape.deltanet_layers:
        divides(shape.k_heads, "DeltaNet key heads (in_proj_qkvz, conv1d)")
        divides(shape.v_heads, "DeltaNet value heads (A_log, dt_bias, the recurrent state)")
    if shape.is_moe:
        divides(shape.expert_intermediate, "expert FFN columns (FusedMoE)")
        divides(shape.shared_expert_intermediate, "shared-expert FFN columns")
        if tp > shape.experts:
            problems.append(f"TP {tp} is larger than the {shape.experts} experts (Qwen3NextSparseMoeBlock)")
    else:
        divides(shape.intermediate, "MLP columns (MergedColumnParallelLinear gate_up_proj)")
    divides(padded_vocab(shape.vocab), "padded vocab rows (VocabParallelEmbedding)")
    return problems


def check_tp(shape: HybridShape, tp: int, where: str = "model") -> None:
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise QuantlabError(f"tensor parallel size must be a positive integer, got {tp!r}")
    problems = tp_problems(shape, tp)
    if problems:
        raise QuantlabError(f"{where}: vLLM refuses tensor parallel size {tp}: " + "; ".join(problems))


def rank_shape(shape: HybridShape, tp: int) -> HybridShape:
    """The widths one rank sees: heads and FFN columns / tp; hidden, vocab and experts whole."""
    return replace(
        shape,
        heads=shape.heads // tp,
        kv_heads=kv_layout(shape.kv_heads, tp)[0],
        intermediate=shape.intermediate // tp,
        expert_intermediate=shape.expert_intermediate // tp,
        shared_expert_intermediate=shape.shared_expert_intermediate // tp,
        v_heads=shape.v_heads // tp,
        k_heads=shape.k_heads // tp,
    )


def sharding_rule(name: str) -> tuple[str, int]:
    """(kind, dim) of the vLLM rule for one tensor name (a TensorGroup pattern works too)."""
    for pattern, kind, dim in SHARDING_RULES:
        if re.search(pattern, name):
            return kind, dim
    raise QuantlabError(f"no tensor-parallel rule for tensor {name!r}: add one to SHARDING_RULES")


def rank_weights(
    inventory: ModelInventory, shape: HybridShape, scheme: Scheme, tp: int, dtype: str = "bfloat16"
) -> tuple[WeightsEstimate, int]:
    """(one rank's tensors by role, the bytes of them that every rank holds whole)."""
    split, whole, unquantized = rank_groups(inventory, shape, scheme, tp)
    kept = scheme.dtype or dtype
    plain = Scheme(key=kept, label=kept, method="none", source="vLLM ReplicatedLinear(quant_config=None)", dtype=kept)

    def priced(groups: tuple[TensorGroup, ...], how: Scheme) -> WeightsEstimate:
        return estimate_weights(ModelInventory(inventory.model_class, groups), how, shape.layers, dtype)

    shared = (priced(whole, scheme), priced(unquantized, plain))
    return combined(scheme, priced(split, scheme), *shared), sum(e.bytes() for e in shared)


def combined(scheme: Scheme, *estimates: WeightsEstimate) -> WeightsEstimate:
    """One estimate from several over disjoint tensors: components summed by role."""
    parts: dict[str, list[ComponentBytes]] = {}
    for estimate in estimates:
        for c in estimate.components:
            parts.setdefault(c.role, []).append(c)
    components = tuple(
        ComponentBytes(
            role=role,
            parameters=sum(c.parameters for c in parts[role]),
            bytes=sum(c.bytes for c in parts[role]),
            formats=tuple(f for c in parts[role] for f in c.formats),
        )
        for role in ROLES
        if role in parts
    )
    return WeightsEstimate(scheme, components, max((e.largest_quantized_numel for e in estimates), default=0))


def rank_groups(
    inventory: ModelInventory, shape: HybridShape, scheme: Scheme, tp: int
) -> tuple[tuple[TensorGroup, ...], tuple[TensorGroup, ...], tuple[TensorGroup, ...]]:
    """The text model's tensors as one rank holds them: (split, at their per-rank shapes; whole, priced by
    the scheme; whole and unquantized whatever the scheme)."""
    split: list[TensorGroup] = []
    whole: list[TensorGroup] = []
    unquantized: list[TensorGroup] = []
    for group in inventory.groups:
        if group.role in SKIPPED_ROLES:
            continue
        kind, dim = sharding_rule(group.name)
        if kind == "unquantized":
            unquantized.append(group)
        elif kind == "replicated" or (kind == "ba" and scheme.method in BA_REPLICATED_METHODS):
            whole.append(group)
        else:
            ranked = _rank_group(group, kind, dim, shape, tp)
            _check_groups_align(group, ranked, dim, scheme, tp)
            split.append(ranked)
    return tuple(split), tuple(whole), tuple(unquantized)


def _rank_group(group: TensorGroup, kind: str, dim: int, shape: HybridShape, tp: int) -> TensorGroup:
    dims = list(group.shape)
    if kind == "vocab":
        dims[0] = padded_vocab(dims[0]) // tp
    elif kind == "kv":
        dims[0] = kv_layout(shape.kv_heads, tp)[0] * shape.head_dim
    else:
        if dims[dim] % tp:
            raise QuantlabError(f"{group.name}: dimension {dim} ({dims[dim]:,}) is not divisible by TP {tp}")
        dims[dim] //= tp
    return replace(group, shape=tuple(dims))


def _check_groups_align(group: TensorGroup, ranked: TensorGroup, dim: int, scheme: Scheme, tp: int) -> None:
    """A quantized tensor split along its input dim must keep whole quantization groups on each rank."""
    if dim != len(group.shape) - 1 or len(group.shape) < 2 or scheme.method == "none":
        return
    if group.role in UNQUANTIZED_ROLES.get(scheme.method, frozenset()):
        return
    for part in scheme.parts:
        if part.per == "group" and ranked.row_length % part.size:
            raise QuantlabError(
                f"{group.name}: {scheme.label} at TP {tp} leaves {ranked.row_length:,} input columns per rank, "
                f"not a multiple of the group size {part.size}: vLLM refuses it (input size not aligned)"
            )
