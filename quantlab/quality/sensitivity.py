"""`quantlab sensitivity RECIPE`: which tensor classes to keep at higher precision, measured, not guessed.

For an RTN recipe: each tensor class (quantlab.architecture.TENSOR_CLASSES: DeltaNet in_proj_qkv, in_proj_z,
in_proj_a/b, out_proj; attention q, k, v, o; MLP gate, up, down; lm_head; embeddings; MTP) is quantized alone,
the rest left unquantized, and scored against the reference in one paired pass: the KL each class adds, beside
the bytes its quantization saves. Then a mixed recipe: start from every class at the recipe's bits and give the
classes with the most KL per byte saved `--high-bits` (8 by default) while the weights stay within `--budget-gb`.
The plain bytes are counted as the RTN checkpoint would store them: bits per weight plus an fp16 scale and zero
per group.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from pathlib import Path

from quantlab.errors import QuantlabError


@dataclass(frozen=True)
class ClassEffect:
    name: str
    parameters: int
    kl_added: float  # KL mean with this class alone quantized
    kl_ci: tuple[float, float] | None
    bytes_saved: int  # against the unquantized dtype

    @property
    def kl_per_gb(self) -> float:
        return self.kl_added / max(self.bytes_saved / 1e9, 1e-12)


def stored_bytes(parameters: int, bits: int, group_size: int) -> float:
    """Bytes of `parameters` weights at `bits`, with an fp16 scale and an fp16 zero per group (16: unquantized)."""
    if bits >= 16:
        return parameters * 2
    return parameters * (bits + 32 / group_size) / 8


def class_parameters(model) -> dict[str, int]:
    from quantlab.architecture import class_modules

    counts: dict[str, int] = {}
    for kind, _, module in class_modules(model):
        counts[kind] = counts.get(kind, 0) + module.weight.numel()
    return counts


def measure_effects(session, model, qconfig, quantize=None) -> list[ClassEffect]:
    """One candidate per class, every one against the same reference windows (one reference pass), most KL per
    byte saved first. `quantize(model, config)`: RTN's apply unless given (tests pass a destructive one)."""
    from quantlab.methods.rtn import RtnMethod

    quantize = quantize or RtnMethod().apply
    params = class_parameters(model)
    candidates = {}
    for kind in params:
        config = qconfig.model_copy(update={"only": [kind], "overrides": {}})
        candidates[kind] = quantize(copy.deepcopy(model), config)
    results = session.evaluate_many(candidates)
    effects = []
    for kind, n in params.items():
        q = results[kind]
        saved = n * 2 - stored_bytes(n, qconfig.bits, qconfig.group_size)
        effects.append(ClassEffect(kind, n, q.kl_mean, tuple(q.kl_mean_ci) if q.kl_mean_ci else None, round(saved)))
    return sorted(effects, key=lambda e: -e.kl_per_gb)


def suggest(effects: list[ClassEffect], bits: int, high_bits: int, group_size: int, budget_bytes: float
            ) -> tuple[dict[str, int], float]:
    """Classes at high_bits, the most harmful per byte first, within the budget; (overrides, bytes)."""
    size = sum(stored_bytes(e.parameters, bits, group_size) for e in effects)
    if size > budget_bytes:
        raise QuantlabError(f"--budget-gb {budget_bytes / 1e9:.6f}: below the uniform int{bits} build itself "
                            f"({size / 1e9:.6f} GB)")
    overrides = {}
    for e in effects:  # most KL per byte saved first
        extra = stored_bytes(e.parameters, high_bits, group_size) - stored_bytes(e.parameters, bits, group_size)
        if size + extra <= budget_bytes:
            overrides[e.name] = high_bits
            size += extra
    return overrides, size


def table(effects: list[ClassEffect]) -> list[str]:
    lines = [f"{'class':<22} {'parameters':>12} {'MB saved':>10} {'KL added':>10} {'95% interval':>22} {'KL per GB saved':>16}"]
    for e in effects:
        ci = f"[{e.kl_ci[0]:.5f}, {e.kl_ci[1]:.5f}]" if e.kl_ci else "—"
        lines.append(f"{e.name:<22} {e.parameters:>12,} {e.bytes_saved / 1e6:>10.3f} {e.kl_added:>10.5f} {ci:>22} "
                     f"{e.kl_per_gb:>16.3f}")
    return lines


def render_png(effects: list[ClassEffect]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=110, layout="constrained")
    ax = figure.subplots()
    ax.barh([e.name for e in effects][::-1], [e.kl_per_gb for e in effects][::-1], color="tab:red")
    ax.set_xlabel("KL added per GB saved (nats/token per GB)")
    ax.set_title("Sensitivity by tensor class: the top is the first to keep at higher precision", fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def add_sensitivity_parser(sub) -> None:
    p = sub.add_parser("sensitivity", help="the KL each tensor class adds when quantized alone, and a mixed recipe")
    p.add_argument("recipe", metavar="RECIPE", help="an RTN recipe (quantization.method: rtn) with a quality section")
    p.add_argument("--budget-gb", type=float, help="weights budget of the suggested mixed build (default: the uniform "
                   "build at group size 32, the same size as the smallest-group uniform build)")
    p.add_argument("--high-bits", type=int, choices=(8, 16), default=8, help="bits of the classes kept higher")
    p.add_argument("--out", help="where the suggested recipe goes (default: RECIPE's folder, NAME-mixed.yaml)")
    p.add_argument("--plot", help="a PNG of KL added per GB saved (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sensitivity)


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from quantlab.console import silence_progress_bars
    from quantlab.plan import make_plan
    from quantlab.quality.session import QualitySession
    from quantlab.recipe import load_recipe
    from quantlab.runtimes.transformers import load_model

    if args.no_progress:
        silence_progress_bars()
    loaded = load_recipe(args.recipe)
    recipe = loaded.recipe
    if recipe.quantization.method != "rtn" or recipe.quality is None:
        raise QuantlabError(f"{args.recipe}: sensitivity needs an RTN recipe (quantization.method: rtn) with a "
                            "quality section")
    out = Path(args.out) if args.out else loaded.path.with_name(f"{recipe.name}-mixed.yaml")
    _check_new_file(out, "the suggested recipe", "--out")
    if args.plot:
        _check_new_file(Path(args.plot), "the plot", "--plot")
    if args.budget_gb is not None and not args.budget_gb > 0:
        raise QuantlabError(f"--budget-gb {args.budget_gb}: a size in GB, above 0")
    plan = make_plan(loaded)
    qconfig = recipe.quantization
    total = sum(class_parameters(plan.source.meta).values())  # the meta model: the budget is checked before any load
    budget = args.budget_gb * 1e9 if args.budget_gb else stored_bytes(total, qconfig.bits, 32)
    uniform = stored_bytes(total, qconfig.bits, qconfig.group_size)
    if budget < uniform:
        raise QuantlabError(f"--budget-gb {budget / 1e9:.6f}: below the uniform int{qconfig.bits} build itself "
                            f"({uniform / 1e9:.6f} GB)")
    session = QualitySession(plan, progress=not args.no_progress)
    model = load_model(plan.source, plan.device).model
    effects = measure_effects(session, model, qconfig)
    print("\n".join(table(effects)))
    if args.plot:
        Path(args.plot).write_bytes(render_png(effects))
        print(f"wrote {args.plot}")
    overrides, size = suggest(effects, qconfig.bits, args.high_bits, qconfig.group_size, budget)
    write_mixed_recipe(loaded, out, overrides, effects, size, budget)
    print(f"suggested: {', '.join(f'{k} int{v}' for k, v in overrides.items()) or 'no class fits the budget'}; "
          f"{size / 1e9:.6f} GB of weights within {budget / 1e9:.6f} GB; wrote {out}")
    return 0


def _check_new_file(path: Path, what: str, option: str) -> None:
    """Before any work: a new file in an existing folder (quantlab replaces nothing it did not make)."""
    if path.exists() or path.is_symlink():
        raise QuantlabError(f"{path}: already exists; pass {option} to write {what} elsewhere")
    if not path.parent.is_dir():
        raise QuantlabError(f"{path}: its folder {path.parent} does not exist")


def write_mixed_recipe(loaded, out: Path, overrides: dict[str, int], effects, size: float, budget: float) -> None:
    import yaml

    data = yaml.safe_load(loaded.text)
    data["name"] = f"{loaded.recipe.name}-mixed"
    data["description"] = (f"{loaded.recipe.name} with the classes that add the most KL per byte saved kept at "
                           f"higher precision (quantlab sensitivity): {size / 1e9:.6f} GB of weights")
    bits = loaded.recipe.quantization.bits
    data["quantization"]["overrides"] = {e.name: overrides.get(e.name, bits) for e in effects}  # every class, as sized
    data["quantization"].pop("only", None)
    header = (f"# Suggested by `quantlab sensitivity {loaded.path}`: {len(overrides)} class(es) kept at higher "
              f"precision within {budget / 1e9:.6f} GB.\n# KL added per GB saved, most harmful first: "
              + ", ".join(f"{e.name} {e.kl_per_gb:.3f}" for e in effects[:6]) + "\n")
    out.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
