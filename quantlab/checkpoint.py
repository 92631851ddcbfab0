"""Checks on a local folder of safetensors shards, made before any weights are loaded.

Each shard's header says how many bytes its tensors occupy, so a truncated or corrupt file is
caught by reading a few kilobytes, not 55 GB.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from quantlab.errors import QuantlabError

INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class ShardSet:
    folder: Path
    shards: tuple[Path, ...]
    tensor_bytes: int  # sum of the tensor payloads, headers excluded


def check_folder(folder: str | Path, progress: bool = True) -> ShardSet:
    folder = Path(folder)
    if not folder.is_dir():
        raise QuantlabError(f"{folder}: model folder not found")
    read_config(folder)
    shards = _shard_files(folder)
    payload = 0
    tensors: dict[str, set[str]] = {}
    for shard in tqdm(shards, desc="checking shards", unit="shard", disable=not progress or len(shards) < 2):
        size, names = check_shard(shard)
        payload += size
        tensors[shard.name] = names
    _check_index_matches(folder, tensors)
    return ShardSet(folder, tuple(shards), payload)


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise QuantlabError(f"{folder}: no config.json; a model folder needs one beside its safetensors shards")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QuantlabError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise QuantlabError(f"{path}: has no 'model_type', so the architecture cannot be known")
    return config


def _shard_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = _read_index(index)
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise QuantlabError(f"{index}: lists shards that are not in the folder: {', '.join(missing)}")
        return shards
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise QuantlabError(f"{folder}: no *.safetensors files (and no {INDEX_NAME})")
    return shards


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise QuantlabError(f"{index}: not a valid safetensors index ({type(exc).__name__}: {exc})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise QuantlabError(f"{index}: 'weight_map' is empty or not a mapping")
    return weight_map


def check_shard(path: Path) -> tuple[int, set[str]]:
    """Payload bytes and tensor names of one shard; raises on a truncated or corrupt file."""
    actual = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise QuantlabError(f"{path}: corrupt shard: {actual} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > actual:
            raise QuantlabError(f"{path}: corrupt or truncated shard: header length {header_len} does not fit in {actual} bytes")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise QuantlabError(f"{path}: corrupt shard: its header is not valid JSON") from None
    ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"]
    payload = max(ends, default=0)
    expected = 8 + header_len + payload
    if actual < expected:
        raise QuantlabError(
            f"{path}: truncated shard: its header promises {expected:,} bytes but the file has {actual:,} "
            f"({expected - actual:,} missing). Re-download or re-copy this file."
        )
    return payload, {name for name in header if name != "__metadata__"}


def _check_index_matches(folder: Path, tensors: dict[str, set[str]]) -> None:
    index = folder / INDEX_NAME
    if not index.is_file():
        return
    for name, shard in _read_index(index).items():
        if name not in tensors.get(shard, set()):
            raise QuantlabError(f"{index}: says {name!r} is in {shard}, but that shard does not hold it")
