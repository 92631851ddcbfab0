"""`awq`: AWQ W4A16, 4-bit weights in groups along in_features, with activation-aware scales and clipping searched
on calibration text, written as `quant_method: awq`, `version: gemm` checkpoints.

AWQ cannot quantize a model that is already in memory the way bitsandbytes does: an engine (quantlab's own, or
gptqmodel's; quantlab/quantize/awq/) reads the source shards layer by layer (or creates synthetic weights) and
writes the checkpoint. `quantlab build` keeps it; `quantlab run` writes it to a temporary folder and measures it
there, as any checkpoint (transformers loads it through gptqmodel's AWQ kernels).

The MTP head (`mtp.*`) is copied from the source at the model dtype and listed in the skip list (`mtp`), so that vLLM
builds its draft unquantized (`mtp: bf16`, the default). `mtp: quantize` quantizes its Linears too, with the
same activation-aware search on the head's own inputs (quantlab/quantize/awq/mtp.py), writes them in the same GEMM
layout into the build's MTP shard, and leaves `mtp` out of the skip list: vLLM builds the draft with the main
model's AWQ config, as it does for the main model.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from quantlab.architecture import TENSOR_CLASS_NAMES, tensor_class
from quantlab.errors import QuantlabError
from quantlab.fields import IntOnly, SkipClasses
from quantlab.methods.base import CardFacts, Method, MethodConfig, WrittenCheckpoint, register
from quantlab.quantize.awq.engine import AwqParams
from quantlab.quantize.awq.mtp import MTP_LINEAR_NAMES, check_mtp_head, kept_class
from quantlab.quantize.groupwise import check_group_size
from quantlab.quantize.skips import SkipPlan, classes_label, skip_plan
from quantlab.quantize.vllm_layout import VLLM_NAMING, serving_skip_list, vllm_layers, vllm_reading
from quantlab.text.calibration import CalibrationSpec

PACK_MULTIPLE = 8  # eight 4-bit values per int32 along out_features
DTYPES = ("bfloat16", "float16", "float32")


class AwqConfig(MethodConfig):
    """AWQ W4A16. Which Linears stay unquantized comes from quantlab.architecture (UNQUANTIZED_ROLES["awq"]), plus
    the tensor classes in `skip_classes`; `engine` picks the implementation (quantlab/quantize/awq/); the checkpoint
    format is the same."""

    method: Literal["awq"]
    bits: Annotated[Literal[4], IntOnly] = 4
    group_size: Annotated[Literal[32, 64, 128], IntOnly] = 128
    zero_point: bool = True
    engine: Literal["quantlab", "gptqmodel"] = "quantlab"
    clip: bool = Field(True, description="search a clipping threshold per group after the scales")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    batch_size: int = Field(8, ge=1, le=1024, description="calibration windows per forward pass")
    skip_classes: SkipClasses = Field(default_factory=list, description="tensor classes kept at the model dtype")
    mtp: Literal["bf16", "quantize"] = Field(
        "bf16", description="the MTP head (mtp.*): bf16 copies it from the source and keeps it out of quantization "
        "(`mtp` in the skip list); quantize puts its Linears through the same AWQ search and packing (engine quantlab)")


@register
class AwqMethod(Method):
    name = "awq"
    config = AwqConfig
    writes_checkpoint = True
    builds = True
    card = CardFacts("", "needs gptqmodel (transformers 5 loads AWQ through its kernels)", "modules_to_not_convert",
                     ("awq", "4-bit", "w4a16"))

    def label(self, qconfig: AwqConfig, dtype: str) -> str:
        kept = f", {classes_label(qconfig.skip_classes)}" if qconfig.skip_classes else ""
        mtp = f", MTP W{qconfig.bits}" if qconfig.mtp == "quantize" else ""
        return f"AWQ W4A16 g{qconfig.group_size}" + ("" if qconfig.zero_point else " (symmetric)") + kept + mtp

    def check(self, qconfig: AwqConfig, source) -> None:
        if qconfig.mtp == "quantize":  # first: a source without an MTP head is the one line to say
            _check_mtp_source(qconfig, source)
        model = source.checkpoint_meta  # the engine writes the whole checkpoint, a vision tower included
        _engine(qconfig).check(engine_params(qconfig, type(model).__name__), source.config)
        plan = self.skip_rules(qconfig, source)  # an unknown class fails here with the classes quantlab knows
        _check_vllm_reading(plan)
        if qconfig.mtp == "quantize":
            _check_vllm_mtp_reading(plan, qconfig.skip_classes)
        modules = dict(model.named_modules())
        linears = [(name, modules[name]) for name in plan.quantized]
        check_group_size([(n, m.in_features) for n, m in linears], qconfig.group_size)
        narrow = [n for n, m in linears if m.out_features % PACK_MULTIPLE]
        if narrow:
            raise QuantlabError(
                f"quantization.method awq: {len(narrow)} Linear(s) have out_features not divisible by {PACK_MULTIPLE}, "
                f"which the AWQ GEMM layout needs, e.g. {narrow[0]}"
            )
        if importlib.util.find_spec("gptqmodel") is None:
            raise QuantlabError(
                "quantization.method awq: transformers loads AWQ checkpoints through gptqmodel's kernels, which are "
                "not installed here: pip install 'gptqmodel==7.6.0' (the newest release that accepts torch 2.13)"
            )

    def check_source(self, qconfig: AwqConfig, source) -> tuple[str, ...]:
        """The calibration text, tokenized and cut, before any weights load. Synthetic weights need none."""
        from quantlab.text.calibration import calibration_samples

        if source.synthetic:
            return ("synthetic weights: AWQ-format round-to-nearest packing, no calibration (same memory and speed "
                    "as a calibrated build, not its quality)",)
        if source.files() is None:  # a Hub model not downloaded yet: checked once its files are here
            return ("AWQ calibration: checked after the model's files are downloaded",)
        calibration = calibration_samples(qconfig.calibration, source.tokenizer())
        return (f"AWQ calibration: {calibration.label}",)

    def skip_rules(self, qconfig: AwqConfig, source) -> SkipPlan:
        """transformers' skip list, plus what vLLM needs to read the same intent under its own names."""
        from dataclasses import replace

        plan = skip_plan(source.checkpoint_meta, self.name, classes=qconfig.skip_classes)
        serving = serving_skip_list(plan.model_class, plan.rule_patterns)
        if qconfig.mtp == "quantize":  # vLLM's draft then takes the main model's AWQ config, as the tensors are
            serving = tuple(p for p in serving if p != "mtp")
        return replace(plan, patterns=serving + plan.extra_patterns, rule_patterns=serving)

    def apply(self, model, qconfig: AwqConfig):
        raise QuantlabError(
            "quantization.method awq quantizes from the checkpoint's files into a new checkpoint; "
            "use `quantlab build` or `quantlab run` on the recipe"
        )

    def write_checkpoint(self, qconfig: AwqConfig, source, folder: Path, device, max_shard_bytes: int,
                         progress: bool, echo) -> WrittenCheckpoint:
        """Quantize the source with the recipe's engine into `folder`: shards and config.json."""
        from quantlab.text.calibration import calibration_samples
        import torch

        from quantlab.quantize.awq.engine import AwqJob

        files = source.files(download=True)
        calibration = None
        if files is not None:
            calibration = calibration_samples(qconfig.calibration, source.tokenizer())
            echo(f"AWQ calibration: {calibration.label}")
        job = AwqJob(
            source=files, config=source.config, out=folder,
            params=engine_params(qconfig, type(source.checkpoint_meta).__name__),
            calibration=calibration.input_ids if calibration else None, device=device,
            dtype=getattr(torch, source.spec.dtype), max_shard_bytes=max_shard_bytes, seed=source.spec.seed,
            progress=progress,
        )
        outcome = _engine(qconfig).quantize(job)  # a quantized MTP head is staged; the run places it (run.py)
        write_config(source.config, quantization_config(qconfig, self.skip_rules(qconfig, source).patterns), folder)
        return WrittenCheckpoint(
            outcome.engine, outcome.quantized, outcome.notes, calibration.label if calibration else None,
            calibration.description if calibration else None,
        )

    def from_checkpoint(self, qc: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        if qc.get("quant_method") != "awq":
            return None
        return f"AWQ W{qc.get('bits', '?')}A16 g{qc.get('group_size', '?')} (pre-quantized)", dict(qc)

    def estimator_scheme(self, params: dict, dtype: str) -> str | None:
        if params.get("skip_classes"):
            return None  # more kept at the model dtype than the scheme table prices
        if params.get("mtp", "bf16") != "bf16":
            return None  # the scheme table prices the MTP head at the model dtype
        return f"awq-g{params.get('group_size', 128)}"

    def scheme_config(self, scheme: str) -> AwqConfig | None:
        group = scheme.removeprefix("awq-g")
        return AwqConfig(method="awq", group_size=int(group)) if scheme.startswith("awq-g") and group.isdigit() else None

    def as_loaded(self, qconfig: AwqConfig, config, skip_patterns: tuple[str, ...]):
        """An AWQ checkpoint's config.json carries its quantization_config; from_pretrained takes none."""
        import copy

        config = copy.deepcopy(config)
        config.quantization_config = quantization_config(qconfig, skip_patterns)
        return config, None

    def card_rows(self, params: dict) -> list[tuple[str, object]]:
        return [
            ("method", self.name),
            ("weights", f"{params.get('bits')}-bit integers in groups of {params.get('group_size')} along in_features, "
                        f"{'with' if params.get('zero_point') else 'without'} zero points; AWQ GEMM layout"),
            ("engine", params.get("engine")),
            ("clip search", params.get("clip")),
            ("kept tensor classes (skip_classes)", params.get("skip_classes") or []),
            ("MTP head (mtp)", params.get("mtp", "bf16")),
        ]

    def serving_lines(self, mtp: bool, repo_hint: str, mtp_quantized: bool = False) -> list[str]:
        """`mtp_quantized`: the build's MTP Linears are AWQ-packed and `mtp` is not in the skip list."""
        lines = [
            "With vLLM (AWQ is one of its built-in formats; on CUDA it upgrades `awq` to its Marlin kernels itself):",
            "",
            "```bash",
            f"vllm serve {repo_hint}",
        ]
        if mtp:
            draft = "the AWQ-packed mtp.* tensors" if mtp_quantized else "the bf16 mtp.* tensors"
            lines.append(f"vllm serve {repo_hint} --speculative-config '{{\"method\": \"mtp\", \"num_speculative_tokens\": 1}}'"
                         f"   # MTP draft, from {draft}")
        why_mtp = ("`mtp` is not in it: the MTP head's Linears are quantized like the main model's, and vLLM builds "
                   "its MTP draft with the same AWQ config" if mtp_quantized else
                   "and `mtp` so that vLLM builds the MTP draft head unquantized, as its tensors are")
        return lines + [
            "```",
            "",
            "`modules_to_not_convert` names each unquantized part twice where the two loaders' names differ: "
            "`model.visual` for transformers (a prefix of its module names) and `visual` for vLLM (a substring of its "
            f"own){'; ' if mtp_quantized else ', '}{why_mtp}.",
            "",
        ]


def _check_vllm_reading(plan: SkipPlan) -> None:
    """vLLM reads the skip list its own way (substrings, fused layers): it must keep what transformers keeps."""
    naming = VLLM_NAMING.get(plan.model_class)
    if naming is None:
        return
    linears, quantized = list(plan.quantized + plan.kept), set(plan.quantized)
    layers = vllm_layers(linears, naming)
    for layer, skipped in vllm_reading(linears, plan.patterns, naming).items():
        parts = layers[layer]
        states = {part in quantized for part in parts}
        if skipped is None or len(states) > 1:
            together = sorted({tensor_class(p) or p for p in parts}, key=_class_order)
            raise QuantlabError(
                f"quantization.skip_classes: vLLM fuses {_and(together)} into one layer ({layer.rpartition('.')[2]}) "
                "and refuses a checkpoint that skips only some of them; skip them together"
            )
        if skipped == (True in states):
            raise QuantlabError(
                f"quantization.skip_classes: vLLM would {'skip' if skipped else 'quantize'} {layer} (from {parts[0]}), "
                f"which transformers {'quantizes' if skipped else 'keeps'} with the skip list {list(plan.patterns)}"
            )


def _check_mtp_source(qconfig: AwqConfig, source) -> None:
    """The MTP head the recipe quantizes: in the config and, where the files are here, in their headers (no weights
    are read); a Hub source not downloaded yet, or a made one not made yet, is checked by the engine."""
    from quantlab.checkpoint import folder_tensors

    if qconfig.engine != "quantlab":
        raise QuantlabError(f"quantization.mtp quantize: engine {qconfig.engine} drops the MTP head (mtp.*) and cannot "
                            "quantize it; use engine: quantlab")
    folder = None if source.synthetic else source.files()
    shapes = {n: tuple(t.shape) for n, t in folder_tensors(folder).items()} if folder is not None else None
    check_mtp_head(source.name, source.config, shapes, qconfig.group_size, synthetic=source.synthetic)


def _check_vllm_mtp_reading(plan: SkipPlan, skip_classes) -> None:
    """vLLM builds the MTP draft with the main model's quant config and reads the skip list as substrings of its
    layer names (mtp.fc, mtp.layers.0.self_attn.qkv_proj, ...): it must skip exactly the MTP Linears kept at the
    model dtype, so that it loads packed tensors where the build wrote them."""
    naming = VLLM_NAMING.get(plan.model_class)
    if naming is None:
        return
    layers = vllm_layers(list(MTP_LINEAR_NAMES), naming)
    for layer, skipped in vllm_reading(list(MTP_LINEAR_NAMES), plan.patterns, naming).items():
        kept = {kept_class(part, skip_classes) for part in layers[layer]}
        if skipped is None or len(kept) > 1 or skipped != (True in kept):
            raise QuantlabError(
                f"quantization.mtp quantize: vLLM would {'skip' if skipped else 'quantize'} its MTP draft layer "
                f"{layer} with the skip list {list(plan.patterns)}, where the build "
                f"{'keeps it at the model dtype' if True in kept else 'quantizes it'}; use mtp: bf16")


def _class_order(name: str) -> int:
    return TENSOR_CLASS_NAMES.index(name) if name in TENSOR_CLASS_NAMES else len(TENSOR_CLASS_NAMES)


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def engine_params(qconfig: AwqConfig, model_class: str) -> AwqParams:
    """The fields an engine uses, apart from the recipe."""
    return AwqParams(model_class=model_class, bits=qconfig.bits, group_size=qconfig.group_size,
                     zero_point=qconfig.zero_point, clip=qconfig.clip, batch_size=qconfig.batch_size,
                     skip_classes=tuple(qconfig.skip_classes), mtp=qconfig.mtp == "quantize")


def _engine(qconfig: AwqConfig):
    from quantlab.quantize.awq import ENGINES

    return ENGINES[qconfig.engine]


def quantization_config(qconfig: AwqConfig, skip_patterns) -> dict:
    """config.json's quantization_config: what transformers (AwqConfig), vLLM and SGLang read."""
    return {
        "quant_method": "awq",
        "bits": qconfig.bits,
        "group_size": qconfig.group_size,
        "zero_point": qconfig.zero_point,
        "version": "gemm",
        "modules_to_not_convert": list(skip_patterns),
    }


def write_config(config, qc: dict, folder: Path) -> None:
    data = config.to_dict()
    data["quantization_config"] = qc
    (Path(folder) / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
