"""The suggested mixed recipe `quantlab sensitivity` writes: the recipe as loaded, renamed NAME-mixed, with the
sweep's per-class overrides in place of its own, and a header comment naming the classes raised, in the order
chosen, with the KL each added per GB saved.
"""

from __future__ import annotations

from pathlib import Path

from quantlab.assess.sensitivity_table import gb


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
              f"{gb(budget)}, in the order chosen (KL added per GB saved at the recipe's quantization):\n# "
              + ", ".join(f"{k} {v} ({per_gb[k]:.3f})" for k, v in chosen.items()) + "\n")
    out.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
