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
pass leaves nothing that a later run would mistake for finished statistics. meta.json holds each
window file's SHA-256: a file damaged since (flipped bytes, cut short) fails the check and the
statistics are computed again, never read.
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
from safetensors.torch import load, save_file

from quantlab.errors import QuantlabError

FORMAT = 2  # 2: meta.json carries each window file's sha256
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
        """One window's statistics, checked against the sha256 the reference pass recorded."""
        name = _window_file(index)
        data = _read_bytes(self.folder / name)
        if data is None or hashlib.sha256(data).hexdigest() != self.meta["sha256"][name]:
            raise QuantlabError(f"quality: {self.folder / name} changed while this run read the reference statistics "
                                "(its sha256 no longer matches); run again to recompute them")
        return load(data)


def find_complete(folder: Path, windows: int, expected: dict[str, Any] | None = None
                  ) -> tuple[dict[str, Any] | None, str | None]:
    """(the metadata of a finished, undamaged statistics folder, None) or (None, why it cannot be used; None when
    there is no folder at all). `expected`: values meta.json must hold (what the statistics were computed for)."""
    if not (folder.exists() or folder.is_symlink()):
        return None, None
    try:
        meta = json.loads(_read_bytes(folder / META) or b"")
    except ValueError:
        return None, f"{META} is missing, not a regular file or not JSON (an unfinished pass)"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("windows") != windows:
        return None, "of another format or window count"
    changed = sorted(key for key, value in (expected or {}).items() if meta.get(key) != value)
    if changed:
        return None, f"{META} was changed since it was written ({', '.join(changed)})"
    sums = meta.get("sha256")
    for name in (_window_file(i) for i in range(windows)):
        data = _read_bytes(folder / name)
        if data is None:
            return None, f"{name} is missing or unreadable"
        if not isinstance(sums, dict) or hashlib.sha256(data).hexdigest() != sums.get(name):
            return None, f"{name} does not match its recorded sha256 (damaged since it was written)"
    return meta, None


def _read_bytes(path: Path) -> bytes | None:
    """A regular file's bytes; None for anything else (a link is never followed out of the cache, a pipe never
    waited on)."""
    try:
        return path.read_bytes() if path.is_file() and not path.is_symlink() else None
    except OSError:
        return None


class StatsWriter:
    """Writes window files into a temporary folder; `finish` renames it into place."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.sums: dict[str, str] = {}

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        path = self.tmp / _window_file(index)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
        self.sums[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()

    def finish(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Rename the finished statistics into place; the metadata in place (this run's, or a run's that finished
        the same statistics first)."""
        meta = {"format": FORMAT, **meta, "sha256": dict(self.sums)}
        (self.tmp / META).write_text(json.dumps(meta, indent=1, default=str) + "\n", encoding="utf-8")
        try:
            os.rename(self.tmp, self.folder)
        except OSError:  # another run finished the same statistics first: keep theirs
            shutil.rmtree(self.tmp, ignore_errors=True)
            theirs, _ = find_complete(self.folder, meta["windows"])
            if theirs is None:
                raise
            return theirs
        return meta

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _window_file(index: int) -> str:
    return f"window-{index:05d}.safetensors"
