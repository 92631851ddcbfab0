"""Give a model salient activation channels without changing its function (quantlab/salient.py), to show what AWQ
is for and to stress-test any quantization method.

    .venv/bin/python scripts/make_salient_model.py [--source quantlab/bundled/model] [--out build/bundled-salient]
                                                   [--channels 4] [--factor 32] [--seed 0]

Recipes need not run this: `model: {source: bundled, transform: {salient: {channels: 4, factor: 32, seed: 0}}}` (as in
recipes/bundled-salient-awq.yaml and recipes/bundled-salient-rtn4.yaml) makes the same files on first use and caches
them (quantlab/made_sources.py). This writes them to a folder of your choice, e.g. to read with `source: local`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantlab.salient import write_salient_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=str(ROOT / "quantlab" / "bundled" / "model"))
    p.add_argument("--out", default=str(ROOT / "build" / "bundled-salient"))
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--factor", type=float, default=32.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    done = write_salient_model(Path(args.source), Path(args.out), args.channels, args.factor, args.seed)
    print(f"wrote {args.out}: channels {list(done.channels)} × {done.factor:g} in {done.norms} norms, "
          f"{done.linears} Linears' input columns ÷ {done.factor:g}")


if __name__ == "__main__":
    main()
