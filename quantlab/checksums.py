"""SHA256SUMS: one line per file of a build, in `sha256sum` format (`sha256sum -c SHA256SUMS` works)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from quantlab.schema.build import CHECKSUMS_NAME
from quantlab.checkpoint import inside
from quantlab.errors import QuantlabError

_CHUNK = 8 << 20
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
MAX_SUMS_BYTES = 16 << 20  # a build has tens of files; a checksum list of megabytes is not one


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build_files(folder: Path) -> list[str]:
    """Every file of the build, relative, sorted; the checksum file itself excluded. Symbolic links count
    as files here (so that verify names them), and are never followed out of the folder."""
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*")
        if (p.is_symlink() or p.is_file()) and p.name != CHECKSUMS_NAME
    )


def write_checksums(folder: Path) -> dict[str, str]:
    sums = {name: sha256_file(folder / name) for name in build_files(folder)}
    (folder / CHECKSUMS_NAME).write_text("".join(f"{h}  {name}\n" for name, h in sums.items()), encoding="utf-8")
    return sums


def read_checksums(folder: Path) -> dict[str, str]:
    """name -> sha256 from SHA256SUMS. ValueError for a line that is not a sha256sum line, a name given twice,
    or a name outside the build folder (absolute, or climbing out with '..')."""
    path = folder / CHECKSUMS_NAME
    try:
        if path.stat().st_size > MAX_SUMS_BYTES:
            raise ValueError(f"{path}: larger than {MAX_SUMS_BYTES:,} bytes; not a checksum list of a build")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it ({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
    sums = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition(" ")
        name = name[1:] if name[:1] in (" ", "*") else name  # sha256sum's text ("  ") and binary (" *") modes
        if not sep or not _HEX64.fullmatch(digest) or not name.strip():
            raise ValueError(f"{path}:{n}: not a sha256sum line: {line[:80]!r}")
        name = name.strip()
        try:
            inside(folder, name, f"{path}:{n}")
        except QuantlabError as exc:
            raise ValueError(str(exc)) from None
        if name in sums:
            raise ValueError(f"{path}:{n}: {name!r} is listed twice")
        sums[name] = digest.lower()
    return sums


def check_checksums(folder: Path) -> tuple[list[str], list[str]]:
    """(problems, good files). Problems: a missing checksum file, changed, missing or unlisted files, and
    files that are symbolic links or lead out of the folder."""
    if (folder / CHECKSUMS_NAME).is_symlink():
        return [f"{CHECKSUMS_NAME}: a symbolic link; a build holds regular files only"], []
    if not (folder / CHECKSUMS_NAME).is_file():
        return [f"{folder}: no {CHECKSUMS_NAME}; not a complete quantlab build"], []
    try:
        expected = read_checksums(folder)
    except ValueError as exc:
        return [str(exc)], []
    problems, good = [], []
    root = folder.resolve()
    for name, digest in expected.items():
        path = folder / name
        if path.is_symlink():
            problems.append(f"{name}: a symbolic link; a build holds regular files only")
        elif path.exists() and not path.is_file():
            problems.append(f"{name}: not a regular file (a folder, a pipe or a device); a build holds regular files")
        elif not path.is_file():
            problems.append(f"{name}: missing")
        elif root not in path.resolve().parents:
            problems.append(f"{name}: outside the build folder")
        else:
            try:
                matches = sha256_file(path) == digest
            except OSError as exc:
                problems.append(f"{name}: cannot read it ({exc.strerror})")
                continue
            if matches:
                good.append(name)
            else:
                problems.append(f"{name}: SHA256 mismatch (the file changed since the build)")
    problems += [f"{name}: not listed in {CHECKSUMS_NAME}" for name in build_files(folder) if name not in expected]
    return problems, good
