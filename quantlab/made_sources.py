"""Models quantlab makes itself from files it ships (e.g. the bundled model with salient channels), on first use,
into a cache folder named after a hash of everything they are made from; later uses reuse the folder.

- The key: sha256 of the kind, the maker's code version, its parameters and the sha256 of every input file.
  Changing any of them names another folder; nothing is ever made over an existing one.
- Where: $QUANTLAB_CACHE/models/, else $XDG_CACHE_HOME/quantlab/models/, else ~/.cache/quantlab/models/.
- Made atomically: in a hidden sibling folder (`.NAME.partial-PID-RANDOM`), renamed into place when complete, under
  a lock file beside it so that two processes make it once; without the lock the rename still lets only one win.
- Every use checks the folder against the manifest written with it (quantlab_made.json: every file's size and
  sha256). A folder quantlab made whose files no longer match is made again (one line says so); anything else (no
  or unreadable manifest, files quantlab did not write, a link, a file) is refused, and never deleted or used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from quantlab.checksums import sha256_file
from quantlab.errors import QuantlabError
from quantlab.placement import PARTIAL, remove_stale_partials

CACHE_ENV = "QUANTLAB_CACHE"
MANIFEST = "quantlab_made.json"
MADE_BY = "quantlab made_sources"
_DAMAGED = ".damaged-"


def cache_root() -> Path:
    """quantlab's cache: $QUANTLAB_CACHE, else $XDG_CACHE_HOME/quantlab, else ~/.cache/quantlab."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".cache") / "quantlab"


@dataclass(frozen=True)
class MadeModel:
    """A model folder made by `make(empty_folder)` from the files of `inputs`: deterministic, so the key of its
    inputs names it."""

    kind: str  # e.g. "bundled-salient"
    label: str  # the folder's readable name, e.g. "bundled-salient-c4-x32-s0"
    inputs: Path  # the folder it is made from; every regular file in it counts in the key
    params: dict[str, Any]  # JSON-serializable parameters of the maker
    version: int  # the maker's code version
    make: Callable[[Path], Any] = field(compare=False, repr=False)
    what: str = ""  # one phrase for the message while it is made

    @cached_property
    def input_files(self) -> dict[str, str]:
        """name → sha256 of every regular file of `inputs`."""
        if not self.inputs.is_dir():
            raise QuantlabError(f"{self.inputs}: the folder {self.kind} is made from is missing")
        return {p.name: sha256_file(p) for p in sorted(self.inputs.iterdir())
                if p.is_file() and not p.is_symlink() and not p.name.startswith(".")}

    @cached_property
    def key(self) -> str:
        payload = {"kind": self.kind, "version": self.version, "params": self.params, "inputs": self.input_files}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    @property
    def folder(self) -> Path:
        return cache_root() / "models" / f"{self.label}-{self.key[:16]}"

    def made(self) -> Path | None:
        """The folder when it is there and intact; None when it is not made yet. Raises on a folder it cannot use."""
        folder = self.folder
        if not (folder.exists() or folder.is_symlink()):
            return None
        problem = _problem(folder, self.key)
        if problem is None:
            return folder
        if _ours(folder):
            return None  # damaged: `ensure` makes it again
        raise QuantlabError(_refusal(folder, problem))

    def ensure(self, echo: Callable[[str], None] | None = None) -> Path:
        """The folder, made first when it is not there (or damaged)."""
        echo = echo or (lambda line: print(f"quantlab: {line}", file=sys.stderr, flush=True))
        folder = self.folder
        if self.made() is not None:
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        with _lock(folder):
            if folder.exists() or folder.is_symlink():  # again, under the lock: another process may have made it
                problem = _problem(folder, self.key)
                if problem is None:
                    return folder
                if not _ours(folder):
                    raise QuantlabError(_refusal(folder, problem))
                echo(f"{folder}: damaged ({problem}); making it again")
                _discard(folder)
            remove_stale_partials(folder)  # left by makers that were killed
            tmp = folder.parent / f".{folder.name}{PARTIAL}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                echo(f"making {self.what or self.label} into {folder} (once; later runs reuse it)")
                self.make(tmp)
                _write_manifest(tmp, self)
                try:
                    tmp.rename(folder)
                except OSError:  # another maker (one that took no lock) put its folder there first
                    if _problem(folder, self.key) is not None:
                        raise
                    shutil.rmtree(tmp, ignore_errors=True)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)  # made here, by this call
                raise
        problem = _problem(folder, self.key)
        if problem is not None:
            raise QuantlabError(_refusal(folder, problem))
        return folder


# ---- the manifest ---------------------------------------------------------------------------------------------

def _write_manifest(folder: Path, made: MadeModel) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.name != MANIFEST}
    manifest = {"made_by": MADE_BY, "kind": made.kind, "key": made.key, "version": made.version,
                "params": made.params, "inputs": {"folder": str(made.inputs), "files": made.input_files},
                "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() and not path.is_symlink() else None
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("made_by") == MADE_BY and isinstance(data.get("files"), dict)
    return data if ok else None


def _ours(folder: Path) -> bool:
    """A real folder with quantlab's manifest, holding only the files that manifest lists: quantlab made it all."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    manifest = _read_manifest(folder)
    if manifest is None:
        return False
    listed = set(manifest["files"]) | {MANIFEST}
    return all(p.name in listed and (p.is_file() or p.is_symlink()) for p in folder.iterdir())


def _problem(folder: Path, key: str) -> str | None:
    """What is wrong with `folder` as the made model of `key`; None when every file is as it was written."""
    if folder.is_symlink():
        return "a symbolic link, not a folder quantlab made"
    if not folder.is_dir():
        return "a file, not a folder"
    manifest = _read_manifest(folder)
    if manifest is None:
        return f"no readable {MANIFEST}, so not a folder quantlab made"
    files: dict[str, Any] = manifest["files"]
    extra = sorted(p.name for p in folder.iterdir() if p.name not in files and p.name != MANIFEST)
    if extra:
        return f"holds {len(extra)} file(s) quantlab did not write ({', '.join(extra[:5])})"
    if manifest.get("key") != key:
        return f"its {MANIFEST} names other inputs (key {str(manifest.get('key'))[:16]})"
    for name, expected in files.items():
        path = folder / name
        if path.is_symlink() or not path.is_file():
            return f"{name} is missing"
        if not isinstance(expected, dict) or path.stat().st_size != expected.get("bytes"):
            return f"{name} has another size than when it was made"
        if sha256_file(path) != expected.get("sha256"):
            return f"{name} has another sha256 than when it was made"
    return None


def _refusal(folder: Path, problem: str) -> str:
    return (f"{folder}: {problem}; quantlab neither uses nor deletes it. Move it away (or set {CACHE_ENV} to "
            "another folder) and run again")


def _discard(folder: Path) -> None:
    """Remove a damaged folder quantlab made: renamed aside first, so that no one uses it half-deleted."""
    aside = folder.parent / f".{folder.name}{_DAMAGED}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def _lock(folder: Path):
    """An exclusive lock on `.NAME.lock` beside the folder: a second maker waits, then finds the folder made."""
    try:
        import fcntl
    except ImportError:  # no flock here: the atomic rename alone keeps makers apart
        yield
        return
    with open(folder.parent / f".{folder.name}.lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
