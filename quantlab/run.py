"""One run, as the recipe says: plan → load → quantize → measure → record.

What is measured is a Candidate: the source to load, and how its method quantizes it once loaded; or, for a
method whose engine writes a checkpoint (AWQ), that checkpoint, loaded back from disk as any checkpoint is,
with the records naming the recipe's model and method. `quantlab build` measures its build folder the same
way (`measure_candidate`).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import KW_ONLY, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from quantlab import fingerprint
from quantlab.checkpoint import EXTRA_FILES
from quantlab.cost import cost_summary, quantize_cost
from quantlab.device_map import DeviceSplit
from quantlab.fields import memory_bytes, parse_size
from quantlab.finite import describe as describe_nonfinite, model_nonfinite
from quantlab.measure import PointSettings, free_memory, measure_point
from quantlab.methods import method_for
from quantlab.methods.base import Method, WrittenCheckpoint
from quantlab.plan import RunPlan, make_plan
from quantlab.plan_quality import describe_quality_plan
from quantlab.quality.show import quality_line
from quantlab.schema.quality import QualityResult
from quantlab import mtp_shard as T
from quantlab.assess.session import QualitySession
from quantlab.recipe import BuildSpec, LoadedRecipe
from quantlab.quantize.awq.engine import MTP_STAGED
from quantlab.roofline import decode_roofline, gpu_spec
from quantlab.runtimes import RUNTIMES, runtime_for
from quantlab.runtimes.base import LoadRequest, SpeculativeRequest
from quantlab.speculative import describe_speculative, speculative_prompts
from quantlab.schema.build import QuantizeCost
from quantlab.schema.environment import WeightsInfo
from quantlab.schema.measurement import Kernels, MemoryResult, PointResult
from quantlab.schema.record import (
    MethodRef, PointRef, Record, RecipeRef, RuntimeRef, SplitRef, new_run_id, produced_by, record_id, utc_now,
)
from quantlab.checkpoint_formats import format_of
from quantlab.model_file import describe_checkpoint, describe_gguf
from quantlab.sources import GgufSource, ModelSource, resolve
from quantlab.store import append_record
from quantlab.threads import fit_threads
from quantlab.trackers import MemoryTracker, Timer
from quantlab.trackers.nvml import NvmlProbe
from quantlab.trackers.memory import rss_bytes


PUBLISHED = "not quantlab: measured as it is (no quantlab manifest read)"


@dataclass(frozen=True)
class RunResult:
    plan: RunPlan
    records: tuple[Record, ...]
    paths: tuple[Path, ...]


@dataclass(frozen=True)
class Candidate:
    """What a run measures: the source it loads, what quantizes it once loaded, and what the records call it."""

    source: ModelSource
    _: KW_ONLY  # the rest by name: a positional argument must not land in another field
    from_pretrained: dict[str, Any] = field(default_factory=dict)  # the method's extra from_pretrained arguments
    gguf: Path | None = None  # the GGUF file the llama.cpp runtime loads
    quantize: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    names: dict[str, str] = field(default_factory=dict)  # WeightsInfo fields the records state instead of the loaded ones
    notes: tuple[str, ...] = ()
    made_by: str = ""  # who made the GGUF, as its records' file section says


@dataclass(frozen=True)
class _Loaded:
    model: torch.nn.Module
    info: WeightsInfo
    memory: MemoryResult
    seconds: float
    weight_bytes: int
    lookup_table_bytes: int  # the input embedding table: a decode step reads one row of it, not all
    kernels: Kernels
    notes: tuple[str, ...]
    parameters: int
    runtime: RuntimeRef


def run_recipe(
    loaded: LoadedRecipe, output_dir: str | Path | None = None, progress: bool = True, echo: Callable[[str], None] = print,
    append: bool = True,
) -> RunResult:
    """`append=False` returns the records without writing them."""
    out = Path(output_dir or loaded.recipe.output.dir)
    plan = make_plan(loaded, records_to=out if append else None)
    thread_note = fit_threads() if plan.device.type == "cpu" else None  # before any CPU work, an engine's too
    notes = (thread_note,) if thread_note else ()
    echo(describe_plan(plan))
    qconfig = plan.recipe.quantization
    method = method_for(qconfig)
    if isinstance(plan.source, GgufSource):  # someone else's GGUF: measured as the file is
        candidate = Candidate(plan.source, gguf=plan.source.gguf_file, notes=notes, made_by=PUBLISHED)
        return measure_candidate(plan, candidate, out, progress, echo, append)
    if not method.writes_checkpoint:
        candidate = Candidate(plan.source, from_pretrained=method.load_kwargs(qconfig, plan.source),
                              quantize=lambda model: method.apply(model, qconfig), notes=notes)
        return measure_candidate(plan, candidate, out, progress, echo, append)
    with tempfile.TemporaryDirectory(prefix=f"quantlab-{method.name}-") as tmp:
        echo(f"writing the {plan.method_label} checkpoint to a temporary folder ({tmp})")
        written, cost = write_checkpoint(plan, method, Path(tmp), progress, echo)
        notes += written.notes + (
            f"{plan.method_label} {'file' if method.artifact_file else 'checkpoint'} written by engine {written.engine} "
            f"in {cost.seconds:,.1f} s ({cost_summary(cost)}), then loaded from disk by {plan.recipe.measure.runtime} "
            "and measured",
            *([f"calibration: {written.calibration_label}"] if written.calibration_label else []),
        )
        source = plan.source  # the records name the recipe's model, not the temporary folder
        names = {"name": source.name, "source": source.spec.source, "location": source.location, "weights": source.weights}
        if method.artifact_file:
            candidate = Candidate(source, gguf=Path(tmp) / method.artifact_file, names=names, notes=notes,
                                  made_by=f"quantlab, this run ({written.engine}'s tools)")
        else:
            copy_mtp_for_drafting(plan, Path(tmp))
            candidate = checkpoint_candidate(plan, Path(tmp), names, notes)
        return measure_candidate(plan, candidate, out, progress, echo, append)


def write_checkpoint(plan: RunPlan, method: Method, folder: Path, progress: bool, echo) -> tuple[WrittenCheckpoint, QuantizeCost]:
    """The method's engine writes the checkpoint into `folder` (with the source's tokenizer and config files);
    what it cost, in time and memory, is measured around it."""
    recipe, device = plan.recipe, plan.device
    nvml = NvmlProbe(device) if device.type == "cuda" else None
    shard_bytes = parse_size((recipe.build or BuildSpec()).max_shard_size)
    with MemoryTracker(device, nvml=nvml) as memory, Timer(device) as timer:
        written = method.write_checkpoint(recipe.quantization, plan.source, folder, device, shard_bytes, progress, echo)
    copy_side_files(plan.source.files(), folder)
    place_mtp(folder)
    cost = quantize_cost(f"{method.name} engine {written.engine}: read the source, quantize, write", timer.result.seconds,
                         memory.result)
    echo(f"checkpoint written in {cost.seconds:,.1f} s; {cost_summary(cost)}")
    return written, cost


def place_mtp(folder: Path) -> None:
    """A head an engine quantized (staged in MTP_STAGED, quantize/awq/engine.py) moved into the checkpoint's last
    shard, where a build would copy the source's."""
    staged = folder / MTP_STAGED
    if staged.is_dir():
        T.add_mtp_shard(folder, T.mtp_tensors(staged))
        shutil.rmtree(staged)


def copy_mtp_for_drafting(plan: RunPlan, folder: Path) -> None:
    """A run that drafts with the MTP head (measure.speculative) needs it in the checkpoint it serves: the source's
    mtp.* copied byte for byte, as a build copies them (artifact/writer.py), unless the engine wrote one."""
    if plan.recipe.measure.speculative is not None and T.placed_mtp(folder) is None:
        T.add_mtp_shard(folder, T.mtp_tensors(plan.source.files()))


def checkpoint_candidate(plan: RunPlan, folder: Path, names: dict[str, str], notes: tuple[str, ...] = ()) -> Candidate:
    """A checkpoint written for the plan's model, measured as it loads from `folder`, with the plan's method in its
    records and `names` (WeightsInfo fields) in place of the loaded folder's."""
    spec = plan.recipe.model
    local = spec.model_copy(update={"source": "local", "path": str(folder), "id": None, "revision": None, "config": None})
    return Candidate(resolve(local), names=names, notes=notes)


def copy_side_files(source: Path | None, dest: Path) -> list[str]:
    """Tokenizer, chat template, generation and processor configs, licence: copied as they are."""
    copied = []
    for name in EXTRA_FILES:
        path = source / name if source else None
        if path is not None and path.is_file():
            shutil.copyfile(path, dest / name)
            copied.append(name)
    return copied


def measure_candidate(plan: RunPlan, candidate: Candidate, out: Path, progress: bool, echo: Callable[[str], None],
                      append: bool) -> RunResult:
    """Load the candidate, score its quality once (when the recipe asks), then measure every point of the plan."""
    runtime = runtime_for(plan.recipe.measure.runtime)
    device = plan.device
    hardware, software = fingerprint.hardware(device), fingerprint.software()
    nvml = NvmlProbe(device) if device.type == "cuda" else None
    quality = QualitySession(plan, out, progress, echo) if plan.quality else None  # text, tokenizers: no weights yet
    if quality:
        quality.prepare()  # stored mode: the reference pass runs, and is freed, before the candidate loads
    files, file_notes = _describe_file(runtime, candidate, plan, echo, progress)
    candidate = replace(candidate, notes=candidate.notes + file_notes)
    loaded = _load(runtime, candidate, plan, nvml, echo)
    try:
        quality_result = _quality(quality, runtime, loaded.model, device, echo)
        serving = runtime.serving(loaded.model, plan.recipe.measure.seed, echo)
        speculative = _speculative(runtime, loaded.model, plan, echo)
        run_id, records, paths = new_run_id(), [], []
        points = tqdm(plan.points, desc="measuring", unit="point", disable=not progress)
        for context, batch in points:
            m = plan.recipe.measure
            settings = PointSettings(context, batch, m.new_tokens, m.warmup, m.repeats, m.seed, m.memory_sample_ms / 1000)
            result = measure_point(runtime, loaded.model, settings, device, nvml, progress, plan.devices)
            record = _record(plan, loaded, (hardware, software), settings, result, run_id, quality_result,
                             candidate.notes, serving, speculative, files.get(context))
            if append:
                paths.append(append_record(out, record))  # each point as it is measured: nothing lost if one fails
            records.append(record)
            (points.write if progress else echo)(describe_point(record))
    finally:
        runtime.close(loaded.model)  # a server runtime stops its server, also on errors and Ctrl-C
    return RunResult(plan, tuple(records), tuple(paths))


def _describe_file(runtime, candidate: Candidate, plan: RunPlan, echo, progress: bool):
    """Before it loads: a GGUF's sha256, size, type mix and llama.cpp's plan at each context; a published checkpoint's
    shards' sha256 and dtypes; ({}, ()) for anything else."""
    claimed = plan.recipe.model.claimed_size
    claimed = memory_bytes(claimed) if claimed else None
    contexts = sorted(plan.recipe.measure.contexts)
    fmt, folder = format_of(plan.method_name), candidate.source.files()
    if candidate.gguf is None and fmt is not None and folder is not None:
        described = describe_checkpoint(folder, fmt.name, PUBLISHED, claimed, echo, progress)
        return {c: described for c in contexts}, ()
    if candidate.gguf is None:
        return {}, ()
    settings = runtime.options(plan.recipe.measure, plan.device, _longest(plan))
    return describe_gguf(candidate.gguf, candidate.made_by, claimed, contexts, settings.kv_type, settings.slots, echo,
                         progress=progress and candidate.gguf.stat().st_size > 256 << 20)


def _speculative(runtime, model, plan: RunPlan, echo):
    """MTP speculative decoding off and on for each k, once per run, on text prompts of the smallest context."""
    spec, m = plan.recipe.measure.speculative, plan.recipe.measure
    if spec is None:
        return None
    prompts = speculative_prompts(plan.source.tokenizer(required=True, what="measure.speculative"), min(m.contexts),
                                  spec.prompts, m.seed)
    request = SpeculativeRequest(spec, tuple(ids for ids, _ in prompts), tuple(text for _, text in prompts),
                                 m.new_tokens, m.seed)
    results = runtime.speculative(model, request, echo)
    for r in results:
        echo(describe_speculative(r))
    return results


def _load(runtime, candidate: Candidate, plan: RunPlan, nvml, echo) -> _Loaded:
    device, devices = plan.device, plan.devices
    with MemoryTracker(device, nvml=nvml, devices=devices) as memory, Timer(device, devices) as timer:
        loaded = runtime.load(LoadRequest(candidate.source, device, plan.split, candidate.from_pretrained,
                                          candidate.gguf, runtime.options(plan.recipe.measure, device, _longest(plan))))
        model = candidate.quantize(loaded.model) if candidate.quantize else loaded.model
    load_memory = _server_memory(runtime, model, device) or memory.result
    kernels = runtime.kernels(model)
    weight_bytes = runtime.weight_bytes(model)
    echo(f"loaded {loaded.info.model_class} in {timer.result.seconds:.1f} s: {weight_bytes / 1e9:.3f} GB of weights; "
         f"{describe_kernels(kernels)}")
    notes = dtype_note(loaded.info)
    broken = model_nonfinite(model) if isinstance(model, torch.nn.Module) else None
    if broken:
        notes += (f"non-finite weights: {describe_nonfinite(broken)}; the figures measure a broken model",)
        echo(f"warning: {notes[-1]}")
    info = loaded.info.model_copy(update=candidate.names)
    ref = RuntimeRef(name=runtime.name, version=runtime.version(), settings=runtime.settings(model))
    return _Loaded(model, info, load_memory, timer.result.seconds, weight_bytes,
                   runtime.lookup_table_bytes(model), kernels, notes, runtime.parameter_count(model), ref)


def _longest(plan: RunPlan) -> int:
    """The longest sequence the run sends: a point's context and new tokens, or a quality window."""
    m = plan.recipe.measure
    return max(max(m.contexts) + m.new_tokens + 1, plan.quality.spec.context + 1 if plan.quality else 0)


def _server_memory(runtime, model, device: torch.device) -> MemoryResult | None:
    """A runtime whose model lives in a server process: that process tree's RSS once it is up (it did not exist
    before the load, so all of it is the load's), not quantlab's client."""
    pid = runtime.memory_pid(model)
    if pid is None:
        return None
    rss = rss_bytes(pid)
    return MemoryResult(device=str(device), rss_start_bytes=0, rss_end_bytes=rss, rss_peak_bytes=rss, samples=1,
                        rss_of=f"the server's process tree (pid {pid} and its children), read once it answered")


def _record(plan: RunPlan, loaded: _Loaded, machine, settings: PointSettings, result: PointResult, run_id: str,
            quality: QualityResult | None, notes: tuple[str, ...], serving=None, speculative=None, file=None) -> Record:
    hardware, software = machine
    recipe, created = plan.loaded, utc_now()
    return Record(
        record_id=record_id(created, loaded.info.name, plan.method_label, settings.context, settings.batch, run_id),
        run_id=run_id,
        created_at=created,
        produced_by=produced_by(hardware, loaded.info, plan.split.devices if plan.split else ()),
        recipe=RecipeRef(name=recipe.recipe.name, path=str(recipe.path), sha256=recipe.sha256, content=recipe.text),
        model=loaded.info,
        parameters=loaded.parameters,
        weight_bytes=loaded.weight_bytes,
        method=MethodRef(name=plan.method_name, label=plan.method_label, params=plan.method_params),
        hardware=hardware,
        software=software,
        point=PointRef(context=settings.context, batch=settings.batch, new_tokens=settings.new_tokens,
                       warmup=settings.warmup, repeats=settings.repeats, seed=settings.seed),
        load_seconds=loaded.seconds,
        load_memory=loaded.memory,
        result=result,
        roofline=_roofline(hardware, loaded, settings.batch, result),
        quality=quality,
        serving=serving,
        speculative=speculative,
        kernels=loaded.kernels,
        split=split_ref(plan.split) if plan.split is not None else None,
        runtime=loaded.runtime,
        file=file,
        notes=plan.notes + loaded.notes + notes + _notes(hardware),
    )


def split_ref(split: DeviceSplit) -> SplitRef:
    """The record's account of a split: the plan's map, and the GPUs it ran on."""
    gpus = {d: torch.cuda.get_device_properties(torch.device(d)) for d in split.gpus}
    return SplitRef(
        devices=split.devices,
        gpu_names={d: props.name for d, props in gpus.items()},
        gpu_memory_bytes={d: props.total_memory for d, props in gpus.items()},
        offered_bytes=split.max_memory,
        weight_bytes_per_device=split.bytes_per_device,
        layers_per_device=split.layers_per_device,
        device_map=split.device_map,
    )


def _quality(session: QualitySession | None, runtime, model, device: torch.device, echo) -> QualityResult | None:
    """Once per run, before the points: each record is then complete when written (nothing lost on interruption)."""
    if session is None:
        return None
    result = session.evaluate(runtime.scorer(model))
    free_memory(device)  # the quality passes' activations must not count in the measured peaks
    echo(quality_line(result))
    return result


def dtype_note(info: WeightsInfo) -> tuple[str, ...]:
    if info.requested_dtype is None:
        return ()
    return (f"ran in {info.dtype}, not the recipe's {info.requested_dtype}: transformers changed it while loading "
            "(its AWQ CUDA kernels take float16)",)


def _roofline(hardware, loaded: _Loaded, batch: int, result: PointResult):
    if hardware.kind != "gpu" or result.status != "ok":
        return None
    return decode_roofline(hardware.name, loaded.weight_bytes, loaded.lookup_table_bytes, result.cache_bytes or 0, batch,
                           result.decode_tokens_per_s.median)


def describe_kernels(k: Kernels) -> str:
    linear = ", ".join(k.linear) or "torch.nn.Linear"
    cpu = f"; CPU code: {k.cpu_backend.split(' (')[0]}" if k.cpu_backend else ""
    return f"runs in {k.compute_dtype}; DeltaNet: {k.deltanet_summary}; Linear: {linear}; attention: {k.attention}{cpu}"


def _notes(hardware) -> tuple[str, ...]:
    notes = list(hardware.notes)
    if hardware.kind == "cpu":
        notes.append("CPU run: timings are CPU timings and memory is host RSS; no GPU figures were measured")
    elif gpu_spec(hardware.name) is None:
        notes.append(f"no roofline: {hardware.name} is not in quantlab's GPU bandwidth table")
    return tuple(notes)


def describe_plan(plan: RunPlan) -> str:
    r, gguf = plan.recipe, isinstance(plan.source, GgufSource)
    lines = [
        f"recipe {r.name} ({plan.loaded.path})",
        _model_line(plan),
        f"  method  {plan.method_label} ({plan.method_name}"
        f"{', as quantized in the ' + ('file' if gguf else 'checkpoint') if plan.method_name != r.quantization.method else ''})",
        f"  device  {plan.device}" if plan.split is None else f"  devices {', '.join(plan.split.devices)} "
        "(accelerate's device map)",
        *[f"          {line}" for line in (plan.split.lines() if plan.split else ())],
        f"  points  contexts {sorted(r.measure.contexts)} × batch {r.measure.batch_sizes}, {r.measure.new_tokens} new tokens, "
        f"{r.measure.warmup} warm-up + {r.measure.repeats} repeats",
    ]
    if plan.quality:
        lines.append(f"  quality {describe_quality_plan(plan.quality, RUNTIMES[r.measure.runtime].quality_from)}")
    lines += [f"  note    {n}" for n in plan.notes]
    return "\n".join(lines)


def _model_line(plan: RunPlan) -> str:
    r = plan.recipe
    if isinstance(plan.source, GgufSource):
        h = plan.source.header
        return (f"  model   {plan.source.name} [gguf file] GGUF {h.architecture} (planned as {plan.model_class}), "
                f"{plan.parameters:,} parameters, {h.file_bytes / 1e9:.3f} GB file")
    return (f"  model   {plan.source.name} [{r.model.source}, {r.model.variant}] {plan.model_class}, "
            f"{plan.parameters:,} parameters, {plan.weight_bytes / 1e9:.2f} GB in {r.model.dtype}")


def describe_point(record: Record) -> str:
    p, res = record.point, record.result
    head = f"  context {p.context:>7,} × batch {p.batch}: "
    if res.status != "ok":
        return head + res.error
    return head + (
        f"prefill {res.prefill_tokens_per_s.median:,.0f} tok/s, TTFT {res.time_to_first_token_s.median * 1000:,.0f} ms, "
        f"decode {res.decode_tokens_per_s.median:,.1f} tok/s"
        + (f" over {p.batch} sequences ({res.decode_tokens_per_s_per_sequence.median:,.1f} per sequence)"
           if p.batch > 1 and res.decode_tokens_per_s_per_sequence else "")
        + f" ({res.decode_ms_per_token.median:.1f} ms/token)"
    )
