"""Quality of a quantized model against its reference, as a library: perplexity, KL divergence, top-1 agreement,
Δp. The commands and sessions that load models and run it are quantlab/assess/; what a record carries is
quantlab/schema/quality.py (QualityResult).

Modules:
- `metrics.py`: sliding windows and the per-token math, chunk by chunk, in fp32;
- `noise.py`: bootstrap intervals, and whether two builds differ beyond the noise;
- `refstats.py`: stored mode's on-disk reference statistics (top-k log-probs + collapsed tail);
- `compare.py`: every build of a model side by side, for the report;
- `show.py`: a result as a report cell, model-card lines and terminal text.

Only `show` is imported here: the model card and the report need it, and it must stay free of torch.
"""

from quantlab.quality.show import quality_card_lines
from quantlab.schema.quality import QualityResult

__all__ = ["QualityResult", "quality_card_lines"]
