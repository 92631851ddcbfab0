"""Checks on a local folder of safetensors shards, made before any weights are loaded.

Each shard's header says how many bytes its tensors occupy, so a truncated or corrupt file is
caught by reading a few kilobytes, not 55 GB. The headers also give every tensor's name, dtype and
shape: `compare_with_model` holds them against the model the config describes (instantiated on the
meta device), so a missing, unexpected, misshapen or mistyped tensor is an error before loading,
never a tensor that transformers fills in at random.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from quantlab.errors import QuantlabError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

# Copied verbatim from the source folder when present: tokenizer, chat template, generation and
# processor configs, licence.
EXTRA_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json", "generation_config.json",
    "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json", "LICENSE",
)
INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
MAX_JSON_BYTES = 64 * 1024 * 1024  # config.json, the shard index: a few kilobytes to a few megabytes
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
# The dtypes an unquantized checkpoint of this model stores its floating-point tensors in.
FLOAT_DTYPES = ("BF16", "F16", "F32")
SHOWN = 8  # tensors named in one error message; the rest are counted
# Layers (decoder layers, vision blocks) a config may ask for: Qwen3.6-27B has 64, the largest open models under
# 200; instantiating 100,000 on the meta device would take minutes.
MAX_LAYERS = 512
# Config fields that are sizes or counts: a positive integer each, where a config has them.
SIZE_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "vocab_size", "max_position_embeddings", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
    "linear_value_head_dim", "linear_conv_kernel_dim", "depth", "num_heads", "out_hidden_size", "patch_size",
    "in_channels", "spatial_merge_size", "temporal_patch_size", "num_position_embeddings",
)
LAYER_FIELDS = ("num_hidden_layers", "depth")


@dataclass(frozen=True)
class ShardSet:
    folder: Path
    shards: tuple[Path, ...]
    tensor_bytes: int  # sum of the tensor payloads, headers excluded


@dataclass(frozen=True)
class HeaderTensor:
    """One tensor as a shard's header describes it."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in `file`
    nbytes: int


def check_folder(folder: str | Path, progress: bool = True) -> ShardSet:
    folder = Path(folder)
    if not folder.is_dir():
        raise QuantlabError(f"{folder}: model folder not found")
    read_config(folder)
    shards = shard_files(folder)
    payload = 0
    tensors: dict[str, set[str]] = {}
    for shard in tqdm(shards, desc="checking shards", unit="shard", disable=not progress or len(shards) < 2):
        size, names = check_shard(shard)
        payload += size
        tensors[shard.relative_to(folder).as_posix()] = names
    _check_index_matches(folder, tensors)
    return ShardSet(folder, tuple(shards), payload)


def read_json_file(path: Path, what: str) -> object:
    """A JSON file a user's folder holds (config.json, an index): any problem is one QuantlabError naming it."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise QuantlabError(f"{path}: larger than {MAX_JSON_BYTES:,} bytes, the limit for {what}")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise QuantlabError(f"{path}: cannot read {what}: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError as exc:
        raise QuantlabError(f"{path}: not valid JSON (not UTF-8: {exc.reason} at byte {exc.start:,})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise QuantlabError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise QuantlabError(f"{path}: not valid JSON (nested too deeply)") from None


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise QuantlabError(f"{folder}: no config.json; a model folder needs one beside its safetensors shards")
    config = read_json_file(path, "a model config")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise QuantlabError(f"{path}: has no 'model_type', so the architecture cannot be known")
    return config


def inside(folder: Path, name: object, what: str) -> Path:
    """`folder / name` for a relative file name read from a file in `folder` (an index, a checksum list):
    a name that is absolute or climbs out of the folder with '..' is refused."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        raise QuantlabError(f"{what}: {name!r} is not a file name")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts:
        raise QuantlabError(f"{what}: {name!r} points outside {folder}; only files inside the folder are read")
    return folder / pure


def shard_files(folder: Path) -> list[Path]:
    """The shard files of a checkpoint folder: those its index names (each inside the folder), else *.safetensors."""
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = _read_index(index)
        shards = [inside(folder, name, str(index)) for name in sorted(set(weight_map.values()))]
        missing = [str(s.relative_to(folder)) for s in shards if not s.is_file()]
        if missing:
            raise QuantlabError(f"{index}: lists shards that are not in the folder: {', '.join(missing)}")
        return shards
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise QuantlabError(f"{folder}: no *.safetensors files (and no {INDEX_NAME})")
    return shards


def _read_index(index: Path) -> dict[str, str]:
    data = read_json_file(index, "a safetensors index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise QuantlabError(f"{index}: not a valid safetensors index ('weight_map' is missing, empty or not a mapping)")
    bad = next((v for v in weight_map.values() if not isinstance(v, str)), None)
    if bad is not None:
        raise QuantlabError(f"{index}: not a valid safetensors index (a shard name is {bad!r}, not a file name)")
    return weight_map


def read_shard_header(path: Path) -> tuple[int, dict[str, dict]]:
    """(data start offset, header) of one safetensors file, every entry checked: a known dtype, a shape of
    non-negative integers, and data offsets that hold exactly that many bytes. Raises QuantlabError."""
    try:
        if not path.is_file():
            raise QuantlabError(f"{path}: not a file (a safetensors shard must be a regular file)")
        actual = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise QuantlabError(f"{path}: corrupt shard: {actual} bytes, too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > actual:
                raise QuantlabError(
                    f"{path}: corrupt or truncated shard: header length {header_len} does not fit in {actual} bytes")
            raw = f.read(header_len)
    except OSError as exc:
        raise QuantlabError(f"{path}: cannot read the shard: {exc.strerror or type(exc).__name__}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise QuantlabError(f"{path}: corrupt shard: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise QuantlabError(f"{path}: corrupt shard: its header is not a mapping of tensor names")
    for name, info in header.items():
        if name != "__metadata__":
            _check_entry(path, name, info)
    return 8 + header_len, header


def _check_entry(path: Path, name: str, info: object) -> None:
    def bad(why: str) -> QuantlabError:
        return QuantlabError(f"{path}: corrupt shard: tensor {name[:200]!r} {why}")

    if not isinstance(info, dict):
        raise bad("has no dtype, shape and data_offsets")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise bad(f"has dtype {str(dtype)[:40]!r}, which quantlab does not know ({', '.join(DTYPE_BYTES)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"has shape {str(shape)[:80]}, not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has data_offsets {str(offsets)[:80]}, not [start, end] with 0 <= start <= end")
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise bad(f"of shape {shape} and dtype {dtype} needs {expected:,} bytes, but its data_offsets hold "
                  f"{offsets[1] - offsets[0]:,}")


def check_shard(path: Path) -> tuple[int, set[str]]:
    """Payload bytes and tensor names of one shard; raises on a truncated or corrupt file."""
    header_end, header = read_shard_header(path)
    actual = path.stat().st_size
    payload = max((info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"), default=0)
    expected = header_end + payload
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
        if name not in tensors.get(PurePosixPath(shard).as_posix(), set()):
            raise QuantlabError(f"{index}: says {name!r} is in {shard}, but that shard does not hold it")


def header_tensors(folder: Path, shards: list[Path] | tuple[Path, ...] | None = None) -> dict[str, HeaderTensor]:
    """Every tensor of a folder's shards, from their headers; a name held by two shards is an error."""
    tensors: dict[str, HeaderTensor] = {}
    for path in shards if shards is not None else shard_files(folder):
        start, header = read_shard_header(path)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in tensors:
                raise QuantlabError(f"{folder}: tensor {name!r} is in two shards ({tensors[name].file.name} and "
                                    f"{path.name}); a checkpoint holds each tensor once")
            begin, end = info["data_offsets"]
            tensors[name] = HeaderTensor(name, path, info["dtype"], tuple(info["shape"]), start + begin, end - begin)
    return tensors


def check_config_sizes(config: PretrainedConfig | dict, where: str) -> None:
    """Sizes and counts must be positive integers, and layers few enough to instantiate in seconds."""
    raw = config if isinstance(config, dict) else config.to_dict()
    parts = {"": raw}
    for key in ("text_config", "vision_config"):
        if isinstance(raw.get(key), dict):
            parts[f"{key}."] = raw[key]
    for prefix, part in parts.items():
        for name in SIZE_FIELDS:
            value = part.get(name)
            if value is None:
                continue
            if type(value) is not int or value < 1:
                raise QuantlabError(f"{where}: {prefix}{name} must be a positive integer, got {str(value)[:40]!r}")
            if name in LAYER_FIELDS and value > MAX_LAYERS:
                raise QuantlabError(f"{where}: {prefix}{name} is {value:,}; quantlab handles at most {MAX_LAYERS} "
                                    "(Qwen3.6-27B has 64), and building that many would take minutes")


# ---- the checkpoint against the model its config describes ---------------------------------------------

def compare_with_model(folder: Path, model: torch.nn.Module, config_name: str = "config.json") -> None:
    """Hold the shard headers of an unquantized checkpoint against `model` (on the meta device): every tensor
    the model expects must be in the checkpoint with its shape, in a floating-point dtype a checkpoint of
    this model uses; every tensor of the checkpoint must be one the model loads, or one its architecture
    drops on purpose (`mtp.*`, the vision tower of a text-only load). Names are matched as transformers
    matches them when loading (its key renamings, e.g. model.language_model.* -> model.*)."""
    folder = Path(folder)
    tensors = header_tensors(folder)
    expected = model.state_dict()
    rename = _renamer(model, expected)
    ignored = _ignore_pattern(model)
    found: dict[str, HeaderTensor] = {}
    unexpected, misshapen, mistyped = [], [], []
    for name, t in tensors.items():
        target, converted = rename(name)
        if target not in expected:
            if not (ignored and (ignored.search(target) or ignored.search(name))):
                unexpected.append(name)
            continue
        found[target] = t
        if (t.dtype in FLOAT_DTYPES) != expected[target].is_floating_point():
            mistyped.append(f"{name} is {t.dtype}")
        if not converted and t.shape != tuple(expected[target].shape):
            misshapen.append(f"{name}: expected {list(expected[target].shape)} (from {config_name}), "
                             f"found {list(t.shape)} in {t.file.name}")
    missing = [n for n in expected if n not in found and not _tied_to_found(model, n, found)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) the model needs are missing from the checkpoint: {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) of the checkpoint are not part of {type(model).__name__}: "
                        f"{_names(unexpected)}")
    if misshapen:
        problems.append(f"{len(misshapen)} tensor(s) have another shape than {config_name} says: {_names(misshapen)}")
    if mistyped:
        problems.append(f"{len(mistyped)} tensor(s) have a dtype that an unquantized checkpoint of this model does not "
                        f"use ({'/'.join(FLOAT_DTYPES)} for weights): {_names(mistyped)}")
    if problems:
        raise QuantlabError(f"{folder}: the checkpoint does not match its config; transformers would fill or drop "
                            f"these tensors silently, so nothing is loaded. " + "; ".join(problems))


def _renamer(model: torch.nn.Module, expected: dict):
    """checkpoint name -> (model name, whether a converter reshapes it), as transformers loads it."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None)

    def rename(name: str) -> tuple[str, bool]:
        target, pattern = rename_source_key(name, renamings, converters, prefix, expected)
        return target, pattern is not None

    return rename


def _ignore_pattern(model: torch.nn.Module) -> re.Pattern | None:
    """transformers' own list of checkpoint tensors a class drops on load (mtp.*, a text load's vision tower)."""
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    if any(n.endswith("rotary_emb.inv_freq") for n, _ in model.named_buffers()):
        patterns.add(r"rotary_emb\.inv_freq")
    return re.compile("|".join(f"({p})" for p in sorted(patterns))) if patterns else None


def _tied_to_found(model: torch.nn.Module, name: str, found: dict) -> bool:
    """A tied weight (lm_head to the embeddings) needs only one of its names in the checkpoint."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    partners = {tied.get(name)} | {target for target, source in tied.items() if source == name}
    return any(p in found for p in partners if p)


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def folder_tensors(folder: Path) -> dict[str, HeaderTensor]:
    """Every tensor of a checkpoint folder, by name, from its shard headers (no tensor data is read)."""
    return header_tensors(folder, shard_files(folder))


def payload_bytes(folder: Path, include_mtp: bool = True) -> int:
    """Bytes of tensor data in a checkpoint folder, the MTP head's included or not."""
    from quantlab.architecture import MTP_PREFIX

    return sum(t.nbytes for t in folder_tensors(folder).values() if include_mtp or not t.name.startswith(MTP_PREFIX))
