"""Quality of a quantized model against its reference: perplexity, KL divergence, top-1 agreement, Δp.

Modules:
- `result.py`: QualityResult (what records carry), `quality_card_lines` (model cards), the terminal table;
- `text.py`: the held-out text (stdlib default, a file, a folder, or a Hub dataset) and its description;
- `metrics.py`: sliding windows and the per-token math, chunk by chunk, in fp32;
- `refstats.py`: stored mode's on-disk reference statistics (top-k log-probs + collapsed tail);
- `checks.py`: the cross-field checks the plan runs before any weights load;
- `session.py`: one quality evaluation (paired or stored), as `quantlab run` and `quantlab quality` use it.

Only `result` is imported here: records.py needs it, and it must stay free of torch-heavy imports.
"""

from quantlab.schema.quality import QualityResult, quality_card_lines

__all__ = ["QualityResult", "quality_card_lines"]
