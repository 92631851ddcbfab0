"""What `quantlab build` and `quantlab verify` return, whatever the build's format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quantlab.schema.build import BuildManifest
    from quantlab.schema.record import Record


@dataclass(frozen=True)
class BuildResult:
    folder: Path
    manifest: BuildManifest | None  # None for a GGUF build (its quantlab_gguf_build.json)
    records: tuple[Record, ...]
    record_paths: tuple[Path, ...]
    disk_bytes: int


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    problems: tuple[str, ...]
    files_checked: int
    expected_tokens: tuple[int, ...] = ()
    tokens: tuple[int, ...] = ()
