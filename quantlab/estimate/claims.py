"""The article's claims, one row each: claim | estimate | measured | verdict.

The weight figures are GGUF files and BF16 checkpoints, so the "fits on" and context claims use
the llama.cpp runtime profile (512-token micro-batches, f16 KV cache, fixed buffers) with its
stated overheads. Measured figures come from quantlab's GPU records when there are some.
"""

from __future__ import annotations

from quantlab.claims import article_claims, claims_data, gpu_weight_bytes, judge, latest_gpu_weights
from quantlab.estimate.model import EstimationModel
from quantlab.estimate.runtime import RuntimeAssumptions, max_context, memory_at, runtime_profile
from quantlab.estimate.schemes import get_scheme
from quantlab.estimate.weights import WeightsEstimate, estimate_weights
from quantlab.schema.estimate import ClaimRow
from quantlab.schema.record import Record

GIB = 1 << 30


def check_claims(dense: EstimationModel, moe: EstimationModel, records: list[Record]) -> list[ClaimRow]:
    article = article_claims()
    rt = runtime_profile("llama.cpp")
    rows = [_weights_row(dense, row, records) for row in article["rows"]]
    rows += [_fits_row(dense, row, rt) for row in article["rows"]]
    rows += [_room_for_context(dense, rt), _memory_ratio(dense, moe), _active_params(dense, moe)]
    rows += [_native_context(dense, rt), _multi_gpu_bf16(dense), _vllm_tp8(dense), _moe_multi_gpu(moe)]
    return rows


def _weights(model: EstimationModel, precision: str) -> WeightsEstimate:
    scheme = get_scheme(claims_data()["table"][precision]["scheme"])
    return estimate_weights(model.inventory, scheme, model.shape.layers)


def _weights_row(model: EstimationModel, row: dict, records: list[Record]) -> ClaimRow:
    precision, low, high = row["precision"], row["low_gb"], row["high_gb"]
    weights = _weights(model, precision)
    published = claims_data()["published"]
    if precision == "BF16":
        value = weights.bytes(include_vision=True, include_mtp=True) / 1e9
        text = weights.bytes() / 1e9
        estimate = f"{value:.2f} GB checkpoint (text model {text:.2f} + vision {_gb(weights, 'vision')} + MTP {_gb(weights, 'mtp')})"
        detail = f"published checkpoint total_size {published['bf16_checkpoint_gb']:.2f} GB"
    else:
        value = weights.bytes() / 1e9
        estimate = f"{value:.2f} GB of GGUF tensors ({8 * weights.bytes() / weights.parameters():.2f} bits/weight)"
        file_gb = published["gguf_file_gb"][precision]
        detail = f"published file {file_gb:.2f} GB ({(value - file_gb) / file_gb:+.1%}); {_mix(weights)}"
    measured_gb, measured = _measured_weights(records, model.name, row["measured_by"])
    if measured_gb is not None:  # a measurement, where there is one, decides
        verdict, basis = judge(measured_gb, low, high).text, "GPU measurement (torch allocated after load)"
    else:
        verdict, basis = judge(value, low, high).text, "estimate (no GPU measurement yet)"
    return ClaimRow(
        id=f"weights_{precision.lower()}", claim=f"{precision} weights {row['claimed']}", estimate=estimate,
        measured=measured, verdict=verdict, detail=detail, basis=basis, estimate_gb=round(value, 3),
        claimed_low_gb=low, claimed_high_gb=high, measured_gb=measured_gb,
    )


def _gb(weights: WeightsEstimate, role: str) -> str:
    component = weights.component(role)
    return f"{component.bytes / 1e9:.2f}" if component else "0"


def _mix(weights: WeightsEstimate) -> str:
    total = sum(weights.formats().values())

    def share(n: int) -> str:
        return f"{n / total:.1%}" if n / total >= 0.001 else "<0.1%"

    return "mix by parameters: " + ", ".join(f"{fmt} {share(n)}" for fmt, n in weights.formats().items())


def _measured_weights(records: list[Record], model: str, match: dict[str, str]) -> tuple[float | None, str]:
    """The latest GPU measurement of the weights for a claim row: torch allocated after load."""
    r = latest_gpu_weights(records, model, match)
    if r is None:
        return None, "no GPU record yet"
    value = gpu_weight_bytes(r) / 1e9
    return value, f"{value:.2f} GB ({r.hardware.name}, {r.model.weights} weights, {r.model.variant} model)"


def _device(name: str) -> dict:
    return next(d for d in claims_data()["devices"] if d["name"] == name)


def device_budget(name: str, whole: bool = False) -> int:
    """Bytes the GPU may use: the whole memory, or the default share of a Mac's unified memory."""
    device = _device(name)
    return round(device["memory_gib"] * GIB * (1.0 if whole else device.get("usable_fraction", 1.0)))


def _fits_row(model: EstimationModel, row: dict, rt: RuntimeAssumptions) -> ClaimRow:
    precision = row["precision"]
    weights = _weights(model, precision)
    context = claims_data()["fits_context"]
    need = memory_at(weights, weights.bytes(), model.shape, context, 1, rt).total
    devices = claims_data()["table"][precision]["fits_on"]
    fits = {name: _device_fit(model, weights, name, rt) for name in devices}
    problems = [
        f"{name} only with its GPU memory limit raised" if raised >= context else f"{name} too small"
        for name, (tokens, raised, _) in fits.items()
        if tokens < context
    ]
    verdict = "matches" if not problems else (
        ("partly: " if len(problems) < len(devices) else "does not match: ") + "; ".join(problems)
    )
    return ClaimRow(
        id=f"fits_{precision.lower()}", claim=f"{precision} fits on {row['fits_on']}",
        estimate=f"{need / 1e9:.1f} GB at {context:,} tokens; " + "; ".join(text for _, _, text in fits.values()),
        measured="—", verdict=verdict, basis="estimate (llama.cpp profile)", assumptions=_profile_note(rt),
    )


def _device_fit(
    model: EstimationModel, weights: WeightsEstimate, name: str, rt: RuntimeAssumptions
) -> tuple[int, int, str]:
    """(max context, max context with all memory, description); a Mac also says what raising its GPU limit gives."""
    tokens = max_context(weights, weights.bytes(), model.shape, device_budget(name), 1, rt).tokens
    raised = max_context(weights, weights.bytes(), model.shape, device_budget(name, whole=True), 1, rt).tokens
    text = f"{name}: " + (f"up to {tokens:,} tokens" if tokens else "does not fit")
    if _device(name).get("usable_fraction"):
        text += f" within the default {_device(name)['usable_fraction']:.0%} GPU share, " + (
            f"up to {raised:,} if the limit is raised" if raised else "nor with all of it"
        )
    return tokens, raised, text


def _profile_note(rt: RuntimeAssumptions) -> str:
    return (
        f"the fits-on and context rows use the llama.cpp profile: {rt.kv_dtype} KV cache, {rt.state_dtype} DeltaNet "
        f"state, {rt.prefill_chunk}-token micro-batches, no allocator slack, CUDA context "
        f"{rt.cuda_context_bytes / 1e9:.1f} GB (assumed); a desktop sharing the GPU takes more"
    )


def _room_for_context(model: EstimationModel, rt: RuntimeAssumptions) -> ClaimRow:
    """The verdict rests on the one published run it can (ran_tokens at Q4 on 24 GB); the estimate is set beside
    that report, and where they disagree (the estimate fits more than ran out of memory), that is said."""
    weights = _weights(model, "Q4_K_M")
    budget = device_budget("RTX 3090/4090 (24 GB)")
    report = claims_data()["published"]["q4_on_24gb"]
    f16 = max_context(weights, weights.bytes(), model.shape, budget, 1, rt).tokens
    oom_rt = runtime_profile("llama.cpp", kv_dtype=report["oom_kv_dtype"])
    at_oom_kv = max_context(weights, weights.bytes(), model.shape, budget, 1, oom_rt).tokens
    contradictions = []
    if at_oom_kv >= report["oom_tokens"]:
        contradictions.append(
            f"the estimate fits {at_oom_kv:,} tokens with a {report['oom_kv_dtype']} KV cache, but "
            f"{report['oom_tokens']:,} ran out of memory with one in the report")
    if f16 < report["ran_tokens"]:
        contradictions.append(f"the estimate fits only {f16:,} tokens (f16 KV), but {report['ran_tokens']:,} ran")
    statement = claims_data()["statements"]["room_for_context"]
    verdict = f"matches: a published run had {report['ran_tokens']:,} tokens of context at Q4 on 24 GB"
    if contradictions:
        verdict += "; CONTRADICTION between estimate and report: " + "; ".join(contradictions)
    return ClaimRow(
        id="room_for_context", claim=statement["quote"],
        estimate=f"Q4_K_M on 24 GiB: up to {f16:,} tokens with an f16 KV cache, {at_oom_kv:,} with {report['oom_kv_dtype']}",
        measured="—", verdict=verdict,
        basis="published report (not measured by quantlab)" + ("; the estimate contradicts it" if contradictions else ""),
        detail=f"published: {report['text']} The estimate leaves out llama.cpp's compute buffers beyond one "
        "micro-batch (its KQ mask grows with context), a larger Q4_K_XL file, and a desktop sharing the GPU; "
        "a contradiction means the estimate misses memory that the real run needed.",
        assumptions=_profile_note(rt),
    )


def _memory_ratio(dense: EstimationModel, moe: EstimationModel) -> ClaimRow:
    bf16 = get_scheme("bf16")
    dense_bytes = estimate_weights(dense.inventory, bf16, dense.shape.layers).bytes()
    moe_bytes = estimate_weights(moe.inventory, bf16, moe.shape.layers).bytes()
    ratio = moe_bytes / dense_bytes
    statement = claims_data()["statements"]["memory_ratio"]
    verdict = "matches" if abs(ratio - statement["claimed"]) / statement["claimed"] <= 0.1 else "does not match"
    return ClaimRow(
        id="memory_ratio", claim=statement["quote"],
        estimate=f"{ratio:.1f}× ({moe_bytes / 1e9:.1f} GB vs {dense_bytes / 1e9:.1f} GB at BF16, text models)",
        measured="—", verdict=f"{verdict} (within 10% of {statement['claimed']}×)", basis="parameter counts of the configs",
        detail="the same ratio holds at any precision that quantizes both alike; the 397B config is quantlab's shipped, inferred text config",
    )


def active_parameters(model: EstimationModel) -> int:
    """Parameters a token passes through: everything in the text model, routed experts at top-k of n."""
    shape = model.shape
    routed = model.inventory.parameters(["routed_experts"])
    rest = model.inventory.parameters(set(model.inventory.by_role()) - {"routed_experts", "vision", "mtp"})
    return rest + (routed * shape.experts_per_token // shape.experts if shape.experts else 0)


def _active_params(dense: EstimationModel, moe: EstimationModel) -> ClaimRow:
    statement = claims_data()["statements"]["active_params"]
    d, m = active_parameters(dense) / 1e9, active_parameters(moe) / 1e9
    ok = abs(d - statement["claimed_dense_b"]) <= 1 and abs(m - statement["claimed_moe_b"]) <= 1
    return ClaimRow(
        id="active_params", claim=statement["quote"],
        estimate=f"{d:.2f} B vs {m:.2f} B (embeddings and lm_head included; MoE: {moe.shape.experts_per_token} of "
        f"{moe.shape.experts} routed experts + shared expert)",
        measured="—", verdict="matches" if ok else "does not match", basis="parameter counts of the configs",
        detail=f"total stored: {dense.inventory.parameters(set(dense.inventory.by_role()) - {'vision', 'mtp'}) / 1e9:.2f} B vs "
        f"{moe.inventory.parameters(set(moe.inventory.by_role()) - {'vision', 'mtp'}) / 1e9:.2f} B (text models)",
    )


def _native_context(model: EstimationModel, rt: RuntimeAssumptions) -> ClaimRow:
    statement = claims_data()["statements"]["native_context"]
    tokens = statement["tokens"]
    costs = []
    for precision in claims_data()["table"]:
        weights = _weights(model, precision)
        total = memory_at(weights, weights.bytes(), model.shape, tokens, 1, rt).total
        costs.append(f"{precision} {total / 1e9:.1f} GB ({_smallest_device(total)})")
    point = memory_at(_weights(model, "Q4_K_M"), 0, model.shape, tokens, 1, rt)
    return ClaimRow(
        id="native_context", claim=statement["quote"],
        estimate=f"at {tokens:,} tokens: " + "; ".join(costs),
        measured="—",
        verdict=f"the window is real, but its KV cache alone is {point.kv_cache / GIB:.0f} GiB ({rt.kv_dtype})",
        basis="config (max_position_embeddings) and estimate (llama.cpp profile)",
        detail=f"KV cache {point.kv_cache / 1e9:.2f} GB + DeltaNet state {point.deltanet_state / 2**20:.1f} MiB",
        assumptions=_profile_note(rt),
    )


def _smallest_device(total: int) -> str:
    """The smallest device in estimate_claims.yaml that holds `total` bytes."""
    fitting = sorted((device_budget(d["name"]), d["name"]) for d in claims_data()["devices"])
    name = next((n for budget, n in fitting if budget >= total), None)
    return f"fits a {name}" if name else "more than any listed device"


def _multi_gpu_bf16(model: EstimationModel) -> ClaimRow:
    """BF16 on one 48 GB-class GPU and on GPU pairs: accelerate's device map and vLLM's tensor parallelism."""
    from quantlab.estimate.multi_gpu import multi_gpu_estimates, parse_gpu_sets

    statement = claims_data()["statements"]["multi_gpu_bf16"]
    bf16 = get_scheme("bf16")
    weights = estimate_weights(model.inventory, bf16, model.shape.layers)
    rt = runtime_profile("transformers")
    parts, fits = [], {}
    for gpus in parse_gpu_sets(",".join(statement["gpu_sets"])):
        for row in multi_gpu_estimates(model, bf16, weights, weights.bytes(), gpus, 1, rt):
            fits[(gpus.label, row.split)] = row.max_context
            parts.append(f"{gpus.label} GB {_split_name(row.split)}: " + (
                f"up to {row.max_context:,} tokens" if row.max_context else "does not fit"))
    single = max(v for (label, _), v in fits.items() if label == "1x48")
    pairs = max(v for (label, _), v in fits.items() if label.startswith("2x"))
    verdict = ("partly: one 48 GB-class GPU does not hold the BF16 weights; two GPUs do" if not single and pairs
               else "matches" if single else "does not match: no listed GPU set holds BF16")
    return ClaimRow(
        id="multi_gpu_bf16", claim=statement["quote"], estimate="; ".join(parts), measured="—", verdict=verdict,
        basis="estimate (accelerate's device map on the meta device; vLLM TP rules)",
        detail=f"BF16 text weights {weights.bytes() / 1e9:.2f} GB > a 48 GiB card ({48 * GIB / 1e9:.2f} GB); "
        "`quantlab estimate --gpus` gives the per-GPU figures",
    )


def _vllm_tp8(model: EstimationModel) -> ClaimRow:
    """The article's `vllm serve ... --tensor-parallel-size 8 --max-model-len 262144`, per GPU, by vLLM's own
    KV-cache accounting (quantlab/estimate/vllm_cache.py): it starts when one request of max-model-len tokens fits
    the block pool that 0.9 of each GPU leaves beside the weights and the profile run."""
    from quantlab.estimate.tensor_parallel import GPU_MEMORY_UTILIZATION, tensor_parallel_estimate

    statement = claims_data()["statements"]["vllm_tp8"]
    tp, tokens = tensor_parallel_estimate(model, get_scheme("bf16"), statement["tp"]), statement["tokens"]
    need = tp.memory_at(tokens).total
    pools = {g: tp.cache(tp.kv_space(g * GIB), tokens) for g in statement["gpu_gib"]}
    fitting = [g for g, pool in pools.items() if tp.kv_space(g * GIB) > 0 and pool.fits]
    smallest = pools[min(fitting)] if fitting else None
    return ClaimRow(
        id="vllm_tp8", claim=statement["quote"],
        estimate=f"per GPU: {tp.weight_bytes / 1e9:.2f} GB of BF16 weights; vLLM starts from {need / 1e9:.1f} GB per GPU "
        f"(one {tokens:,}-token request: {_request_blocks(tp, tokens)})" + (
            f"; on {min(fitting)} GB GPUs its pool holds {smallest.kv_cache_tokens:,} tokens, "
            f"{smallest.max_concurrency:.2f} such requests at once" if smallest else "")
        + f" ({tp.q_heads_per_rank} query heads and {tp.kv_heads_per_rank} KV head per GPU, each KV head on "
        f"{tp.kv_replicas} GPUs)",
        measured="—",
        verdict=(f"runs: vLLM accepts TP {tp.tp} for this model, and each GPU fits in {min(fitting)} GB"
                 if fitting else f"each GPU needs {need / 1e9:.1f} GB: more than {max(pools)} GB cards give vLLM"),
        basis="estimate (vLLM tensor-parallel rules and its KV-cache accounting: blocks, padded state pages)",
        detail=f"at {GPU_MEMORY_UTILIZATION:.0%} of each GPU (vLLM's --gpu-memory-utilization default); with "
        f"{tp.kv_replicas} GPUs per KV head, the cache per GPU does not shrink past TP {tp.tp // tp.kv_replicas}; "
        f"SSM state in {tp.ssm_dtype} (the config's mamba_ssm_dtype), prefix caching on (vLLM's default)",
    )


def _request_blocks(tp, tokens: int) -> str:
    """'656 blocks of 400 tokens + 6 state blocks and the null block, 6.6 MB each, mamba page padded 2.17%'."""
    pool = tp.cache(1, tokens)
    padding = f", mamba page padded {pool.mamba_page_padding_pct:.2f}%" if pool.mamba_page_padding_pct else ""
    return (f"{pool.blocks_per_request - pool.state_blocks_per_request:,} blocks of {pool.block_size} tokens + "
            f"{pool.state_blocks_per_request} state blocks and the null block, {pool.bytes_per_block / 1e6:.1f} MB "
            f"each{padding}")


def _moe_multi_gpu(moe: EstimationModel) -> ClaimRow:
    """The 397B MoE "needs a multi-GPU server just to load": its weights per GPU at TP 8."""
    from quantlab.estimate.tensor_parallel import GPU_MEMORY_UTILIZATION, tensor_parallel_estimate

    statement = claims_data()["statements"]["moe_multi_gpu"]
    parts, loads = [], []
    for key in statement["schemes"]:
        tp = tensor_parallel_estimate(moe, get_scheme(key), statement["tp"])
        fits = [g for g in statement["gpu_gib"] if g * GIB * GPU_MEMORY_UTILIZATION > tp.memory_at(4096).total]
        loads.append(bool(fits))
        parts.append(f"{key}: {tp.weight_bytes / 1e9:.1f} GB per GPU at TP {tp.tp} "
                     + (f"(fits {min(fits)} GB GPUs at 4,096 tokens)" if fits else f"(more than {max(statement['gpu_gib'])} GB GPUs hold)"))
    single = estimate_weights(moe.inventory, get_scheme(statement["schemes"][-1]), moe.shape.layers).bytes()
    return ClaimRow(
        id="moe_multi_gpu", claim=statement["quote"], estimate="; ".join(parts), measured="—",
        verdict="matches" if single > max(statement["gpu_gib"]) * GIB else "does not match",
        basis="estimate (vLLM tensor-parallel rules)",
        detail=f"even at {statement['schemes'][-1]} the weights alone are {single / 1e9:.0f} GB, more than one "
        f"{max(statement['gpu_gib'])} GB GPU" + ("" if all(loads) else "; some schemes need larger GPUs at TP 8"),
    )


def _split_name(split: str) -> str:
    return {"accelerate": "accelerate map", "accelerate-sequential": "accelerate map (sequential)",
            "accelerate-even": "accelerate map (even cap)", "vllm-tp": "vLLM TP"}.get(split, split)
