"""`quantlab sensitivity` on an RTN recipe: candidates are quantized copies of the loaded model, one class at a
time through RTN's own apply; bytes are counted as the RTN checkpoint would store them, bits per weight plus an
fp16 scale and zero per group. The unquantized model is the reference itself, so there is no baseline to run.
"""

from __future__ import annotations

import copy

from quantlab.assess.sensitivity_select import ClassEffect, choose
from quantlab.assess.sensitivity_sweep import sweep_effects


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


def measure_effects(session, model, qconfig, quantize=None) -> list[ClassEffect]:
    """RTN: one candidate per class. `quantize(model, config)`: RTN's apply unless given (tests pass a
    destructive one)."""
    return sweep_effects(session, RtnSweep(model, qconfig, quantize))[0]


def suggest(effects: list[ClassEffect], bits: int, high_bits: int, group_size: int, budget_bytes: float
            ) -> tuple[dict[str, int], float]:
    """RTN: classes at high_bits, within the budget; (overrides, bytes)."""
    size = sum(stored_bytes(e.parameters, bits, group_size) for e in effects)
    level = f"int{high_bits}"
    costs = {(e.name, level): stored_bytes(e.parameters, high_bits, group_size)
             - stored_bytes(e.parameters, bits, group_size) for e in effects}
    chosen, size = choose(effects, size, costs, budget_bytes, f"int{bits}")
    return {name: high_bits for name in chosen}, size
