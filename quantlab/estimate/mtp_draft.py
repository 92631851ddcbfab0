"""What llama.cpp's MTP speculative decoding adds to a GGUF's memory, from the config alone: `llama-server
--spec-type draft-mtp --spec-draft-n-max K` on one slot, as the pinned tree (.llama.cpp/src/vendor/llama.cpp) sets
it up. (The pinned tree removed --draft-max: "use --spec-draft-n-max".)

Read from that tree (file:line there):
- MTP block weights. The converter writes the MTP head as one more block, blk.N (N = num_hidden_layers), quantized by
  llama-quantize under the file type's rules as the last layer (quantlab/estimate/gguf_mix.py), or at one type
  with `--tensor-type blk\\.N\\.=TYPE` (the rules then skip those tensors; norms stay F32). llama.cpp loads them
  only with the MTP draft on: load_mtp follows --spec-type (common/common.cpp:1625), and without it every MTP tensor
  is TENSOR_SKIP (src/models/qwen35.cpp:38). They sit in the one model buffer: the draft context runs on the
  target's model (common/speculative.cpp:2557-2567), so the weights are counted once.
- Draft KV cache. The MTP draft is a second llama_context (ctx_type MTP: common/speculative.cpp:2525-2527) with the
  target's n_ctx (2530), which llama.cpp pads to a multiple of 256 (src/llama-context.cpp:290); its memory is a plain
  KV cache over the MTP layer(s) only (src/llama-model.cpp:2660-2669, 2792-2802: il >= n_layer()), one full-attention
  layer of kv_heads × head_dim for K and for V, in the draft's own cache types: -ctkd/-ctvd, f16 by default
  (common/common.h:343-344, common/speculative.cpp:2478-2479), whatever -ctk/-ctv say for the target. The target
  context keeps no KV for the MTP layer (src/llama-model.cpp:2699-2704: il < n_layer()).
- Draft compute buffer: graph_mtp (src/models/qwen35.cpp:485-660) reserved for n_ubatch tokens against every KV cell,
  one output (n_outputs_max = slots: common/speculative.cpp:2480). With flash attention (auto: on, on the CPU and on
  CUDA) it holds the f16 KQ mask, cells × n_ubatch × 2 bytes (src/llama-graph.cpp:38-41), and the layer's
  activations for n_ubatch tokens; `draft_compute_bytes` says which, and how close that is.
- The target context changes too: n_rs_seq = K recurrent-state snapshots per sequence, for rollback
  (common/common.cpp:1635, common/common.h:396-402), so the DeltaNet state is slots × (1 + K) rows
  (src/llama-memory-recurrent.cpp:101), K more copies of the whole state. Its graph is reserved for 1 + K outputs
  (tools/server/server-context.cpp:41-53, common/speculative.cpp:2586-2596), but the K more rows of logits fit in
  memory the graph has freed: its compute buffer does not change in llama.cpp's plans (Qwen3.6-27B, the bundled
  model), so no row here.
- Not in llama.cpp's memory breakdown, so not here: the host-side output buffers (logits and MTP embeddings of the
  outputs, a few MB), and on a GPU the CUDA context and cuBLAS workspace.

scripts/mtp_full_size.py holds these figures against llama.cpp's own plan (no_alloc) for Qwen3.6-27B at full size, and
tests/test_mtp_estimate.py against llama.cpp's log on the bundled model with an MTP head.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantlab.errors import QuantlabError
from quantlab.estimate import gguf_mix
from quantlab.estimate.hybrid import HybridShape
from quantlab.estimate.model import EstimationModel
from quantlab.estimate.runtime import (CACHE_DTYPE_BYTES, RuntimeAssumptions, deltanet_state_bytes, longest_fitting,
                                       memory_at)
from quantlab.estimate.schemes import Scheme
from quantlab.estimate.weights import WeightsEstimate, estimate_weights
from quantlab.schema.speculative import MAX_DRAFT_TOKENS  # as the recipe's measure.speculative.tokens

CELL_PAD = 256  # llama.cpp pads n_ctx to a multiple of this (src/llama-context.cpp:290)
UBATCH = 512  # llama.cpp's default n_ubatch
INPUT_BYTES = 41  # per token of graph_mtp inputs: token id 4, rope positions 4 × 4, K and V cell indices 2 × 8 (36);
# the other 5 are what llama.cpp's plans of small shapes and of Qwen3.6-27B show beyond those (tensor alignment)
DRAFT_KV_TYPES = ("f16", "bf16", "q8_0", "f32")  # llama.cpp's -ctkd / -ctvd types the estimator knows
# the weight types one can keep the MTP block at (llama-quantize --tensor-type blk\.N\.=TYPE)
BLOCK_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "F16", "BF16")


@dataclass(frozen=True)
class MtpDraft:
    """What the MTP draft of K tokens per step adds at one context, one slot (bytes)."""

    draft_tokens: int  # K
    context: int  # tokens asked for (-c)
    cells: int  # KV cells llama.cpp makes for them (a multiple of 256)
    block_weights: int  # blk.N.* as loaded
    block_formats: tuple[tuple[str, int], ...]  # (ggml type, parameters stored in it)
    draft_kv: int
    draft_compute: int
    target_state_snapshots: int  # K more copies of the DeltaNet state in the target context

    @property
    def total(self) -> int:
        return self.block_weights + self.draft_kv + self.draft_compute + self.target_state_snapshots

    def rows(self) -> list[tuple[str, int]]:
        return [("MTP block weights (blk.N)", self.block_weights),
                ("draft KV cache", self.draft_kv),
                ("draft compute buffer", self.draft_compute),
                (f"target: DeltaNet state snapshots (K = {self.draft_tokens})", self.target_state_snapshots)]


def check_draft_tokens(k: int, flag: str = "--mtp-draft") -> None:
    if not 1 <= k <= MAX_DRAFT_TOKENS:
        off = " (K = 0 is speculative decoding off)" if k == 0 else ""
        raise QuantlabError(f"{flag}: K, the tokens drafted per step (llama.cpp --spec-draft-n-max), must be "
                            f"between 1 and {MAX_DRAFT_TOKENS}, got {k}{off}")


def mtp_layer_count(model: EstimationModel) -> int:
    """The MTP layers the config declares (mtp_num_hidden_layers); one line naming the model where there is none."""
    n = gguf_mix.mix_context(model.inventory.groups, model.shape.layers).mtp_layers
    if n == 0:
        raise QuantlabError(f"no MTP head: {model.name}'s config has no mtp_num_hidden_layers, so there is no MTP "
                            "draft to run (llama.cpp's --spec-type draft-mtp needs its blk.N.nextn.* block, vLLM's "
                            "method mtp its mtp.* tensors)")
    return n


def mtp_layers(model: EstimationModel) -> int:
    """mtp_layer_count, for llama.cpp: its Qwen3.5 MTP graph runs exactly one."""
    n = mtp_layer_count(model)
    if n != 1:
        raise QuantlabError(f"{model.name}: {n} MTP layers; llama.cpp's Qwen3.5 MTP graph runs exactly one "
                            "(src/models/qwen35.cpp:489)")
    return n


def check_scheme(scheme: Scheme) -> None:
    if scheme.method != "none" and not scheme.is_gguf:
        raise QuantlabError(f"--mtp-draft: llama.cpp runs GGUF files, and {scheme.key} is not one: give q8_0, q6_k, "
                            "q4_k_m, or bf16 / fp16 (a GGUF of that type)")


def cells(context: int) -> int:
    return -(-context // CELL_PAD) * CELL_PAD


def block_bytes(model: EstimationModel, scheme: Scheme, block_type: str | None = None) -> tuple[int, dict[str, int]]:
    """The MTP block's bytes in the GGUF and its parameters per ggml type: at the file type's own rules, or every
    2-D tensor at `block_type` (1-D norms stay F32, as the converter writes them and llama-quantize leaves them)."""
    ctx = gguf_mix.mix_context(model.inventory.groups, model.shape.layers)
    total, formats = 0, {}
    for group in (g for g in model.inventory.groups if g.role == "mtp"):
        if len(group.shape) < 2:
            types = {"F32": group.count}
        elif block_type is not None:
            types = {gguf_mix.with_fallback(block_type, group.row_length): group.count}
        elif scheme.is_gguf:
            types = dict(gguf_mix.tensor_types(group, scheme.ggml_type, scheme.mix, ctx))
        else:
            types = {"BF16" if scheme.dtype == "bfloat16" else "F16": group.count}
        for ggml_type, n in types.items():
            total += n * group.rows * _row_bytes(ggml_type, group.row_length)
            formats[ggml_type] = formats.get(ggml_type, 0) + n * group.numel
    return total, formats


def _row_bytes(ggml_type: str, row_length: int) -> int:
    if ggml_type in ("F32", "F16", "BF16"):
        return row_length * (4 if ggml_type == "F32" else 2)
    return gguf_mix.row_bytes(ggml_type, row_length)


def draft_kv_bytes(shape: HybridShape, context: int, kv_type: str, n_mtp: int = 1) -> int:
    """K and V of the MTP layer(s) for every cell, in the draft's cache type."""
    per_cell = n_mtp * 2 * shape.kv_heads * shape.head_dim * CACHE_DTYPE_BYTES[_dtype(kv_type)]
    return round(per_cell * cells(context))


def draft_compute_bytes(shape: HybridShape, context: int, ubatch: int = UBATCH) -> int:
    """graph_mtp's compute buffer, flash attention on, reserved for T = min(cells, n_ubatch) tokens: the larger of
    - the attention stage: the f16 KQ mask over every cell (cells × T × 2 bytes, src/llama-graph.cpp:38-41) and, per
      token, f32 activations of 2 × hidden (the residual and the normed input) and of the attention projections,
      max(4 × heads × head_dim, 3 × heads × head_dim + 2 × kv_heads × head_dim) (the gated query, its norm, the
      gate; or the query, gate, K and V), plus INPUT_BYTES of inputs (token, 4 rope positions, K and V cell indices);
    - the MLP stage, the mask freed: the residual, gate, up and their product (hidden + 3 × intermediate, f32) and the
      same inputs.
    ggml's allocator places each tensor in a freed block where one fits, so these stages' sums are what llama.cpp
    plans to within a few hundred bytes where the mask is the larger part (long contexts: 128k on Qwen3.6-27B, and
    small models); where the MLP stage is, the allocator may not reuse the mask's block for the MLP's larger tensors,
    and llama.cpp plans more, up to the mask's size (Qwen3.6-27B at 32k: 14% more, measurements/mtp-full-size.md).
    The one row of logits fits in freed memory (no change with the vocabulary in llama.cpp's plans)."""
    n_cells = cells(context)
    tokens = min(n_cells, ubatch)
    q = shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim
    attention = n_cells * tokens * 2 + tokens * (INPUT_BYTES + 4 * (2 * shape.hidden + max(4 * q, 3 * q + 2 * kv)))
    mlp = tokens * (INPUT_BYTES + 4 * (shape.hidden + 3 * shape.intermediate))
    return max(attention, mlp)


def _dtype(kv_type: str) -> str:
    return {"f16": "fp16", "bf16": "bf16", "q8_0": "q8_0", "f32": "f32"}[kv_type]


def mtp_draft(model: EstimationModel, weights: WeightsEstimate, scheme: Scheme, context: int, k: int,
              rt: RuntimeAssumptions, draft_kv_type: str = "f16", block_type: str | None = None,
              ubatch: int = UBATCH) -> MtpDraft:
    """Every part the MTP draft of K tokens adds at `context` tokens, one slot."""
    check_draft_tokens(k)
    n_mtp = mtp_layers(model)
    weight_bytes, formats = block_bytes(model, scheme, block_type)
    shape = model.shape
    return MtpDraft(
        draft_tokens=k, context=context, cells=cells(context), block_weights=weight_bytes,
        block_formats=tuple(sorted(formats.items(), key=lambda kv: -kv[1])),
        draft_kv=draft_kv_bytes(shape, context, draft_kv_type, n_mtp),
        draft_compute=draft_compute_bytes(shape, context, ubatch),
        target_state_snapshots=round(k * deltanet_state_bytes(shape, rt.state_dtype)),
    )


def weights_of(model: EstimationModel, scheme: Scheme) -> WeightsEstimate:
    return estimate_weights(model.inventory, scheme, model.shape.layers)


def total_without(model: EstimationModel, weights: WeightsEstimate, context: int, rt: RuntimeAssumptions,
                  on_gpu: bool = True) -> int:
    """The estimator's llama.cpp total without the draft, one slot (the MTP block not loaded): on a GPU (token_embd
    in host memory, the CUDA context counted), or every buffer on the CPU backend."""
    p = memory_at(weights, weights.bytes(False, False), model.shape, context, 1, rt)
    return p.total if on_gpu else p.allocated + p.host_weights


def longest_context(model: EstimationModel, weights: WeightsEstimate, scheme: Scheme, budget: int, k: int,
                    rt: RuntimeAssumptions, draft_kv_type: str = "f16", block_type: str | None = None,
                    on_gpu: bool = True, minus: int = 0) -> int:
    """The longest context whose estimate, less `minus` bytes, fits `budget` bytes, with the MTP draft of K tokens
    (k = 0: off); on a GPU (see total_without) or counting every buffer of the CPU backend."""
    def fits(context: int) -> bool:
        extra = mtp_draft(model, weights, scheme, context, k, rt, draft_kv_type, block_type).total if k else 0
        return total_without(model, weights, context, rt, on_gpu) + extra - minus <= budget

    return longest_fitting(fits)
