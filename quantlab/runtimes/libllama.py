"""The llama.cpp runtime: a GGUF file loaded and run by libllama (llama.cpp built by `make llama-cpp`), through the
llama-cpp-python binding's C API, as llama-bench runs it: prefill of the prompt in batches of n_batch, then
decode one token at a time at that depth. quantlab's own loop (quantlab/measure.py) times it, with warm-ups,
repeats, median and spread, as for every runtime.

Memory is llama.cpp's own buffer accounting per device (model, KV cache, recurrent state, compute, output),
read from its log as each context is made, beside the process RSS the shared trackers measure.
"""

from __future__ import annotations

from typing import Any

import torch

from quantlab.errors import QuantlabError
from quantlab.llamacpp import tools as llamacpp
from quantlab.llamacpp.binding import (
    LlamaCppModel, LlamaCppSettings, cpu_backend, describe_types, library, open_gguf, process_log,
)
from quantlab.llamacpp.settings import LlamaCppSpec
from quantlab.llamacpp.speculative import decode_with_mtp, decode_without_draft, same_text
from quantlab.runtimes.base import LoadedModel, LoadRequest, Runtime, SpeculativeRequest
from quantlab.schema.speculative import MAX_DRAFT_TOKENS, DraftMemory, SpeculativeResult, summarize
from quantlab.schema.environment import WeightsInfo
from quantlab.schema.measurement import Kernels

NAME = "llama.cpp"
LLAMA_ALL_LAYERS = 999  # -ngl 999: llama.cpp offloads at most every layer and the output (n_layer + 1)


class LlamaCppRuntime(Runtime):
    name = NAME

    def __init__(self) -> None:
        self.lib = library()
        self.log = process_log()

    def options(self, measure, device: torch.device, longest: int = 0) -> LlamaCppSettings:
        """from the recipe's measure.llama_cpp: defaults as llama-bench's, all layers on a GPU, none on the CPU"""
        return settings_for(measure.llama_cpp or LlamaCppSpec(), device)

    def version(self) -> str:
        return llamacpp.locate().version

    def settings(self, model: LlamaCppModel) -> dict[str, Any]:
        return model.settings.as_dict()

    def load(self, request: LoadRequest) -> LoadedModel:
        if request.gguf is None:
            raise QuantlabError("the llama.cpp runtime runs GGUF files, and this load names none")
        source, path = request.source, request.gguf
        settings: LlamaCppSettings = request.settings or settings_for(LlamaCppSpec(), request.device)
        if request.device.type == "cuda" and not self.lib.llama_supports_gpu_offload():
            # the records would say GPU while llama.cpp ran on the CPU
            raise QuantlabError("this llama.cpp build has no GPU backend, so the model would run on the CPU: build it "
                                "with `GGML_CUDA=on make llama-cpp`, or set model.device: cpu")
        loaded = open_gguf(path, settings)
        header = loaded.header
        info = WeightsInfo(name=source.name, source=source.spec.source, weights=source.weights, location=str(path),
                           model_class=f"GGUF {header.architecture}", variant=source.spec.variant,
                           dtype=describe_types(header))
        return LoadedModel(loaded, None, source.config, info)

    def prepare_point(self, model: LlamaCppModel, context: int, batch: int, new_tokens: int) -> None:
        if batch > 1:
            raise QuantlabError("the llama.cpp runtime measures batch 1 (one sequence; slots size the memory)")
        model.free_context()  # a context of this point's size, so that its buffers are this point's
        model.ensure_context(context + new_tokens + 1)

    def prefill(self, model: LlamaCppModel, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        tokens = ids[0].tolist()
        model.clear()
        return model.decode(tokens, 0, 1).argmax(-1, keepdim=True), len(tokens)

    def decode(self, model: LlamaCppModel, next_ids: torch.Tensor, cache: Any, steps: int) -> torch.Tensor:
        position, token = cache, int(next_ids[0, 0])
        generated = [token]
        for _ in range(steps):
            token = int(model.decode([token], position, 1)[0].argmax())
            position += 1
            generated.append(token)
        return torch.tensor([generated])

    def cache_bytes(self, cache: Any) -> int | None:
        return None  # llama.cpp allocates KV and recurrent state whole at context creation: see buffers

    def point_buffers(self, model: LlamaCppModel) -> dict[str, int]:
        return dict(model.buffers)

    def vocab_size(self, model: LlamaCppModel) -> int:
        return model.vocab_size

    def weight_bytes(self, model: LlamaCppModel) -> int:
        return int(self.lib.llama_model_size(model.model))

    def parameter_count(self, model: LlamaCppModel) -> int:
        return int(self.lib.llama_model_n_params(model.model))

    def lookup_table_bytes(self, model: LlamaCppModel) -> int:
        return sum(t.nbytes for t in model.header.tensors if t.name == "token_embd.weight")

    def kernels(self, model: LlamaCppModel) -> Kernels:
        header = model.header
        s = model.settings
        backend = cpu_backend()
        return Kernels(deltanet={"gated_delta_net": "ggml"}, linear=tuple(f"ggml {t}" for t in header.parameters_by_type()),
                       attention=f"llama.cpp, flash attention {s.flash_attn}, KV {s.kv_type}",
                       compute_dtype=describe_types(header),
                       cpu_backend=f"ggml-cpu {backend['variant']} ({backend['system_info']})")


    def speculative(self, model: LlamaCppModel, request: SpeculativeRequest, echo) -> tuple[SpeculativeResult, ...]:
        """llama.cpp's own tools on the same GGUF and settings: each prompt decoded with no draft (llama-completion),
        then with the MTP head drafting k tokens per step (llama-speculative-simple), for each k."""
        tools, s = llamacpp.locate(), model.settings
        context = max(len(ids) for ids in request.prompt_ids) + request.new_tokens + MAX_DRAFT_TOKENS + 16
        common = ["-c", str(context), "-t", str(s.threads), "-ngl", str(s.gpu_layers), "-fa", s.flash_attn,
                  "-ctk", s.kv_type, "-ctv", s.kv_type, "-ub", str(s.ubatch), "-b", str(s.batch),
                  "--seed", str(request.seed)]
        prompts = request.prompt_texts
        echo(f"speculative decoding: {len(prompts)} prompt(s), no draft, then the MTP head drafting "
             f"k = {', '.join(map(str, request.spec.tokens))}")
        off = [decode_without_draft(tools, model.path, p, request.new_tokens, common) for p in prompts]
        results = []
        for k in request.spec.tokens:
            on = [decode_with_mtp(tools, model.path, p, request.new_tokens, k, common) for p in prompts]
            calls = sum(r.draft_calls for r in on)
            results.append(summarize(
                k, [r.tok_s for r in off], [r.tok_s for r in on], sum(r.drafted for r in on),
                sum(r.accepted for r in on), 1 + sum(r.accepted for r in on) / calls if calls else None,
                all(same_text(a.text, b.text) for a, b in zip(off, on)), round(sum(r.prompt_tokens for r in on) / len(on)),
                request.new_tokens, _draft_memory(on[0], off[0]),
                how=(f"llama.cpp: on, llama-speculative-simple --spec-type draft-mtp --spec-draft-n-max {k}, its "
                     "'decoded N tokens in S seconds' (the draft-verify loop, wall time); off, llama-completion, its "
                     "'eval time = T ms / N runs' (single-token decode steps); both greedy, EOS ignored. Drafted and "
                     "accepted: the MTP driver's statistics (#gen tokens, #acc tokens); tokens per step: llama.cpp's "
                     "'#mean acc len', 1 + accepted ÷ verified drafts, summed over the prompts")))
        return tuple(results)


def _draft_memory(on, off) -> DraftMemory:
    """What MTP adds, in llama.cpp's own log: the MTP block's weights (the model buffers with the draft loaded, less
    those without: llama.cpp loads blk.N only when a draft uses it), the draft context's KV and compute buffers,
    and the main context's recurrent state kept for each drafted position (its RS buffer grows). Weights are the
    stored bytes (CPU_Mapped, or the device's model buffer); a CPU_REPACK buffer, where ggml repacks a type for its
    kernels (Q4_K on AVX-512), holds a second copy and is named on its own."""
    def growth(kind: str, repack: bool = False) -> int:
        def total(buffers: dict[str, int]) -> int:
            return sum(v for key, v in buffers.items() if key.endswith(f" {kind}") and ("REPACK" in key) == repack)
        return total(on.buffers) - total(off.buffers)

    repacked = growth("model", repack=True)
    return DraftMemory(weights=max(0, growth("model")) or None,
                       kv=sum(v for k, v in on.draft_buffers.items() if k.endswith(" KV")) or None,
                       compute=sum(v for k, v in on.draft_buffers.items() if k.endswith(" compute")) or None,
                       recurrent=growth("RS") if growth("RS") > 0 else None,
                       source="llama.cpp's log: the buffers of the MTP draft context, and the model and recurrent-"
                              "state buffers with the draft against without"
                              + (f"; ggml's CPU_REPACK copy of the block adds {repacked / 2**20:.2f} MiB more"
                                 if repacked > 0 else ""))


def settings_for(spec: LlamaCppSpec, device: torch.device) -> LlamaCppSettings:
    if device.type != "cuda":
        layers = 0  # on the CPU nothing is offloaded, whatever a GPU recipe's measure asks
    else:
        layers = LLAMA_ALL_LAYERS if spec.gpu_layers in (None, "all") else spec.gpu_layers
    return LlamaCppSettings(threads=spec.threads or torch.get_num_threads(), gpu_layers=layers,
                            flash_attn=spec.flash_attn, kv_type=spec.kv_type, slots=spec.slots,
                            ubatch=spec.ubatch, batch=spec.batch)

