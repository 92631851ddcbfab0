"""Quantized checkpoint formats quantlab did not write, as data: the `quant_method` a checkpoint's config.json names,
what the records call it, and which runtimes here run it with what. quantlab's own methods recognise their own
formats (methods/awq.py, methods/bnb.py); this table is for the rest, the formats most published 4-bit builds use.

A runtime not listed for a format, or a package it needs that is not installed, is refused before any load, with
the reason (quantlab/plan.py). A quant_method in neither place is refused too: no runtime here runs it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from quantlab.checkpoint import folder_tensors
from quantlab.errors import QuantlabError


@dataclass(frozen=True)
class CheckpointFormat:
    name: str  # as the records say it
    label: Callable[[dict[str, Any]], str]
    packed: str  # the suffix of the tensors its quantized layers store (a checkpoint without one is not this format)
    problem: Callable[[dict[str, Any]], str | None]  # what is wrong with a quantization_config of it, if anything
    # runtime -> the Python packages (import names, pip names) it needs beside itself to run the format
    runtimes: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # runtime -> why it cannot run the format here


def _bits_group(qc: dict[str, Any]) -> str:
    return f"W{qc.get('bits', '?')}A16 g{qc.get('group_size', '?')}"


def _bits_problem(qc: dict[str, Any]) -> str | None:
    bits, group = qc.get("bits"), qc.get("group_size", -1)
    if bits not in (2, 3, 4, 8):
        return f"bits is {str(bits)[:20]!r}; the kernels run 2, 3, 4 or 8"
    if isinstance(group, bool) or not isinstance(group, int) or not (group == -1 or group > 0):
        return f"group_size is {str(group)[:20]!r}; -1 or a positive whole number is expected"
    return None


def _groups_problem(qc: dict[str, Any]) -> str | None:
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups or not all(
            isinstance(g, dict) and isinstance(g.get("weights"), dict) for g in groups.values()):
        return "config_groups is not a mapping of groups, each with its weights' scheme"
    return None


def _compressed_tensors(qc: dict[str, Any]) -> str:
    groups = qc.get("config_groups")
    groups = [g for g in groups.values() if isinstance(g, dict)] if isinstance(groups, dict) else []
    weights = next((g.get("weights") for g in groups if isinstance(g.get("weights"), dict)), {})
    acts = next((g.get("input_activations") for g in groups), None)
    act_bits = f"A{acts.get('num_bits')}" if isinstance(acts, dict) else "A16"
    return (f"compressed-tensors W{weights.get('num_bits', '?')}{act_bits} g{weights.get('group_size', '?')}, "
            f"{qc.get('format', '?')} (pre-quantized)")


LLAMA_CPP = "llama.cpp runs GGUF files, not checkpoint folders"
FORMATS = {
    "gptq": CheckpointFormat(
        "GPTQ", lambda qc: f"GPTQ {_bits_group(qc)}{' desc_act' if qc.get('desc_act') else ''} (pre-quantized)",
        ".qweight", _bits_problem,
        runtimes={"transformers": (("optimum", "optimum"), ("gptqmodel", "gptqmodel")), "vllm": ()},
        refused={"llama.cpp": LLAMA_CPP}),
    "auto-round": CheckpointFormat(
        "AutoRound", lambda qc: f"AutoRound {_bits_group(qc)}, {qc.get('packing_format', 'auto_round')} (pre-quantized)",
        ".qweight", _bits_problem,
        runtimes={"transformers": (("auto_round", "auto-round"),), "vllm": ()},
        refused={"llama.cpp": LLAMA_CPP}),
    "compressed-tensors": CheckpointFormat(
        "compressed-tensors", _compressed_tensors, ".weight_packed", _groups_problem,
        runtimes={"transformers": (("compressed_tensors", "compressed-tensors"),), "vllm": ()},
        refused={"llama.cpp": LLAMA_CPP}),
}
FORMATS["intel/auto-round"] = FORMATS["auto-round"]  # what older auto-round releases wrote


def format_of(quant_method: str) -> CheckpointFormat | None:
    return FORMATS.get(quant_method)


def check_runnable(qc: dict[str, Any], where: str, folder, runtime: str, known: tuple[str, ...]) -> None:
    """QuantlabError, before any load, when `runtime` cannot run this checkpoint here: a format no runtime here runs,
    a quantization_config its format's loaders would choke on, shards that hold no layer of the format, a runtime
    without the format or without the package it needs for it. `folder`: the shards, None while not downloaded."""
    quant_method = str(qc.get("quant_method", "unknown"))
    fmt = FORMATS.get(quant_method)
    if fmt is None:
        raise QuantlabError(f"{where}: its quantization_config names quant_method {quant_method[:60]!r}, a format no "
                            f"runtime here runs (known: {', '.join(sorted({*known, *FORMATS}))})")
    problem = fmt.problem(qc)
    if problem:
        raise QuantlabError(f"{where}: its {fmt.name} quantization_config does not load: {problem}")
    if runtime in fmt.refused or runtime not in fmt.runtimes:
        able = " or ".join(fmt.runtimes)
        why = fmt.refused.get(runtime, f"quantlab does not run {fmt.name} checkpoints in {runtime}")
        raise QuantlabError(f"{where}: a {fmt.name} checkpoint, which the {runtime} runtime cannot run ({why}); set "
                            f"measure.runtime: {able}")
    missing = [pip for module, pip in fmt.runtimes[runtime] if importlib.util.find_spec(module) is None]
    if missing:
        raise QuantlabError(f"{where}: a {fmt.name} checkpoint; {runtime} loads it only with "
                            f"{' and '.join(missing)} installed, which is not here: pip install {' '.join(missing)} "
                            "into quantlab's venv (not in its lock), or measure it with another runtime: "
                            f"{' or '.join(r for r in fmt.runtimes if r != runtime)}")
    if folder is not None and not any(name.endswith(fmt.packed) for name in folder_tensors(Path(folder))):
        raise QuantlabError(f"{where}: its config says {fmt.name}, but its shards hold no {fmt.packed} tensor, which "
                            f"{fmt.name} layers store: the config and the weights are from different checkpoints")


def gptq_block_modules(config, folder) -> list[str] | None:
    """The quantized Linears of a GPTQ checkpoint's blocks (names within a block, e.g. mlp.down_proj), read from its
    shards, when its quantization_config does not list them (`modules_in_block_to_quantize`); None otherwise.

    transformers' GPTQ loader (optimum's convert_model) turns every Linear inside the blocks into a GPTQ layer unless
    that key says which: a checkpoint that kept some in bf16 (gptqmodel keeps Qwen3.5's 256→4 DeltaNet in_proj_a/b)
    then loads with those layers missing and the bf16 weights unexpected. The list read from the files is exactly
    what was quantized."""
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) or qc is None else qc.to_dict()
    if not qc or qc.get("quant_method") != "gptq" or qc.get("modules_in_block_to_quantize") or folder is None:
        return None
    inside = {name.removesuffix(".qweight").split(".layers.", 1)[1].split(".", 1)[1]
              for name in folder_tensors(Path(folder)) if name.endswith(".qweight") and ".layers." in name}
    return sorted(inside) or None
