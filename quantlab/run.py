"""One run, as the recipe says: plan → load → quantize → measure → record → report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from quantlab import fingerprint
from quantlab.finite import describe as describe_nonfinite, model_nonfinite
from quantlab.kernels import kernels_of
from quantlab.schema.measurement import Kernels, PointResult
from quantlab.measure import PointSettings, free_memory, measure_point
from quantlab.quality.plan import describe_quality_plan
from quantlab.quality.result import QualityResult, quality_line
from quantlab.quality.session import QualitySession
from quantlab.plan import RunPlan, make_plan
from quantlab.quantize.bnb import quant_state_bytes
from quantlab.quantize.handlers import handler_for, load_kwargs_for
from quantlab.recipe import LoadedRecipe
from quantlab.schema.record import MethodRef, PointRef, Record, RecipeRef, new_run_id, produced_by, record_id, utc_now
from quantlab.roofline import decode_roofline, gpu_spec
from quantlab.sources import dtype_note, load_model, select_variant
from quantlab.store import append_record
from quantlab.threads import fit_threads
from quantlab.trackers import MemoryTracker, Timer
from quantlab.trackers.nvml import NvmlProbe


@dataclass(frozen=True)
class RunResult:
    plan: RunPlan
    records: tuple[Record, ...]
    paths: tuple[Path, ...]


def run_recipe(
    loaded: LoadedRecipe, output_dir: str | Path | None = None, progress: bool = True, echo: Callable[[str], None] = print,
    append: bool = True,
) -> RunResult:
    """`append=False` returns the records without writing them (quantlab build appends them once its folder exists)."""
    out = Path(output_dir or loaded.recipe.output.dir)
    plan = make_plan(loaded, records_to=out if append else None)
    thread_note = fit_threads() if plan.device.type == "cpu" else None  # before any CPU work, the engine's too
    if getattr(handler_for(plan.recipe.quantization), "writes_checkpoint", False):
        from quantlab.run_checkpoint import run_through_checkpoint

        return run_through_checkpoint(plan, output_dir, progress, echo, append)
    recipe, device = plan.recipe, plan.device
    echo(describe_plan(plan))
    hardware, software = fingerprint.hardware(device), fingerprint.software()
    nvml = NvmlProbe(device) if device.type == "cuda" else None
    quality = QualitySession(plan, out, progress, echo) if plan.quality else None  # text, tokenizers: no weights yet
    if quality:
        quality.prepare()  # stored mode: the reference pass runs, and is freed, before the candidate loads

    with MemoryTracker(device, nvml=nvml) as load_mem, Timer(device) as load_time:
        config = select_variant(plan.resolved.config, recipe.model.variant)[0]
        loaded_model = load_model(recipe.model, plan.resolved, device, load_kwargs_for(recipe.quantization, config))
        model = handler_for(recipe.quantization).apply(loaded_model.model, recipe.quantization)
    weight_bytes = model_bytes(model)
    kernels = kernels_of(model)
    echo(f"loaded {loaded_model.info.model_class} in {load_time.result.seconds:.1f} s: {weight_bytes / 1e9:.3f} GB of weights; "
         f"{describe_kernels(kernels)}")
    broken = model_nonfinite(model)
    weight_notes: tuple[str, ...] = ()
    if broken:
        weight_notes = (f"non-finite weights: {describe_nonfinite(broken)}; the figures measure a broken model",)
    for note in weight_notes:
        echo(f"warning: {note}")
    quality_result = _quality(quality, model, device, echo)

    run_id, records, paths = new_run_id(), [], []
    points = tqdm(plan.points, desc="measuring", unit="point", disable=not progress)
    for context, batch in points:
        settings = PointSettings(
            context, batch, recipe.measure.new_tokens, recipe.measure.warmup, recipe.measure.repeats,
            recipe.measure.seed, recipe.measure.memory_sample_ms / 1000,
        )
        result = measure_point(model, settings, device, nvml, progress)
        created = utc_now()
        record = Record(
            record_id=record_id(created, loaded_model.info.name, plan.method_label, context, batch, run_id),
            run_id=run_id,
            created_at=created,
            produced_by=produced_by(hardware, loaded_model.info),
            recipe=RecipeRef(name=recipe.name, path=str(loaded.path), sha256=loaded.sha256, content=loaded.text),
            model=loaded_model.info,
            parameters=sum(p.numel() for p in model.parameters()),
            weight_bytes=weight_bytes,
            method=MethodRef(name=plan.method_name, label=plan.method_label, params=plan.method_params),
            hardware=hardware,
            software=software,
            point=PointRef(context=context, batch=batch, new_tokens=settings.new_tokens, warmup=settings.warmup,
                           repeats=settings.repeats, seed=settings.seed),
            load_seconds=load_time.result.seconds,
            load_memory=load_mem.result,
            result=result,
            roofline=_roofline(hardware, weight_bytes - lookup_table_bytes(model), batch, result),
            quality=quality_result,
            kernels=kernels,
            notes=plan.notes + dtype_note(loaded_model.info) + weight_notes + ((thread_note,) if thread_note else ())
            + _notes(hardware, result),
        )
        if append:
            paths.append(append_record(out, record))
        records.append(record)
        (points.write if progress else echo)(describe_point(record))
    return RunResult(plan, tuple(records), tuple(paths))


def _quality(session: QualitySession | None, model: torch.nn.Module, device: torch.device, echo) -> QualityResult | None:
    """Once per run, before the points: each record is then complete when written (nothing lost on interruption)."""
    if session is None:
        return None
    result = session.evaluate(model)
    free_memory(device)  # the quality passes' activations must not count in the measured peaks
    echo(quality_line(result))
    return result


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct parameter and buffer: what the weights occupy, quantized or not."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values()) + quant_state_bytes(model)


def lookup_table_bytes(model: torch.nn.Module) -> int:
    """The input embedding table, which a decode step reads one row of per sequence, not whole; 0 when
    lm_head shares it (then every step reads it whole)."""
    table = getattr(model.get_input_embeddings(), "weight", None)
    output_layer = getattr(model, "get_output_embeddings", lambda: None)()
    output = getattr(output_layer, "weight", None)
    if table is None or table is output or table.device.type == "meta":
        return 0
    return table.numel() * table.element_size()


def _roofline(hardware, weight_bytes_read: int, batch: int, result: PointResult):
    if hardware.kind != "gpu" or result.status != "ok":
        return None
    return decode_roofline(hardware.name, weight_bytes_read, result.cache_bytes or 0, batch,
                           result.decode_tokens_per_s.median)


def describe_kernels(k: Kernels) -> str:
    linear = ", ".join(k.linear) or "torch.nn.Linear"
    return f"runs in {k.compute_dtype}; DeltaNet: {k.deltanet_summary}; Linear: {linear}; attention: {k.attention}"


def _notes(hardware, result: PointResult) -> tuple[str, ...]:
    notes = list(hardware.notes)
    if hardware.kind == "cpu":
        notes.append("CPU run: timings are CPU timings and memory is host RSS; no GPU figures were measured")
    elif gpu_spec(hardware.name) is None:
        notes.append(f"no roofline: {hardware.name} is not in quantlab's GPU bandwidth table")
    return tuple(notes)


def describe_plan(plan: RunPlan) -> str:
    r = plan.recipe
    lines = [
        f"recipe {r.name} ({plan.loaded.path})",
        f"  model   {plan.resolved.name} [{r.model.source}, {r.model.variant}] {plan.model_class}, "
        f"{plan.parameters:,} parameters, {plan.weight_bytes / 1e9:.2f} GB in {r.model.dtype}",
        f"  method  {plan.method_label} ({plan.method_name}"
        f"{', as quantized in the checkpoint' if plan.method_name != r.quantization.method else ''})",
        f"  device  {plan.device}",
        f"  points  contexts {sorted(r.measure.contexts)} × batch {r.measure.batch_sizes}, {r.measure.new_tokens} new tokens, "
        f"{r.measure.warmup} warm-up + {r.measure.repeats} repeats",
    ]
    if plan.quality:
        lines.append(f"  quality {describe_quality_plan(plan.quality)}")
    lines += [f"  note    {n}" for n in plan.notes]
    return "\n".join(lines)


def describe_point(record: Record) -> str:
    p, res = record.point, record.result
    head = f"  context {p.context:>7,} × batch {p.batch}: "
    if res.status != "ok":
        return head + res.error
    return head + (
        f"prefill {res.prefill_tokens_per_s.median:,.0f} tok/s, TTFT {res.time_to_first_token_s.median * 1000:,.0f} ms, "
        f"decode {res.decode_tokens_per_s.median:,.1f} tok/s ({res.decode_ms_per_token.median:.1f} ms/token)"
    )
