"""Tensor-at-a-time safetensors I/O, so that a model is quantized without ever being whole in memory."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

from quantlab.checkpoint import folder_tensors
from quantlab.checkpoint import INDEX_NAME
from quantlab.errors import QuantlabError


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class ShardReader:
    """Reads single tensors from a checkpoint folder (one file, or shards with an index).

    Plain reads, not a memory map: pages of a mapped file that were touched stay in the process's
    resident set until it is unmapped, so a mapped 27B checkpoint read tensor by tensor would end up
    counted whole in RSS. A read copies just the tensor, which is freed with it.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.tensors = folder_tensors(self.folder)
        if not self.tensors:
            raise QuantlabError(f"{self.folder}: no safetensors weights")

    def names(self) -> set[str]:
        return set(self.tensors)

    def get(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        info = self.tensors.get(name)
        if info is None:
            raise QuantlabError(f"{self.folder}: the checkpoint has no tensor {name!r}")
        if info.dtype not in _DTYPES:
            raise QuantlabError(f"{info.file}: tensor {name} has dtype {info.dtype}, which quantlab cannot read")
        data = bytearray(info.nbytes)
        with info.file.open("rb") as f:
            f.seek(info.start)
            if f.readinto(data) != info.nbytes:
                raise QuantlabError(f"{info.file}: truncated at tensor {name}")
        tensor = torch.frombuffer(data, dtype=_DTYPES[info.dtype]).reshape(info.shape) if info.nbytes else \
            torch.empty(info.shape, dtype=_DTYPES[info.dtype])
        return tensor.to(device=device, dtype=dtype or tensor.dtype)


class ShardWriter:
    """Writes tensors as they come, never holding more than one in memory: each tensor's bytes are
    appended to a data file, and when `max_bytes` is reached the shard is written as the safetensors
    header followed by those bytes. `finish` names the shards model-0000i-of-0000n.safetensors with an
    index (or model.safetensors when there is one)."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = Path(folder), max_bytes
        self._entries: dict[str, dict] = {}
        self._data_path = self.folder / ".shard-data.partial"
        self._data = None
        self._offset = 0
        self._written: list[tuple[Path, list[str]]] = []
        self._seen: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise ValueError(f"tensor {name} written twice")
        self._seen.add(name)
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if self._entries and self._offset + size > self.max_bytes:
            self._flush()
        if self._data is None:
            self._data = self._data_path.open("wb")
        if size:
            self._data.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        self._entries[name] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [self._offset, self._offset + size]}
        self._offset += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self._entries:
            return
        self._data.close()
        header = dict(sorted(self._entries.items()))
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        path = self.folder / f".shard-{len(self._written):05d}.safetensors"
        with path.open("wb") as out, self._data_path.open("rb") as data:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            shutil.copyfileobj(data, out, 16 << 20)
            out.flush()
            os.fsync(out.fileno())
        self._data_path.unlink()
        self._written.append((path, sorted(self._entries)))
        self._entries, self._data, self._offset = {}, None, 0

    def finish(self) -> list[Path]:
        self._flush()
        count = len(self._written)
        if count == 1:
            final = [self.folder / "model.safetensors"]
        else:
            final = [self.folder / f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        weight_map = {}
        for (tmp, names), path in zip(self._written, final):
            os.replace(tmp, path)
            weight_map.update({name: path.name for name in names})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return final
