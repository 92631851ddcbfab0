"""The results store: one JSON file per record, append-only.

A record is written to a temporary file, fsynced, then hard-linked to its final name, which
fails rather than overwrite: earlier records are never rewritten, a crash leaves at most a
hidden temporary file, and concurrent runs never touch the same file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from quantlab.schema.bounds import first_error
from quantlab.schema.record import Record

RECORDS_SUBDIR = "records"
MAX_RECORD_BYTES = 16 << 20  # a record is a few kilobytes (its recipe text is at most 64 KiB)
M = TypeVar("M", bound=BaseModel)


def records_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / RECORDS_SUBDIR


def append_record(output_dir: str | Path, record: Record) -> Path:
    directory = records_dir(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{record.record_id}.json"
    write_new_file(target, record.model_dump_json(indent=1) + "\n")
    return target


def _readable_by_all(fd: int) -> None:
    """mkstemp creates files private to the user; records and reports are meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)


def write_new_file(target: Path, text: str) -> None:
    """Create `target` atomically with `text`; FileExistsError if it exists."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".json")
    _readable_by_all(fd)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, target)
    finally:
        os.unlink(tmp)


def replace_file(target: Path, content: str | bytes) -> None:
    """Atomically replace a generated file (the report, the plot), never leaving it half-written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=target.suffix)
    _readable_by_all(fd)
    data = content.encode("utf-8") if isinstance(content, str) else content
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_records(output_dir: str | Path) -> tuple[list[Record], list[str]]:
    """All readable records, oldest first, and one problem line per unreadable entry (a folder or a broken
    link named *.json, a file too large or nested too deeply to be a record, invalid JSON, a field of the wrong
    type or out of its range, named): listed, skipped."""
    records, problems = [], []
    directory = records_dir(output_dir)
    for path in sorted(directory.glob("[!.]*.json")) if directory.is_dir() else []:
        try:
            records.append(read_model(path, Record))
        except UNREADABLE as exc:
            problems.append(f"{path}: skipped, not a valid record ({why(exc)})")
    records.sort(key=lambda r: (r.created_at, r.record_id))
    return records, problems


# What reading a damaged or hostile JSON file can raise: OSError, ValueError (ValidationError, JSONDecodeError,
# UnicodeDecodeError, an integer too long to parse), RecursionError (nesting too deep).
UNREADABLE = (OSError, ValueError, RecursionError)


def why(exc: BaseException) -> str:
    """One line: why a file could not be read as what it should be; a schema error names its field."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, ValidationError):
        return first_error(exc)
    first = (str(exc).strip().splitlines() or [""])[0][:160]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def read_model(path: Path, model: type[M], max_bytes: int = MAX_RECORD_BYTES) -> M:
    """`path` validated as `model` (types and ranges); raises one of UNREADABLE."""
    if not path.is_file():  # a folder, a broken link, a pipe that would block the read
        raise ValueError("not a regular file")
    if path.stat().st_size > max_bytes:
        raise ValueError(f"larger than {max_bytes:,} bytes")
    return model.model_validate(json.loads(path.read_text(encoding="utf-8")))
