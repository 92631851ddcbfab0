"""`quantlab sensitivity RECIPE`: which tensor classes to keep at higher precision, measured, not guessed.

Each tensor class (quantlab.architecture.TENSOR_CLASSES: DeltaNet in_proj_qkv, in_proj_z, in_proj_a/b, out_proj;
attention q, k, v, o; MLP gate, up, down; lm_head; embeddings) is quantized alone, the rest left unquantized, and
scored against the reference on the same windows: the KL each class adds, beside the bytes its quantization
saves. Then a mixed recipe: the classes with the most KL per byte saved are kept higher while the weights stay
within `--budget-gb`, and (unless --no-check) that build is made and scored beside the uniform ones.

A recipe's method is swept when it declares the option naming its higher levels (Method.sensitivity_option);
SWEEPS below holds each such method's backend:
- RTN recipes (assess/sensitivity_rtn.py): candidates are quantized copies of the loaded model; bytes are counted
  as the RTN checkpoint would store them, bits per weight plus an fp16 scale and zero per group.
- GGUF recipes (assess/sensitivity_gguf.py): llama-quantize writes one file per class; bytes come from the files.

This module is the command: its options, their checks before any work, and the run. The rest is one job a module:
sensitivity_sweep.py scores a backend's candidates, sensitivity_select.py chooses the classes within the budget,
sensitivity_table.py, sensitivity_plot.py and sensitivity_recipe.py write what comes out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from quantlab.assess.sensitivity_plot import render_png
from quantlab.assess.sensitivity_recipe import write_mixed_recipe
from quantlab.assess.sensitivity_select import check_budget, choose
from quantlab.assess.sensitivity_sweep import evaluate_checks, sweep_effects
from quantlab.assess.sensitivity_table import check_lines, gb, table
from quantlab.errors import QuantlabError

MAX_BUDGET_GB = 100_000  # far above any model's weights


def add_sensitivity_parser(sub) -> None:
    p = sub.add_parser("sensitivity", help="the KL each tensor class adds when quantized alone, and a mixed recipe")
    p.add_argument("recipe", metavar="RECIPE", help="an RTN or GGUF recipe (quantization.method rtn or gguf) with a "
                   "quality section")
    p.add_argument("--budget-gb", type=float, help="weights budget of the suggested mixed build (default: RTN, the "
                   "uniform build at group size 32; GGUF, the uniform build of the next type up, e.g. Q5_K_M for Q4_K_M)")
    p.add_argument("--high-bits", type=int, choices=(8, 16), help="RTN: bits of the classes kept higher (8)")
    p.add_argument("--high-types", help="GGUF: the tensor types a class may be raised to, comma-separated, each "
                   "measured per class (default: those of Q5_K, Q6_K, Q8_0 above the recipe's type)")
    p.add_argument("--out", help="where the suggested recipe goes (default: RECIPE's folder, NAME-mixed.yaml)")
    p.add_argument("--plot", help="a PNG of KL added per GB saved (needs matplotlib)")
    p.add_argument("--no-check", action="store_true", help="do not build and score the suggested mixed build beside "
                   "the uniform ones")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sensitivity)


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from quantlab.console import silence_progress_bars
    from quantlab.methods import method_for
    from quantlab.plan import make_plan
    from quantlab.recipe import load_recipe

    if args.no_progress:
        silence_progress_bars()
    loaded = load_recipe(args.recipe)
    recipe = loaded.recipe
    method = method_for(recipe.quantization)
    if method.sensitivity_option is None or recipe.quality is None:
        raise QuantlabError(f"{args.recipe}: sensitivity needs an RTN or GGUF recipe (quantization.method rtn or "
                            "gguf) with a quality section; AWQ and bitsandbytes recipes keep classes unquantized with "
                            "quantization.skip_classes")
    out = Path(args.out) if args.out else loaded.path.with_name(f"{recipe.name}-mixed.yaml")
    _check_options(args, out, method)
    plan = make_plan(loaded)
    if recipe.quantization.overrides:
        print("note: the recipe's quantization.overrides are not used: every class is measured from the uniform "
              "build, and the suggested recipe replaces them")
    return SWEEPS[method.name](args, loaded, plan, out)


def _check_options(args: argparse.Namespace, out: Path, method) -> None:
    """Before any work: the files the command writes, the budget, and no other method's level option."""
    from quantlab.methods import METHODS

    _check_new_file(out, "the suggested recipe", "--out")
    if args.plot:
        if Path(args.plot).resolve() == out.resolve():
            raise QuantlabError(f"--plot {args.plot}: the same file as the suggested recipe ({out}); give each its own")
        _check_new_file(Path(args.plot), "the plot", "--plot")
    if args.budget_gb is not None and not 0 < args.budget_gb <= MAX_BUDGET_GB:  # NaN and inf fail here too
        raise QuantlabError(f"--budget-gb {args.budget_gb}: a size in GB, above 0 and at most {MAX_BUDGET_GB:,}")
    for other in METHODS.values():
        flag = other.sensitivity_option
        if flag and flag != method.sensitivity_option and getattr(args, flag[2:].replace("-", "_")) is not None:
            raise QuantlabError(f"{flag}: not for a {method.name} recipe; {method.sensitivity_option} is its option")


def _check_new_file(path: Path, what: str, option: str) -> None:
    """Before any work: a new file in an existing folder (quantlab replaces nothing it did not make)."""
    if path.exists() or path.is_symlink():
        raise QuantlabError(f"{path}: already exists, and quantlab replaces nothing it did not make; give {option} "
                            f"a new file for {what}")
    if not path.parent.is_dir():
        raise QuantlabError(f"{path}: its folder {path.parent} does not exist")
    import tempfile

    try:  # a folder that takes no new file fails here, not after the sweep
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".quantlab-probe-"):
            pass
    except OSError as exc:
        raise QuantlabError(f"{path}: cannot write in {path.parent} ({exc.strerror}); give {option} a file in a "
                            "folder you can write") from None


def _rtn(args, loaded, plan, out: Path) -> int:
    from quantlab.assess.sensitivity_rtn import RtnSweep
    from quantlab.assess.session import QualitySession
    from quantlab.runtimes.transformers import load_model

    qconfig = plan.recipe.quantization
    sweep = RtnSweep(plan.source.meta, qconfig, high_bits=args.high_bits or 8)  # meta: the budget is checked before any load
    budget = args.budget_gb * 1e9 if args.budget_gb else sweep.default_budget()
    check_budget(budget, sweep.uniform_bytes(), f"int{qconfig.bits}")
    session = QualitySession(plan, progress=not args.no_progress)
    sweep.model = load_model(plan.source, plan.device).model
    return _sweep(args, loaded, session, sweep, budget, out)


def _gguf(args, loaded, plan, out: Path) -> int:
    import tempfile

    from quantlab.assess.sensitivity_gguf import GgufSweep
    from quantlab.assess.session import QualitySession

    with tempfile.TemporaryDirectory(prefix="quantlab-sensitivity-") as work:
        sweep = GgufSweep(plan, args.high_types.split(",") if args.high_types is not None else None, Path(work))  # llama.cpp's tools and both types, before any work
        if args.budget_gb is None and sweep.next_up is None:
            raise QuantlabError(f"--budget-gb: needed for type {sweep.kind}, which has no next type up in quantlab's "
                                "ladder to size the default budget")
        session = QualitySession(plan, progress=not args.no_progress)
        sweep.prepare()
        budget = args.budget_gb * 1e9 if args.budget_gb else sweep.default_budget()
        check_budget(budget, sweep.uniform_bytes(), sweep.kind)
        return _sweep(args, loaded, session, sweep, budget, out)


# The backend of each method that declares a sensitivity_option (a test holds the two lists equal)
SWEEPS = {"rtn": _rtn, "gguf": _gguf}


def _sweep(args, loaded, session, sweep, budget: float, out: Path) -> int:
    effects, baseline = sweep_effects(session, sweep)
    print("\n".join(table(effects, baseline)))
    if args.plot:
        Path(args.plot).write_bytes(render_png(effects, sweep.label))
        print(f"wrote {args.plot}")
    costs = {(e.name, level): sweep.upgrade_cost(e.name, level) for e in effects for level in e.levels}
    chosen, size = choose(effects, sweep.uniform_bytes(), costs, budget, sweep.label)
    within = f"within {gb(budget)}{f' ({sweep.budget_words()})' if not args.budget_gb else ''}"
    if not chosen:
        print(f"no class is raised: no move to {', '.join(sweep.levels())} both removes KL and fits {within}; "
              f"the uniform {sweep.label} build stands, and no recipe is written")
        return 0
    write_mixed_recipe(loaded, out, sweep.mixed_overrides(chosen), chosen, effects, size, budget)
    print(f"suggested: {', '.join(f'{k} {v}' for k, v in chosen.items())}; {gb(size)} of weights (from each "
          f"class's own file or count) {within}; wrote {out}")
    if not args.no_check:
        print("\n".join(check_lines(evaluate_checks(session, sweep, chosen))))
    return 0
