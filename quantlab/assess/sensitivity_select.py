"""Which tensor classes `quantlab sensitivity` raises: each class's measured effect (the KL it adds quantized
alone, the bytes it saves, the KL it adds at each higher level) and the greedy choice within the weights budget,
the move that removes the most measured KL per byte added first. Numbers in, classes out: no torch, no model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
