"""A checkpoint's MTP shard, at the byte level and without torch: the MTP tensors (`mtp.*`) copied byte for byte from
the source's shards into one more shard (transformers drops them at load, so a save_pretrained never has them), a
head an engine wrote described where it lies, and the shards renamed model-0000i-of-0000n with their index. Used by
every checkpoint quantlab writes: builds (artifact/), runs that draft with the head (run.py), and the head an AWQ
engine quantized (`quantization.mtp: quantize`), moved into the same last shard.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from quantlab.architecture import MTP_PREFIX
from quantlab.checkpoint import INDEX_NAME, HeaderTensor, folder_tensors, read_shard_header, shard_files
from quantlab.errors import QuantlabError

_CHUNK = 16 << 20
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
