"""The vLLM runtime's settings as a recipe gives them (`measure.vllm`), typed at the bottom like the llama.cpp
runtime's (quantlab/llamacpp/settings.py): the recipe validates them, the runtime reads them.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

from quantlab.fields import STRICT


class VllmSpec(BaseModel):
    """The vLLM runtime's settings (measure.runtime: vllm), named as `vllm serve` names them."""

    model_config = STRICT

    kv_cache_gib: int = Field(1, ge=1, le=4096, description="the KV cache space in whole GiB (VLLM_CPU_KVCACHE_SPACE "
                              "on the CPU, which takes whole GiB only; --kv-cache-memory-bytes on a GPU)")
    max_num_seqs: int = Field(16, ge=1, le=1024, description="the most sequences vLLM runs at once (--max-num-seqs)")
    prefix_caching: bool = Field(False, description="--enable-prefix-caching. Off by default here: the measurement "
                                 "repeats one prompt, and with it on every repeat after the first measures a cache "
                                 "hit, not a prefill")
    enforce_eager: bool = Field(True, description="--enforce-eager: no torch.compile (minutes on 2 cores)")
    concurrency: list[int] = Field(default_factory=lambda: [1, 4, 16], max_length=16, description="serving under load: the concurrency levels, as "
                                         "`vllm bench serve --max-concurrency` takes them; () skips the load test")
    requests_per_level: int = Field(32, ge=1, le=10_000, description="requests sent at each concurrency level")
    input_tokens: int = Field(256, ge=1, le=1_048_576, description="prompt tokens of each load-test request")
    output_tokens: int = Field(64, ge=1, le=65_536, description="tokens each load-test request generates")
    max_model_len: int | None = Field(None, ge=16, le=1_048_576, description="--max-model-len; default: the longest "
                                      "sequence the run sends (points, load test, quality windows)")
    startup_timeout_s: float = Field(600, gt=0, le=7200, description="how long the server may take to answer")
    port: int | None = Field(None, ge=1024, le=65535, description="a fixed port on 127.0.0.1; default: a free one")

    @field_validator("concurrency")
    @classmethod
    def _levels(cls, levels: list[int]) -> list[int]:
        if any(level < 1 or level > 4096 for level in levels):
            raise ValueError("each concurrency level is a whole number from 1 to 4,096")
        if len(set(levels)) != len(levels):
            raise ValueError("each concurrency level once")
        return sorted(levels)
