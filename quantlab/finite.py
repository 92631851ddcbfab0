"""Non-finite weights (NaN, inf): found, counted and named, never measured as if they were fine.

A build refuses a source checkpoint that holds them (`checkpoint_nonfinite`, read tensor by tensor
from the shards) and a reloaded build whose weights hold them; a run measures the model as loaded,
and its records say so (`model_nonfinite`, on the device, in chunks so that the check needs no
more than a few megabytes beside the weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import torch

CHUNK = 1 << 24  # elements checked at a time: a bounded temporary, even for a 1.3-billion-entry embedding
SHOWN = 5


def count_nonfinite(tensor: torch.Tensor) -> int:
    """NaN and inf entries of a floating-point tensor (0 for other dtypes)."""
    if not tensor.is_floating_point() or tensor.device.type == "meta" or tensor.numel() == 0:
        return 0
    flat = tensor.detach().reshape(-1)
    bad = 0
    for start in range(0, flat.numel(), CHUNK):
        chunk = flat[start : start + CHUNK]
        if not bool(torch.isfinite(chunk).all()):
            bad += int((~torch.isfinite(chunk)).sum())
    return bad


def nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, int]]:
    return [(name, n) for name, t in named if (n := count_nonfinite(t))]


def model_nonfinite(model: torch.nn.Module) -> list[tuple[str, int]]:
    """Parameters and buffers of a loaded model, bitsandbytes' scales and absmax statistics included."""
    return nonfinite(_model_tensors(model))


def _model_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    seen: set[int] = set()
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        yield name, t
        scb = getattr(t, "SCB", None)
        if isinstance(scb, torch.Tensor):
            yield f"{name}.SCB", scb
        state = getattr(t, "quant_state", None)
        for label, holder in (("quant_state", state), ("quant_state.state2", getattr(state, "state2", None))):
            absmax = getattr(holder, "absmax", None)
            if isinstance(absmax, torch.Tensor):
                yield f"{name}.{label}.absmax", absmax


def checkpoint_nonfinite(folder: Path, progress: bool = False) -> list[tuple[str, int]]:
    """Every floating-point tensor of a checkpoint folder, read one at a time from its shards."""
    from tqdm.auto import tqdm

    from quantlab.quantize.awq.shards import ShardReader

    reader = ShardReader(folder)
    names = [n for n, t in sorted(reader.tensors.items()) if t.dtype in ("BF16", "F16", "F32", "F64")]
    found = []
    for name in tqdm(names, desc="checking weights for NaN/inf", unit="tensor", disable=not progress):
        bad = count_nonfinite(reader.get(name))
        if bad:
            found.append((name, bad))
    return found


def describe(found: list[tuple[str, int]]) -> str:
    """'2 tensor(s) hold NaN or inf: a (3 entries), b (1 entry)'."""
    shown = ", ".join(f"{name} ({n:,} entr{'y' if n == 1 else 'ies'})" for name, n in found[:SHOWN])
    more = f" and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
    return f"{len(found)} tensor(s) hold NaN or inf values: {shown}{more}"
