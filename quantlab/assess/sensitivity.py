"""`quantlab sensitivity RECIPE`: which tensor classes to keep at higher precision, measured, not guessed.

Each tensor class (quantlab.architecture.TENSOR_CLASSES: DeltaNet in_proj_qkv, in_proj_z, in_proj_a/b, out_proj;
attention q, k, v, o; MLP gate, up, down; lm_head; embeddings) is quantized alone, the rest left unquantized, and
scored against the reference on the same windows: the KL each class adds, beside the bytes its quantization
saves. Then a mixed recipe: the classes with the most KL per byte saved are kept higher while the weights stay
within `--budget-gb`, and (unless --no-check) that build is made and scored beside the uniform ones.

- RTN recipes (this module's RtnSweep): candidates are quantized copies of the loaded model; bytes are counted as
  the RTN checkpoint would store them, bits per weight plus an fp16 scale and zero per group.
- GGUF recipes (assess/sensitivity_gguf.py): llama-quantize writes one file per class; bytes come from the files.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from quantlab.errors import QuantlabError


@dataclass(frozen=True)
class ClassEffect:
    name: str
    parameters: int
    kl: float  # KL mean with this class alone quantized
    kl_ci: tuple[float, float] | None
    bytes_saved: int  # against the unquantized dtype
    baseline: float = 0.0  # KL mean of the unquantized build itself (GGUF: llama.cpp's BF16; RTN: 0 by construction)
    levels: dict[str, float] = field(default_factory=dict)  # higher level → KL added with the class alone at it

    @property
    def kl_added(self) -> float:
        return self.kl - self.baseline

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


class RtnSweep:
    """The steps of an RTN sensitivity run: candidates are quantized copies of the loaded model."""

    baseline_label = None  # the unquantized model is the reference itself: its KL is 0

    def __init__(self, model, qconfig, quantize=None, high_bits: int = 8):
        from quantlab.methods.rtn import RtnMethod

        self.model, self.q, self.high_bits = model, qconfig, high_bits
        self.quantize = quantize or RtnMethod().apply
        self.counts = class_parameters(model)
        self.label = f"int{qconfig.bits} g{qconfig.group_size}"

    def parameters(self) -> dict[str, int]:
        return dict(self.counts)

    def _bytes(self, kind: str, bits: int, group_size: int | None = None) -> float:
        return stored_bytes(self.counts[kind], bits, group_size or self.q.group_size)

    def uniform_bytes(self, group_size: int | None = None) -> float:
        return sum(self._bytes(kind, self.q.bits, group_size) for kind in self.counts)

    def bytes_saved(self, kind: str) -> int:
        return round(self.counts[kind] * 2 - self._bytes(kind, self.q.bits))

    def levels(self) -> list[str]:
        return [f"int{self.high_bits}" if self.high_bits < 16 else "16-bit"]

    def upgrade_cost(self, kind: str, level: str) -> float:
        return self._bytes(kind, self._level_bits(level)) - self._bytes(kind, self.q.bits)

    def _level_bits(self, level: str) -> int:
        return int(level.removeprefix("int")) if level.startswith("int") else 16

    def build_class(self, kind: str, level: str | None = None):
        bits = {kind: self._level_bits(level)} if level else {}
        return self.quantize(copy.deepcopy(self.model), self.q.model_copy(update={"only": [kind], "overrides": bits}))

    def release(self, model) -> None:
        pass

    def candidate_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def mixed_overrides(self, chosen: dict[str, str]) -> dict[str, int]:
        """Every class, as sized: the chosen ones at their level, the rest at the recipe's bits."""
        return {kind: self._level_bits(chosen[kind]) if kind in chosen else self.q.bits for kind in self.counts}

    def default_budget(self) -> float:
        return self.uniform_bytes(32)

    def budget_words(self) -> str:
        return "the uniform build at group size 32"

    def check_builds(self, chosen: dict[str, str]) -> list[tuple[str, float, object]]:
        """(label, weight bytes, builder): every class quantized in all three, lm_head and embeddings too."""
        every = {kind: self.q.bits for kind in self.counts}

        def build(**update):
            return lambda: self.quantize(copy.deepcopy(self.model), self.q.model_copy(update={"only": None, **update}))

        mixed = self.mixed_overrides(chosen)
        mixed_bytes = sum(self._bytes(kind, bits) for kind, bits in mixed.items())
        return [(f"uniform {self.label}", self.uniform_bytes(), build(overrides=every)),
                ("suggested mixed", mixed_bytes, build(overrides=mixed)),
                *([] if self.q.group_size == 32 else
                  [(f"uniform int{self.q.bits} g32", self.uniform_bytes(32), build(overrides=every, group_size=32))])]


def evaluate_built(session, builders: dict[str, Callable[[], Any]], release: Callable[[Any], None],
                   candidate_bytes: float | None = None) -> dict:
    """Score built candidates against the same reference windows. Stored mode reuses the stored reference: one
    candidate at a time, each released before the next is built. Paired mode holds the reference beside the
    candidates (small models): as many per reference pass as fit in half the device's free memory."""
    labels = list(builders)
    at_once = candidates_at_once(session, candidate_bytes) if session.q.spec.mode == "paired" else 1
    groups = [labels[i:i + at_once] for i in range(0, len(labels), at_once)]
    results = {}
    for group in groups:
        built = {}
        try:
            for label in group:
                built[label] = builders[label]()
            results.update(session.evaluate_many(built))
        finally:
            for model in built.values():
                release(model)
    return results


def candidates_at_once(session, candidate_bytes: float | None) -> int:
    """How many candidates of `candidate_bytes` fit in half the free memory of the session's device now."""
    import torch

    from quantlab.fingerprint import available_host_ram

    if not candidate_bytes:
        return 1 << 30
    device = getattr(session, "device", torch.device("cpu"))
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_host_ram()
    return max(1, int(free * 0.5 // candidate_bytes))


def sweep_effects(session, sweep) -> tuple[list[ClassEffect], Any]:
    """One candidate per class at the recipe's quantization and one per class and higher level (and the baseline
    where the sweep has one), all on the same windows; most KL per byte saved first."""
    kinds, levels = list(sweep.parameters()), sweep.levels()
    builders = {kind: (lambda kind=kind: sweep.build_class(kind)) for kind in kinds}
    builders |= {f"{kind} at {level}": (lambda kind=kind, level=level: sweep.build_class(kind, level))
                 for kind in kinds for level in levels}
    if sweep.baseline_label:
        builders = {sweep.baseline_label: sweep.build_baseline, **builders}
    results = evaluate_built(session, builders, sweep.release, sweep.candidate_bytes())
    base = results.get(sweep.baseline_label) if sweep.baseline_label else None
    floor = base.kl_mean if base else 0.0
    effects = [ClassEffect(kind, n, results[kind].kl_mean,
                           tuple(results[kind].kl_mean_ci) if results[kind].kl_mean_ci else None,
                           sweep.bytes_saved(kind), floor,
                           {level: results[f"{kind} at {level}"].kl_mean - floor for level in levels})
               for kind, n in sweep.parameters().items()]
    return sorted(effects, key=lambda e: -e.kl_per_gb), base


def measure_effects(session, model, qconfig, quantize=None) -> list[ClassEffect]:
    """RTN: one candidate per class. `quantize(model, config)`: RTN's apply unless given (tests pass a
    destructive one)."""
    return sweep_effects(session, RtnSweep(model, qconfig, quantize))[0]


def choose(effects: list[ClassEffect], base_bytes: float, costs: dict[tuple[str, str], float], budget_bytes: float,
           what: str) -> tuple[dict[str, str], float]:
    """A higher level for some classes, within the budget: greedily, the move (a class to a level, or from one
    level to another) that removes the most measured KL per byte added, until none fits. Levels cost what the
    sweep measured or counted; a class's KL at a level is the KL measured with it alone at that level."""
    check_budget(budget_bytes, base_bytes, what)
    chosen: dict[str, str] = {}
    size = base_bytes
    while True:
        best, best_ratio = None, 0.0
        for e in effects:
            now = chosen.get(e.name)
            kl_now = e.levels[now] if now else e.kl_added
            cost_now = costs[(e.name, now)] if now else 0.0
            for level, kl in e.levels.items():
                gain, extra = kl_now - kl, costs[(e.name, level)] - cost_now
                if level == now or gain <= 0 or size + extra > budget_bytes:
                    continue
                ratio = gain / max(extra, 1e-9)
                if ratio > best_ratio:
                    best, best_ratio = (e.name, level, extra), ratio
        if best is None:
            return chosen, size
        chosen[best[0]] = best[1]
        size += best[2]


def check_budget(budget_bytes: float, uniform_bytes: float, what: str) -> None:
    if budget_bytes < uniform_bytes:
        raise QuantlabError(f"--budget-gb {budget_bytes / 1e9:.6f}: below the uniform {what} build itself "
                            f"({uniform_bytes / 1e9:.6f} GB)")


def suggest(effects: list[ClassEffect], bits: int, high_bits: int, group_size: int, budget_bytes: float
            ) -> tuple[dict[str, int], float]:
    """RTN: classes at high_bits, within the budget; (overrides, bytes)."""
    size = sum(stored_bytes(e.parameters, bits, group_size) for e in effects)
    level = f"int{high_bits}"
    costs = {(e.name, level): stored_bytes(e.parameters, high_bits, group_size)
             - stored_bytes(e.parameters, bits, group_size) for e in effects}
    chosen, size = choose(effects, size, costs, budget_bytes, f"int{bits}")
    return {name: high_bits for name in chosen}, size


def table(effects: list[ClassEffect], baseline=None) -> list[str]:
    lines = [f"{'class':<22} {'parameters':>14} {'MB saved':>10} {'KL':>9} {'95% interval':>20} {'KL added':>10} "
             f"{'KL per GB saved':>16}"]
    for e in effects:
        ci = f"[{e.kl_ci[0]:.5f}, {e.kl_ci[1]:.5f}]" if e.kl_ci else "—"
        lines.append(f"{e.name:<22} {e.parameters:>14,} {e.bytes_saved / 1e6:>10.3f} {e.kl:>9.5f} {ci:>20} "
                     f"{e.kl_added:>10.5f} {e.kl_per_gb:>16.3f}")
    if baseline is not None:
        ci = f"[{baseline.kl_mean_ci[0]:.5f}, {baseline.kl_mean_ci[1]:.5f}]" if baseline.kl_mean_ci else "—"
        lines.append(f"{'baseline':<22} {'':>14} {'':>10} {baseline.kl_mean:>9.5f} {ci:>20}   "
                     f"({baseline.candidate}); KL added = KL − the baseline's")
    return lines


def render_png(effects: list[ClassEffect], label: str = "") -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=110, layout="constrained")
    ax = figure.subplots()
    ax.barh([e.name for e in effects][::-1], [e.kl_per_gb for e in effects][::-1], color="tab:red")
    ax.set_xlabel("KL added per GB saved (nats/token per GB)")
    ax.set_title(f"Sensitivity by tensor class{f' ({label})' if label else ''}: the KL each adds, quantized alone, "
                 "per GB it saves", fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


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


SWEPT_METHODS = ("rtn", "gguf")


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from quantlab.console import silence_progress_bars
    from quantlab.plan import make_plan
    from quantlab.recipe import load_recipe

    if args.no_progress:
        silence_progress_bars()
    loaded = load_recipe(args.recipe)
    recipe = loaded.recipe
    if recipe.quantization.method not in SWEPT_METHODS or recipe.quality is None:
        raise QuantlabError(f"{args.recipe}: sensitivity needs an RTN or GGUF recipe (quantization.method rtn or "
                            "gguf) with a quality section; AWQ and bitsandbytes recipes keep classes unquantized with "
                            "quantization.skip_classes")
    out = Path(args.out) if args.out else loaded.path.with_name(f"{recipe.name}-mixed.yaml")
    _check_new_file(out, "the suggested recipe", "--out")
    if args.plot:
        if Path(args.plot).resolve() == out.resolve():
            raise QuantlabError(f"--plot {args.plot}: the same file as the suggested recipe ({out}); give each its own")
        _check_new_file(Path(args.plot), "the plot", "--plot")
    if args.budget_gb is not None and not 0 < args.budget_gb <= MAX_BUDGET_GB:  # NaN and inf fail here too
        raise QuantlabError(f"--budget-gb {args.budget_gb}: a size in GB, above 0 and at most {MAX_BUDGET_GB:,}")
    wrong = {"rtn": ("--high-types", args.high_types), "gguf": ("--high-bits", args.high_bits)}[recipe.quantization.method]
    if wrong[1] is not None:
        raise QuantlabError(f"{wrong[0]}: not for a {recipe.quantization.method} recipe; "
                            f"{'--high-bits' if wrong[0] == '--high-types' else '--high-types'} is its option")
    plan = make_plan(loaded)
    if recipe.quantization.overrides:
        print("note: the recipe's quantization.overrides are not used: every class is measured from the uniform "
              "build, and the suggested recipe replaces them")
    if recipe.quantization.method == "rtn":
        return _rtn(args, loaded, plan, out)
    return _gguf(args, loaded, plan, out)


def _rtn(args, loaded, plan, out: Path) -> int:
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


def _sweep(args, loaded, session, sweep, budget: float, out: Path) -> int:
    effects, baseline = sweep_effects(session, sweep)
    print("\n".join(table(effects, baseline)))
    if args.plot:
        Path(args.plot).write_bytes(render_png(effects, sweep.label))
        print(f"wrote {args.plot}")
    costs = {(e.name, level): sweep.upgrade_cost(e.name, level) for e in effects for level in e.levels}
    chosen, size = choose(effects, sweep.uniform_bytes(), costs, budget, sweep.label)
    within = f"within {_gb(budget)}{f' ({sweep.budget_words()})' if not args.budget_gb else ''}"
    if not chosen:
        print(f"no class is raised: no move to {', '.join(sweep.levels())} both removes KL and fits {within}; "
              f"the uniform {sweep.label} build stands, and no recipe is written")
        return 0
    write_mixed_recipe(loaded, out, sweep.mixed_overrides(chosen), chosen, effects, size, budget)
    print(f"suggested: {', '.join(f'{k} {v}' for k, v in chosen.items())}; {_gb(size)} of weights (from each "
          f"class's own file or count) {within}; wrote {out}")
    if not args.no_check:
        print("\n".join(check_lines(evaluate_checks(session, sweep, chosen))))
    return 0


def _gb(size: float) -> str:
    return f"{size / 1e9:.4g} GB"


def evaluate_checks(session, sweep, chosen: dict[str, str]) -> list[tuple[str, float, Any]]:
    """The uniform build, the suggested mixed one and the budget's uniform build, scored on the same windows."""
    builds = sweep.check_builds(chosen)
    results = evaluate_built(session, {label: builder for label, _, builder in builds}, sweep.release,
                             sweep.candidate_bytes())
    return [(label, size, results[label]) for label, size, _ in builds]


def check_lines(checked: list[tuple[str, float, Any]]) -> list[str]:
    from quantlab.quality.noise import outside_noise, paired_difference

    lines = ["", "check: the suggested build beside the uniform ones, on the same windows",
             f"{'build':<24} {'weights GB':>12} {'KL mean':>10} {'95% interval':>22}"]
    for label, size, q in checked:
        ci = f"[{q.kl_mean_ci[0]:.5f}, {q.kl_mean_ci[1]:.5f}]" if q.kl_mean_ci else "—"
        lines.append(f"{label:<24} {size / 1e9:>12.6f} {q.kl_mean:>10.5f} {ci:>22}")
    mixed = next(q for label, _, q in checked if label == "suggested mixed")
    label, _, last = checked[-1]
    if last is not mixed:
        difference = paired_difference(last.window_sums, mixed.window_sums)
        verdict = {True: "beyond the noise", False: "within the noise", None: "not comparable"}[outside_noise(difference)]
        span = f"[{difference[0]:+.5f}, {difference[1]:+.5f}]" if difference else "—"
        lines.append(f"suggested mixed − {label}: KL {span}, {verdict}")
        if difference and difference[0] > 0:
            lines.append(f"the uniform build ({label}) is closer to the reference at about the same size: prefer it")
    return lines


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


def write_mixed_recipe(loaded, out: Path, overrides: dict, chosen: dict[str, str], effects, size: float,
                       budget: float) -> None:
    import yaml

    data = yaml.safe_load(loaded.text)
    data["name"] = f"{loaded.recipe.name}-mixed"
    data["description"] = (f"{loaded.recipe.name} with the classes that add the most KL per byte saved kept at "
                           f"higher precision (quantlab sensitivity): {size / 1e9:.6f} GB of weights")
    data["quantization"]["overrides"] = overrides
    data["quantization"].pop("only", None)
    per_gb = {e.name: e.kl_per_gb for e in effects}
    header = (f"# Suggested by `quantlab sensitivity {loaded.path}`: {len(chosen)} class(es) raised within "
              f"{_gb(budget)}, in the order chosen (KL added per GB saved at the recipe's quantization):\n# "
              + ", ".join(f"{k} {v} ({per_gb[k]:.3f})" for k, v in chosen.items()) + "\n")
    out.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
