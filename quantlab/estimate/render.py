"""The estimate as text: aligned terminal tables, or Markdown (also used by `quantlab report`)."""

from __future__ import annotations

from collections.abc import Sequence

from quantlab.architecture import role_label
from quantlab.schema.estimate import EstimateResult

Table = tuple[list[str], list[list[str]], str]  # headers, rows, alignment per column ("l" / "r")


def aligned(table: Table) -> list[str]:
    headers, rows, align = table
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    pad = lambda cells: "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align))  # noqa: E731
    return [pad(headers).rstrip(), "  ".join("-" * w for w in widths), *(pad(r).rstrip() for r in rows)]


def markdown(table: Table) -> list[str]:
    headers, rows, align = table
    rule = ["---" if a == "l" else "--:" for a in align]
    return [_md_row(headers), _md_row(rule), *(_md_row(r) for r in rows)]


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def _unit(largest: float) -> tuple[str, float]:
    """GB, or MB for a small model whose weights would all read 0.00 GB."""
    return ("GB", 1e9) if largest >= 1e9 else ("MB", 1e6)


def header_lines(result: EstimateResult) -> list[str]:
    m, a = result.model, result.assumptions
    chunk = f"{a.prefill_chunk:,}-token chunks" if a.prefill_chunk else "the whole prompt in one forward"
    return [
        f"{m.name} ({m.model_class}, from {m.location}): {m.loaded_parameters:,} parameters loaded, {a.scope}",
        f"Runtime ({a.profile} profile, batch {a.batch}): KV cache {a.kv_dtype} {a.kv_bytes_per_token / 1024:.1f} KiB/token "
        f"(full-attention layers only); DeltaNet state {a.state_dtype} {a.deltanet_state_bytes_per_sequence / 2**20:.1f} MiB "
        f"per sequence; prefill activations {a.activation_bytes_per_token / 1024:.1f} KiB/token ({chunk})",
        f"Overheads: {a.overheads}. GB = 10⁹ bytes; a 'N GB' GPU is taken as N GiB, as nvidia-smi reports it.",
        *[f"Note: {n}" for n in m.notes],
    ]


def components_table(result: EstimateResult) -> Table:
    methods, by_role = result.methods, result.model.parameters_by_role
    unit, scale = _unit(max((me.checkpoint_bytes for me in methods), default=0))

    def size(n: int) -> str:
        return f"{n / scale:.2f}"

    rows = [
        [role_label(role), f"{n:,}", *[size(me.component_bytes.get(role, 0)) for me in methods]]
        for role, n in by_role.items()
    ]
    rows.append([f"loaded: {result.assumptions.scope}", f"{result.model.loaded_parameters:,}",
                 *[size(me.weights_bytes) for me in methods]])
    rows.append(["checkpoint (all tensors)", f"{sum(by_role.values()):,}", *[size(me.checkpoint_bytes) for me in methods]])
    return [f"Component ({unit})", "Parameters", *[me.label for me in methods]], rows, "lr" + "r" * len(methods)


def memory_table(result: EstimateResult) -> Table:
    methods = result.methods
    contexts = [p.context for p in methods[0].points] if methods else []
    gpus = [f.gpu_gib for f in methods[0].fits] if methods else []
    headers = ["Method", "Weights", "bits/w", *[f"@ {c:,}" for c in contexts], *[f"max ctx @ {g:g} GB" for g in gpus]]
    rows = [
        [me.label, gb(me.weights_bytes), f"{me.bits_per_weight:.2f}", *[gb(p.total) for p in me.points],
         *[f"{f.max_context:,}" + ("+" if f.limit != "memory" else "") for f in me.fits]]
        for me in methods
    ]
    return headers, rows, "lrr" + "r" * (len(contexts) + len(gpus))


SPLIT_NAMES = {"accelerate": "accelerate device map", "accelerate-sequential": "accelerate device map (sequential)",
               "accelerate-even": "accelerate device map (even cap)", "vllm-tp": "vLLM tensor parallel"}


def multi_gpu_table(result: EstimateResult) -> Table:
    """Each method on each GPU set, both ways of splitting: weights and memory per GPU, the longest context."""
    labels = {me.key: me.label for me in result.methods}
    rows = []
    for row in result.multi_gpu:
        head = [labels.get(row.method, row.method), row.gpus, SPLIT_NAMES.get(row.split, row.split)]
        if row.unavailable:
            weights = _per_gpu([g.weights for g in row.per_gpu]) if row.per_gpu else "n/a"
            rows.append([*head, weights, "-", "n/a", row.unavailable])
            continue
        weights, totals = _per_gpu([g.weights for g in row.per_gpu]), _per_gpu([g.total_at_max_context for g in row.per_gpu])
        layers = ", ".join(f"{g.device}: {g.full_attention_layers} + {g.deltanet_layers}" for g in row.per_gpu
                           if g.full_attention_layers or g.deltanet_layers)
        fit = f"{row.max_context:,}" + ("+" if not row.limit.startswith("memory") else "")
        rows.append([*head, weights, totals, fit, f"{row.limit}" + (f"; layers (attention + DeltaNet) {layers}" if layers else "")])
    headers = ["Method", "GPUs (count x GB)", "Split", "Weights per GPU", "Total per GPU at max ctx", "Max ctx", "Limit, notes"]
    return headers, rows, "lllrrrl"


def _per_gpu(values: list[int | None]) -> str:
    """'13.45 each' when the GPUs hold the same, else each GPU's in order."""
    cells = [gb(v) if v else "-" for v in values]
    if all(c == "-" for c in cells):
        return "-"
    return f"{cells[0]} each" if len(cells) > 1 and len(set(cells)) == 1 else " / ".join(cells)


def multi_gpu_lines(result: EstimateResult) -> list[str]:
    return [
        "accelerate: whole decoder layers per GPU, the map a run computes (each GPU offering its size less the CUDA "
        "context; '-' for a GPU the map leaves empty), or, where it fits a shorter context, an even map (accelerate's "
        "sequential map with one cap on every GPU, the cap and the run's map's context named in the row), one GPU "
        "working at a time, on the transformers profile; vLLM: every layer cut across the GPUs (KV heads copied when GPUs "
        "outnumber them), 0.9 of each GPU (--gpu-memory-utilization), bf16 KV cache, the DeltaNet state in the "
        "config's mamba_ssm_dtype, 8,192-token prefill chunks, vLLM's KV-cache accounting (a pool of blocks, state "
        "pages padded to the attention page, two state blocks per request with prefix caching), the context at most "
        "max_position_embeddings. Text model only. GB = 10⁹ bytes.",
    ]


def claims_table(result: EstimateResult, llama_plan: dict[str, str] | None = None) -> Table:
    """`llama_plan`: claim id → llama.cpp's own figure (scripts/gguf_full_size.py), a column of its own."""
    if not llama_plan:
        rows = [[c["claim"], c["estimate"], c["measured"], c["verdict"], c.get("basis", "estimate")] for c in result.claims]
        return ["Claim", "Estimate", "Measured", "Verdict", "Rests on"], rows, "lllll"
    rows = [[c["claim"], c["estimate"], llama_plan.get(c["id"], "—"), c["measured"], c["verdict"],
             c.get("basis", "estimate")] for c in result.claims]
    return (["Claim", "Estimate", "llama.cpp's plan, synthetic weights of the real shapes, CPU backend, no GPU",
             "Measured", "Verdict", "Rests on"], rows, "llllll")


def claim_assumptions(result: EstimateResult) -> list[str]:
    return list(dict.fromkeys(c["assumptions"] for c in result.claims if c.get("assumptions")))


def claim_notes(result: EstimateResult) -> list[str]:
    """Markdown bullets: each row's details, then the shared assumptions once."""
    notes = [f"- *{c['claim']}*: {c['detail']}" for c in result.claims if c.get("detail")]
    return notes + [f"- Assumptions: {a}." for a in claim_assumptions(result)]


def checks_table(result: EstimateResult) -> Table:
    unit, scale = _unit(max((c["measured_allocated"] for c in result.checks), default=0))

    def pair(measured: int | None, estimated: int) -> str:
        return f"{measured / scale:.2f} vs {estimated / scale:.2f}" if measured else "n/a"

    rows = []
    for c in result.checks:
        delta = c["estimated_allocated"] / c["measured_allocated"] - 1
        rows.append([
            f"{c['model']} {c['method']} ({c['variant']}, {c['weights']})", c["hardware"], f"{c['context']:,}",
            str(c["batch"]), pair(c["measured_weights"], c["estimated_weights"]),
            pair(c["measured_allocated"], c["estimated_allocated"]), f"{delta:+.1%}",
            "yes" if abs(delta) <= 0.05 else "no", pair(c.get("measured_total"), c["estimated_total"]),
        ])
    headers = ["Model, method", "GPU", "Context", "Batch", f"Weights {unit} meas. vs est.",
               f"Prefill peak {unit} meas. vs est.", "Delta", "≤ 5%", f"nvidia-smi {unit} meas. vs est."]
    return headers, rows, "llrrrrrlr"


def terminal_text(result: EstimateResult) -> str:
    lines = [*header_lines(result), "", "Weights by component", *aligned(components_table(result))]
    lines += ["", f"Total memory at each context (GB: {_total_formula()}), batch {result.assumptions.batch}"]
    lines += aligned(memory_table(result))
    if result.multi_gpu:
        lines += ["", "Across GPUs", *multi_gpu_lines(result), *aligned(multi_gpu_table(result))]
    if result.claims:
        lines += ["", "The article's claims", *[f"({a})" for a in claim_assumptions(result)]]
        for c in result.claims:
            lines += [f"- {c['claim']}", f"    estimate: {c['estimate']}", f"    measured: {c['measured']}",
                      f"    verdict:  {c['verdict']}", f"    rests on: {c.get('basis', 'estimate')}",
                      *([f"    note:     {c['detail']}"] if c.get("detail") else [])]
    if result.checks:
        lines += ["", "Estimate vs quantlab's GPU measurements", *aligned(checks_table(result))]
    return "\n".join(lines) + "\n"


def markdown_text(result: EstimateResult, title_level: str = "##") -> str:
    lines = [f"{title_level} Estimate: {result.model.name}", "", *[f"{line}  " for line in header_lines(result)], ""]
    lines += ["Weights by component:", "", *markdown(components_table(result)), ""]
    lines += [f"Total memory at each context (GB: {_total_formula()}), batch {result.assumptions.batch}:", ""]
    lines += [*markdown(memory_table(result)), ""]
    if result.multi_gpu:
        lines += ["Across GPUs:", "", *multi_gpu_lines(result), "", *markdown(multi_gpu_table(result)), ""]
    if result.claims:
        lines += ["The article's claims:", "", *markdown(claims_table(result)), ""]
        lines += [*claim_notes(result), ""]
    if result.checks:
        lines += ["Estimate vs quantlab's GPU measurements:", "", *markdown(checks_table(result)), ""]
    return "\n".join(lines)


def _total_formula() -> str:
    return "weights + KV cache + DeltaNet state + prefill activations + workspace + allocator overhead + CUDA context"
