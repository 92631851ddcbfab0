"""SHA256SUMS: one line per file of a build, in `sha256sum` format (`sha256sum -c SHA256SUMS` works)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from quantlab.build.manifest import CHECKSUMS_NAME

_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build_files(folder: Path) -> list[str]:
    """Every file of the build, relative, sorted; the checksum file itself excluded."""
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS_NAME
    )


def write_checksums(folder: Path) -> dict[str, str]:
    sums = {name: sha256_file(folder / name) for name in build_files(folder)}
    (folder / CHECKSUMS_NAME).write_text("".join(f"{h}  {name}\n" for name, h in sums.items()), encoding="utf-8")
    return sums


def read_checksums(folder: Path) -> dict[str, str]:
    path = folder / CHECKSUMS_NAME
    sums = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise ValueError(f"{path}:{n}: not a sha256sum line: {line[:80]!r}")
        sums[name.strip()] = digest.lower()
    return sums


def check_checksums(folder: Path) -> tuple[list[str], list[str]]:
    """(problems, good files). Problems: a missing checksum file, changed, missing or unlisted files."""
    if not (folder / CHECKSUMS_NAME).is_file():
        return [f"{folder}: no {CHECKSUMS_NAME}; not a complete quantlab build"], []
    try:
        expected = read_checksums(folder)
    except ValueError as exc:
        return [str(exc)], []
    problems, good = [], []
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name}: SHA256 mismatch (the file changed since the build)")
        else:
            good.append(name)
    problems += [f"{name}: not listed in {CHECKSUMS_NAME}" for name in build_files(folder) if name not in expected]
    return problems, good
