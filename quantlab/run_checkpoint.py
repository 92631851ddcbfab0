"""`quantlab run` for methods whose engine writes a checkpoint (AWQ): write it to a temporary folder,
measure it there as any local checkpoint, and label the records with the recipe's own model and
method. The folder is deleted afterwards; `quantlab build` is the command that keeps one."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from quantlab.artifact.cost import cost_summary, quantize_cost
from quantlab.fields import parse_size
from quantlab.plan import RunPlan
from quantlab.quantize.configs import NoQuant
from quantlab.schema.record import MethodRef
from quantlab.recipe import BuildSpec, LoadedRecipe, ModelSpec
from quantlab.store import append_record
from quantlab.trackers import MemoryTracker, Timer
from quantlab.trackers.nvml import NvmlProbe


def run_through_checkpoint(plan: RunPlan, output_dir, progress: bool, echo: Callable[[str], None], append: bool):
    from quantlab.artifact.writer import copy_extras, source_folder
    from quantlab.quantize.awq.handler import write_checkpoint
    from quantlab.run import RunResult, run_recipe

    recipe, device, loaded = plan.recipe, plan.device, plan.loaded
    out = Path(output_dir or recipe.output.dir)
    shard = parse_size((recipe.build or BuildSpec()).max_shard_size)
    with tempfile.TemporaryDirectory(prefix=f"quantlab-{recipe.quantization.method}-") as tmp:
        echo(f"writing the {plan.method_label} checkpoint to a temporary folder ({tmp})")
        nvml = NvmlProbe(device) if device.type == "cuda" else None
        with MemoryTracker(device, nvml=nvml) as memory, Timer(device) as timer:
            written = write_checkpoint(plan, Path(tmp), shard, progress, echo)
        copy_extras(source_folder(recipe.model, plan.resolved), Path(tmp))
        cost = quantize_cost("write the checkpoint", timer.result.seconds, memory.result)
        echo(f"checkpoint written in {cost.seconds:,.1f} s; {cost_summary(cost)}")
        derived = recipe.model_copy(update={
            "model": ModelSpec(source="local", path=tmp, variant=recipe.model.variant, dtype=recipe.model.dtype,
                               device=recipe.model.device, seed=recipe.model.seed, awq_kernel=recipe.model.awq_kernel),
            "quantization": NoQuant(),
            "quality": quality_against_source(recipe),
        })
        result = run_recipe(LoadedRecipe(derived, loaded.path, loaded.text, loaded.sha256), out, progress, echo,
                            append=False)
    notes = (
        *written.outcome.notes,
        f"{plan.method_label} checkpoint written by engine {written.outcome.engine} in {cost.seconds:,.1f} s "
        f"({cost_summary(cost)}), then reloaded from disk by transformers and measured",
        *([f"calibration: {written.calibration.label}"] if written.calibration else []),
    )
    records = []
    for r in result.records:
        model = r.model.model_copy(update={
            "name": plan.resolved.name, "source": recipe.model.source, "location": plan.resolved.location,
            "weights": "synthetic" if recipe.model.source == "synthetic" else "real",
        })
        method = MethodRef(name=plan.method_name, label=plan.method_label, params=plan.method_params)
        records.append(r.model_copy(update={"model": model, "method": method, "notes": (*r.notes, *notes)}))
    paths = tuple(append_record(out, r) for r in records) if append else ()
    return RunResult(plan, tuple(records), paths)


def quality_against_source(recipe):
    """The quality reference is the unquantized source model, not the checkpoint itself."""
    quality = recipe.quality
    if quality is None or quality.reference.model is not None:
        return quality
    return quality.model_copy(update={"reference": quality.reference.model_copy(update={"model": recipe.model})})
