"""The `quantlab` command: run, measure, validate, report, estimate."""

from __future__ import annotations

import argparse
import sys

from quantlab.console import keep_hf_cache_location, quiet_libraries, silence_progress_bars
from quantlab.errors import QuantlabError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    keep_hf_cache_location()
    quiet_libraries()
    try:
        _check_path_options(args)
        return args.func(args)
    except QuantlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system said no (a name too long, a permission, a full disk): one line
        print(f"error: {os_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: records already written are complete; nothing partial was kept", file=sys.stderr)
        return 130


PATH_OPTIONS = {"out": "--out", "output": "--output", "json": "--json", "plot": "--plot", "build": "BUILD"}


def _check_path_options(args: argparse.Namespace) -> None:
    """Every path option of every command held to a recipe path's rules, before the command starts: an empty path
    would mean the working folder or a default, and a newline would end up in a folder's name."""
    from quantlab.fields import path_option

    for dest, option in PATH_OPTIONS.items():
        value = getattr(args, dest, None)
        if isinstance(value, str):
            path_option(value, option)


def os_error_message(exc: OSError) -> str:
    from quantlab.strict_yaml import shorten

    what = exc.strerror or type(exc).__name__
    if exc.filename is None:
        return shorten(f"{type(exc).__name__}: {exc}")
    return f"{shorten(str(exc.filename))}: {what}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantlab", description="Measure what a quantized model really costs.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="plan, load, quantize, measure, record, then regenerate the report")
    _run_arguments(run)
    run.set_defaults(func=_cmd_run, report=True)

    measure = sub.add_parser("measure", help="like run, but leave the report alone")
    _run_arguments(measure)
    measure.set_defaults(func=_cmd_run, report=False)

    validate = sub.add_parser("validate", help="check recipes without loading any weights")
    validate.add_argument("recipes", nargs="+", metavar="RECIPE")
    validate.add_argument("--schema-only", action="store_true", help="skip the dry run on the meta device")
    validate.set_defaults(func=_cmd_validate)

    report = sub.add_parser("report", help="regenerate measurements/README.md from all records")
    report.add_argument("--output", default="measurements", help="measurements folder (default: measurements)")
    report.set_defaults(func=_cmd_report)

    from quantlab.estimate.cli import add_estimate_parser

    add_estimate_parser(sub)
    sub.choices["estimate"].set_defaults(func=_cmd_estimate)

    from quantlab.assess.command import add_quality_parser
    from quantlab.assess.sensitivity import add_sensitivity_parser

    add_quality_parser(sub)
    add_sensitivity_parser(sub)

    from quantlab.artifact.cli import add_build_parsers

    add_build_parsers(sub)
    return parser


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument("--output", help="measurements folder (default: the recipe's output.dir)")
    p.add_argument("--dry-run", action="store_true", help="validate and plan on the meta device, load nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _cmd_run(args) -> int:
    from quantlab.plan import make_plan
    from quantlab.recipe import load_recipe
    from quantlab.report import write_report
    from quantlab.run import describe_plan, run_recipe

    loaded = load_recipe(args.recipe)
    if args.dry_run:
        print(describe_plan(make_plan(loaded, records_to=args.output or loaded.recipe.output.dir)))
        print("dry run: nothing loaded, nothing measured")
        return 0
    if args.no_progress:
        silence_progress_bars()
    result = run_recipe(loaded, args.output, progress=not args.no_progress)
    output = args.output or loaded.recipe.output.dir
    print(f"wrote {len(result.paths)} record(s) to {output}/records/")
    if args.report and loaded.recipe.output.report:
        print(f"report: {write_report(output)}")
    return 0


def _cmd_validate(args) -> int:
    from quantlab.plan import make_plan
    from quantlab.recipe import load_recipe

    failed = 0
    for path in args.recipes:
        try:
            loaded = load_recipe(path)
            plan = None if args.schema_only else make_plan(loaded, for_this_machine=False)
            print(f"ok: {path}: {_plan_line(plan) if plan else 'schema ok'}")
            for line in plan.split.lines() if plan and plan.split else ():
                print(f"    {line}")
        except (QuantlabError, OSError) as exc:
            failed += 1
            # a recipe's error names its file; a plan's error is about the model: name the recipe before it
            message = os_error_message(exc) if isinstance(exc, OSError) else str(exc)
            print(f"invalid: {message if message.startswith(str(path)) else f'{path}: {message}'}", file=sys.stderr)
    return 1 if failed else 0


def _plan_line(plan) -> str:
    r = plan.recipe
    return (
        f"{plan.source.name} ({r.model.source}, {r.model.variant}), {plan.method_label}, "
        f"{plan.parameters:,} parameters, {len(plan.points)} point(s), "
        + (f"split across {', '.join(plan.split.devices)} (accelerate's device map):" if plan.split else
           f"device {r.model.device}" + (f", split across {r.model.gpus} GPUs (mapped on the machine)" if r.model.gpus else ""))
    )


def _cmd_estimate(args) -> int:
    """`quantlab estimate`, then the report regenerated from what it wrote."""
    from quantlab.estimate.cli import cmd_estimate
    from quantlab.report import write_report

    code = cmd_estimate(args)
    if code == 0 and not args.no_write and args.vllm_kv_gib is None:  # --vllm-kv-gib prints a figure, writes nothing
        print(f"report: {write_report(args.output)}")
    return code


def _cmd_report(args) -> int:
    from quantlab.report import write_report

    print(f"wrote {write_report(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
