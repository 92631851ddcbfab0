"""Stored mode's reference statistics: written once by the reference pass, read by each candidate pass.

At Qwen3.6-27B's vocabulary (248,320) a full fp32 distribution is ~1 MB per token, so only this is
kept per scored token (safetensors, one file per window):
- `top_logp` (fp32) and `top_ids` (int32): the reference's top-k log-probabilities and their tokens;
- `tail_logmass` (fp32): log of the probability outside the top-k, computed directly (no 1 − Σ);
- `target_logp` (fp32): the correct token's log-probability (exact perplexity and Δp);
- `argmax` (int32): the reference's top token (exact top-1 agreement);
- `targets` (int32): the scored tokens, to check that a candidate pass scores the same tokens.
That is 8·k + 16 bytes per token: ~1 KiB at k = 128, 32 MiB for 32k tokens.

The folder name carries a hash of everything the statistics depend on (reference weights, dtype,
device type, text, token ids, windows, k, tokenizer): a changed input never reuses stale statistics.
A folder is written under a temporary name and renamed when complete, so an interrupted reference
pass leaves nothing that a later run would mistake for finished statistics.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from quantlab.errors import QuantlabError

FORMAT = 1
META = "meta.json"


def cache_key(payload: dict[str, Any]) -> str:
    blob = json.dumps({"format": FORMAT, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_folder(cache_dir: Path, name: str, key: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-").lower() or "reference"
    return Path(cache_dir) / f"{slug}-{key}"


def check_cache_dir(cache_dir: Path) -> None:
    """The stored-mode cache must be a folder that exists or can be made, and be writable."""
    cache_dir = Path(cache_dir)
    where = f"quality cache {cache_dir}"
    if cache_dir.is_symlink() and not cache_dir.exists():
        raise QuantlabError(f"{where}: a symbolic link to nothing (or a loop of links)")
    existing = cache_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == cache_dir else f"cannot be made: {existing} is a file"
        raise QuantlabError(f"{where}: {what}; the cache is a folder (quality.reference.cache_dir)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise QuantlabError(f"{where}: {existing} is not writable")


@dataclass(frozen=True)
class StoredReference:
    folder: Path
    meta: dict[str, Any]
    reused: bool
    seconds: float | None

    def window(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(self.folder / _window_file(index))


def find_complete(folder: Path, windows: int) -> dict[str, Any] | None:
    """The metadata of a finished statistics folder, or None (absent, partial or another format)."""
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("format") != FORMAT or meta.get("windows") != windows:
        return None
    if not all((folder / _window_file(i)).is_file() for i in range(windows)):
        return None
    return meta


class StatsWriter:
    """Writes window files into a temporary folder; `finish` renames it into place."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(self.tmp / _window_file(index)))

    def finish(self, meta: dict[str, Any]) -> None:
        (self.tmp / META).write_text(json.dumps({"format": FORMAT, **meta}, indent=1, default=str) + "\n", encoding="utf-8")
        try:
            os.rename(self.tmp, self.folder)
        except OSError:  # another run finished the same statistics first: keep theirs
            shutil.rmtree(self.tmp, ignore_errors=True)
            if find_complete(self.folder, meta["windows"]) is None:
                raise

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _window_file(index: int) -> str:
    return f"window-{index:05d}.safetensors"
