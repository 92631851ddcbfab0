"""Which Linears a method leaves unquantized, as the skip list a checkpoint's loader reads.

The rules come from quantlab.architecture (UNQUANTIZED_ROLES, the ones the estimator reads too). The list
handed to transformers (`llm_int8_skip_modules`, `modules_to_not_convert`) is derived from them and written
compactly: a module name or a suffix ('in_proj_a', 'lm_head', 'model.visual'), each checked to match exactly
the modules the rules leave alone, with transformers' own matching rule. A recipe adds to them: skip_modules
(patterns, as written) and skip_classes (tensor classes, architecture.TENSOR_CLASSES, written the same compact way).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from quantlab.architecture import (
    TENSOR_CLASS_NAMES,
    UNQUANTIZED_ROLES,
    class_modules,
    quantizable_linears,
    supported_classes,
    tensor_class,
)
from quantlab.errors import QuantlabError


def skip_pattern_matches(pattern: str, name: str) -> bool:
    """transformers' rule (quantizers_utils.should_convert_module, 5.x): the pattern matches from the
    start up to a module boundary (as a regex), or is a suffix of the module name."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return bool(re.match(rf"(?:{pattern}){boundary}", name)) or name.endswith(pattern)


@dataclass(frozen=True)
class SkipPlan:
    """What a method quantizes in one model class, and the skip list that says so to transformers."""

    method: str
    model_class: str
    patterns: tuple[str, ...]  # llm_int8_skip_modules: the rules' patterns, then the recipe's extras
    rule_patterns: tuple[str, ...]
    extra_patterns: tuple[str, ...]  # the recipe's: its skip_classes (as compact patterns), then its skip_modules
    quantized: tuple[str, ...]  # Linear module names that are quantized
    kept: tuple[str, ...]  # Linear module names left unquantized (rules + extras)


def skip_plan(model: torch.nn.Module, method: str, extra: list[str] | tuple[str, ...] = (),
              classes: list[str] | tuple[str, ...] = ()) -> SkipPlan:
    """The skip list for `model` (a meta-device instance is enough). `extra` are the recipe's skip_modules
    patterns, `classes` its skip_classes (tensor classes kept whole). Raises QuantlabError when a recipe
    pattern or class matches no quantizable Linear, or when nothing is left to quantize."""
    class_name = type(model).__name__
    try:
        by_rules = {name for name, _ in quantizable_linears(model, method)}
    except KeyError as exc:
        raise QuantlabError(
            f"quantization.method {method}: quantlab has no tensor-role rules for {class_name} ({exc.args[0]}); "
            f"it knows {', '.join(supported_classes())}. Add a role table to quantlab/architecture.py."
        ) from None
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    rule_patterns = _compact(linears, set(linears) - by_rules)
    by_class = _class_members(model, method, by_rules, classes)
    class_patterns = _compact(linears, by_class) if by_class else ()
    extra = tuple(extra)
    for pattern in extra:
        _check_pattern(pattern)
        if not any(skip_pattern_matches(pattern, name) for name in by_rules):
            raise QuantlabError(
                f"quantization.skip_modules: {pattern!r} matches none of the {len(by_rules)} Linear modules "
                f"{method} would quantize in {class_name} (e.g. {sorted(by_rules)[0] if by_rules else 'none'}); "
                "use a module name, a suffix such as 'mlp.down_proj', or a regex anchored at the start"
            )
    extra_patterns = tuple(dict.fromkeys(p for p in class_patterns + extra if p not in rule_patterns))
    patterns = rule_patterns + extra_patterns
    quantized = tuple(n for n in linears if not any(skip_pattern_matches(p, n) for p in patterns))
    by_extra = {n for n in by_rules if any(skip_pattern_matches(p, n) for p in extra)}
    if set(quantized) != by_rules - by_class - by_extra:
        raise QuantlabError(f"internal: the skip list {list(patterns)} does not reproduce the skip rules for {class_name}")
    if not quantized:
        always = ", ".join(sorted(UNQUANTIZED_ROLES[method]))
        raise QuantlabError(
            f"quantization: nothing left to quantize: the skip list {list(patterns)} covers all {len(linears)} "
            f"Linear modules of {class_name} (the rules for {method} always keep: {always}). "
            "Remove entries from quantization.skip_modules or quantization.skip_classes."
        )
    kept = tuple(n for n in linears if n not in set(quantized))
    return SkipPlan(method, class_name, patterns, rule_patterns, extra_patterns, quantized, kept)


def _class_members(model: torch.nn.Module, method: str, by_rules: set[str], classes) -> set[str]:
    """The Linears of the named tensor classes among those the rules quantize; each class must have some."""
    members: set[str] = set()
    for kind in classes:
        found = {name for name in by_rules if tensor_class(name) == kind}
        if not found:
            anywhere = [name for k, name, _ in class_modules(model) if k == kind]
            why = (f"the rules for {method} already keep it unquantized (e.g. {anywhere[0]})" if anywhere
                   else f"{type(model).__name__} has no module of that class")
            raise QuantlabError(
                f"quantization.skip_classes: {kind!r} matches none of the Linear modules {method} would quantize: "
                f"{why}; remove it"
            )
        members |= found
    return members


def classes_label(classes: list[str] | tuple[str, ...]) -> str:
    """'mlp.down kept', 'attention.q+attention.k kept': the kept classes in TENSOR_CLASSES order, for labels."""
    ordered = sorted(classes, key=TENSOR_CLASS_NAMES.index)
    return f"{'+'.join(ordered)} kept" if ordered else ""


def _check_pattern(pattern: str) -> None:
    if not pattern.strip():
        raise QuantlabError("quantization.skip_modules: entries must not be empty")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise QuantlabError(f"quantization.skip_modules: {pattern!r} is not a valid pattern ({exc})") from None


def _compact(linears: list[str], skipped: set[str]) -> tuple[str, ...]:
    """The shortest patterns that match exactly the skipped Linears, from whole subtrees down.

    A subtree whose Linears are all skipped (the vision tower) becomes its module name; a single
    skipped Linear becomes the shortest dotted suffix that matches no quantized Linear
    ('in_proj_a'), so the same list also fits a text model loaded from a VL checkpoint.
    """
    quantized = [n for n in linears if n not in skipped]
    busy = {".".join(n.split(".")[:i]) for n in quantized for i in range(1, n.count(".") + 2)}
    roots: list[str] = []
    for name in linears:
        if name not in skipped:
            continue
        parts = name.split(".")
        root = next(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) not in busy)
        if root not in roots:
            roots.append(root)
    patterns: list[str] = []
    for root in roots:
        under = [n for n in linears if n == root or n.startswith(root + ".")]
        parts = root.split(".")
        candidates = [".".join(parts[-k:]) for k in range(1, len(parts) + 1)]
        for candidate in candidates:
            covered = {n for n in linears if skip_pattern_matches(candidate, n)}
            if set(under) <= covered and covered <= skipped:
                break
        else:  # pragma: no cover - the full name always qualifies
            candidate = root
        if candidate not in patterns:
            patterns.append(candidate)
    return tuple(sorted(patterns))
