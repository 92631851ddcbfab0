"""Sliding windows and the per-token math, chunk by chunk, with log-softmax in fp32.

Windows follow Hugging Face's perplexity guide: windows of `context` tokens start every `stride`
tokens, and each window scores only the tokens that the previous window did not score, so every
scored token has at least `context - stride` tokens of context (except in the first window). With
stride == context the windows do not overlap and a window's first token has nothing before it in the
window, so it is not scored.

A window's logits are only computed for the positions that score a token (`logits_to_keep`), and
they become fp32 log-probabilities one block of rows at a time (ROW_BUDGET_BYTES per block), so a
248,320-token vocabulary never needs the whole window's fp32 log-probabilities at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from quantlab.quality.noise import intervals

ROW_BUDGET_BYTES = 128 * 2**20  # one fp32 (rows, vocab) block: 135 rows at 248,320 tokens; a few such live at once


@dataclass(frozen=True)
class Window:
    begin: int  # first input token
    end: int  # one past the last input token
    first: int  # first scored (target) token; targets are first .. end-1

    @property
    def scored(self) -> int:
        return self.end - self.first

    @property
    def keep(self) -> int:
        """Logits to keep: the positions first-1 .. end-1 (the last one predicts past the window; dropped)."""
        return self.end - self.first + 1


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be between 1 and the context ({context}), got {stride}")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            windows.append(Window(begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def rows_per_block(vocab: int, budget: int = ROW_BUDGET_BYTES) -> int:
    return max(1, budget // (4 * vocab))


@torch.inference_mode()
def window_logits(model: torch.nn.Module, ids: torch.Tensor, window: Window, device: torch.device) -> torch.Tensor:
    """(scored, vocab) logits in the model's dtype: row i predicts token window.first + i."""
    inputs = ids[window.begin : window.end].unsqueeze(0).to(device)
    out = model(input_ids=inputs, use_cache=False, logits_to_keep=window.keep)
    return out.logits[0, :-1]


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


# Position buckets (tokens of context before the scored token, within its window): does the error grow with depth?
POSITION_EDGES = (0, 256, 512, 2048, 8192, 32768, 131072, 262144, 1_048_576)


@dataclass
class TokenStats:
    """Per-token figures, gathered window by window (float64 on the CPU: a few bytes per token), with each token's
    position in its window and the window it belongs to (for KL by depth and for bootstrap intervals)."""

    kl: list[torch.Tensor] = field(default_factory=list)
    nll_ref: list[torch.Tensor] = field(default_factory=list)
    nll_cand: list[torch.Tensor] = field(default_factory=list)
    agree: list[torch.Tensor] = field(default_factory=list)
    tail: list[torch.Tensor] = field(default_factory=list)  # stored mode: reference tail mass
    position: list[torch.Tensor] = field(default_factory=list)
    window: list[torch.Tensor] = field(default_factory=list)

    def add(self, kl, nll_ref, nll_cand, agree, tail=None, position=None, window: int = 0) -> None:
        self.kl.append(kl.double().cpu())
        self.nll_ref.append(nll_ref.double().cpu())
        self.nll_cand.append(nll_cand.double().cpu())
        self.agree.append(agree.cpu())
        if tail is not None:
            self.tail.append(tail.double().cpu())
        n = kl.numel()
        self.position.append(position.cpu() if position is not None else torch.full((n,), -1, dtype=torch.long))
        self.window.append(torch.full((n,), window, dtype=torch.long))

    def summary(self) -> dict:
        kl, nll_ref, nll_cand = torch.cat(self.kl), torch.cat(self.nll_ref), torch.cat(self.nll_cand)
        agree = torch.cat(self.agree)
        delta_p = torch.exp(-nll_cand) - torch.exp(-nll_ref)
        q50, q90, q99, q999 = np.quantile(kl.numpy(), [0.5, 0.9, 0.99, 0.999]).tolist()  # torch.quantile stops at 2**24
        ppl_ref, ppl_cand = math.exp(nll_ref.mean().item()), math.exp(nll_cand.mean().item())
        out = {
            "tokens": kl.numel(),
            "ppl_reference": ppl_ref,
            "ppl_candidate": ppl_cand,
            "ppl_ratio": ppl_cand / ppl_ref,
            "kl_mean": kl.mean().item(),
            "kl_median": q50,
            "kl_p90": q90,
            "kl_p99": q99,
            "kl_p999": q999,
            "kl_max": kl.max().item(),
            "top1_agreement": agree.double().mean().item(),
            "delta_p_mean": delta_p.mean().item(),
            "delta_p_rms": delta_p.square().mean().sqrt().item(),
        }
        if self.tail:
            out["reference_tail_mass_mean"] = torch.cat(self.tail).mean().item()
        out.update(self._depth_and_noise(kl, nll_ref, nll_cand))
        for name, point in (("kl_mean_ci", out["kl_mean"]), ("ppl_ratio_ci", out["ppl_ratio"])):
            out[name] = _around(out[name], point)
        return out

    def _depth_and_noise(self, kl, nll_ref, nll_cand) -> dict:
        position, window = torch.cat(self.position), torch.cat(self.window)
        sums = window_sums(kl, nll_ref, nll_cand, window)
        kl_ci, ratio_ci = intervals(sums.numpy())
        return {"kl_by_position": kl_by_position(kl, position) if bool((position >= 0).all()) else None,
                "kl_mean_ci": kl_ci, "ppl_ratio_ci": ratio_ci, "window_sums": sums.tolist()}


def _around(interval: list[float] | None, point: float) -> list[float] | None:
    """The bootstrap interval, widened to hold its own point: the point is summed in another precision and order,
    and a percentile interval of a ratio may miss it by a hair; a record holds low <= point <= high (schema)."""
    return None if interval is None else [min(interval[0], point), max(interval[1], point)]


def kl_by_position(kl: torch.Tensor, position: torch.Tensor) -> list[dict]:
    """KL mean per bucket of in-window position (POSITION_EDGES), for the buckets that have tokens."""
    rows = []
    for low, high in zip(POSITION_EDGES, POSITION_EDGES[1:]):
        mask = (position >= low) & (position < high)
        if bool(mask.any()):
            rows.append({"from": low, "to": high, "tokens": int(mask.sum()), "kl_mean": kl[mask].mean().item()})
    return rows


def window_sums(kl, nll_ref, nll_cand, window) -> torch.Tensor:
    """(windows, 4): per window, Σ KL, Σ NLL ref, Σ NLL cand and the token count: all a bootstrap needs."""
    n = int(window.max()) + 1 if window.numel() else 0
    sums = torch.zeros(n, 4, dtype=torch.float64)
    for column, values in enumerate((kl, nll_ref, nll_cand, torch.ones_like(kl))):
        sums[:, column].index_add_(0, window, values)
    return sums[sums[:, 3] > 0]


def paired_block(ref_logits: torch.Tensor, cand_logits: torch.Tensor, targets: torch.Tensor):
    """Exact per-token (KL, NLL ref, NLL cand, top-1 agreement) for a block of rows."""
    lp_ref, lp_cand = log_probs(ref_logits), log_probs(cand_logits)
    kl = _p_log_ratio(lp_ref, lp_cand).sum(-1).clamp_min(0.0)  # fp32 rounding can dip below 0
    t = targets.unsqueeze(-1)
    nll_ref, nll_cand = -lp_ref.gather(-1, t).squeeze(-1), -lp_cand.gather(-1, t).squeeze(-1)
    return kl, nll_ref, nll_cand, lp_ref.argmax(-1) == lp_cand.argmax(-1)


def reference_block(ref_logits: torch.Tensor, targets: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """What stored mode keeps of the reference, per token: top-k log-probs and ids, the correct
    token's log-prob, the argmax, and the log of the tail mass (everything outside the top-k)."""
    lp = log_probs(ref_logits)
    top_logp, top_ids = lp.topk(top_k, dim=-1)
    return {
        "top_logp": top_logp.contiguous(),
        "top_ids": top_ids.to(torch.int32).contiguous(),
        "target_logp": lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).contiguous(),
        "argmax": lp.argmax(-1).to(torch.int32).contiguous(),
        "tail_logmass": _logmass_outside(lp, top_ids),
        "targets": targets.to(torch.int32).contiguous(),
    }


def stored_block(ref: dict[str, torch.Tensor], cand_logits: torch.Tensor, targets: torch.Tensor):
    """Per-token (KL lower bound, NLL ref, NLL cand, agreement, ref tail mass) against stored reference rows.

    KL_k = Σ_{v∈top-k} P(v) (log P(v) − log Q(v)) + P(T) (log P(T) − log Q(T)), T = the tail; ≤ the exact KL.
    """
    lp = log_probs(cand_logits)
    top_ids = ref["top_ids"].long()
    p_logp, q_logp = ref["top_logp"], lp.gather(-1, top_ids)
    p_tail_log, q_tail_log = ref["tail_logmass"], _logmass_outside(lp, top_ids)
    p_tail = p_tail_log.exp()
    kl = (_p_log_ratio(p_logp, q_logp).sum(-1) + _p_log_ratio(p_tail_log, q_tail_log)).clamp_min(0.0)
    nll_cand = -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    agree = ref["argmax"].long() == lp.argmax(-1)
    return kl, -ref["target_logp"], nll_cand, agree, p_tail


def _p_log_ratio(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """p · (log p − log q), with 0 · log(0/q) = 0 (no NaN where the reference puts no mass)."""
    return torch.where(logp > float("-inf"), logp.exp() * (logp - logq), torch.zeros_like(logp))


def _logmass_outside(lp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log Σ_{v ∉ ids} exp(lp[v]) per row, computed directly (no 1 − Σ cancellation); −inf when empty."""
    masked = lp.scatter(-1, ids, float("-inf"))
    return torch.logsumexp(masked, dim=-1).contiguous()
