"""AWQ's two searches on one decoder layer's captured activations (Lin et al., 2023; AutoAWQ's rules).

- Scales: for s = x_mean^a / w_mean^(1-a), a on a grid in [0, 1), quantize W·s and divide by s;
  keep the s whose `inspect` output is closest (MSE) to the float output.
- Clipping: per output row and group, the range kept, shrunk on a grid down to half; keep the one
  whose Linear output on a sample of tokens is closest. AutoAWQ clips at ±max, which for
  zero-point quantization moves only one end of the range; shrinking [min, max] moves both.
Both compare in float32 on the layer's device, one chunk of samples at a time: the reference outputs are kept
in the layer's dtype (they are computed in it, so nothing is lost) and each candidate's outputs are compared
chunk by chunk as they are made, not all held at once. With this (AutoAWQ's "duo") formula a = 0 gives
s = 1/w_mean, not 1, so s = 1 (plain rounding) is tried first as one more candidate: the search
then never does worse than round-to-nearest on the loss it measures.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from quantlab.quantize.groupwise import row_step, fake_quantize, fake_quantize_scaled

GRID = 20
CLIP_MAX_SHRINK = 0.5
CLIP_TOKENS = 4096
CLIP_CHUNK_BYTES = 256 << 20


def input_channel_mean(inputs: list[torch.Tensor]) -> torch.Tensor:
    total, count = None, 0
    for x in inputs:
        flat = x.reshape(-1, x.shape[-1]).float().abs()
        part = flat.sum(0)
        total = part if total is None else total + part
        count += flat.shape[0]
    return total / count


def weight_channel_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Per input channel: the mean over output rows of |w| / the group's max |w|."""
    total, rows = None, 0
    for w in weights:
        step = row_step(w)
        for i in range(0, w.shape[0], step):
            grouped = w[i:i + step].float().abs().reshape(-1, group_size)
            normalised = (grouped / (grouped.amax(dim=1, keepdim=True) + 1e-6)).reshape(-1, w.shape[1])
            part = normalised.sum(0)
            total = part if total is None else total + part
            rows += normalised.shape[0]
    return total / rows


@torch.no_grad()
def search_scales(
    linears: list[torch.nn.Linear],
    inputs: list[torch.Tensor],
    run: Callable[[], Iterable[torch.Tensor]],
    bits: int,
    group_size: int,
    zero_point: bool,
    grid: int = GRID,
) -> tuple[torch.Tensor, float]:
    """The best per-input-channel scales for `linears` (which share their input) and the relative loss.

    `run()` replays the inspected computation and yields its outputs (one tensor per chunk of samples).
    The Linears' weights are restored before returning.
    """
    originals = [fc.weight.data for fc in linears]  # kept aside: candidates go to separate buffers
    x_mean = input_channel_mean(inputs).to(originals[0].device)
    w_mean = weight_channel_mean(originals, group_size)
    reference = list(run())
    norm = sum(float(r.float().pow(2).sum()) for r in reference) or 1.0
    best, best_loss = None, float("inf")
    buffers = [torch.empty_like(w) for w in originals]
    try:
        for scales in _candidates(x_mean, w_mean, grid):
            for fc, w, buffer in zip(linears, originals, buffers):
                fc.weight.data = fake_quantize_scaled(w, scales, bits, group_size, zero_point, out=buffer)
            loss = sum(float((out.float() - ref.float()).pow(2).sum()) for out, ref in zip(run(), reference))
            if loss < best_loss:
                best, best_loss = scales.clone(), loss
    finally:
        for fc, w in zip(linears, originals):
            fc.weight.data = w
    return best, best_loss / norm


def _candidates(x_mean: torch.Tensor, w_mean: torch.Tensor, grid: int = GRID):
    yield torch.ones_like(x_mean)
    for step in range(grid):
        ratio = step / grid
        scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        yield scales / (scales.max() * scales.min()).sqrt()


@torch.no_grad()
def search_clip(weight: torch.Tensor, inputs: list[torch.Tensor], bits: int, group_size: int, zero_point: bool,
                grid: int = GRID) -> torch.Tensor:
    """The best shrink factors per (output row, group), [out, in / group_size, 2]: the lower and upper
    end of the group's range [min, max] (symmetric: one factor on [-absmax, absmax]) are multiplied by
    them before rounding. Each group's partial output on a sample of tokens is what is compared."""
    out_features, in_features = weight.shape
    groups = in_features // group_size
    x = _every_nth_row([t.reshape(-1, in_features) for t in inputs], CLIP_TOKENS).float()
    x = x.reshape(-1, groups, group_size).transpose(0, 1)  # [groups, tokens, group_size]
    steps = [1 - i / grid for i in range(max(1, int(CLIP_MAX_SHRINK * grid)))]
    pairs = [(a, b) for a in steps for b in steps] if zero_point else [(a, a) for a in steps]
    rows = max(1, min(out_features, CLIP_CHUNK_BYTES // (x.shape[1] * groups * 4), row_step(weight)))
    best_all = []
    for start in range(0, out_features, rows):
        chunk = weight[start:start + rows].float().reshape(-1, groups, group_size)
        low, high = _range(chunk, zero_point)
        reference = _group_outputs(x, chunk)
        best = torch.ones(*low.shape[:2], 2, device=weight.device)
        min_err = torch.full(low.shape[:2], float("inf"), device=weight.device)
        for low_factor, high_factor in pairs:
            clipped = torch.clamp(chunk, low * low_factor, high * high_factor)
            q = fake_quantize(clipped.reshape(-1, in_features), bits, group_size, zero_point).reshape(chunk.shape)
            err = (_group_outputs(x, q) - reference).pow(2).mean(dim=1).t()  # [rows, groups]
            better = err < min_err
            min_err[better] = err[better]
            best[better] = torch.tensor([low_factor, high_factor], device=weight.device)
        best_all.append(best)
    return torch.cat(best_all)


def _every_nth_row(chunks: list[torch.Tensor], about: int) -> torch.Tensor:
    """torch.cat(chunks)[::step], step = total rows // about, without concatenating all the rows first (the
    inputs of a 27B's down_proj at 64 x 512 tokens are 1.1 GB)."""
    total = sum(c.shape[0] for c in chunks)
    step = max(1, total // about)
    picked, offset = [], 0
    for chunk in chunks:
        first = (-offset) % step  # the first global multiple of step inside this chunk
        picked.append(chunk[first::step])
        offset += chunk.shape[0]
    return torch.cat(picked)


def _group_outputs(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Each group's partial output: x [groups, tokens, g], w [rows, groups, g] -> [groups, tokens, rows]."""
    return torch.bmm(x, w.permute(1, 2, 0))


def _range(w: torch.Tensor, zero_point: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if zero_point:
        return w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    absmax = w.abs().amax(dim=-1, keepdim=True)
    return -absmax, absmax


def apply_clip(linear: torch.nn.Linear, factor: torch.Tensor, group_size: int, zero_point: bool) -> None:
    out_features, in_features = linear.weight.shape
    w = linear.weight.data.float().reshape(out_features, in_features // group_size, group_size)
    low, high = _range(w, zero_point)
    clipped = torch.clamp(w, low * factor[..., :1], high * factor[..., 1:])
    linear.weight.data = clipped.reshape(out_features, in_features).to(linear.weight.dtype)
