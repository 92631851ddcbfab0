"""`quantlab build RECIPE`: a quantized model folder that anyone can load, check and publish.

recipe → plan (every check, the skip list included, before weights load) → quantize → save → reload → greedy
check (and, for an engine that writes the checkpoint, a check against the unquantized source) → measure
(quantlab's own loop, on the reloaded build) → card → checksums → rename. All of it happens in a hidden folder
beside the target (`.NAME.partial-PID-RANDOM`), renamed to NAME at the very end, so an interrupted build never
leaves a complete-looking folder, and a re-run starts clean. Records are appended to the measurements store only
once the folder exists.

Order matters for bitsandbytes: a 4-bit model that has run a forward pass on the CPU has its weights repacked
for the CPU kernel, and saving it then writes wrong weights. So the quantized model is saved before any forward
pass; only then does it generate, and the build must reproduce those tokens after a reload from disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import quantlab
from quantlab import fingerprint
from quantlab.artifact import tensors as T
from quantlab.artifact.results import BuildResult
from quantlab.artifact.card import card_text, write_card
from quantlab.artifact.verify import common_prefix, greedy_tokens, prompt_token_ids, teacher_forced_agreement
from quantlab.checkpoint import payload_bytes, shard_files
from quantlab.checksums import write_checksums
from quantlab.cost import cost_summary, quantize_cost
from quantlab.errors import QuantlabError
from quantlab.finite import checkpoint_nonfinite, describe as describe_nonfinite, model_nonfinite
from quantlab.measure import free_memory
from quantlab.methods import METHODS, method_for
from quantlab.outputs import check_measurements_folder
from quantlab.placement import building, check_target, recover_interrupted_replace
from quantlab.plan import RunPlan, make_plan
from quantlab.recipe import BuildSpec, LoadedRecipe
from quantlab.run import checkpoint_candidate, copy_side_files, measure_candidate, write_checkpoint
from quantlab.runtimes import transformers as transformers_runtime
from quantlab.schema.build import BaseModelRef, BuildManifest, GreedyCheck, QuantizeCost, ReferenceCheck, Unquantized, write_manifest
from quantlab.schema.record import MethodRef, Record, RecipeRef, utc_now
from quantlab.store import append_record
from quantlab.threads import fit_threads
from quantlab.trackers import MemoryTracker, Timer
from quantlab.trackers.nvml import NvmlProbe

BUILD_METHODS = tuple(name for name, method in METHODS.items() if method.builds)
REFERENCE_THRESHOLD = 0.5  # a sound 4-bit build predicts most of its source's greedy tokens; a broken one ~none


@dataclass(frozen=True)
class _Quantized:
    """What the quantize-and-save step leaves for the rest of the build."""

    tokenizer: object | None
    prompt_ids: list[int]
    cost: QuantizeCost
    in_memory: list[int] | None = None  # greedy tokens of the in-memory quantized model, when there is one
    reference: list[int] | None = None  # greedy tokens of the unquantized source (engines that write a checkpoint)
    reference_note: str | None = None  # why there are none
    engine: dict | None = None


def default_target(loaded: LoadedRecipe, out: str | Path | None = None) -> Path:
    spec = loaded.recipe.build or BuildSpec()
    return Path(out or spec.out or Path("builds") / loaded.recipe.name)


def build_recipe(
    loaded: LoadedRecipe, out: str | Path | None = None, force: bool = False, output_dir: str | Path | None = None,
    measure: bool = True, progress: bool = True, echo: Callable[[str], None] = print,
) -> BuildResult:
    recipe = loaded.recipe
    _check_buildable(recipe)
    target = default_target(loaded, out)
    out_dir = Path(output_dir or recipe.output.dir)
    recover_interrupted_replace(target, lambda line: echo(f"note: {line}"))
    if METHODS[recipe.quantization.method].artifact_file:
        from quantlab.artifact.gguf_build import build_gguf

        return build_gguf(loaded, target, force, out_dir, measure, progress, echo)
    # every check, the skip list and the measurements folder included, before any weights load
    plan = make_plan(loaded, records_to=out_dir if measure else None)
    if plan.device.type == "cpu":
        fit_threads()  # before quantizing; the records' note comes from the run that measures the build
    source = plan.source.files()
    check_target(target, force, {"the source model's folder": source, "the measurements folder": out_dir})
    _check_finite_source(source, progress, echo)
    with building(target, force) as tmp:
        manifest, records = _build_in(plan, tmp, target, out_dir, measure, progress, echo)
        disk = payload_bytes(tmp)
        if records:
            check_measurements_folder(out_dir)  # again: the records must be written once the folder is in place
    paths = tuple(append_record(out_dir, r) for r in records)
    echo(f"built {target}: {disk / 1e6:,.2f} MB of tensors, {len(paths)} record(s) in {out_dir}/records/")
    return BuildResult(target, manifest, tuple(records), paths, disk)


def _check_buildable(recipe) -> None:
    if recipe.quantization.method not in BUILD_METHODS:
        raise QuantlabError(
            f"quantization.method {recipe.quantization.method}: quantlab builds {', '.join(BUILD_METHODS)} "
            "checkpoints; `quantlab run` measures the others in memory"
        )
    if recipe.model.source == "synthetic":
        raise QuantlabError(
            "model.source synthetic: a build is a checkpoint for others to use, and random weights are not one. "
            "`quantlab run` measures synthetic weights in memory; build from bundled, local or hub weights"
        )


def _build_in(plan: RunPlan, tmp: Path, target: Path, out_dir: Path, measure: bool, progress: bool, echo):
    spec = plan.recipe.build or BuildSpec()
    echo(f"quantizing {plan.source.name} ({plan.method_label}) on {plan.device}")
    made = _quantize(plan, tmp, spec, progress, echo)
    echo(f"quantized in {made.cost.seconds:,.1f} s; {cost_summary(made.cost)}")
    copied = copy_side_files(plan.source.files(), tmp)
    mtp = _mtp_shard(plan, tmp, made)
    echo(f"saved to {tmp.name}: {len(shard_files(tmp))} shard(s)"
         + (f", {mtp['tensors']} mtp.* tensors written by the engine ({mtp['quantized_linears']} Linears quantized)"
            if mtp and "quantized_linears" in mtp else f", {mtp['tensors']} mtp.* tensors copied" if mtp
            else ", no mtp.* tensors in the source")
         + (f", {len(copied)} tokenizer/config file(s)" if copied else ""))
    greedy = _greedy_check(plan, tmp, made, spec, echo)
    manifest = _manifest(plan, target, made, mtp, greedy)
    write_manifest(tmp, manifest)  # before measuring: records name the build after its base model
    records: list[Record] = []
    if measure:
        note = f"measured from the build folder {target} after reloading it from disk"
        candidate = checkpoint_candidate(plan, tmp, {"name": plan.source.name, "location": str(target)}, (note,))
        records = list(measure_candidate(plan, candidate, out_dir, progress, echo, append=False).records)
        manifest = manifest.model_copy(update={"record_ids": [r.record_id for r in records]})
        write_manifest(tmp, manifest)
    kept, quantized_weights = T.unquantized_groups(tmp, manifest.base.model_class)
    disk = payload_bytes(tmp)
    write_card(tmp, card_text(manifest, kept, quantized_weights, disk, len(shard_files(tmp)),
                              _estimate(tmp, manifest, disk), records, repo_hint=f"<user>/{target.name}"))
    _make_readable(tmp)
    write_checksums(tmp)
    return manifest, records


def _mtp_shard(plan: RunPlan, tmp: Path, made: _Quantized) -> dict | None:
    """The MTP head: the one the engine quantized and placed (AWQ `mtp: quantize`), described with the engine's
    own note on how; otherwise the source's mtp.* tensors, copied byte for byte into one more shard."""
    placed = T.placed_mtp(tmp)
    if placed is None:
        return T.add_mtp_shard(tmp, T.mtp_tensors(plan.source.files()))
    notes = (made.engine or {}).get("notes", [])
    placed["how"] = next((n for n in notes if n.startswith("MTP head:")), None)
    return placed


def _quantize(plan: RunPlan, tmp: Path, spec: BuildSpec, progress: bool, echo) -> _Quantized:
    method = method_for(plan.recipe.quantization)
    if method.writes_checkpoint:
        return _engine_checkpoint(plan, method, tmp, spec, progress, echo)
    return _quantize_and_save(plan, method, tmp, spec)


def _quantize_and_save(plan: RunPlan, method, tmp: Path, spec: BuildSpec) -> _Quantized:
    """Methods that quantize a loaded model (bitsandbytes): load, quantize, save, then generate."""
    qconfig, device = plan.recipe.quantization, plan.device
    nvml = NvmlProbe(device) if device.type == "cuda" else None
    with MemoryTracker(device, nvml=nvml) as memory, Timer(device) as timer:
        loaded = transformers_runtime.load_model(plan.source, device, method.load_kwargs(qconfig, plan.source))
        model = method.apply(loaded.model, qconfig)
        model.save_pretrained(tmp, max_shard_size=spec.max_shard_size)  # before any forward pass (docstring)
        prompt_ids = prompt_token_ids(loaded.tokenizer, spec.prompt, model.get_input_embeddings().num_embeddings)
        in_memory = greedy_tokens(model, prompt_ids, spec.check_tokens, device)
    del model, loaded.model
    free_memory(device)
    cost = quantize_cost(f"load, quantize, save, {spec.check_tokens}-token greedy run", timer.result.seconds,
                         memory.result)
    return _Quantized(loaded.tokenizer, prompt_ids, cost, in_memory=in_memory)


def _engine_checkpoint(plan: RunPlan, method, tmp: Path, spec: BuildSpec, progress: bool, echo) -> _Quantized:
    """Methods whose engine writes the checkpoint from the source's files (AWQ)."""
    written, cost = write_checkpoint(plan, method, tmp, progress, echo)
    tokenizer = plan.source.tokenizer()
    prompt_ids = prompt_token_ids(tokenizer, spec.prompt, plan.source.variant()[0].get_text_config().vocab_size)
    reference, note = _source_greedy(plan, prompt_ids, spec.check_tokens)
    engine = {"name": written.engine, "quantized_linears": len(written.quantized), "notes": list(written.notes),
              "calibration": written.calibration_description, "calibration_label": written.calibration_label}
    return _Quantized(tokenizer, prompt_ids, cost, reference=reference, reference_note=note, engine=engine)


def _source_greedy(plan: RunPlan, prompt_ids: list[int], new_tokens: int) -> tuple[list[int] | None, str | None]:
    """The unquantized source's greedy tokens: what the build is compared with. A source larger than the free
    GPU memory is spread by accelerate (device_map auto); synthetic weights have no source to compare with."""
    if plan.source.synthetic:
        return None, "synthetic weights: the engine makes its own random layers, which no unquantized model shares"
    device = plan.device
    device_map = str(device)
    if device.type == "cuda" and plan.weight_bytes * 1.1 > torch.cuda.mem_get_info(device)[0]:
        device_map = "auto"
    auto_class = plan.source.variant()[1]
    source = transformers_runtime.load_pretrained(auto_class, plan.source.load_location(),
                                                  dtype=transformers_runtime.DTYPES[plan.recipe.model.dtype], device_map=device_map)
    tokens = greedy_tokens(source, prompt_ids, new_tokens, next(source.parameters()).device)
    del source
    free_memory(device)
    return tokens, None


def _greedy_check(plan: RunPlan, tmp: Path, made: _Quantized, spec: BuildSpec, echo) -> GreedyCheck:
    """The build reloaded with plain transformers, as a user would: it must reproduce the in-memory model's
    greedy tokens (bitsandbytes), or predict most of its unquantized source's (an engine's checkpoint)."""
    device, auto_class = plan.device, plan.source.variant()[1]
    reloaded = transformers_runtime.load_pretrained(auto_class, tmp, device_map=str(device))
    broken = model_nonfinite(reloaded)
    if broken:
        raise QuantlabError(f"the saved build holds non-finite weights, {describe_nonfinite(broken)}; not keeping it")
    tokens = greedy_tokens(reloaded, made.prompt_ids, spec.check_tokens, device)
    reference = _against_source(reloaded, made, tokens, device, echo)
    del reloaded
    free_memory(device)
    if made.in_memory is None:
        echo(f"greedy check: reloaded with plain transformers and generated {len(tokens)} tokens")
    elif tokens != made.in_memory:
        raise QuantlabError(
            f"the saved build does not reproduce the quantized model: greedy tokens {tokens} after reload, "
            f"{made.in_memory} before saving. The weights on disk differ from those in memory; not keeping this build"
        )
    else:
        echo(f"greedy check: {len(tokens)} tokens reproduced after reloading from disk")
    tokenizer = made.tokenizer
    return GreedyCheck(
        prompt=spec.prompt if tokenizer is not None else "", prompt_ids=made.prompt_ids, new_tokens=spec.check_tokens,
        tokens=tokens, text=tokenizer.decode(tokens) if tokenizer is not None else None, device=str(device),
        auto_class=auto_class.__name__, reference=reference, reference_note=made.reference_note,
    )


def _against_source(reloaded, made: _Quantized, tokens: list[int], device, echo) -> ReferenceCheck | None:
    """The reloaded build against its unquantized source: refused when it predicts too few of its tokens."""
    if made.reference is None:
        if made.reference_note:
            echo(f"reference check: none ({made.reference_note})")
        return None
    agreement = teacher_forced_agreement(reloaded, made.prompt_ids, made.reference, device)
    check = ReferenceCheck(model="the unquantized source", tokens=made.reference, agreement=agreement,
                           common_prefix=common_prefix(tokens, made.reference), threshold=REFERENCE_THRESHOLD)
    if agreement < REFERENCE_THRESHOLD:
        raise QuantlabError(
            f"the build predicts {agreement:.0%} of its unquantized source's {len(made.reference)} greedy tokens "
            f"(below {REFERENCE_THRESHOLD:.0%}; a sound build predicts most of them): it is broken, not keeping it")
    echo(f"reference check: the build predicts {agreement:.0%} of the unquantized source's {len(made.reference)} greedy "
         f"tokens; its own greedy run shares the first {check.common_prefix}")
    return check


def _manifest(plan: RunPlan, target: Path, made: _Quantized, mtp: dict | None, greedy: GreedyCheck) -> BuildManifest:
    recipe, source, spec = plan.recipe, plan.source, plan.recipe.build or BuildSpec()
    method = method_for(recipe.quantization)
    skip = method.skip_rules(recipe.quantization, source)
    software, hardware = fingerprint.software(), fingerprint.hardware(plan.device)
    loaded = plan.loaded
    return BuildManifest(
        name=target.name, created_at=utc_now(), quantlab=quantlab.__version__, git_commit=software.git_commit,
        recipe=RecipeRef(name=recipe.name, path=str(loaded.path), sha256=loaded.sha256, content=loaded.text),
        base=BaseModelRef(
            name=source.name, source=recipe.model.source, location=source.location, revision=source.revision,
            hub_id=spec.base_model or source.hub_id, license=spec.license or source.license(),
            variant=recipe.model.variant, dtype=recipe.model.dtype, model_class=plan.model_class,
        ),
        method=MethodRef(name=method.name, label=plan.method_label, params=recipe.quantization.model_dump()),
        unquantized=Unquantized(
            skip_modules=list(skip.patterns), rule_patterns=list(skip.rule_patterns),
            extra_patterns=list(skip.extra_patterns), kept_linears=list(skip.kept), quantized_linears=len(skip.quantized),
        ),
        mtp=mtp, greedy=greedy, built_on=f"{hardware.kind.upper()} {hardware.name}", cost=made.cost, engine=made.engine,
    )


def _estimate(folder: Path, manifest: BuildManifest, disk: int) -> tuple[int, str] | None:
    """quantlab's estimate of this build's tensor bytes, and the delta to the files."""
    from quantlab.estimate.estimator import weights_for
    from quantlab.estimate.model import read_estimation_model
    from quantlab.estimate.schemes import get_scheme

    key = METHODS[manifest.method.name].estimator_scheme(manifest.method.params, manifest.base.dtype)
    if key is None:
        return None
    try:
        scheme = get_scheme(key)
        model = read_estimation_model(str(folder))
    except QuantlabError:
        return None
    estimated = weights_for(model, scheme, manifest.base.dtype).bytes(
        include_vision=model.has_vision, include_mtp=manifest.mtp is not None
    )
    return estimated, f"{estimated / disk - 1:+.2%} vs the files"


# ---- checks before quantizing ---------------------------------------------------------------------------

def _check_finite_source(source: Path | None, progress: bool, echo) -> None:
    """A build refuses a source checkpoint with NaN or inf weights (a Hub source not in the cache yet is
    checked after quantizing, on the reloaded build)."""
    if source is None:
        return
    broken = checkpoint_nonfinite(source, progress)
    if broken:
        raise QuantlabError(f"{source}: the source checkpoint holds non-finite weights, {describe_nonfinite(broken)}; "
                            "a build of it would be broken. Re-download or re-copy the checkpoint")


def _make_readable(folder: Path) -> None:
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # save_pretrained leaves some files 0600
