"""Is a published GGUF measured as quantlab's own build of it is? The same Q4_K_M twice: read as someone else's file
(recipes/published/gguf-q4_k_m.yaml, `model.source: gguf`) and built by quantlab from the bundled model
(recipes/bundled-gguf-q4_k_m-noimatrix.yaml), alternated A B A B in one process, with no quality pass and no records
written. Prints, per context, the decode tok/s of each run and two ratios: published ÷ own, medians (the difference the
source makes), and the fastest ÷ the slowest of quantlab's own runs (the run-to-run noise on this machine, the
yardstick for the first); and whether the two files were one file (sha256).

    make published-builds && make bench-published-gguf      # or: python scripts/bench_published_gguf.py [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PUBLISHED = REPO / "recipes" / "published" / "gguf-q4_k_m.yaml"
OWN = REPO / "recipes" / "bundled-gguf-q4_k_m-noimatrix.yaml"


def measured(recipe: Path, out: Path) -> dict[int, tuple[float, str]]:
    """context -> (decode tok/s median, the file's sha256), quality left out, nothing appended."""
    from dataclasses import replace

    from quantlab.recipe import load_recipe
    from quantlab.run import run_recipe

    loaded = load_recipe(recipe)
    loaded = replace(loaded, recipe=loaded.recipe.model_copy(update={"quality": None}))
    records = run_recipe(loaded, out, progress=False, echo=lambda _: None, append=False).records
    return {r.point.context: (r.result.decode_tokens_per_s.median, r.file.sha256) for r in records}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds (default 2)")
    args = parser.parse_args(argv)
    from quantlab.errors import QuantlabError

    if args.rounds < 2:
        parser.error("--rounds must be at least 2: the noise needs two runs of quantlab's build")
    published_file = REPO / "builds" / "published" / "gguf" / "bundled-Q4_K_M.gguf"
    if not published_file.is_file():
        print(f"error: {published_file.relative_to(REPO)} is missing: run `make published-builds` first", file=sys.stderr)
        return 2
    runs: dict[str, list[dict]] = {"published": [], "own": []}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-published-") as tmp:
            for round_ in range(args.rounds):
                for name, recipe in (("own", OWN), ("published", PUBLISHED)):
                    runs[name].append(measured(recipe, Path(tmp)))
                    print(f"round {round_ + 1}: {name} measured", flush=True)
    except QuantlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    same = {sha for run in runs["published"] + runs["own"] for _, sha in run.values()}
    print(f"\nfiles: {'one file, sha256 ' + next(iter(same))[:16] if len(same) == 1 else 'DIFFERENT files: ' + str(same)}")
    print("| context | own tok/s (runs) | published tok/s (runs) | published ÷ own (medians) | own: fastest ÷ slowest |")
    print("|--:|---|---|--:|--:|")
    for context in sorted(runs["own"][0]):
        own = [run[context][0] for run in runs["own"]]
        pub = [run[context][0] for run in runs["published"]]
        print(f"| {context:,} | {', '.join(f'{v:,.0f}' for v in own)} | {', '.join(f'{v:,.0f}' for v in pub)} | "
              f"{statistics.median(pub) / statistics.median(own):.3f} | {max(own) / min(own):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
