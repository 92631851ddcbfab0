"""The model card of a build: README.md with Hugging Face Hub metadata, written from the build's own
files and records (nothing typed by hand): method and parameters, every unquantized tensor, the
bytes on disk against the estimate, measured memory, speed and quality with their hardware."""

from __future__ import annotations

from pathlib import Path

import yaml

from quantlab.artifact.tensors import KeptGroup
from quantlab.methods import METHODS
from quantlab.schema.build import BuildManifest
from quantlab.schema.record import Record

_ROLE_WHY = {
    "embed_tokens": "embedding lookup (these methods quantize Linear layers only)",
    "lm_head": "output projection: kept for quality",
    "deltanet_small_linear": "DeltaNet in_proj_a/b: tiny (one row per value head), and not a multiple of 32 rows (bitsandbytes 4-bit CPU kernel)",
    "deltanet_conv_and_params": "DeltaNet conv1d, A_log, dt_bias: not Linear layers",
    "norm": "norms: not Linear layers",
    "vision": "vision tower: kept at the model dtype",
    "mtp": "multi-token prediction head: copied unquantized from the source shards",
    "other": "not a Linear layer known to quantlab's role table",
}


def card_text(
    m: BuildManifest, kept: list[KeptGroup], quantized_weights: int, disk_bytes: int, shards: int,
    estimate: tuple[int, str] | None, records: list[Record], repo_hint: str,
) -> str:
    method = METHODS[m.method.name]
    lines = [
        "---", yaml.safe_dump(_metadata(m, method), sort_keys=False, allow_unicode=True).rstrip(), "---", "",
        *_intro_lines(m, method, repo_hint),
        *_serving_lines(m, method, repo_hint),
        *_quantization_lines(m, method, quantized_weights),
        *_engine_lines(m),
        *_cost_lines(m),
        *_unquantized_lines(m, method, kept),
        *_files_lines(disk_bytes, shards, estimate),
        "## Measured memory and speed", "",
        *_measurement_lines(records),
        *_quality_lines(records),
        *_greedy_lines(m),
        *_reference_lines(m),
        "## Recipe", "",
        f"`{m.recipe.path}` (sha256 `{m.recipe.sha256[:16]}…`):", "",
        "```yaml", m.recipe.content.rstrip(), "```", "",
    ]
    return "\n".join(lines)


def _mtp_quantized(m: BuildManifest) -> bool:
    return bool(m.mtp and m.mtp.get("quantized_linears"))


def _serving_lines(m: BuildManifest, method, repo_hint: str) -> list[str]:
    if _mtp_quantized(m):  # only AWQ quantizes the MTP head, and only its serving lines take this
        return method.serving_lines(True, repo_hint, mtp_quantized=True)
    return method.serving_lines(m.mtp is not None, repo_hint)


def _intro_lines(m: BuildManifest, method, repo_hint: str) -> list[str]:
    by = method.card.by
    return [
        f"# {m.name}: {m.base.name}, {m.method.label}",
        "",
        f"{m.base.name} quantized with **{by + ' ' if by else ''}{m.method.label.removeprefix('bnb ')}** "
        f"(recipe method `{m.method.name}`), built by quantlab {m.quantlab}"
        f"{f' ({m.git_commit[:10]})' if m.git_commit else ''} on {m.built_on}, {m.created_at}.",
        f"Base weights: {m.base.source} `{m.base.location}`" + (f" at revision `{m.base.revision}`" if m.base.revision else "")
        + f", {m.base.model_class}, variant `{m.base.variant}`, unquantized tensors in {m.base.dtype}.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import " + m.greedy.auto_class + ", AutoTokenizer",
        "",
        f'model = {m.greedy.auto_class}.from_pretrained("{repo_hint}", device_map="auto")  # {method.card.loading_needs}',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_hint}")',
        "```",
        "",
    ]


def _quantization_lines(m: BuildManifest, method, quantized_weights: int) -> list[str]:
    return [
        "## Quantization", "",
        "| Parameter | Value |", "|---|---|",
        *[f"| {k} | `{v}` |" for k, v in method.card_rows(m.method.params)],
        "",
        f"The quantization_config in config.json says the same to transformers. {quantized_weights} Linear weights are quantized.",
        "",
    ]


def _unquantized_lines(m: BuildManifest, method, kept: list[KeptGroup]) -> list[str]:
    return [
        "## Left unquantized",
        "",
        f"The skip list (`{method.card.skip_key}`) is `{m.unquantized.skip_modules}`: "
        f"{_skip_origin(m)} It keeps {len(m.unquantized.kept_linears)} Linear module(s) unquantized. "
        "Every tensor stored unquantized in this folder:",
        "",
        "| Role | Tensors | Count | Parameters | Stored as | Why |",
        "|---|---|--:|--:|---|---|",
        *[f"| {g.role} | `{g.pattern}` | {g.count} | {g.parameters:,} | {g.dtype} | {_why(m, g.role)} |"
          for g in kept],
        "",
        _mtp_line(m),
        "",
    ]


def _why(m: BuildManifest, role: str) -> str:
    if role == "mtp" and _mtp_quantized(m):
        return ("multi-token prediction head: its norms (and any Linear skip_classes keeps); its other Linears are "
                "quantized")
    return _ROLE_WHY.get(role, "")


def _files_lines(disk_bytes: int, shards: int, estimate: tuple[int, str] | None) -> list[str]:
    return [
        "## Files",
        "",
        f"{disk_bytes / 1e6:,.2f} MB of tensors in {shards} safetensors shard(s)"
        + (f"; quantlab's estimate for this method is {estimate[0] / 1e6:,.2f} MB ({estimate[1]})." if estimate else "."),
        "`SHA256SUMS` lists the SHA-256 of every file; `quantlab verify <folder>` checks them, reloads the model "
        "and repeats the greedy check below. `quantlab_build.json` holds the build's own record.",
        "",
    ]


def _greedy_lines(m: BuildManifest) -> list[str]:
    return [
        "## Greedy check",
        "",
        f"After the build was saved it was reloaded from disk and generated {m.greedy.new_tokens} greedy tokens "
        f"on {m.greedy.device} from the prompt `{m.greedy.prompt!r}` (token ids {m.greedy.prompt_ids}):",
        "",
        f"`{m.greedy.tokens}`" + (f", i.e. `{m.greedy.text!r}`" if m.greedy.text is not None else ""),
        "",
    ]


def _metadata(m: BuildManifest, method) -> dict:
    meta: dict = {}
    if m.base.hub_id:
        meta["base_model"] = m.base.hub_id
        meta["base_model_relation"] = "quantized"
    meta["license"] = m.base.license or "other"
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "image-text-to-text" if m.base.variant == "full" else "text-generation"
    meta["tags"] = ["quantlab", *method.card_tags(m.method.params), m.base.model_class.split("For")[0].lower() or "model"]
    return meta


def _reference_lines(m: BuildManifest) -> list[str]:
    ref = m.greedy.reference
    if ref is None:
        return [f"No comparison with an unquantized model: {m.greedy.reference_note}.", ""] if m.greedy.reference_note else []
    return [
        f"Against {ref.model}: fed the source's own {len(ref.tokens)} greedy tokens `{ref.tokens}`, the build predicts "
        f"{ref.agreement:.0%} of them (a build below {ref.threshold:.0%} is refused); the two free-running greedy "
        f"generations share their first {ref.common_prefix} tokens.",
        "",
    ]


def _engine_lines(m: BuildManifest) -> list[str]:
    if not m.engine:
        return []
    lines = [f"Engine: `{m.engine['name']}`."]
    if m.engine.get("calibration_label"):
        lines.append(f"Calibration: {m.engine['calibration_label']}.")
    lines += [f"- {n}" for n in m.engine.get("notes", [])]
    return lines + [""]


def _cost_lines(m: BuildManifest) -> list[str]:
    if m.cost is None:
        return []
    c = m.cost
    gpu = ("no GPU (none was used)" if c.gpu_allocated_peak_bytes is None
           else f"{c.gpu_allocated_peak_bytes / 1e9:,.2f} GB allocated by torch"
           + (f", {c.gpu_reserved_peak_bytes / 1e9:,.2f} GB reserved" if c.gpu_reserved_peak_bytes is not None else ""))
    return [
        "### Cost of quantizing",
        "",
        f"Measured around the step \"{c.what}\" on {m.built_on} ({c.device}):",
        "",
        "| Wall time | Peak host RSS | Peak GPU memory |",
        "|--:|--:|---|",
        f"| {c.seconds:,.1f} s | {c.rss_peak_bytes / 1e9:,.2f} GB | {gpu} |",
        "",
    ]


def _skip_origin(m: BuildManifest) -> str:
    text = (
        f"`{m.unquantized.rule_patterns}` come from quantlab's skip rules "
        "(`quantlab/architecture.py`, UNQUANTIZED_ROLES: the same rules its memory estimator uses)"
    )
    if m.unquantized.extra_patterns:
        text += f"; `{m.unquantized.extra_patterns}` from the recipe"
    return text + "."


def _mtp_line(m: BuildManifest) -> str:
    if _mtp_quantized(m):
        how = (m.mtp.get("how") or "").removeprefix("MTP head: ") or (
            f"{m.mtp['quantized_linears']} of its Linears quantized in the main model's AWQ GEMM layout "
            "(qweight/qzeros/scales)")
        return (
            f"MTP: {m.mtp['tensors']} `mtp.*` tensors ({m.mtp['bytes'] / 1e6:,.2f} MB) in `{m.mtp['file']}`: {how}. "
            "`mtp` is not in the skip list, so vLLM builds its MTP draft with the same AWQ config and loads these "
            "tensors; transformers ignores them at load."
        )
    if m.mtp:
        return (
            f"MTP: {m.mtp['tensors']} `mtp.*` tensors ({m.mtp['bytes'] / 1e6:,.2f} MB) copied byte for byte from the "
            f"source shards into `{m.mtp['file']}`. transformers ignores them at load; engines with speculative "
            "decoding (vLLM, SGLang) can use them."
        )
    return "MTP: the source checkpoint has no `mtp.*` tensors, so this build has none."


def _measurement_lines(records: list[Record]) -> list[str]:
    if not records:
        return ["Not measured.", ""]
    lines = [
        "Measured by quantlab after reloading this folder from disk. Memory: GPU memory allocated by torch "
        "on a GPU; host RSS on a CPU (a CPU run also counts the Python process).",
        "",
        "| Hardware | Context | Batch | Weights resident (GB) | Peak prefill (GB) | Peak decode (GB) | Prefill tok/s | Decode tok/s |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in records:
        gpu = r.hardware.kind == "gpu"
        hw = f"{r.hardware.kind.upper()} {r.hardware.name}"
        res = r.result
        resident = r.load_memory.allocated_end_bytes if gpu else r.load_memory.rss_end_bytes
        if res.status != "ok":
            lines.append(f"| {hw} | {r.point.context:,} | {r.point.batch} | {_gb(resident)} | {res.status.upper()} | | | |")
            continue
        pre = res.prefill_memory.allocated_peak_bytes if gpu else res.prefill_memory.rss_peak_bytes
        dec = res.decode_memory.allocated_peak_bytes if gpu else res.decode_memory.rss_peak_bytes
        lines.append(
            f"| {hw} | {r.point.context:,} | {r.point.batch} | {_gb(resident)} | {_gb(pre)} | {_gb(dec)} | "
            f"{res.prefill_tokens_per_s.median:,.1f} | {res.decode_tokens_per_s.median:,.1f} |"
        )
    first = records[0]
    lines += [
        "",
        f"Weights in memory as quantlab counts them (parameters, buffers and quantization state): "
        f"{first.weight_bytes / 1e6:,.2f} MB. Speeds are medians over {first.point.repeats} repeat(s) after "
        f"{first.point.warmup} warm-up; {first.point.new_tokens} greedy decode steps.",
    ]
    lines += [f"- {n}" for n in sorted({n for r in records for n in r.notes})]
    return lines + [""]


def _quality_lines(records: list[Record]) -> list[str]:
    q = next((getattr(r, "quality", None) for r in records if getattr(r, "quality", None) is not None), None)
    try:
        from quantlab.quality import quality_card_lines
    except ImportError:
        quality_card_lines = None
    if q is not None and quality_card_lines is not None:
        return list(quality_card_lines(q))
    why = "the recipe has no `quality:` section" if records else "the build was not measured (--no-measure)"
    return ["## Quality", "", f"Quality not measured: {why}.", ""]


def _gb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1e9:.3f}"


def write_card(folder: Path, text: str) -> None:
    (folder / "README.md").write_text(text, encoding="utf-8")
