"""safetensors at the byte level: headers, the MTP copy, shard names, and what a build left unquantized.

The MTP copy (quantlab/mtp_shard.py, re-exported here for the build's modules): `mtp.*` copied byte for byte from
the source shards, without torch; a head an AWQ engine quantized (`quantization.mtp: quantize`) is moved into the same
last shard instead (run.py's write_checkpoint); `placed_mtp` then describes it, and nothing is copied.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from quantlab.architecture import role_of
from quantlab.checkpoint import HeaderTensor, folder_tensors
from quantlab.mtp_shard import add_mtp_shard, header_names, mtp_tensors, placed_mtp, write_raw  # noqa: F401 (the build's)

# Tensors bitsandbytes stores beside a quantized `weight`, by the name after the module.
QUANT_STATE = re.compile(
    r"\.(SCB|weight_format|weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.bitsandbytes__\w+))$"
)
# What an AWQ GEMM checkpoint stores instead of a quantized Linear's `weight`.
AWQ_PACKED = re.compile(r"\.(qweight|qzeros|scales)$")
TensorInfo = HeaderTensor  # name, file, dtype, shape, start (absolute offset in file), nbytes


# ---- what stayed unquantized ---------------------------------------------------------------------------

@dataclass(frozen=True)
class KeptGroup:
    role: str
    pattern: str  # e.g. "model.layers.{0-2,4-6}.linear_attn.in_proj_a.weight"
    count: int
    parameters: int
    dtype: str


def unquantized_groups(folder: Path, model_class: str) -> tuple[list[KeptGroup], int]:
    """Every tensor of a build stored unquantized, grouped by role and name pattern, and the
    number of quantized weights. A quantized weight is one with bitsandbytes state beside it, or
    an AWQ module (qweight, qzeros, scales)."""
    tensors = folder_tensors(folder)
    quantized_modules = {QUANT_STATE.sub("", n) for n in tensors if QUANT_STATE.search(n)}
    awq_modules = {n.removesuffix(".qweight") for n in tensors if n.endswith(".qweight")}
    groups: dict[tuple[str, str, str], list[tuple[int | None, int]]] = defaultdict(list)
    for name, t in tensors.items():
        module, _, leaf = name.rpartition(".")
        if QUANT_STATE.search(name) or (leaf == "weight" and module in quantized_modules):
            continue  # a quantized weight or its state; a bias stays unquantized and is listed
        if AWQ_PACKED.search(name) and module in awq_modules:
            continue
        try:
            role = role_of(model_class, name)
        except KeyError:
            role = "other"
        match = re.search(r"\.(layers|blocks)\.(\d+)\.", name)
        pattern = re.sub(r"\.(layers|blocks)\.\d+\.", r".\1.{N}.", name, count=1) if match else name
        numel = 1
        for d in t.shape:
            numel *= d
        groups[(role, pattern, t.dtype)].append((int(match.group(2)) if match else None, numel))
    kept = []
    for (role, pattern, dtype), items in sorted(groups.items()):
        layers = sorted(i for i, _ in items if i is not None)
        shown = pattern.replace("{N}", "{" + _ranges(layers) + "}") if layers else pattern
        kept.append(KeptGroup(role, shown, len(items), sum(n for _, n in items), dtype))
    return kept, len(quantized_modules) + len(awq_modules)


def _ranges(values: list[int]) -> str:
    out, start, prev = [], None, None
    for v in values + [None]:
        if start is None:
            start = prev = v
        elif v is not None and v == prev + 1:
            prev = v
        else:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = prev = v
    return ",".join(out)
