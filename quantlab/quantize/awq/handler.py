"""The `awq` method: checks before any weights load, and the checkpoint it writes.

AWQ cannot quantize a model that is already in memory the way bitsandbytes does: an engine reads
the source shards layer by layer (or creates synthetic weights) and writes a `quant_method: awq`
checkpoint. `quantlab build` keeps that folder; `quantlab run` writes it to a temporary folder,
then measures it like any checkpoint (transformers loads it through gptqmodel's AWQ kernels).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from transformers import PretrainedConfig

from quantlab.architecture import quantizable_linears
from quantlab.errors import QuantlabError
from quantlab.quantize.awq import ENGINES
from quantlab.quantize.awq.calibration import Calibration, calibration_samples
from quantlab.quantize.awq.engine import AwqJob, AwqOutcome
from quantlab.quantize.bnb import SkipPlan, skip_plan
from quantlab.quantize.configs import AwqConfig
from quantlab.quantize.rtn import check_group_size
from quantlab.quantize.vllm_layout import serving_skip_list
from quantlab.sources import DTYPES, load_tokenizer

PACK_MULTIPLE = 8  # eight 4-bit values per int32 along out_features


@dataclass(frozen=True)
class WrittenCheckpoint:
    outcome: AwqOutcome
    calibration: Calibration | None


def engine_for(qconfig: AwqConfig):
    return ENGINES[qconfig.engine]


def kernels_available() -> bool:
    """transformers 5.x loads `quant_method: awq` checkpoints through gptqmodel's kernels."""
    return importlib.util.find_spec("gptqmodel") is not None


class AwqHandler:
    method = "awq"
    writes_checkpoint = True

    def skip_plan(self, qconfig: AwqConfig, config: PretrainedConfig) -> SkipPlan:
        """transformers' skip list, plus what vLLM needs to read the same intent under its own names."""
        from quantlab.plan import meta_model

        plan = skip_plan(meta_model(config), self.method)
        serving = serving_skip_list(plan.model_class, plan.rule_patterns)
        return replace(plan, patterns=serving + plan.extra_patterns, rule_patterns=serving)

    def check(self, qconfig: AwqConfig, config: PretrainedConfig) -> None:
        from quantlab.plan import meta_model

        model = meta_model(config)
        engine_for(qconfig).check(qconfig, config, type(model).__name__)
        skip_plan(model, self.method)  # an unknown class fails here with the classes quantlab knows
        linears = quantizable_linears(model, self.method)
        check_group_size([(n, m.in_features) for n, m in linears], qconfig.group_size)
        narrow = [n for n, m in linears if m.out_features % PACK_MULTIPLE]
        if narrow:
            raise QuantlabError(
                f"quantization.method awq: {len(narrow)} Linear(s) have out_features not divisible by {PACK_MULTIPLE}, "
                f"which the AWQ GEMM layout needs, e.g. {narrow[0]}"
            )
        if not kernels_available():
            raise QuantlabError(
                "quantization.method awq: transformers loads AWQ checkpoints through gptqmodel's kernels, which are "
                "not installed here: pip install 'gptqmodel==7.6.0' (the newest release that accepts torch 2.13)"
            )

    def check_source(self, qconfig: AwqConfig, spec, location: str | None) -> tuple[str, ...]:
        """The calibration text, tokenized and cut, before any weights load. Synthetic weights need none."""
        if spec.source == "synthetic":
            return ("synthetic weights: AWQ-format round-to-nearest packing, no calibration (same memory and speed "
                    "as a calibrated build, not its quality)",)
        if location is None:  # a Hub model not downloaded yet: checked once its files are here
            return ("AWQ calibration: checked after the model's files are downloaded",)
        calibration = calibration_samples(qconfig.calibration, load_tokenizer(location))
        return (f"AWQ calibration: {calibration.label}",)

    def label(self, qconfig: AwqConfig, dtype: str) -> str:
        return f"AWQ W4A16 g{qconfig.group_size}" + ("" if qconfig.zero_point else " (symmetric)")

    def apply(self, model: torch.nn.Module, qconfig: AwqConfig) -> torch.nn.Module:
        raise QuantlabError(
            "quantization.method awq quantizes from the checkpoint's files into a new checkpoint; "
            "use `quantlab build` or `quantlab run` on the recipe"
        )


def write_checkpoint(plan, folder: Path, max_shard_bytes: int, progress: bool = True,
                     echo: Callable[[str], None] = print) -> WrittenCheckpoint:
    """Quantize the plan's model with its AWQ engine into `folder`: shards and config.json."""
    recipe = plan.recipe
    qconfig: AwqConfig = recipe.quantization
    source = checkpoint_folder(recipe.model, plan.resolved)
    calibration = None
    if source is not None:
        calibration = calibration_samples(qconfig.calibration, load_tokenizer(str(source)))
        echo(f"AWQ calibration: {calibration.label}")
    job = AwqJob(
        source=source, config=plan.resolved.config, out=folder, qconfig=qconfig,
        calibration=calibration.input_ids if calibration else None, device=plan.device,
        dtype=DTYPES[recipe.model.dtype], max_shard_bytes=max_shard_bytes, seed=recipe.model.seed, progress=progress,
    )
    outcome = engine_for(qconfig).quantize(job)
    skip = AwqHandler().skip_plan(qconfig, plan.resolved.config)
    write_config(plan.resolved.config, quantization_config(qconfig, skip.patterns), folder)
    return WrittenCheckpoint(outcome, calibration)


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


def write_config(config: PretrainedConfig, qc: dict, folder: Path) -> None:
    data = config.to_dict()
    data["quantization_config"] = qc
    (Path(folder) / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def checkpoint_folder(spec, resolved) -> Path | None:
    """The local folder of the source's shards (downloaded first for a Hub source); None for synthetic."""
    if spec.source == "synthetic":
        return None
    if spec.source in ("bundled", "local"):
        return Path(resolved.location)
    from huggingface_hub import snapshot_download

    from quantlab.sources import hub_unavailable_message

    try:
        return Path(snapshot_download(spec.id, revision=spec.revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*"]))
    except Exception as exc:  # offline, gated, not found: one clear message
        raise QuantlabError(hub_unavailable_message(spec.id, exc)) from None
