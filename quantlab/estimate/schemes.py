"""The scheme table (quantlab/data/quant_schemes.yaml) and the bytes of one tensor under a scheme."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

import yaml

from quantlab.errors import QuantlabError

Unit = Literal["element", "block", "group", "row", "tensor"]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Part:
    """One stored tensor of a quantized weight: `bits` for every `per` unit (see the YAML header)."""

    tensor: str
    bits: int
    per: Unit
    size: int = 1

    def units(self, rows: int, row_length: int) -> int:
        n = rows * row_length
        return {
            "element": n,
            "block": math.ceil(n / self.size),
            "group": rows * math.ceil(row_length / self.size),
            "row": rows,
            "tensor": 1,
        }[self.per]

    def bytes(self, rows: int, row_length: int) -> int:
        return math.ceil(self.units(rows, row_length) * self.bits / 8)


@dataclass(frozen=True)
class Scheme:
    key: str  # the CLI name, e.g. "nf4"
    label: str  # the table label, e.g. "bnb nf4"
    method: str  # the recipe's quantization method, e.g. "bnb_4bit"
    source: str
    dtype: str | None = None  # `none` only: the dtype every tensor is stored in
    parts: tuple[Part, ...] = ()
    ggml_type: str | None = None  # GGUF only: the file type's default tensor type
    mix: str | None = None  # GGUF only: the per-tensor rule set, e.g. "q4_k_m"

    @property
    def is_gguf(self) -> bool:
        return self.ggml_type is not None

    def quantized_bytes(self, rows: int, row_length: int) -> int:
        """Bytes of one quantized [rows, row_length] tensor (not for GGUF: see gguf_mix)."""
        return sum(part.bytes(rows, row_length) for part in self.parts)


@cache
def scheme_table() -> tuple[dict[str, Scheme], dict[str, str]]:
    data = yaml.safe_load(resources.files("quantlab.data").joinpath("quant_schemes.yaml").read_text())
    schemes = {key: _scheme(key, entry) for key, entry in data["schemes"].items()}
    return schemes, dict(data.get("aliases", {}))


def _scheme(key: str, entry: dict) -> Scheme:
    parts = tuple(Part(**p) for p in entry.get("parts", ()))
    fields = {k: v for k, v in entry.items() if k != "parts"}
    return Scheme(key=key, parts=parts, **fields)


def scheme_names() -> list[str]:
    return list(scheme_table()[0])


def get_scheme(name: str) -> Scheme:
    schemes, aliases = scheme_table()
    key = aliases.get(name.lower(), name.lower())
    if key not in schemes:
        raise QuantlabError(f"unknown method '{name}': choose from {', '.join(schemes)} (or {', '.join(aliases)})")
    return schemes[key]


def parse_schemes(text: str) -> tuple[Scheme, ...]:
    """'bf16,nf4,q4_k_m' (or 'all') → schemes, in the order given, without repeats."""
    names = scheme_names() if text.strip().lower() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise QuantlabError("--methods: give at least one method, e.g. bf16,int8,nf4,q4_k_m")
    unique: dict[str, Scheme] = {}
    for name in names:
        scheme = get_scheme(name)
        unique.setdefault(scheme.key, scheme)
    return tuple(unique.values())
