"""The held-out text that quality is measured on, and the description a record keeps of it.

- `default`: the Python standard library's "heldout" split, gathered at run time (quantlab.text.corpus).
  It is disjoint by construction from the "train" split (the bundled model's training text) and from
  the "calibration" split (AWQ calibration), and needs no network.
- `file`: one local file; `folder`: every text file under a folder, in sorted relative-path order.
- `hub`: a data file of a Hub dataset, fetched with huggingface_hub (the `datasets` library is not needed).

Plain-text files are read whole; .jsonl, .json, .csv and .parquet files give the `column` of each row
(.parquet needs pyarrow). Rows and files are joined with a blank line.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from quantlab.text import corpus
from quantlab.errors import QuantlabError
from quantlab.text.source import TextSourceSpec

TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py", ".tex", ".html")
SEPARATOR = "\n\n"


@dataclass(frozen=True)
class HeldoutText:
    text: str
    description: dict[str, Any] = field(hash=False)
    label: str


def load_heldout(spec: TextSourceSpec, min_chars: int | None = None) -> HeldoutText:
    """The text named by `quality.source`; `min_chars` lets a Hub source stop downloading shards early."""
    return load_text(spec, "quality", "heldout", min_chars)


def load_text(spec: TextSourceSpec, where: str, default_split: str, min_chars: int | None = None) -> HeldoutText:
    """The text named by a recipe's text source; `where` (e.g. 'quality') prefixes error messages,
    `default_split` is the stdlib split that source `default` means."""
    if spec.source == "default":
        return default_text(default_split)
    if spec.source == "file":
        return _from_file(Path(spec.path).expanduser(), spec.column, where)
    if spec.source == "folder":
        return _from_folder(Path(spec.path).expanduser(), spec.column, where)
    if spec.source == "hub":
        return _from_hub(spec, min_chars, where)
    raise QuantlabError(f"{where}.source: unknown source {spec.source!r}; allowed: default, file, folder, hub")


_DISJOINT = {
    "heldout": "disjoint from the calibration split and the bundled model's training text",
    "calibration": "disjoint from the held-out split and the bundled model's training text",
    "train": "the bundled model's training text",
}


@functools.lru_cache(maxsize=3)
def default_text(split: str = "heldout") -> HeldoutText:
    text = corpus.stdlib_text(split)
    described = corpus.describe(split)
    description = {**described, "sha256": _sha256(text)}
    name = "held-out" if split == "heldout" else split
    label = (
        f"the Python {described['python']} standard library's {name} split ({described['files']} files, "
        f"{described['chars']:,} chars; {_DISJOINT[split]})"
    )
    return HeldoutText(text, description, label)


def _from_file(path: Path, column: str, where: str) -> HeldoutText:
    if not path.is_file():
        why = "a folder" if path.is_dir() else "not a regular file (a device, a pipe or a socket)" if path.exists() \
            else "file not found"
        raise QuantlabError(f"{where}.path: {path}: {why}")
    text = read_text_column(path, column, where)
    sha = _sha256(text)
    description = {"source": "file", "path": str(path.resolve()), "sha256": sha, "chars": len(text)}
    return HeldoutText(text, description, f"file {path} ({len(text):,} chars, sha256 {sha[:12]})")


def _from_folder(folder: Path, column: str, where: str) -> HeldoutText:
    if not folder.is_dir():
        raise QuantlabError(f"{where}.path: {folder}: {'not a folder' if folder.exists() else 'folder not found'}")
    files = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + TABLE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        allowed = ", ".join(TEXT_SUFFIXES + TABLE_SUFFIXES)
        raise QuantlabError(f"{where}.path: {folder}: no text files in the folder (looked for {allowed})")
    text = SEPARATOR.join(read_text_column(p, column, where) for p in files)
    sha = _sha256(text)
    description = {"source": "folder", "path": str(folder.resolve()), "files": len(files), "sha256": sha, "chars": len(text)}
    return HeldoutText(text, description, f"folder {folder} ({len(files)} files, {len(text):,} chars, sha256 {sha[:12]})")


def _from_hub(spec: TextSourceSpec, min_chars: int | None, where: str) -> HeldoutText:
    files = [spec.path] if spec.path else _split_files(spec, where)
    texts, used, commit = [], [], None
    for name in files:
        local = _download(spec, name, where)
        commit = commit or _commit_of(local)
        texts.append(read_text_column(local, spec.column, where))
        used.append(name)
        if min_chars is not None and sum(map(len, texts)) >= min_chars:
            break
    text = SEPARATOR.join(texts)
    sha = _sha256(text)
    description = {
        "source": "hub", "dataset": spec.dataset, "revision": commit or spec.revision, "files": used,
        "column": spec.column, "sha256": sha, "chars": len(text),
    }
    shown = used[0] if len(used) == 1 else f"{len(used)} files"
    return HeldoutText(text, description, f"Hub dataset {spec.dataset} ({shown}, {len(text):,} chars, sha256 {sha[:12]})")


def _split_files(spec: TextSourceSpec, where: str) -> list[str]:
    from huggingface_hub import HfApi

    try:
        names = HfApi().list_repo_files(spec.dataset, repo_type="dataset", revision=spec.revision)
    except Exception as exc:  # offline, unknown repo, gated, network: all one clear message
        raise QuantlabError(_hub_message(spec, exc, where, listing=True)) from None
    data = [n for n in names if n.lower().endswith(TABLE_SUFFIXES + (".txt",)) and _in_split(n, spec.effective_split)]
    if not data:
        some = ", ".join(sorted(names)[:8]) or "none"
        raise QuantlabError(
            f"{where}.dataset {spec.dataset}: no .parquet/.jsonl/.json/.csv/.txt data file of split '{spec.effective_split}' "
            f"(files: {some}). Set {where}.split, or {where}.path to the data file inside the repo."
        )
    return sorted(data)


def _in_split(name: str, split: str) -> bool:
    path = PurePosixPath(name)
    first_word = re.split(r"[-_.]", path.stem)[0]
    return split in path.parts[:-1] or first_word == split or path.stem == split


def _download(spec: TextSourceSpec, filename: str, where: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(spec.dataset, filename, repo_type="dataset", revision=spec.revision))
    except Exception as exc:
        raise QuantlabError(_hub_message(spec, exc, where, listing=False, filename=filename)) from None


def _hub_message(spec: TextSourceSpec, exc: BaseException, where: str, listing: bool, filename: str | None = None) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"} or _hub_offline_constant()
    why = "HF_HUB_OFFLINE is set" if offline else f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    what = "list its data files:" if listing else f"get {filename}: it is not in the Hugging Face cache, and"
    hint = "" if not listing else (
        "\n  - if a data file is already in the cache, name it with {where}.path (e.g. wikitext-2-raw-v1/test-00000-of-00001.parquet)"
    )
    return (
        f"{where}.dataset {spec.dataset}: cannot {what} the Hub cannot be reached ({why}).\nTo work offline:\n"
        f"  - on a machine with network: hf download {spec.dataset} --repo-type dataset{hint}\n"
        f"  - or use source: file or folder with a local copy of the text\n"
        f"  - or use source: default (a split of the Python standard library, no network needed)"
    )


def _hub_offline_constant() -> bool:
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _commit_of(local: Path) -> str | None:
    parts = local.parts
    if "snapshots" in parts:
        index = parts.index("snapshots")
        if index + 1 < len(parts):
            return parts[index + 1]
    return None


def read_text_column(path: Path, column: str = "text", where: str = "quality") -> str:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            rows = [json.loads(line) for line in lines if line.strip()]
            return _column(rows, column, path, where)
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get(column), list):
                return SEPARATOR.join(str(v) for v in data[column])
            if isinstance(data, list):
                return _column(data, column, path, where)
            raise QuantlabError(f"{path}: a .json file must be a list of rows or a mapping with a '{column}' list")
        if suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as f:
                return _column(list(csv.DictReader(f)), column, path, where)
        if suffix == ".parquet":
            return _parquet(path, column, where)
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise QuantlabError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise QuantlabError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from None
    except RecursionError:
        raise QuantlabError(f"{path}: not valid JSON (nested too deeply)") from None
    except csv.Error as exc:
        raise QuantlabError(f"{path}: not valid CSV ({exc})") from None
    except OSError as exc:
        raise QuantlabError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None


def _column(rows: list[Any], column: str, path: Path, where: str) -> str:
    if rows and not all(isinstance(r, dict) and column in r for r in rows):
        first = rows[0] if isinstance(rows[0], dict) else {}
        raise QuantlabError(f"{path}: no column '{column}' in every row (columns: {', '.join(first) or 'none'}); set {where}.column")
    return SEPARATOR.join(str(r[column]) for r in rows if r[column] is not None)


def _parquet(path: Path, column: str, where: str) -> str:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise QuantlabError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow), or give a .jsonl/.txt copy") from None
    from pyarrow import ArrowException

    try:
        table = pq.read_table(path)
    except ArrowException as exc:  # ArrowInvalid and the rest: a file that is not Parquet
        first = (str(exc).splitlines() or [""])[0][:200]
        raise QuantlabError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {first})") from None
    if column not in table.column_names:
        raise QuantlabError(f"{path}: no column '{column}' (columns: {', '.join(table.column_names)}); set {where}.column")
    return SEPARATOR.join(str(v) for v in table.column(column).to_pylist() if v is not None)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
