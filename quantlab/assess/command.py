"""`quantlab quality RECIPE`: quality only (no speed), printed as a table.

A recipe without a quality section gets the defaults: the stdlib held-out text, 4,096 tokens,
context 512, stride 256, paired mode, against the recipe's model unquantized.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from quantlab.errors import QuantlabError


def add_quality_parser(sub) -> None:
    p = sub.add_parser("quality", help="perplexity and KL divergence against the BF16 reference (no speed)")
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument("--output", help="folder for the stored-mode reference cache (default: the recipe's output.dir)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quality)


def cmd_quality(args: argparse.Namespace) -> int:
    from quantlab.console import silence_progress_bars
    from quantlab.quality.show import quality_table

    if args.json:
        check_json_target(Path(args.json))  # before the passes, not after them
    if args.no_progress:
        silence_progress_bars()
    result = run_quality(args.recipe, args.output, progress=not args.no_progress)
    print(quality_table(result))
    if args.json:
        path = Path(args.json)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(result.model_dump_json(indent=1) + "\n", encoding="utf-8")
        except OSError as exc:
            raise QuantlabError(f"--json {path}: cannot write it: {exc.strerror}") from None
        print(f"wrote {path}")
    return 0


def check_json_target(path: Path) -> None:
    """--json replaces a file only when it is a quality result quantlab wrote."""
    from quantlab.schema.quality import QualityResult

    if not (path.exists() or path.is_symlink()):
        return
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1 << 20:
            raise ValueError("not a quality result")
        QualityResult.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise QuantlabError(f"--json {path}: exists and is not a quality result quantlab wrote; "
                            "give a new file name") from None


def run_quality(recipe_path: str | Path, output_dir: str | Path | None = None, progress: bool = True, echo=print):
    from quantlab.plan import make_plan
    from quantlab.assess.session import QualitySession
    from quantlab.methods import method_for
    from quantlab.recipe import QualitySpec, load_recipe
    from quantlab.runtimes import RUNTIMES

    loaded = load_recipe(recipe_path)
    made = "gguf" if loaded.recipe.model.source == "gguf" else method_for(loaded.recipe.quantization).makes
    if made not in RUNTIMES["transformers"].loads:  # before any work: the passes below load through transformers
        raise QuantlabError(f"{recipe_path}: `quantlab quality` scores a model quantized in memory, and a GGUF is a "
                            "file llama.cpp's tools write; give the recipe a quality section and run `quantlab run` "
                            "on it (or `quantlab build`): the GGUF's quality is measured through llama.cpp there")
    if loaded.recipe.quality is None:
        loaded = dataclasses.replace(loaded, recipe=loaded.recipe.model_copy(update={"quality": QualitySpec()}))
    plan = make_plan(loaded)
    session = QualitySession(plan, output_dir, progress=progress, echo=echo)
    session.prepare()
    return session.evaluate(load_candidate(plan))


def load_candidate(plan):
    """The recipe's model, loaded and quantized as `quantlab run` does."""
    from quantlab.methods import method_for
    from quantlab.runtimes.transformers import load_model

    qconfig = plan.recipe.quantization
    method = method_for(qconfig)
    loaded = load_model(plan.source, plan.device, method.load_kwargs(qconfig, plan.source))
    return method.apply(loaded.model, qconfig)
