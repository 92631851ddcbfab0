"""The ranges a record's quality figures can take (quantlab.schema.quality.QualityResult holds their types): a KL
is never negative, a perplexity is at least 1, a 95% interval contains its point. Checked where a record is read
or made, so the report never draws a build from impossible numbers."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from quantlab.schema.bounds import AtLeastOne, Count, NonNegative, Positive, Share, check_interval, first_error

Perplexity = Annotated[float, Field(ge=1, allow_inf_nan=False)]  # exp(mean NLL), NLL >= 0
DeltaP = Annotated[float, Field(ge=-1, le=1, allow_inf_nan=False)]
WindowSums = Annotated[list[NonNegative], Field(min_length=4, max_length=4)]  # Σ KL, Σ NLL ref, Σ NLL cand, tokens


class DepthBucket(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    start: Count = Field(alias="from")
    to: AtLeastOne
    tokens: Count
    kl_mean: NonNegative


class QualityBounds(BaseModel):
    """The numeric fields of a QualityResult, with their ranges; its other fields are checked by its own types."""

    model_config = ConfigDict(extra="ignore")

    top_k: AtLeastOne | None = None
    text_tokens: AtLeastOne
    tokens: AtLeastOne
    context: AtLeastOne
    stride: AtLeastOne
    windows: AtLeastOne
    ppl_reference: Perplexity
    ppl_candidate: Perplexity
    ppl_ratio: Positive
    kl_mean: NonNegative
    kl_median: NonNegative
    kl_p90: NonNegative
    kl_p99: NonNegative
    kl_max: NonNegative
    kl_p999: NonNegative | None = None
    kl_mean_ci: tuple[NonNegative, NonNegative] | None = None
    ppl_ratio_ci: tuple[Positive, Positive] | None = None
    window_sums: list[WindowSums] | None = None
    kl_by_position: list[DepthBucket] | None = None
    top1_agreement: Share
    delta_p_mean: DeltaP
    delta_p_rms: Share
    reference_tail_mass_mean: Share | None = None
    reference_seconds: NonNegative | None = None
    candidate_seconds: NonNegative

    @model_validator(mode="after")
    def _intervals_contain_their_points(self) -> QualityBounds:
        if self.kl_mean_ci is not None:
            check_interval(*self.kl_mean_ci, self.kl_mean, "kl_mean_ci")
        if self.ppl_ratio_ci is not None:
            check_interval(*self.ppl_ratio_ci, self.ppl_ratio, "ppl_ratio_ci")
        for s in self.window_sums or ():
            if s[3] < 1:
                raise ValueError(f"window_sums: a window of {s[3]!r} tokens")
        return self


def quality_in_range(q):
    """An AfterValidator for Record.quality: the QualityResult itself, or ValueError naming the field."""
    try:
        QualityBounds.model_validate(q.model_dump())
    except ValidationError as exc:
        raise ValueError(first_error(exc)) from None
    return q
