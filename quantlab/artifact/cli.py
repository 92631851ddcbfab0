"""The `quantlab build`, `verify` and `publish` subcommands."""

from __future__ import annotations

import argparse


def add_build_parsers(sub: argparse._SubParsersAction) -> None:
    build = sub.add_parser(
        "build", help="quantize, save, reload, check and measure: a build folder ready to share",
        description="Writes BUILD (default: builds/<recipe name>) atomically: quantized safetensors with their "
        "quantization_config, tokenizer and generation config, mtp.* tensors copied from the source, a model card, "
        "quantlab_build.json and SHA256SUMS. Records go to the recipe's output.dir, then the report is regenerated.",
    )
    build.add_argument("recipe", metavar="RECIPE")
    build.add_argument("--out", help="build folder (default: the recipe's build.out, else builds/<recipe name>)")
    build.add_argument("--force", action="store_true", help="replace an existing build folder")
    build.add_argument("--output", help="measurements folder (default: the recipe's output.dir)")
    build.add_argument("--no-measure", action="store_true", help="skip the measurement (the card then says so)")
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    build.set_defaults(func=_cmd_build)

    verify = sub.add_parser("verify", help="check a build: checksums, reload, the recorded greedy tokens")
    verify.add_argument("build", metavar="BUILD")
    verify.add_argument("--device", default="cpu", help="where to reload it (default: cpu)")
    verify.add_argument("--checksums-only", action="store_true", help="do not load the model")
    verify.set_defaults(func=_cmd_verify)

    publish = sub.add_parser("publish", help="upload a verified build to the Hugging Face Hub (only when asked)")
    publish.add_argument("build", metavar="BUILD")
    publish.add_argument("--repo-id", required=True, help="OWNER/NAME on the Hub")
    publish.add_argument("--private", action="store_true", help="create the repository as private")
    publish.add_argument("--dry-run", action="store_true", help="check and list the files; upload nothing")
    publish.set_defaults(func=_cmd_publish)


def _cmd_build(args) -> int:
    from quantlab.artifact.writer import build_recipe
    from quantlab.recipe import load_recipe
    from quantlab.report import write_report

    loaded = load_recipe(args.recipe)
    if args.no_progress:
        from quantlab.console import silence_progress_bars

        silence_progress_bars()
    result = build_recipe(loaded, args.out, force=args.force, output_dir=args.output, measure=not args.no_measure,
                          progress=not args.no_progress)
    output = args.output or loaded.recipe.output.dir
    if result.records and loaded.recipe.output.report:
        print(f"report: {write_report(output)}")
    return 0


def _cmd_verify(args) -> int:
    from transformers.utils import logging as hf_logging

    from quantlab.artifact.verify import verify_build

    hf_logging.disable_progress_bar()  # one load: its bar would only interleave with the checks
    result = verify_build(args.build, device=args.device, load=not args.checksums_only)
    print(f"{'ok' if result.ok else 'FAILED'}: {args.build}")
    return 0 if result.ok else 1


def _cmd_publish(args) -> int:
    from quantlab.artifact.publish import publish_build

    publish_build(args.build, args.repo_id, private=args.private, dry_run=args.dry_run)
    return 0
