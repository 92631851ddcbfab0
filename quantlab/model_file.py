"""The file a run measures, described for its records (quantlab/schema/model_file.py).

A GGUF: its sha256 and size, the mix of tensor types its header lists, and llama.cpp's own plan for it at each
measured context (llama-fit-params --fit-print: nothing is allocated, so it costs seconds even for a 17 GB file).
A checkpoint in a format quantlab did not write (GPTQ, AutoRound, compressed-tensors): its shards' sha256s and sizes,
and the dtypes they store."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from quantlab.checkpoint import header_tensors, read_config, shard_files
from quantlab.checksums import sha256_file
from quantlab.errors import QuantlabError
from quantlab.llamacpp import tools as llamacpp
from quantlab.llamacpp.full_size import fit_print
from quantlab.llamacpp.gguf_file import GgufHeader, header_file_type, header_model_name, read_header
from quantlab.schema.model_file import ModelFile, PlannedBuffers, TypeShare


def describe_gguf(path: Path, made_by: str, claimed_bytes: int | None, contexts: list[int], kv_type: str, slots: int,
                  echo: Callable[[str], None], progress: bool = False) -> tuple[dict[int, ModelFile], tuple[str, ...]]:
    """The file's description for each context's records, and notes (a plan llama.cpp could not make)."""
    header = read_header(path)
    echo(f"file: sha256 of {path.name} ({header.file_bytes / 2**20:,.1f} MiB)")
    described = ModelFile(format="GGUF", name=path.name, sha256=_sha256(path, progress), bytes=header.file_bytes,
                          architecture=header.architecture, model=header_model_name(header),
                          file_type=header_file_type(header),
                          tensor_types=type_mix(header), made_by=made_by, claimed_bytes=claimed_bytes)
    files, notes = {}, []
    for context in contexts:
        try:
            plan = planned_buffers(path, context, kv_type, slots)
        except QuantlabError as exc:
            notes.append(f"no llama.cpp plan in the records: {str(exc).splitlines()[0][:300]}")
            break
        files[context] = described.model_copy(update={"plan": plan})
    return {c: files.get(c, described) for c in contexts}, tuple(notes)


def describe_checkpoint(folder: Path, fmt: str, made_by: str, claimed_bytes: int | None,
                        echo: Callable[[str], None], progress: bool = False) -> ModelFile:
    """One sha256 for the weights: of the `sha256sum` lines of its shards (name-sorted), which `sha256sum *.safetensors
    | sha256sum` gives for a one-level folder; the shards' stored dtypes as the type mix."""
    shards = sorted(shard_files(folder), key=lambda p: p.name)
    echo(f"file: sha256 of {len(shards)} shard(s) of {folder.name}")
    lines = "".join(f"{_sha256(p, progress and p.stat().st_size > 256 << 20)}  {p.name}\n" for p in shards)
    shares: dict[str, list[int]] = {}
    for t in header_tensors(folder, shards).values():
        share = shares.setdefault(t.dtype, [0, 0, 0])
        share[0], share[1], share[2] = share[0] + 1, share[1] + math.prod(t.shape), share[2] + t.nbytes
    mix = {k: TypeShare(tensors=n, parameters=p, bytes=b) for k, (n, p, b) in sorted(shares.items(), key=lambda i: -i[1][2])}
    return ModelFile(format=fmt, name=folder.name, sha256=hashlib.sha256(lines.encode()).hexdigest(),
                     sha256_of=f"the sha256sum lines of its {len(shards)} safetensors shard(s)",
                     bytes=sum(p.stat().st_size for p in shards), architecture=_architecture(folder), file_type=fmt,
                     tensor_types=mix, made_by=made_by, claimed_bytes=claimed_bytes)


def _architecture(folder: Path) -> str:
    try:
        return str((read_config(folder).get("architectures") or ["unknown"])[0])
    except QuantlabError:
        return "unknown"


def _sha256(path: Path, progress: bool) -> str:
    """A 17 GB file takes a minute: a bar, in bytes, where the run shows progress."""
    if not progress:
        return sha256_file(path)
    digest = hashlib.sha256()
    with path.open("rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc="sha256") as bar:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def type_mix(header: GgufHeader) -> dict[str, TypeShare]:
    shares: dict[str, list[int]] = {}
    for t in header.tensors:
        share = shares.setdefault(t.type_name, [0, 0, 0])
        share[0], share[1], share[2] = share[0] + 1, share[1] + t.elements, share[2] + t.nbytes
    ordered = sorted(shares.items(), key=lambda item: -item[1][2])
    return {name: TypeShare(tensors=n, parameters=p, bytes=b) for name, (n, p, b) in ordered}


def planned_buffers(path: Path, context: int, kv_type: str, slots: int) -> PlannedBuffers:
    devices = fit_print(llamacpp.locate(), path, context, kv_type, slots)
    return PlannedBuffers(context=context, kv_type=kv_type, slots=slots, devices=devices,
                          total=sum(sum(row.values()) for row in devices.values()))
