"""The shapes of the bench results the report reads beside the records: gguf-full-size.json (scripts/gguf_full_size.py
writes it through `GgufFullSize`) and gguf-cpu-decode.json (scripts/bench_gguf_cpu_decode.py). The fields the report
uses are required, with their ranges; the others a bench writes are declared where one writes through the class (in
the order it writes them), and any more are kept as they are. A file of another shape is named in the report, and its
section left out."""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from quantlab.schema.bounds import MAX_BYTES, AtLeastOne, Bytes, Count, NonNegative, Positive, Share

GGUF_FULL_SIZE_NAME = "gguf-full-size.json"
GGUF_CPU_DECODE_NAME = "gguf-cpu-decode.json"
NonZeroBytes = Annotated[int, Field(ge=1, lt=MAX_BYTES)]
# The two fits llama_plan_cells shows together.
FITS_PAIR = ("f16_without_token_embd", "q8_0_without_token_embd")


class Open(BaseModel):
    """Immutable once read, like every schema class; fields it does not declare are kept (a bench may add some)."""
    model_config = ConfigDict(extra="allow", frozen=True)

    def json_text(self) -> str:
        """The file as a bench writes it: the fields it was given, in the class's order, then any others."""
        return json.dumps(self.model_dump(mode="json", exclude_unset=True), indent=2) + "\n"


class GgufSize(Open):
    type: str
    mtp: bool
    dry_run_bytes: Bytes | None = None  # llama-quantize --dry-run's total
    tensor_bytes: Bytes
    file_bytes: Bytes | None = None
    header_bytes: Bytes | None = None
    parameters_by_type: dict[str, Count] | None = None
    block_count: Count | None = None


class GgufAllocation(Open):
    type: str
    context: AtLeastOne
    kv_type: str
    slots: AtLeastOne
    model_bytes: Bytes | None = None  # llama-fit-params --fit-print's buffers (its MiB, as bytes)
    context_bytes: Bytes | None = None
    compute_bytes: Bytes | None = None
    total: Bytes


class GgufFullSize(Open):
    label: str
    created_at: str | None = None
    llama_cpp: str
    quantlab_commit: str | None = None
    model: str | None = None
    weights: str | None = None
    seconds: NonNegative | None = None
    sizes: list[GgufSize]
    published_gb: dict[str, NonNegative]
    allocations: list[GgufAllocation]
    fits_24gib: dict[str, Count] = {}
    token_embd_bytes_q4_k_m: Bytes | None = None

    @model_validator(mode="after")
    def _sizes_with_and_without_mtp(self) -> GgufFullSize:
        have = {(s.type, s.mtp) for s in self.sizes}
        for kind in sorted({s.type for s in self.sizes} | set(self.published_gb)):
            if (kind, True) not in have or (kind, False) not in have:
                raise ValueError(f"sizes: {kind} needs a size with MTP and one without")
        if any(key in self.fits_24gib for key in FITS_PAIR) and not all(key in self.fits_24gib for key in FITS_PAIR):
            raise ValueError(f"fits_24gib: needs both {' and '.join(FITS_PAIR)}")
        return self


class CpuDecodeChecks(Open):
    mapped_resident_start: Share | None = None
    mapped_resident_end: Share | None = None
    decode_major_faults: Count | None = None
    bandwidth_major_faults: Count | None = None


class GgufCpuDecode(Open):
    label: str
    cpu: str
    threads: AtLeastOne
    llama_cpp: str
    cpu_code: str | None = None
    created_at: str
    decode_tokens_per_s: Positive
    decode_stddev: NonNegative
    bytes_read_per_token: NonZeroBytes
    read_bandwidth_gb_s: Positive
    bandwidth_method: str | None = None
    samples_tokens_per_s: list[Positive] | None = None
    bandwidth_before_gb_s: list[Positive] | None = None
    bandwidth_after_gb_s: list[Positive] | None = None
    checks: CpuDecodeChecks | None = None
