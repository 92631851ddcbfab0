"""The one file a record measured (a GGUF, or a published checkpoint's shards), as data: what it is, byte for byte, and what llama.cpp plans for it.
So that two people who measured "the same Q4_K_M" can tell whether it was the same file. No torch."""

from __future__ import annotations

from quantlab.schema.bounds import AtLeastOne, Bytes, Count
from quantlab.schema.frozen import Frozen


class TypeShare(Frozen):
    """The tensors of one GGML type in the file."""

    tensors: AtLeastOne
    parameters: Count
    bytes: Bytes


class PlannedBuffers(Frozen):
    """llama-fit-params --fit-print at the record's context: llama.cpp's plan (nothing allocated), per device, its
    MiB (rounded down as it prints them) as bytes: model, context (KV + recurrent state), compute."""

    context: AtLeastOne
    kv_type: str
    slots: AtLeastOne
    devices: dict[str, dict[str, Bytes]]
    total: Bytes


class ModelFile(Frozen):
    format: str  # "GGUF", or a checkpoint format: "GPTQ", "AutoRound", "compressed-tensors"
    name: str  # the file's name (a checkpoint: its folder's)
    sha256: str
    sha256_of: str = "the file"  # a checkpoint: of its shards' sha256sum lines
    bytes: Bytes
    architecture: str
    model: str | None = None  # the model its header names (general.basename-size_label), e.g. Qwen3.6-27B
    file_type: str  # llama.cpp's name for general.file_type, e.g. Q4_K_M; a checkpoint: its format
    tensor_types: dict[str, TypeShare]  # GGML type (a checkpoint: stored dtype, packed elements) -> its tensors
    made_by: str  # "quantlab, this run" or what is known of someone else's file
    claimed_bytes: Bytes | None = None  # model.claimed_size: the size its publisher claims
    plan: PlannedBuffers | None = None
