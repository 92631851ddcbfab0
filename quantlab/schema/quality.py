"""What a quality evaluation found, as records carry it (quantlab/quality/show.py shows it: reports, model cards,
the terminal).

Definitions (per scored token t, P = reference, Q = candidate, y = the true next token):
- KL_t = KL(P_t || Q_t) = Σ_v P_t(v) (log P_t(v) − log Q_t(v)), in nats;
- top-1 agreement: share of tokens where argmax P_t = argmax Q_t;
- Δp_t = Q_t(y) − P_t(y): the change in the probability of the correct token;
- perplexity = exp(mean_t −log P_t(y)), and the same for Q; ratio = candidate / reference.

In stored mode the KL is computed over the reference's top-k tokens plus one bucket for the rest
(the tail). Merging outcomes never increases a KL divergence (data-processing inequality), so that
figure is a lower bound on the exact KL: the gap is Σ_t P_t(tail) · KL(P_t(·|tail) || Q_t(·|tail)),
zero when the reference's tail mass is zero. Perplexity, top-1 agreement and Δp are exact in both modes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class QualityResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["paired", "stored"]
    kl_exact: bool  # False in stored mode: the KL figures are top-k + tail lower bounds
    top_k: int | None = None  # stored mode only
    candidate: str  # e.g. "quantlab-bundled RTN int4 g128 (simulated)"
    reference: str  # e.g. "quantlab-bundled BF16 (bundled, bfloat16)"
    reference_model: dict[str, Any]  # the reference's model spec
    text: dict[str, Any]  # which held-out text: corpus.describe(...) or path/dataset + sha256
    text_label: str
    text_tokens: int  # tokens of held-out text used
    tokens: int  # tokens scored
    context: int
    stride: int
    windows: int
    device: str
    ppl_reference: float
    ppl_candidate: float
    ppl_ratio: float
    kl_mean: float
    kl_median: float
    kl_p90: float
    kl_p99: float
    kl_max: float
    kl_p999: float | None = None  # llama-perplexity --kl-divergence prints it; absent in older records
    # 95% bootstrap intervals over windows (quality/metrics.py), and what they were computed from
    kl_mean_ci: tuple[float, float] | None = None
    ppl_ratio_ci: tuple[float, float] | None = None
    window_sums: list[list[float]] | None = None  # per window: Σ KL, Σ NLL ref, Σ NLL cand, tokens (paired tests)
    kl_by_position: list[dict[str, int | float]] | None = None  # KL mean per bucket of in-window position
    top1_agreement: float
    delta_p_mean: float
    delta_p_rms: float
    reference_tail_mass_mean: float | None = None  # stored mode: mean P(tail) under the reference
    reference_cache: str | None = None  # stored mode: the statistics folder
    reference_cache_reused: bool | None = None
    reference_seconds: float | None = None  # stored mode: the reference pass (None when the cache was reused)
    candidate_seconds: float  # paired mode: both models' passes
    notes: tuple[str, ...] = ()

    @property
    def kl_kind(self) -> str:
        return "exact" if self.kl_exact else f"lower bound: top-{self.top_k} + tail"
