"""`quantlab estimate`: estimate, check the article's claims and the GPU records, write the results."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from quantlab.errors import QuantlabError
from quantlab.extras import install_hint, installed
from quantlab.estimate.overheads import calibrate
from quantlab.estimate.against_records import check_records
from quantlab.claims import claims_data
from quantlab.estimate.claims import check_claims
from quantlab.estimate import DEFAULT_CONTEXTS, DEFAULT_METHODS, ESTIMATES_NAME, PLOT_NAME
from quantlab.estimate.estimator import EstimateRequest, EstimateResult, estimate
from quantlab.estimate.model import EstimationModel, load_model
from quantlab.estimate.multi_gpu import parse_gpu_sets
from quantlab.estimate.runtime import runtime_profile
from quantlab.estimate.schemes import parse_schemes
from quantlab.known_models import KNOWN_MODELS
from quantlab.store import load_records, replace_file



@dataclass(frozen=True)
class EstimateOptions:
    model: str = "qwen3.6-27b"
    methods: str = DEFAULT_METHODS
    contexts: str = ",".join(str(c) for c in DEFAULT_CONTEXTS)
    batch: int = 1
    gpu_gb: str = "24"
    runtime: str = "transformers"
    kv_dtype: str | None = None
    state_dtype: str | None = None
    prefill_chunk: int | None = None
    with_vision: bool = False
    with_mtp: bool = False
    gpus: str | None = None  # "2x24,1x48": GPU sets to split each method across
    output: str | None = "measurements"  # where GPU records are read from (None: no records)


def run_estimate(options: EstimateOptions) -> EstimateResult:
    """The whole estimate, with the claims (for Qwen3.6-27B) and checks against GPU records."""
    gpu_sets = parse_gpu_sets(options.gpus) if options.gpus is not None else ()  # bad input refused before any work
    records, _ = load_records(options.output) if options.output else ([], [])
    model = load_model(options.model)
    # The DeltaNet state dtype: the option, else the config's mamba_ssm_dtype, else the profile's (float32).
    rt = runtime_profile(options.runtime, kv_dtype=options.kv_dtype, state_dtype=options.state_dtype or model.shape.ssm_dtype,
                         prefill_chunk=options.prefill_chunk)
    if options.runtime == "transformers":
        rt = calibrate(rt, records)  # PyTorch records say nothing about llama.cpp's overheads
    if options.with_vision and not model.has_vision:
        raise QuantlabError(f"--with-vision: {model.name} has no vision tower")
    schemes, notes = _schemes(options.methods)
    request = EstimateRequest(
        schemes=schemes,
        contexts=tuple(parse_numbers(options.contexts, "--contexts", int)),
        batch=options.batch,
        gpu_gib=tuple(parse_numbers(options.gpu_gb, "--gpu-gb", float)),
        runtime=rt,
        include_vision=options.with_vision,
        include_mtp=options.with_mtp,
        gpu_sets=gpu_sets,
    )
    result = estimate(model, request)
    result = result.model_copy(update={"model": result.model.model_copy(update={"notes": [*result.model.notes, *notes]})})
    claims = _claims(model, records)
    checks, _ = check_records(records, calibrate(runtime_profile("transformers"), records))
    return result.model_copy(
        update={"claims": [c.model_dump() for c in claims], "checks": [c.model_dump() for c in checks]}
    )


def _schemes(methods: str) -> tuple[tuple, list[str]]:
    """The schemes asked for; by default without the GGUF ones when the gguf package is missing (said in a note)."""
    schemes = parse_schemes(methods)
    if methods != DEFAULT_METHODS or installed("gguf"):
        return schemes, []
    kept = tuple(s for s in schemes if not s.is_gguf)
    return kept, [f"GGUF schemes left out: they need the gguf package ({install_hint('gguf')})"]


def _claims(model: EstimationModel, records: list) -> list:
    dense = KNOWN_MODELS[claims_data()["model"]]
    if model.name != dense.display_name or not installed("gguf"):
        return []  # the article's table is GGUF files: its claims need the GGUF schemes
    return check_claims(model, load_model(claims_data()["moe_model"]), records)


def parse_numbers(text: str, flag: str, kind: type) -> list:
    values = []
    for item in (part.strip() for part in str(text).split(",")):
        try:
            values.append(kind(item.replace("_", "")))
        except ValueError:
            raise QuantlabError(f"{flag}: '{item}' is not a number (give a comma-separated list, e.g. 4096,32768)") from None
    if kind is float and any(not math.isfinite(v) or v <= 0 for v in values):
        raise QuantlabError(f"{flag}: sizes must be positive finite numbers, got {text}")
    return values


def write_outputs(result: EstimateResult, output_dir: str | Path) -> list[Path]:
    """estimates.json (read by `quantlab report`) and memory.png, both replaced atomically."""
    from quantlab.estimate.plot import write_png
    from quantlab.outputs import check_measurements_folder

    check_measurements_folder(output_dir)
    target = Path(output_dir) / ESTIMATES_NAME
    replace_file(target, result.model_dump_json(indent=1) + "\n")
    paths = [target]
    if result.claims and installed("matplotlib"):
        paths.append(write_png(result, output_dir))
    elif result.claims:
        print(f"no {PLOT_NAME}: matplotlib is not installed here ({install_hint('matplotlib')})")
    return paths
