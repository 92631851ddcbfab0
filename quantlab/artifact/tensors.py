"""safetensors at the byte level: headers, the MTP copy, shard names, and what a build left unquantized.

The MTP tensors (`mtp.*`) are copied byte for byte from the source shards, without torch:
transformers drops them at load, so a save_pretrained never has them. An AWQ build that quantizes the MTP head
(`quantization.mtp: quantize`) has its engine's packed head moved into the same last shard instead
(methods/awq.py); `placed_mtp` then describes it, and nothing is copied.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from quantlab.architecture import MTP_PREFIX, role_of
from quantlab.checkpoint import INDEX_NAME, HeaderTensor, folder_tensors, read_shard_header, shard_files
from quantlab.errors import QuantlabError

_CHUNK = 16 << 20
# Tensors bitsandbytes stores beside a quantized `weight`, by the name after the module.
QUANT_STATE = re.compile(
    r"\.(SCB|weight_format|weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.bitsandbytes__\w+))$"
)
# What an AWQ GEMM checkpoint stores instead of a quantized Linear's `weight`.
AWQ_PACKED = re.compile(r"\.(qweight|qzeros|scales)$")
TensorInfo = HeaderTensor  # name, file, dtype, shape, start (absolute offset in file), nbytes


def write_raw(dest: Path, tensors: list[TensorInfo]) -> int:
    """A safetensors file holding `tensors`, their bytes copied from their source files. Returns payload bytes."""
    header, offset = {}, 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
    with dest.open("wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for t in tensors:
            with t.file.open("rb") as src:
                src.seek(t.start)
                left = t.nbytes
                while left:
                    chunk = src.read(min(_CHUNK, left))
                    if not chunk:
                        raise QuantlabError(f"{t.file}: truncated while copying {t.name}")
                    out.write(chunk)
                    left -= len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return offset


def mtp_tensors(source: Path | None) -> list[TensorInfo]:
    if source is None or not source.is_dir():
        return []
    return sorted((t for t in folder_tensors(source).values() if t.name.startswith(MTP_PREFIX)), key=lambda t: t.name)


def placed_mtp(build: Path) -> dict | None:
    """The MTP tensors a build already holds (an engine wrote them: a quantized head), as add_mtp_shard describes
    the ones it copies, with the number of Linears stored packed (qweight); None when it holds none."""
    tensors = [t for t in folder_tensors(build).values() if t.name.startswith(MTP_PREFIX)]
    if not tensors:
        return None
    files = sorted({t.file.name for t in tensors})
    return {"tensors": len(tensors), "bytes": sum(t.nbytes for t in tensors), "file": ", ".join(files),
            "quantized_linears": sum(1 for t in tensors if t.name.endswith(".qweight"))}


def add_mtp_shard(build: Path, tensors: list[TensorInfo]) -> dict | None:
    """Copy the MTP tensors into one more shard and rename every shard model-0000i-of-0000n."""
    if not tensors:
        return None
    shards = shard_files(build)
    already = sorted(n for n in header_names(shards) if n.startswith(MTP_PREFIX))
    if already:  # a quantized head the engine wrote: a copy would shadow it in the index with the source's
        raise QuantlabError(f"internal: {build} already holds {len(already)} mtp.* tensor(s) (e.g. {already[0]}); "
                            "not copying the source's over them")
    count = len(shards) + 1
    names = [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    weight_map: dict[str, str] = {}
    total = 0
    for old, new in zip(shards, names):
        _, header = read_shard_header(old)
        for name, info in header.items():
            if name != "__metadata__":
                weight_map[name] = new
                total += info["data_offsets"][1] - info["data_offsets"][0]
        if old.name != new:
            old.rename(build / new)
    mtp_bytes = write_raw(build / names[-1], tensors)
    weight_map.update({t.name: names[-1] for t in tensors})
    index = {"metadata": {"total_size": total + mtp_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (build / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return {"tensors": len(tensors), "bytes": mtp_bytes, "file": names[-1]}


def header_names(shards: list[Path]) -> set[str]:
    names: set[str] = set()
    for shard in shards:
        names |= {n for n in read_shard_header(shard)[1] if n != "__metadata__"}
    return names


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
