"""`quantlab build RECIPE`: a quantized model folder that anyone can load, check and publish.

recipe → plan (every check, the skip list included, before weights load) → load and quantize →
save → reload → greedy check → measure (quantlab's own loop, on the reloaded build) → card →
checksums → rename. All of it happens in a hidden folder beside the target
(`.NAME.partial-PID-RANDOM`), renamed to NAME at the very end, so an interrupted build never
leaves a complete-looking folder, and a re-run starts clean. Records are appended to the
measurements store only once the folder exists.

Order matters for bitsandbytes: a 4-bit model that has run a forward pass on the CPU has its
weights repacked for the CPU kernel, and saving it then writes wrong weights. So the quantized
model is saved before any forward pass; only then does it generate, and the build must reproduce
those tokens after a reload from disk.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

import quantlab
from quantlab import fingerprint
from quantlab.artifact import tensors as T
from quantlab.artifact.card import card_text, estimator_scheme_key, write_card
from quantlab.checkpoint import payload_bytes, shard_files
from quantlab.checksums import write_checksums
from quantlab.schema.build import BaseModelRef, BuildManifest, GreedyCheck, ReferenceCheck, Unquantized, write_manifest
from quantlab.placement import PARTIAL as _PARTIAL
from quantlab.placement import check_target, move_into_place, recover_interrupted_replace, remove_stale_partials
from quantlab.artifact.cost import cost_summary, quantize_cost
from quantlab.fields import parse_size
from quantlab.artifact.verify import common_prefix, greedy_tokens, prompt_token_ids, teacher_forced_agreement
from quantlab.errors import QuantlabError
from quantlab.finite import checkpoint_nonfinite, describe as describe_nonfinite, model_nonfinite
from quantlab.measure import free_memory
from quantlab.outputs import check_measurements_folder
from quantlab.plan import RunPlan, make_plan
from quantlab.quantize.configs import NoQuant
from quantlab.quantize.handlers import handler_for, load_kwargs_for
from quantlab.recipe import BuildSpec, LoadedRecipe, ModelSpec
from quantlab.schema.record import Record, utc_now
from quantlab.run_checkpoint import quality_against_source
from quantlab.schema.environment import WeightsInfo
from quantlab.sources import DTYPES, load_model, load_pretrained, load_tokenizer, model_class_name, select_variant
from quantlab.store import append_record
from quantlab.threads import fit_threads
from quantlab.trackers import MemoryTracker, Timer
from quantlab.trackers.nvml import NvmlProbe

BUILD_METHODS = ("bnb_int8", "bnb_4bit", "awq")
# Copied verbatim from the source folder when present: tokenizer, chat template, generation and
# processor configs, licence.
EXTRA_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json", "generation_config.json",
    "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json", "LICENSE",
)


@dataclass(frozen=True)
class BuildResult:
    folder: Path
    manifest: BuildManifest
    records: tuple[Record, ...]
    record_paths: tuple[Path, ...]
    disk_bytes: int


def default_target(loaded: LoadedRecipe, out: str | Path | None = None) -> Path:
    spec = loaded.recipe.build or BuildSpec()
    return Path(out or spec.out or Path("builds") / loaded.recipe.name)


def build_recipe(
    loaded: LoadedRecipe,
    out: str | Path | None = None,
    force: bool = False,
    output_dir: str | Path | None = None,
    measure: bool = True,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> BuildResult:
    recipe = loaded.recipe
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
    target = default_target(loaded, out)
    out_dir = Path(output_dir or recipe.output.dir)
    recover_interrupted_replace(target, lambda line: echo(f"note: {line}"))
    # before the plan, the cheap refusals; after it, again with the source folder the plan resolved (a Hub snapshot)
    check_target(target, force, {"the source model's folder": _local_source(recipe.model), "the measurements folder": out_dir})
    # every check, the skip list and the measurements folder included, before any weights load
    plan = make_plan(loaded, records_to=out_dir if measure else None)
    if plan.device.type == "cpu":
        fit_threads()  # before quantizing; the records' note comes from the run that measures the build
    source = source_folder(recipe.model, plan.resolved)
    check_target(target, force, {"the source model's folder": source, "the measurements folder": out_dir})
    _check_finite_source(source, progress, echo)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    tmp = target.parent / f".{target.name}{_PARTIAL}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest, records = _write(plan, loaded, tmp, target, output_dir, measure, progress, echo)
        disk = payload_bytes(tmp)
        if records:
            check_measurements_folder(out_dir)  # again: the records must be written once the folder is in place
        move_into_place(tmp, target, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    paths = tuple(append_record(out_dir, r) for r in records)
    echo(f"built {target}: {disk / 1e6:,.2f} MB of tensors, {len(paths)} record(s) in {out_dir}/records/")
    return BuildResult(target, manifest, tuple(records), paths, disk)


def _write(plan: RunPlan, loaded: LoadedRecipe, tmp: Path, target: Path, output_dir, measure: bool, progress: bool, echo):
    recipe, device = plan.recipe, plan.device
    spec = recipe.build or BuildSpec()
    config, auto_class = select_variant(plan.resolved.config, recipe.model.variant)
    handler = handler_for(recipe.quantization)
    skip = handler.skip_plan(recipe.quantization, config)
    source = source_folder(recipe.model, plan.resolved)

    echo(f"quantizing {plan.resolved.name} ({plan.method_label}) on {device}")
    nvml = NvmlProbe(device) if device.type == "cuda" else None
    with MemoryTracker(device, nvml=nvml) as memory, Timer(device) as timer:
        if getattr(handler, "writes_checkpoint", False):
            made = _write_checkpoint(plan, tmp, spec, progress, echo)
        else:
            made = _quantize_and_save(plan, config, tmp, spec, handler)
    cost = quantize_cost(made.what, timer.result.seconds, memory.result)
    echo(f"quantized in {cost.seconds:,.1f} s; {cost_summary(cost)}")
    tokenizer, info, prompt_ids, in_memory = made.tokenizer, made.info, made.prompt_ids, made.in_memory

    copied = copy_extras(source, tmp)
    mtp = T.add_mtp_shard(tmp, T.mtp_tensors(source))
    echo(f"saved to {tmp.name}: {len(shard_files(tmp))} shard(s)"
         + (f", {mtp['tensors']} mtp.* tensors copied" if mtp else ", no mtp.* tensors in the source")
         + (f", {len(copied)} tokenizer/config file(s)" if copied else ""))

    reloaded = load_pretrained(auto_class, tmp, device_map=str(device))  # plain transformers, as a user would
    broken = model_nonfinite(reloaded)
    if broken:
        raise QuantlabError(f"the saved build holds non-finite weights, {describe_nonfinite(broken)}; not keeping it")
    tokens = greedy_tokens(reloaded, prompt_ids, spec.check_tokens, device)
    reference = _against_source(reloaded, prompt_ids, tokens, made, device, echo)
    del reloaded
    free_memory(device)
    if in_memory is None:
        echo(f"greedy check: reloaded with plain transformers and generated {len(tokens)} tokens")
    elif tokens != in_memory:
        raise QuantlabError(
            f"the saved build does not reproduce the quantized model: greedy tokens {tokens} after reload, "
            f"{in_memory} before saving. The weights on disk differ from those in memory; not keeping this build"
        )
    else:
        echo(f"greedy check: {len(tokens)} tokens reproduced after reloading from disk")

    hardware = fingerprint.hardware(device)
    software = fingerprint.software()
    manifest = BuildManifest(
        name=target.name,
        created_at=utc_now(),
        quantlab=quantlab.__version__,
        git_commit=software.git_commit,
        recipe={"name": recipe.name, "path": str(loaded.path), "sha256": loaded.sha256, "content": loaded.text},
        base=BaseModelRef(
            name=plan.resolved.name, source=recipe.model.source, location=plan.resolved.location, revision=info.revision,
            hub_id=_hub_id(recipe.model, spec), license=_license(recipe.model, spec, source), variant=recipe.model.variant,
            dtype=recipe.model.dtype, model_class=info.model_class,
        ),
        method={"name": recipe.quantization.method, "label": plan.method_label, "params": recipe.quantization.model_dump()},
        unquantized=Unquantized(
            skip_modules=list(skip.patterns), rule_patterns=list(skip.rule_patterns), extra_patterns=list(skip.extra_patterns),
            kept_linears=list(skip.kept), quantized_linears=len(skip.quantized),
        ),
        mtp=mtp,
        greedy=GreedyCheck(
            prompt=spec.prompt if tokenizer is not None else "", prompt_ids=prompt_ids, new_tokens=spec.check_tokens,
            tokens=tokens, text=tokenizer.decode(tokens) if tokenizer is not None else None, device=str(device),
            auto_class=auto_class.__name__, reference=reference, reference_note=made.reference_note,
        ),
        built_on=f"{hardware.kind.upper()} {hardware.name}",
        cost=cost,
        engine=made.engine,
    )
    write_manifest(tmp, manifest)  # before measuring: records name the build after its base model

    records: list[Record] = []
    if measure:
        records = _measure(loaded, tmp, target, output_dir, progress, echo)
        manifest = manifest.model_copy(update={"record_ids": [r.record_id for r in records]})
        write_manifest(tmp, manifest)

    kept, quantized_weights = T.unquantized_groups(tmp, info.model_class)
    disk = payload_bytes(tmp)
    write_card(tmp, card_text(
        manifest, kept, quantized_weights, disk, len(shard_files(tmp)),
        _estimate(tmp, manifest, disk), records, repo_hint=f"<user>/{target.name}",
    ))
    _make_readable(tmp)
    write_checksums(tmp)
    return manifest, records


@dataclass(frozen=True)
class _Made:
    """What the quantize-and-save step leaves for the rest of the build."""

    tokenizer: object | None
    info: WeightsInfo
    prompt_ids: list[int]
    in_memory: list[int] | None  # greedy tokens of the in-memory quantized model, when there is one
    what: str  # what the cost covers
    engine: dict | None = None
    reference: list[int] | None = None  # greedy tokens of the unquantized source, for engines that write a checkpoint
    reference_note: str | None = None  # why there are none


REFERENCE_THRESHOLD = 0.5  # a sound 4-bit build predicts most of its source's greedy tokens; a broken one ~none


def _against_source(reloaded, prompt_ids: list[int], tokens: list[int], made: _Made, device, echo) -> ReferenceCheck | None:
    """The reloaded build against its unquantized source: refused when it predicts too few of its tokens."""
    if made.reference is None:
        if made.reference_note:
            echo(f"reference check: none ({made.reference_note})")
        return None
    agreement = teacher_forced_agreement(reloaded, prompt_ids, made.reference, device)
    check = ReferenceCheck(model="the unquantized source", tokens=made.reference, agreement=agreement,
                           common_prefix=common_prefix(tokens, made.reference), threshold=REFERENCE_THRESHOLD)
    if agreement < REFERENCE_THRESHOLD:
        raise QuantlabError(
            f"the build predicts {agreement:.0%} of its unquantized source's {len(made.reference)} greedy tokens "
            f"(below {REFERENCE_THRESHOLD:.0%}; a sound build predicts most of them): it is broken, not keeping it")
    echo(f"reference check: the build predicts {agreement:.0%} of the unquantized source's {len(made.reference)} greedy "
         f"tokens; its own greedy run shares the first {check.common_prefix}")
    return check


def _quantize_and_save(plan: RunPlan, config, tmp: Path, spec: BuildSpec, handler) -> _Made:
    """Methods that quantize a loaded model (bitsandbytes): load, quantize, save, then generate."""
    recipe, device = plan.recipe, plan.device
    loaded_model = load_model(recipe.model, plan.resolved, device, load_kwargs_for(recipe.quantization, config))
    model = handler.apply(loaded_model.model, recipe.quantization)
    # Save before any forward pass (see the module docstring).
    model.save_pretrained(tmp, max_shard_size=spec.max_shard_size)
    tokenizer = loaded_model.tokenizer
    prompt_ids = prompt_token_ids(tokenizer, spec.prompt, model.get_input_embeddings().num_embeddings)
    in_memory = greedy_tokens(model, prompt_ids, spec.check_tokens, device)
    del model, loaded_model.model
    free_memory(device)
    what = f"load, quantize, save, {spec.check_tokens}-token greedy run"
    return _Made(tokenizer, loaded_model.info, prompt_ids, in_memory, what)


def _write_checkpoint(plan: RunPlan, tmp: Path, spec: BuildSpec, progress: bool, echo) -> _Made:
    """Methods whose engine writes the checkpoint from the source's files (AWQ)."""
    from quantlab.quantize.awq.handler import write_checkpoint

    recipe = plan.recipe
    written = write_checkpoint(plan, tmp, parse_size(spec.max_shard_size), progress, echo)
    config, auto_class = select_variant(plan.resolved.config, recipe.model.variant)
    folder = source_folder(recipe.model, plan.resolved)
    tokenizer = load_tokenizer(str(folder) if folder else None)
    vocab = config.get_text_config().vocab_size
    revision = folder.name if folder is not None and folder.parent.name == "snapshots" else None  # a Hub cache snapshot
    info = WeightsInfo(
        name=plan.resolved.name, source=recipe.model.source, weights="real", location=plan.resolved.location,
        revision=revision, model_class=model_class_name(config, auto_class), variant=recipe.model.variant,
        dtype=recipe.model.dtype,
    )
    engine = {"name": written.outcome.engine, "quantized_linears": len(written.outcome.quantized),
              "notes": list(written.outcome.notes),
              "calibration": written.calibration.description if written.calibration else None,
              "calibration_label": written.calibration.label if written.calibration else None}
    prompt_ids = prompt_token_ids(tokenizer, spec.prompt, vocab)
    reference, note = _source_greedy(plan, folder, auto_class, prompt_ids, spec.check_tokens)
    return _Made(tokenizer, info, prompt_ids, None,
                 f"AWQ engine {written.outcome.engine}: read the source, calibrate, quantize, write", engine,
                 reference, note)


def _source_greedy(plan: RunPlan, folder: Path | None, auto_class, prompt_ids: list[int], new_tokens: int):
    """The unquantized source's greedy tokens: what the build is compared with. A source larger than the free
    GPU memory is spread by accelerate (device_map auto); synthetic weights have no source to compare with."""
    if folder is None:
        return None, "synthetic weights: the engine makes its own random layers, which no unquantized model shares"
    device = plan.device
    dtype = DTYPES[plan.recipe.model.dtype]
    device_map = str(device)
    if device.type == "cuda" and plan.weight_bytes * 1.1 > torch.cuda.mem_get_info(device)[0]:
        device_map = "auto"
    source = load_pretrained(auto_class, folder, dtype=dtype, device_map=device_map)
    tokens = greedy_tokens(source, prompt_ids, new_tokens, next(source.parameters()).device)
    del source
    free_memory(device)
    return tokens, None


def _measure(loaded: LoadedRecipe, tmp: Path, target: Path, output_dir, progress: bool, echo) -> list[Record]:
    """The build measured as any checkpoint is: a local source, reloaded from disk by `quantlab run`'s loop."""
    from quantlab.run import run_recipe

    recipe = loaded.recipe
    spec = recipe.model
    derived = recipe.model_copy(update={
        "model": ModelSpec(source="local", path=str(tmp), variant=spec.variant, dtype=spec.dtype, device=spec.device,
                           seed=spec.seed),
        "quantization": NoQuant(),
        "quality": quality_against_source(recipe),
        "build": None,
    })
    result = run_recipe(LoadedRecipe(derived, loaded.path, loaded.text, loaded.sha256), output_dir, progress, echo,
                        append=False)
    note = f"measured from the build folder {target} after reloading it from disk"
    return [
        r.model_copy(update={"model": r.model.model_copy(update={"location": str(target)}), "notes": (*r.notes, note)})
        for r in result.records
    ]


def _estimate(folder: Path, manifest: BuildManifest, disk: int) -> tuple[int, str] | None:
    """quantlab's estimate of this build's tensor bytes, and the delta to the files."""
    from quantlab.estimate.estimator import weights_for
    from quantlab.estimate.model import load_model as load_estimation_model
    from quantlab.estimate.schemes import get_scheme

    key = estimator_scheme_key(manifest.method["name"], manifest.method["params"])
    if key is None or manifest.method["params"].get("skip_modules"):
        return None
    try:
        scheme = get_scheme(key)
        model = load_estimation_model(str(folder))
    except QuantlabError:
        return None
    estimated = weights_for(model, scheme, manifest.base.dtype).bytes(
        include_vision=model.has_vision, include_mtp=manifest.mtp is not None
    )
    return estimated, f"{estimated / disk - 1:+.2%} vs the files"


# ---- source folder, extras ------------------------------------------------------------------------------

def source_folder(spec: ModelSpec, resolved) -> Path | None:
    """The folder of the source checkpoint's files, for tokenizer files and MTP tensors."""
    if spec.source in ("bundled", "local"):
        return Path(resolved.location)
    if spec.source == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec.id, "config.json", revision=spec.revision)
        return Path(cached).parent if isinstance(cached, str) else None
    return None


def _local_source(spec: ModelSpec) -> Path | None:
    if spec.source == "local":
        return Path(spec.path).expanduser()
    if spec.source == "bundled":
        from quantlab.bundled import BUNDLED_MODEL_DIR

        return BUNDLED_MODEL_DIR
    return None


def copy_extras(source: Path | None, dest: Path) -> list[str]:
    """Tokenizer, chat template, generation and processor configs, licence: copied as they are."""
    copied = []
    for name in EXTRA_FILES:
        path = source / name if source else None
        if path is not None and path.is_file():
            shutil.copyfile(path, dest / name)
            copied.append(name)
    return copied


def _hub_id(spec: ModelSpec, build: BuildSpec) -> str | None:
    if build.base_model:
        return build.base_model
    if spec.source == "hub":
        return spec.id
    if spec.source == "local":  # a Hugging Face cache snapshot: .../models--ORG--NAME/snapshots/REV
        match = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", str(Path(spec.path).expanduser().resolve()))
        return f"{match.group(1)}/{match.group(2)}" if match else None
    return None


def _license(spec: ModelSpec, build: BuildSpec, source: Path | None) -> str | None:
    if build.license:
        return build.license
    if spec.source == "bundled":
        return "apache-2.0"  # quantlab's own model, under quantlab's licence
    card = source / "README.md" if source else None
    if card is not None and card.is_file():
        text = card.read_text(encoding="utf-8", errors="replace")
        match = re.match(r"^---\s*\n(.*?)\n---", text, re.S)
        if match:
            try:
                meta = yaml.safe_load(match.group(1)) or {}
            except yaml.YAMLError:
                meta = {}
            if isinstance(meta, dict) and meta.get("license"):
                return str(meta["license"])
    return None


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
