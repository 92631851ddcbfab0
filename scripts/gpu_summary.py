"""The GPU checks' summary table: the records written since START for METHOD (a prefix, e.g. bnb_ or awq)
on the full-size Qwen3.6-27B, with quantlab's weight estimate beside each.

    python scripts/gpu_summary.py OUTPUT_DIR START METHOD_PREFIX
"""

from __future__ import annotations

import sys

from quantlab.estimate.checks import scheme_for
from quantlab.estimate.estimator import weights_for
from quantlab.estimate.model import load_model
from quantlab.store import load_records


def gb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1e9:6.2f}"


def main(out: str, start: str, prefix: str) -> None:
    records = [r for r in load_records(out)[0] if r.created_at[:19] >= start and r.method.name.startswith(prefix)
               and r.model.name == "Qwen3.6-27B"]
    qwen = load_model("qwen3.6-27b")
    print(f"\n{'method':<26} {'context':>7} {'after load':>10} {'est.':>7} {'prefill pk':>10} {'decode pk':>10} "
          f"{'decode tok/s':>12}  hardware")
    for r in records:
        scheme = scheme_for(r)
        est = weights_for(qwen, scheme).bytes() if scheme else None
        res = r.result
        head = f"{r.method.label:<26} {r.point.context:>7} {gb(r.load_memory.allocated_end_bytes):>10} {gb(est):>7}"
        if res.status != "ok":
            print(f"{head}  {res.error}")
            continue
        print(f"{head} {gb(res.prefill_memory.allocated_peak_bytes):>10} {gb(res.decode_memory.allocated_peak_bytes):>10} "
              f"{res.decode_tokens_per_s.median:>12.1f}  {r.hardware.name}")
    for note in sorted({n for r in records for n in r.notes if "checkpoint written" in n or "no calibration" in n}):
        print("note:", note)
    print("GB = 1e9 bytes; VRAM = torch allocated; 'est.' = quantlab's weight estimate for the text model")


if __name__ == "__main__":
    main(*sys.argv[1:4])
