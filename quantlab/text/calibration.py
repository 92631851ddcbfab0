"""Calibration text, shared by every method that calibrates (AWQ's scale and clip searches, llama.cpp's importance
matrix), as llm-compressor's one calibration loader serves every modifier: `CalibrationSpec` says which text and
how to cut it, and `calibration_samples` tokenizes it into `samples` windows of `seq_len` tokens.

Windows are drawn without overlap where the text is long enough (seeded), else with overlap; a
text shorter than one window is an error, raised while planning, before any weights load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator

from quantlab.errors import QuantlabError
from quantlab.fields import Seed
from quantlab.text.heldout import load_text
from quantlab.text.source import TextSourceSpec

MAX_CALIBRATION_TOKENS = 1 << 22  # 4,194,304 tokens: far above any calibration set, far below a memory problem


class CalibrationSpec(TextSourceSpec):
    """Calibration text, cut into `samples` windows of `seq_len` tokens drawn with `seed`.

    Default: the Python standard library's "calibration" split, gathered on this machine at run time
    (source code suits a coding model; nothing is downloaded or copied into the repository).
    """

    WHERE: ClassVar[str] = "quantization.calibration"
    DEFAULT_SPLIT: ClassVar[str] = "train"

    samples: int = Field(128, ge=1, le=100_000, description="calibration windows")
    seq_len: int = Field(512, ge=16, le=32_768, description="tokens per window")
    seed: Seed = Field(0, description="which windows are drawn")

    @model_validator(mode="after")
    def _fits_in_memory(self) -> "CalibrationSpec":
        tokens = self.samples * self.seq_len
        if tokens > MAX_CALIBRATION_TOKENS:  # the token ids alone are 8 bytes each, held at once
            raise ValueError(f"{self.WHERE}: samples × seq_len is {tokens:,} tokens; at most "
                             f"{MAX_CALIBRATION_TOKENS:,} (calibration sets are thousands to a few hundred thousand)")
        return self


@dataclass(frozen=True)
class Calibration:
    input_ids: torch.Tensor  # [samples, seq_len]
    description: dict[str, Any]
    label: str


def calibration_samples(spec: CalibrationSpec, tokenizer) -> Calibration:
    where = spec.WHERE
    if tokenizer is None:
        raise QuantlabError(f"{where}: the model has no tokenizer files, so calibration text cannot be tokenized")
    text = load_text(spec, where, "calibration", min_chars=spec.samples * spec.seq_len * 8)
    ids = tokenizer(text.text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if len(ids) < spec.seq_len:
        raise QuantlabError(
            f"{where}: {text.label} is {len(ids):,} tokens long, shorter than one sample "
            f"({where}.seq_len {spec.seq_len}); use a longer text or a shorter seq_len"
        )
    tokens = torch.tensor(ids, dtype=torch.long)
    starts = _window_starts(len(ids), spec.seq_len, spec.samples, spec.seed)
    windows = torch.stack([tokens[s:s + spec.seq_len] for s in starts])
    overlap = len(ids) < spec.samples * spec.seq_len
    description = {**text.description, "tokens": len(ids), "samples": spec.samples, "seq_len": spec.seq_len,
                   "seed": spec.seed, "overlapping": overlap}
    label = (f"{spec.samples} × {spec.seq_len} tokens from {text.label}"
             + (" (windows overlap: the text is shorter than samples × seq_len)" if overlap else ""))
    return Calibration(windows, description, label)


def _window_starts(length: int, seq_len: int, samples: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    slots = length // seq_len
    if slots >= samples:  # disjoint windows: a random choice of aligned slots
        return sorted(int(i) * seq_len for i in torch.randperm(slots, generator=generator)[:samples])
    return sorted(int(i) for i in torch.randint(0, length - seq_len + 1, (samples,), generator=generator))
