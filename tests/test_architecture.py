"""The shape of the package: its floors and the one direction of its imports, no import cycles, short functions,
data that reads without torch, and methods and runtimes that answer every hook."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "quantlab"
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """Module → the quantlab modules it imports: at module level, inside functions (a lazy import is still a
    dependency) and under TYPE_CHECKING (a type named from a floor above is a tie to that floor too)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            graph[name].update(_known(t, modules) for t in targets if _known(t, modules) not in (None, name))
    return graph


def _known(target: str, modules: dict[str, Path]) -> str | None:
    """The quantlab module an import names (`import quantlab.a.b as x` names quantlab.a.b)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


# The floors, bottom to top: a module imports from its own floor and the floors below it, never from one above.
# Each entry is a top-level module or package of quantlab/ ("quantlab" is the package's own __init__).
FLOORS = (
    ("base", ("quantlab", "errors", "console", "fields", "strict_yaml", "architecture", "known_models", "extras",
              "stats", "threads", "outputs", "residency", "schema", "store", "claims", "roofline", "cost", "kernels",
              "trackers", "checkpoint", "checksums", "device_map", "fingerprint", "placement", "made_sources",
              "hf_loading", "model_spec", "quality", "cache_shapes", "mtp_shard", "tokenizer_match",
              "checkpoint_formats")),
    ("text", ("text", "bundled", "salient")),
    ("llamacpp", ("llamacpp", "vllm_server")),
    ("engines", ("quantize", "finite")),
    ("runtimes", ("runtimes", "measure", "speculative", "model_file")),
    ("sources", ("sources",)),
    ("methods", ("methods",)),
    ("recipe", ("recipe",)),
    ("plan", ("plan", "plan_quality")),
    ("commands", ("assess", "run", "estimate", "report", "report_runtimes", "report_speculative", "report_published",
                  "artifact",
                  "cli", "__main__")),
)
# The rules the floors exist for, said on their own so that a failure names the rule it breaks
LOW_FLOORS = ("schema", "text", "llamacpp", "vllm_server", "quantize", "errors", "console", "fields")
ABOVE_THE_LOW_FLOORS = ("methods", "recipe", "sources", "runtimes", "assess", "plan", "plan_quality", "run", "report")
RULES = (
    (LOW_FLOORS, ABOVE_THE_LOW_FLOORS, "the low floors import nothing from methods, recipe, sources, runtimes, "
                                        "quality commands, plan, run or report"),
    (("methods",), ("runtimes", "assess"), "methods import no runtime and no quality command"),
    (("runtimes",), ("recipe", "methods"), "runtimes import neither recipe nor methods"),
)


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _floor_of(module: str) -> int:
    top = _top(module)
    for number, (_, members) in enumerate(FLOORS):
        if top in members:
            return number
    raise AssertionError(f"{module}: on no floor; add {top!r} to FLOORS in tests/test_architecture.py (and the README)")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} (floor {FLOORS[_floor_of(a)][0]}) imports {b} (floor {FLOORS[_floor_of(b)][0]})"
                  for a, targets in graph.items() for b in targets if _floor_of(b) > _floor_of(a))


def broken_rules(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{rule}: {a} imports {b}" for sources, forbidden, rule in RULES
                  for a, targets in graph.items() if _top(a) in sources
                  for b in targets if _top(b) in forbidden)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_inside_quantlab_counting_every_import():
    assert cycles(import_graph()) == []


def test_every_module_is_on_a_floor_and_imports_nothing_from_above():
    assert upward_imports(import_graph()) == []


def test_the_floors_rules_hold():
    assert broken_rules(import_graph()) == []


def test_the_floor_checks_find_what_they_look_for():
    graph = {"quantlab.schema.record": {"quantlab.methods.base"}, "quantlab.runtimes.x": {"quantlab.recipe"},
             "quantlab.methods.base": {"quantlab.errors"}, "quantlab.errors": set(), "quantlab.recipe": set()}
    assert upward_imports(graph) == [
        "quantlab.runtimes.x (floor runtimes) imports quantlab.recipe (floor recipe)",
        "quantlab.schema.record (floor base) imports quantlab.methods.base (floor methods)"]
    assert len(broken_rules(graph)) == 2


def test_type_checking_imports_count(tmp_path, monkeypatch):
    package = tmp_path / "quantlab"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from quantlab.b import B\n")
    (package / "b.py").write_text("def f():\n    import quantlab.a as a\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    assert import_graph() == {"quantlab": set(), "quantlab.a": {"quantlab.b"}, "quantlab.b": {"quantlab.a"}}


def test_no_function_is_longer_than_a_screen():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


@pytest.mark.parametrize("module", ["quantlab.schema.record", "quantlab.store", "quantlab.report", "quantlab.schema.build"])
def test_records_store_and_report_import_without_torch(module):
    blocked = "import sys\nfor name in ('torch', 'transformers', 'accelerate', 'safetensors'):\n    sys.modules[name] = None\n"
    code = blocked + f"import {module}\nassert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_registered_method_answers_every_hook():
    """A method is one module: the registry has it, the recipe union takes its config, and every hook answers."""
    from quantlab.methods import CONFIG_CLASSES, METHODS
    from quantlab.methods.base import Method
    from quantlab.recipe import Recipe

    hooks = [name for name, value in vars(Method).items() if callable(value) and not name.startswith("_")]
    assert {"label", "check", "check_model", "check_source", "skip_rules", "load_kwargs", "apply", "write_checkpoint",
            "from_checkpoint", "estimator_scheme", "scheme_config", "as_loaded", "card_rows", "card_tags",
            "serving_lines"} <= set(hooks)
    from quantlab.runtimes import RUNTIMES

    for name, method in METHODS.items():
        assert method.config in CONFIG_CLASSES
        runtime = next(r for r, entry in RUNTIMES.items() if method.makes in entry.loads)  # gguf: llama.cpp
        qconfig = Recipe.model_validate({"name": "x", "model": {"source": "bundled"}, "measure": {"runtime": runtime},
                                         "quantization": {"method": name}}).quantization
        assert isinstance(qconfig, method.config)
        assert isinstance(method.label(qconfig, "bfloat16"), str) and method.label(qconfig, "bfloat16")
        assert method.from_checkpoint({"quant_method": "something-else"}) is None
        assert isinstance(method.card_rows(qconfig.model_dump()), list)
        assert isinstance(method.serving_lines(False, "me/x"), list)
        if method.builds:
            assert method.card is not None and (method.card.skip_key or method.artifact_file)


def test_a_scheme_and_the_config_it_stands_for_agree():
    """The multi-GPU map asks each method for the config an estimator scheme stands for: that config must map back
    to the same scheme, and every scheme of a registered method's name must have one."""
    from quantlab.estimate.schemes import scheme_table
    from quantlab.methods import METHODS

    found = 0
    for key, scheme in scheme_table()[0].items():
        method = METHODS.get(scheme.method)
        qconfig = method.scheme_config(key) if method else None
        if qconfig is not None:
            found += 1
            assert method.estimator_scheme(qconfig.model_dump(), "bfloat16") == key
        elif method is not None and method.name != "none":
            raise AssertionError(f"{key}: method {method.name} gives no config for it")
    assert found >= 7  # int8, nf4, fp4, nf4-dq, awq-g32/64/128


def test_every_registered_runtime_implements_the_interface():
    """A runtime is one module on runtimes/base.py's interface plus one registry line: the class is a Runtime with
    no hook left abstract, and it loads what some method makes."""
    import importlib
    import inspect

    from quantlab.methods import METHODS
    from quantlab.runtimes import RUNTIMES
    from quantlab.runtimes.base import Runtime

    made = {m.makes for m in METHODS.values()}
    for name, entry in RUNTIMES.items():
        cls = getattr(importlib.import_module(entry.module), entry.cls)
        assert issubclass(cls, Runtime) and not inspect.isabstract(cls), name
        assert cls.name == name and set(entry.loads) <= made, name


def _without_extras(argv: list[str]) -> subprocess.CompletedProcess:
    code = (
        "import sys\n"
        "for name in ('bitsandbytes', 'gptqmodel', 'matplotlib', 'gguf'):\n"
        "    sys.modules[name] = None\n"
        "from quantlab.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_the_package_and_the_estimator_work_without_the_optional_packages(tmp_path):
    """bitsandbytes, gptqmodel, matplotlib and gguf are extras: without them quantlab imports, plans and estimates
    (leaving out what needs them, and saying so)."""
    done = _without_extras(["estimate", "--contexts", "4096", "--output", str(tmp_path / "m")])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "GGUF schemes left out: they need the gguf package" in done.stdout
    planned = _without_extras(["validate", "recipes/bundled-bf16.yaml", "recipes/bundled-int8.yaml"])
    assert planned.returncode == 1 and "ok: recipes/bundled-bf16.yaml" in planned.stdout
    assert "bitsandbytes is not installed here" in planned.stderr
