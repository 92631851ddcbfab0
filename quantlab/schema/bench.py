"""The shapes of the bench results the report reads beside the records: gguf-full-size.json (scripts/gguf_full_size.py)
and gguf-cpu-decode.json (scripts/bench_gguf_cpu_decode.py). Only the fields the report uses are checked, with their
ranges; the scripts may add others. A file of another shape is named in the report, and its section left out."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from quantlab.schema.bounds import MAX_BYTES, AtLeastOne, Bytes, Count, NonNegative, Positive, Share

NonZeroBytes = Annotated[int, Field(ge=1, lt=MAX_BYTES)]
# The two fits llama_plan_cells shows together.
FITS_PAIR = ("f16_without_token_embd", "q8_0_without_token_embd")


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class GgufSize(Open):
    type: str
    mtp: bool
    tensor_bytes: Bytes


class GgufAllocation(Open):
    type: str
    context: AtLeastOne
    kv_type: str
    slots: AtLeastOne
    total: Bytes


class GgufFullSize(Open):
    label: str
    llama_cpp: str
    sizes: list[GgufSize]
    published_gb: dict[str, NonNegative]
    allocations: list[GgufAllocation]
    fits_24gib: dict[str, Count] = {}

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
