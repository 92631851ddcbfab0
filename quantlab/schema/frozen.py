"""The base of every schema class: immutable once made, and unknown fields refused (a record from a newer
quantlab, or a hand-edited one, is reported instead of silently half-read)."""

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
