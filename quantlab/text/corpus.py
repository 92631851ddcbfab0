"""Deterministic text corpus gathered from the installed Python standard library.

Every ``*.py`` file of the stdlib (tests, ``idlelib``, ``lib2to3`` and
``site-packages`` excluded) is assigned to exactly one split by a stable hash of
its relative path, so the splits are disjoint and identical across runs:

* ``train``       - hash buckets 0-7, used to train the bundled model
* ``heldout``     - bucket 8, used for perplexity / KL evaluation
* ``calibration`` - bucket 9, used for AWQ calibration
"""

from __future__ import annotations

import hashlib
import pathlib
import platform
import sysconfig

SPLITS = ("train", "heldout", "calibration")

_EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})
_FILE_SEPARATOR = "\n\n"


def stdlib_root() -> pathlib.Path:
    """Return the directory of the running interpreter's standard library."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def split_of(relpath: str) -> str:
    """Return the split a file belongs to, from a stable hash of its relative path."""
    bucket = hashlib.sha256(relpath.encode("utf-8")).digest()[0] % 10
    if bucket <= 7:
        return "train"
    return "heldout" if bucket == 8 else "calibration"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; expected one of {SPLITS}")


def _is_excluded(relpath: pathlib.PurePosixPath) -> bool:
    return any(part in _EXCLUDED_DIRS for part in relpath.parts[:-1])


def _read_utf8(path: pathlib.Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _split_sources(split: str) -> list[tuple[pathlib.Path, str]]:
    """Return ``(path, text)`` of the decodable files of ``split``, sorted by relative path."""
    _check_split(split)
    root = stdlib_root()
    candidates = []
    for path in root.rglob("*.py"):
        relpath = pathlib.PurePosixPath(path.relative_to(root).as_posix())
        if not _is_excluded(relpath) and split_of(str(relpath)) == split:
            candidates.append((str(relpath), path))
    candidates.sort()
    sources = ((path, _read_utf8(path)) for _, path in candidates)
    return [(path, text) for path, text in sources if text is not None]


def stdlib_files(split: str) -> list[pathlib.Path]:
    """Return the UTF-8 decodable stdlib ``*.py`` files of ``split``, sorted by relative path."""
    return [path for path, _ in _split_sources(split)]


def _join(texts: list[str], max_chars: int | None) -> str:
    text = _FILE_SEPARATOR.join(texts)
    return text if max_chars is None else text[:max_chars]


def stdlib_text(split: str, max_chars: int | None = None) -> str:
    """Concatenate the files of ``split`` (blank-line separated), truncated to ``max_chars``."""
    return _join([text for _, text in _split_sources(split)], max_chars)


def describe(split: str) -> dict:
    """Describe the text of ``split`` so that records can say which text was used."""
    texts = [text for _, text in _split_sources(split)]
    return {
        "source": "python-stdlib",
        "python": platform.python_version(),
        "split": split,
        "files": len(texts),
        "chars": len(_join(texts, None)),
    }
