"""`quantlab estimate`: estimate, check the article's claims and the GPU records, write the results."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from quantlab.errors import QuantlabError
from quantlab.extras import install_hint, installed
from quantlab.estimate.overheads import calibrate, skipped_records
from quantlab.estimate.against_records import check_records
from quantlab.claims import claims_data
from quantlab.estimate.claims import check_claims
from quantlab.estimate import DEFAULT_CONTEXTS, DEFAULT_METHODS, ESTIMATES_NAME, PLOT_NAME
from quantlab.estimate.config_check import excerpt_number
from quantlab.estimate.estimator import EstimateRequest, EstimateResult, estimate
from quantlab.estimate.model import EstimationModel, read_estimation_model
from quantlab.estimate.multi_gpu import check_gpu_gib, parse_gpu_sets
from quantlab.estimate.runtime import MAX_BATCH, runtime_profile
from quantlab.estimate.schemes import parse_schemes
from quantlab.known_models import KNOWN_MODELS
from quantlab.recipe import MAX_CONTEXT
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


@dataclass(frozen=True)
class NumericOptions:
    """The numbers the command line gives, each checked before any model is read."""

    contexts: tuple[int, ...]
    gpu_gib: tuple[float, ...]
    gpu_sets: tuple


def parse_numeric_options(options: EstimateOptions) -> NumericOptions:
    """Every numeric option in range, or one QuantlabError naming the option: bad input is refused before any work."""
    contexts = tuple(parse_numbers(options.contexts, "--contexts", int))
    for context in contexts:
        in_range(context, "--contexts", "context", (1, MAX_CONTEXT), " tokens")
    in_range(options.batch, "--batch", "batch", (1, MAX_BATCH))
    if options.prefill_chunk is not None:
        in_range(options.prefill_chunk, "--prefill-chunk", "prefill chunk", (1, MAX_CONTEXT), " tokens")
    gpu_gib = tuple(parse_numbers(options.gpu_gb, "--gpu-gb", float))
    for gib in gpu_gib:
        check_gpu_gib(gib, "--gpu-gb", f"{gib:g}")
    gpu_sets = parse_gpu_sets(options.gpus) if options.gpus is not None else ()
    return NumericOptions(contexts, gpu_gib, gpu_sets)


def in_range(value: int, flag: str, what: str, bounds: tuple[int, int], unit: str = "") -> None:
    least, most = bounds
    if not least <= value <= most:
        raise QuantlabError(f"{flag}: {what} must be between {least:,} and {most:,}{unit}, got {excerpt_number(value)}")


def run_estimate(options: EstimateOptions) -> EstimateResult:
    """The whole estimate, with the claims (for Qwen3.6-27B) and checks against GPU records."""
    numbers = parse_numeric_options(options)
    records, _ = load_records(options.output) if options.output else ([], [])
    model = read_estimation_model(options.model)
    # The DeltaNet state dtype: the option, else the config's mamba_ssm_dtype, else the profile's (float32).
    rt = runtime_profile(options.runtime, kv_dtype=options.kv_dtype, state_dtype=options.state_dtype or model.shape.ssm_dtype,
                         prefill_chunk=options.prefill_chunk)
    if options.runtime == "transformers":
        rt = calibrate(rt, records)  # PyTorch records say nothing about llama.cpp's overheads
    if options.with_vision and not model.has_vision:
        raise QuantlabError(f"--with-vision: {model.name} has no vision tower")
    schemes, notes = _schemes(options.methods)
    request = EstimateRequest(
        schemes=schemes, contexts=numbers.contexts, batch=options.batch, gpu_gib=numbers.gpu_gib, runtime=rt,
        include_vision=options.with_vision, include_mtp=options.with_mtp, gpu_sets=numbers.gpu_sets,
    )
    result = _estimate_in_range(model, request)
    checks, unchecked = check_records(records, calibrate(runtime_profile("transformers"), records))
    notes += [*skipped_records(records), *unchecked]
    result = result.model_copy(update={"model": result.model.model_copy(update={"notes": [*result.model.notes, *notes]})})
    claims = _claims(model, records)
    return result.model_copy(
        update={"claims": [c.model_dump() for c in claims], "checks": [c.model_dump() for c in checks]}
    )


def _estimate_in_range(model: EstimationModel, request: EstimateRequest) -> EstimateResult:
    """The estimate, or one line where a figure of it falls outside what estimates.json may hold (an exabyte: a
    config of huge KV heads at a million tokens and a batch of thousands)."""
    try:
        return estimate(model, request)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"])
        raise QuantlabError(f"{model.name}: the estimate's {field or 'figures'} is outside what an estimate may hold "
                            f"({error['msg']}); ask for shorter --contexts or a smaller --batch") from None


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
    return check_claims(model, read_estimation_model(claims_data()["moe_model"]), records)


MAX_LISTED = 32  # values in one list option: each is a column of the table


def parse_numbers(text: str, flag: str, kind: type) -> list:
    items = [part.strip() for part in str(text).split(",")]
    if len(items) > MAX_LISTED:
        raise QuantlabError(f"{flag}: {len(items):,} values; give at most {MAX_LISTED}")
    values = []
    for item in items:
        try:
            values.append(kind(item.replace("_", "")))
        except ValueError:
            raise QuantlabError(f"{flag}: '{item[:40]}' is not a number "
                                "(give a comma-separated list, e.g. 4096,32768)") from None
    if kind is float and any(not math.isfinite(v) or v <= 0 for v in values):
        raise QuantlabError(f"{flag}: sizes must be positive finite numbers, got {str(text)[:80]}")
    return values


def write_outputs(result: EstimateResult, output_dir: str | Path) -> list[Path]:
    """estimates.json (read by `quantlab report`) and memory.png, both replaced atomically."""
    from quantlab.estimate.plot import write_png
    from quantlab.outputs import check_measurements_folder

    check_measurements_folder(output_dir)
    check_output_files(output_dir)
    target = Path(output_dir) / ESTIMATES_NAME
    replace_file(target, result.model_dump_json(indent=1) + "\n")
    paths = [target]
    if result.claims and installed("matplotlib"):
        paths.append(write_png(result, output_dir))
    elif result.claims:
        print(f"no {PLOT_NAME}: matplotlib is not installed here ({install_hint('matplotlib')})")
    return paths


def check_output_files(output_dir: str | Path) -> None:
    """estimates.json and memory.png are replaced whole, by a rename: a folder (or a pipe) of either name is refused
    up front, by its name, not after the estimate on the temporary file's."""
    for name in (ESTIMATES_NAME, PLOT_NAME):
        path = Path(output_dir) / name
        if path.exists() and not path.is_file():
            raise QuantlabError(f"{path}: not a file (a folder or a special file); `quantlab estimate` writes a file "
                                f"of that name there: move it away, or give another --output")


@dataclass(frozen=True)
class VllmCacheOptions:
    """`quantlab estimate --vllm-kv-gib`: one KV space, read as vLLM would size it."""

    model: str = "qwen3.6-27b"
    kv_gib: str = "4"
    max_num_seqs: int | None = None  # None: vLLM's default (256 here; it sizes nothing)
    context: int | None = None  # --max-model-len; None: the config's max_position_embeddings
    prefix_caching: bool = True
    device: str = "gpu"
    tp: int | None = None
    kv_dtype: str | None = None  # --kv-cache-dtype; None: the model dtype
    ssm_dtype: str | None = None  # --mamba-ssm-cache-dtype; None: the config's mamba_ssm_dtype, else vLLM's rule
    spec_tokens: int | None = None  # --mtp-draft K: MTP speculative decoding's num_speculative_tokens (None: off)


def check_vllm_cache_options(options: VllmCacheOptions) -> tuple[float, int, int]:
    """(KV GiB, max_num_seqs, TP size), each in range, or one QuantlabError naming the option."""
    sizes = parse_numbers(options.kv_gib, "--vllm-kv-gib", float)
    if len(sizes) != 1:
        raise QuantlabError(f"--vllm-kv-gib: one KV space in GiB (e.g. --vllm-kv-gib 4), got {options.kv_gib[:40]!r}")
    gib = sizes[0]
    if not gib <= MAX_KV_GIB:
        raise QuantlabError(f"--vllm-kv-gib: a KV space is at most {MAX_KV_GIB:,} GiB, got {excerpt_number(gib)}")
    if options.device == "cpu" and not gib.is_integer():
        raise QuantlabError(f"--vllm-kv-gib: vLLM on the CPU takes its KV space in whole GiB (VLLM_CPU_KVCACHE_SPACE), "
                            f"got {excerpt_number(gib)}")
    seqs = 256 if options.max_num_seqs is None else options.max_num_seqs
    in_range(seqs, "--max-num-seqs", "max_num_seqs", (1, MAX_BATCH))
    if options.context is not None:
        in_range(options.context, "--context", "max_model_len", (1, MAX_CONTEXT), " tokens")
    tp = 1 if options.tp is None else options.tp
    in_range(tp, "--tensor-parallel-size", "tensor parallel size", (1, 64))
    if options.kv_dtype == "q8_0":
        raise QuantlabError("--kv-dtype q8_0 is llama.cpp's; vLLM's KV cache is bf16, fp16, fp8 or f32")
    if options.spec_tokens is not None:
        from quantlab.estimate.mtp_draft import check_draft_tokens

        check_draft_tokens(options.spec_tokens)
    return gib, seqs, tp


MAX_KV_GIB = 4096


def vllm_cache_lines(options: VllmCacheOptions) -> list[str]:
    """What vLLM would report for the model with this KV space (quantlab/estimate/vllm_cache.py), as lines."""
    from quantlab.estimate.tensor_parallel import check_tp, rank_shape
    from quantlab.estimate.vllm_cache import state_dtypes, vllm_cache

    gib, seqs, tp = check_vllm_cache_options(options)
    model = read_estimation_model(options.model)
    draft_layers = 0
    if options.spec_tokens is not None:
        from quantlab.estimate.mtp_draft import mtp_layer_count

        draft_layers = mtp_layer_count(model)  # "no MTP head: ..." before any figure
    check_tp(model.shape, tp, model.name)
    length = options.context or model.shape.max_positions or 4096
    conv, ssm = state_dtypes("bfloat16", options.device, model.shape.ssm_dtype, options.ssm_dtype)
    cache = vllm_cache(rank_shape(model.shape, tp), max(1, round(gib * (1 << 30))), length, seqs,
                       options.prefix_caching, options.kv_dtype or "bfloat16", conv, ssm, 1, options.device,
                       options.spec_tokens or 0, draft_layers)
    return _vllm_cache_text(model, cache, gib, tp, options)


def _vllm_cache_text(model: EstimationModel, cache, gib: float, tp: int, options: VllmCacheOptions) -> list[str]:
    where = "per GPU" if options.device == "gpu" else "(VLLM_CPU_KVCACHE_SPACE)"
    state = cache.state_blocks_per_request
    padding = f", padded {cache.mamba_page_padding_pct:.2f}%" if cache.mamba_page_padding_pct else ""
    kinds = f"{cache.group_kinds.count('attention')} attention, {cache.group_kinds.count('mamba')} DeltaNet"
    lines = [
        f"vLLM's KV-cache accounting (vLLM 0.32.0's rules; quantlab/estimate/vllm_cache.py): {model.name}, "
        f"{options.device.upper()}, TP {tp}, {gib:g} GiB of KV space {where}, --max-model-len {cache.max_model_len:,}, "
        f"--max-num-seqs {cache.max_num_seqs}, prefix caching {'on' if options.prefix_caching else 'off'} "
        f"(mamba cache mode {cache.mamba_cache_mode})",
        f"block size:       {cache.block_size} tokens (attention page {cache.attention_page_bytes / 1e6:.2f} MB a "
        f"layer; DeltaNet state {cache.mamba_state_bytes / 1e6:.2f} MB a layer and sequence{padding})",
        f"cache groups:     {len(cache.cache_groups)} of {cache.layers_per_group} layers ({kinds}), "
        f"block size {cache.block_size} each",
        f"blocks:           {cache.num_blocks:,} of {cache.bytes_per_block / 1e6:.2f} MB; a {cache.max_model_len:,}-token "
        f"request holds {cache.blocks_per_request:,} ({cache.blocks_per_request - state:,} attention + {state} state)",
        f"KV cache size:    {cache.kv_cache_tokens:,} tokens",
        f"max concurrency:  {cache.max_concurrency:.2f}x at {cache.max_model_len:,} tokens per request; "
        f"{cache.concurrent_full_length} such request{'' if cache.concurrent_full_length == 1 else 's'} at once with --max-num-seqs {cache.max_num_seqs}",
        f"state dtypes:     conv {cache.conv_dtype}, SSM {cache.ssm_dtype}; KV {options.kv_dtype or 'bf16'}",
    ]
    if cache.spec_tokens:
        k = cache.spec_tokens
        lines.append(f"MTP draft:        {k} speculative token{'s' if k > 1 else ''} per step: the drafter's "
                     f"{cache.draft_layers} attention layer{'s' if cache.draft_layers > 1 else ''} in the groups, "
                     f"conv state {model.shape.conv_kernel - 1 + k} columns wide, {k} more state "
                     f"block{'s' if k > 1 else ''} per DeltaNet group and request; the drafter's weights (the MTP "
                     "block) are outside the KV space")
    if not cache.fits:
        lines.append(f"vLLM refuses to start: one request needs {cache.blocks_per_request:,} blocks and the null "
                     f"block, the pool has {cache.num_blocks:,}; the longest --max-model-len that fits is "
                     f"{cache.longest_model_len:,}")
    if model.shape.max_positions and cache.max_model_len > model.shape.max_positions:
        lines.append(f"vLLM refuses --max-model-len above max_position_embeddings ({model.shape.max_positions:,}) "
                     "unless the config scales RoPE (or VLLM_ALLOW_LONG_MAX_MODEL_LEN=1)")
    return lines
