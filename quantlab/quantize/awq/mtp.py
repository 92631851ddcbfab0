"""The MTP (multi-token prediction) head through AWQ, for builds that quantize it (`quantization.mtp: quantize`).

Qwen3.5/3.6's MTP head drafts token t+2 from the main model's final (normed) hidden state h_t and the embedding
e of token t+1: ``norm(layer(fc([pre_fc_norm_embedding(e), pre_fc_norm_hidden(h)])))``, where ``layer`` is one
gated full-attention decoder layer (transformers' own class: the main model's decoder layer, built as a
full-attention one). transformers drops `mtp.*` at load, so the engine builds the block itself from the
checkpoint's tensors and runs it on the calibration windows as vLLM's draft runs it:
1. h: the main model's last decoder layer outputs (the float chain the engine already carries) through its final
   norm; e: the embeddings of the next tokens; positions those of the embedded tokens (t+1);
2. `mtp.fc`: scales searched on its input (the two normed halves, concatenated) and folded into the two pre-fc
   norms (each (1 + weight) RMSNorm takes its half), then clipping; quantized and packed;
3. the decoder layer on fc's float outputs: the same mappings, search, fold, clip and packing as a main-model
   full-attention layer.
Every Linear is written in the AWQ GEMM layout (qweight, qzeros, scales) with the build's group size and zero
points; the norms stay at the model dtype (the fold changes their values, as in the main model's layers).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate.utils import set_module_tensor_to_device

from quantlab.architecture import MTP_PREFIX, tensor_class
from quantlab.errors import QuantlabError
from quantlab.quantize.awq.engine import MTP_STAGED, AwqJob
from quantlab.quantize.awq.pack import pack_gemm
from quantlab.quantize.awq.search import GRID, apply_clip, search_clip, search_scales
from quantlab.quantize.awq.shards import ShardReader, ShardWriter
from quantlab.quantize.groupwise import quantize_rows, scale_columns

# The MTP head's Linear weights, by checkpoint name (Qwen3.5/3.6 dense: one decoder layer)
MTP_LINEAR = re.compile(r"^mtp\.(fc|layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj))\.weight$")
# The Linears of a one-layer dense MTP head, by module name: what `mtp: quantize` quantizes
MTP_LINEAR_NAMES = ("mtp.fc", *(f"mtp.layers.0.{p}" for p in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")))
PACK_MULTIPLE = 8


def mtp_layer_count(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "mtp_num_hidden_layers", 0) or 0)


def mtp_linears(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    """{module name: (out_features, in_features)} of the MTP head's Linears, from checkpoint tensor shapes."""
    return {name.removesuffix(".weight"): tuple(shape) for name, shape in sorted(shapes.items())
            if MTP_LINEAR.match(name) and len(shape) == 2}


def kept_class(module: str, skip_classes) -> bool:
    """Whether the recipe's skip_classes keep an MTP Linear at the model dtype: its class as in a main-model layer
    (mtp.layers.0.mlp.down_proj is an mlp.down), so that the skip list, read by vLLM as substrings, agrees."""
    return tensor_class(module.removeprefix(MTP_PREFIX)) in tuple(skip_classes)


def check_mtp_head(what: str, config, shapes: dict[str, tuple[int, ...]] | None, group_size: int,
                   synthetic: bool = False) -> None:
    """One QuantlabError line where the source has no MTP head quantlab can quantize; `shapes`: the checkpoint's
    tensor shapes by name (None: its files are not here yet, checked by the engine once they are)."""
    layers = mtp_layer_count(config)
    if layers < 1:
        raise QuantlabError(f"quantization.mtp quantize: {what} has no MTP head (its config has no "
                            "mtp_num_hidden_layers); use mtp: bf16, or a source with an MTP head")
    if layers > 1:
        raise QuantlabError(f"quantization.mtp quantize: {what} has {layers} MTP layers; quantlab quantizes a "
                            "one-layer MTP head (Qwen3.5/3.6's)")
    if synthetic:
        raise QuantlabError(f"quantization.mtp quantize: {what}: synthetic weights have no MTP head (transformers "
                            "builds the model without the mtp.* tensors, so quantlab creates none)")
    if shapes is None:
        return
    names = [n for n in shapes if n.startswith(MTP_PREFIX)]
    if not names:
        raise QuantlabError(f"quantization.mtp quantize: {what}: its config names an MTP head but its files have no "
                            "mtp.* tensor (a checkpoint saved by transformers has lost them: it drops mtp.* at load)")
    linears = mtp_linears(shapes)
    missing = [n for n in MTP_LINEAR_NAMES if n not in linears]
    if missing:
        raise QuantlabError(f"quantization.mtp quantize: {what}: the MTP head lacks {missing[0]}.weight "
                            f"({len(missing)} of its {len(MTP_LINEAR_NAMES)} Linears missing); quantlab quantizes a "
                            "dense Qwen3.5/3.6 MTP head")
    wide = [n for n, (_, in_features) in linears.items() if in_features % group_size]
    if wide:
        raise QuantlabError(f"quantization.group_size {group_size} does not divide in_features of {len(wide)} MTP "
                            f"Linear(s), e.g. {wide[0]}; use a group size that divides them, or mtp: bf16")
    narrow = [n for n, (out_features, _) in linears.items() if out_features % PACK_MULTIPLE]
    if narrow:
        raise QuantlabError(f"quantization.method awq: {len(narrow)} MTP Linear(s) have out_features not divisible "
                            f"by {PACK_MULTIPLE}, which the AWQ GEMM layout needs, e.g. {narrow[0]}; use mtp: bf16")


class MtpBlock(torch.nn.Module):
    """The MTP head under its checkpoint names (relative to `mtp.`), from the main model's own module classes."""

    def __init__(self, text_config, layer_class: type, norm_class: type) -> None:
        super().__init__()
        hidden, eps = text_config.hidden_size, text_config.rms_norm_eps
        layer_config = copy.deepcopy(text_config)
        layer_config.layer_types = ["full_attention"]
        layer_config.num_hidden_layers = 1
        layer_config._attn_implementation = "sdpa"  # causal with attention_mask None, as the draft runs
        self.fc = torch.nn.Linear(2 * hidden, hidden, bias=False)
        self.pre_fc_norm_embedding = norm_class(hidden, eps=eps)
        self.pre_fc_norm_hidden = norm_class(hidden, eps=eps)
        self.layers = torch.nn.ModuleList([layer_class(layer_config, 0)])
        self.norm = norm_class(hidden, eps=eps)


@dataclass(frozen=True)
class LayerSteps:
    """The engine's own steps (quantlab/quantize/awq/native.py), handed in so that the head goes through exactly
    them without this module importing the engine that calls it."""

    quantize_layer: Callable
    fold: Callable
    materialize: Callable
    empty_cache: Callable


def quantize_mtp(model, layers_path: str, reader: ShardReader | None, job: AwqJob, hidden,
                 steps: LayerSteps) -> tuple[list[str], str]:
    """Quantize the MTP head into job.out / MTP_STAGED. `hidden`: the last decoder layer's float outputs, one
    tensor per calibration chunk. Returns the quantized Linears' names and a note saying what was done. The engine
    has checked the head (check_mtp_head) before its first layer."""
    from quantlab.quantize.awq.mappings import AWQ_ARCHITECTURES

    qc = job.params
    if reader is None or job.calibration is None or hidden is None:
        raise QuantlabError("quantization.mtp quantize: needs a checkpoint with an MTP head and calibration text; "
                            "synthetic weights have neither")
    text_path = layers_path.rsplit(".", 1)[0]
    text_model = model.get_submodule(text_path)
    text_config = model.config.get_text_config()
    with torch.device("meta"):
        block = MtpBlock(text_config, type(text_model.layers[0]), type(text_model.norm)).to(job.dtype)
    _check_block_names(block, reader)
    for name, tensor in block.state_dict(keep_vars=True).items():
        value = reader.get(f"{MTP_PREFIX}{name}", job.device, job.dtype if tensor.is_floating_point() else None)
        set_module_tensor_to_device(block, name, job.device, value=value)

    fc_inputs, layer_inputs, layer_kwargs = _mtp_inputs(model, text_model, text_path, block, reader, job, hidden,
                                                        steps.materialize)
    (job.out / MTP_STAGED).mkdir(exist_ok=True)
    writer = ShardWriter(job.out / MTP_STAGED, job.max_shard_bytes)
    names = [_quantize_fc(block, fc_inputs, job, writer, steps.fold, text_config.hidden_size)]
    del fc_inputs
    steps.empty_cache(job.device)
    layer = block.layers[0]
    prefix = f"{MTP_PREFIX}layers.0"
    linears = {name: m for name, m in layer.named_modules()
               if isinstance(m, torch.nn.Linear) and not kept_class(f"{prefix}.{name}", qc.skip_classes)}
    arch = AWQ_ARCHITECTURES[type(model).__name__]
    quantized, _ = steps.quantize_layer(model, layer, prefix, arch.mappings, job, layer_inputs, layer_kwargs,
                                        writer, linears=linears)
    names += quantized
    writer.finish()
    del block, layer_inputs, layer_kwargs
    steps.empty_cache(job.device)
    total = len(MTP_LINEAR_NAMES)
    kept = "" if len(names) == total else f" (the other {total - len(names)} kept at the model dtype by skip_classes)"
    note = (f"MTP head: {len(names)} of its {total} Linears{kept} quantized to AWQ W{qc.bits} g{qc.group_size}"
            f"{' with zero points' if qc.zero_point else ' (symmetric)'} in the main model's GEMM layout "
            f"(qweight/qzeros/scales); scales"
            f"{' and clipping' if qc.clip else ''} searched on the MTP block's own inputs (the main model's final "
            "hidden states and the next tokens' embeddings over the calibration windows), fc's scales folded into "
            "pre_fc_norm_embedding/pre_fc_norm_hidden; norms kept at the model dtype")
    return names, note


def _quantize_fc(block, fc_inputs, job: AwqJob, writer: ShardWriter, fold: Callable, half: int) -> str:
    """mtp.fc: no tensor class, so never kept; its input is [embedding half, hidden half], so its scales fold into
    the two norms before it. Writes it packed, and the head's three norms (the two with the scales folded in)."""
    qc, grid = job.params, job.search_grid or GRID
    with torch.no_grad():
        fc = block.fc
        scales, _ = search_scales([fc], fc_inputs, lambda: (fc(x) for x in fc_inputs), qc.bits, qc.group_size,
                                  qc.zero_point, grid)
        fold(block.pre_fc_norm_embedding, [], scales[:half])
        fold(block.pre_fc_norm_hidden, [], scales[half:])
        scale_columns(fc.weight.data, scales)
        for x in fc_inputs:
            x.div_(scales.to(x.dtype))
        if qc.clip:
            apply_clip(fc, search_clip(fc.weight.data, fc_inputs, qc.bits, qc.group_size, qc.zero_point, grid),
                       qc.group_size, qc.zero_point)
        q = quantize_rows(fc.weight.data, qc.bits, qc.group_size, qc.zero_point)
        for suffix, packed in pack_gemm(q, job.dtype).items():
            writer.add(f"{MTP_PREFIX}fc.{suffix}", packed)
        for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            writer.add(f"{MTP_PREFIX}{norm}.weight", block.get_submodule(norm).weight.data)
    return f"{MTP_PREFIX}fc"


def _check_block_names(block: torch.nn.Module, reader: ShardReader) -> None:
    expected = {f"{MTP_PREFIX}{name}" for name in block.state_dict()}
    present = {name for name in reader.names() if name.startswith(MTP_PREFIX)}
    missing, unknown = sorted(expected - present), sorted(present - expected)
    if missing or unknown:
        detail = (f"lacks {missing[0]}" if missing else "") + (" and " if missing and unknown else "") + \
            (f"has {unknown[0]}, which a one-layer dense MTP block does not" if unknown else "")
        raise QuantlabError(f"quantization.mtp quantize: {reader.folder}: the MTP head {detail} "
                            f"({len(missing)} missing, {len(unknown)} unknown); use mtp: bf16")


def _mtp_inputs(model, text_model, text_path: str, block: MtpBlock, reader, job: AwqJob, hidden,
                _materialize: Callable):
    """Per calibration chunk: fc's input, the decoder layer's input (fc's float output) and its keyword
    arguments (the embedded tokens' rotary embeddings; attention_mask None: causal)."""
    embed_name = next(n for n, m in model.named_modules() if m is text_model.get_input_embeddings())
    norm_name = f"{text_path}.norm"
    embed = _materialize(model, embed_name, reader, job)
    final_norm = _materialize(model, norm_name, reader, job)
    rotary = type(text_model.rotary_emb)(config=model.config.get_text_config()).to(job.device)
    fc_inputs, layer_inputs, layer_kwargs = [], [], []
    try:
        with torch.no_grad():
            for ids, last in zip(job.calibration.split(job.params.batch_size), hidden):
                ids = ids.to(job.device)
                h = final_norm(last)[:, :-1]
                e = embed(ids[:, 1:])
                x = torch.cat([block.pre_fc_norm_embedding(e), block.pre_fc_norm_hidden(h)], dim=-1)
                positions = (torch.arange(e.shape[1], device=job.device) + 1).view(1, 1, -1).expand(3, e.shape[0], -1)
                fc_inputs.append(x)
                layer_inputs.append(block.fc(x))
                layer_kwargs.append({"position_embeddings": rotary(e, positions), "attention_mask": None})
    finally:
        model.get_submodule(embed_name).to("meta")
        model.get_submodule(norm_name).to("meta")
    return fc_inputs, layer_inputs, layer_kwargs
