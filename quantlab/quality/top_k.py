"""Quality of a candidate that gives only its top-k log-probabilities per position (a server: vLLM's prompt
log-probs), against a reference known in full (paired mode) or by its stored top-k (stored mode).

The KL is a lower bound, by coarse-graining (the log-sum inequality): the vocabulary is cut into cells where both
distributions are known, the candidate's top-k tokens that the reference also has, and the prompt's own token,
plus one cell for everything else, whose mass each side knows as 1 minus the rest:

    KL_k = Σ_{v ∈ K} P(v) (log P(v) − log Q(v)) + P(R) (log P(R) − log Q(R)),  R = the rest;  KL_k ≤ KL.

The candidate's NLL of the prompt token is exact (vLLM returns the prompt token's own log-probability), and so are
the perplexity ratio and Δp; top-1 agreement compares the reference's argmax with the candidate's rank-1 token.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

TINY = 1e-12  # a cell's mass is never taken as exactly 0 (rounding in 1 − Σ)


@dataclass(frozen=True)
class TopKRows:
    """A candidate's top-k per scored position, sorted by log-prob (ids, logp: (n, k)), and its log-prob of each
    position's target token (n,)."""

    ids: torch.Tensor
    logp: torch.Tensor
    target_logp: torch.Tensor


class TopKScorer(ABC):
    """What a runtime gives quality instead of a model, when all it returns is top-k log-probabilities."""

    top_k: int
    label: str  # for the result's notes: who gave the log-probs, e.g. "vLLM prompt log-probs"

    @abstractmethod
    def score(self, ids: torch.Tensor) -> TopKRows:
        """Rows for positions 1..n-1 of `ids` (1-D): each the candidate's prediction of the token at it."""


def reference_log_probs_at(ref: dict[str, torch.Tensor] | torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The reference's log-probs of `ids` (n, k): from full log-probs (n, V), or from stored top-k rows, where a
    token outside the stored top-k is unknown (NaN)."""
    if isinstance(ref, torch.Tensor):
        return ref.gather(-1, ids)
    match = ref["top_ids"].long().unsqueeze(-1) == ids.unsqueeze(-2)  # (n, K_ref, k)
    found = match.any(-2)
    values = (ref["top_logp"].unsqueeze(-1) * match).sum(-2)
    return torch.where(found, values, torch.full_like(values, float("nan")))


def top_k_block(ref_at_cand: torch.Tensor, ref_target_logp: torch.Tensor, ref_argmax: torch.Tensor,
                cand: TopKRows, targets: torch.Tensor):
    """Per-token (KL lower bound, NLL ref, NLL cand, top-1 agreement) for rows of a top-k candidate."""
    known = ~torch.isnan(ref_at_cand) & (cand.ids != targets.unsqueeze(-1))  # the target gets a cell of its own
    p = torch.where(known, ref_at_cand, torch.full_like(ref_at_cand, float("-inf"))).double()
    q = torch.where(known, cand.logp, torch.full_like(cand.logp, float("-inf"))).double()
    p_cells = torch.cat([p, ref_target_logp.double().unsqueeze(-1)], -1)
    q_cells = torch.cat([q, cand.target_logp.double().unsqueeze(-1)], -1)
    p_rest = (1 - p_cells.exp().sum(-1)).clamp_min(TINY)
    q_rest = (1 - q_cells.exp().sum(-1)).clamp_min(TINY)
    kl = (_p_log_ratio(p_cells, q_cells).sum(-1) + p_rest * (p_rest.log() - q_rest.log())).clamp_min(0.0)
    return kl, -ref_target_logp, -cand.target_logp, ref_argmax.long() == cand.ids[:, 0]


def _p_log_ratio(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    return torch.where(logp > float("-inf"), logp.exp() * (logp - logq), torch.zeros_like(logp))
