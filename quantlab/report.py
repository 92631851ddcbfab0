"""`quantlab report`: measurements/README.md, regenerated from every record.

Claimed X (the article), measured Y on hardware Z, and the delta, at a glance; then one table
per model and hardware with memory and speed per method, context and batch.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


from quantlab.claims import article_claims, judge, gpu_weight_bytes, latest_gpu_weights, tolerance
from quantlab.outputs import REPORT_MARKER, check_measurements_folder, md_text as md
from quantlab.quality.show import quality_cell
from quantlab.report_runtimes import runtime_sections
from quantlab.report_speculative import speculative_section
from quantlab.report_published import published_section
from quantlab.schema.quality import QualityResult
from quantlab.schema.bench import GGUF_CPU_DECODE_NAME, GGUF_FULL_SIZE_NAME, GgufCpuDecode, GgufFullSize
from quantlab.schema.record import Record
from quantlab.store import UNREADABLE, load_records, read_model, replace_file, why

REPORT_NAME = "README.md"
QUALITY_NOTE = (
    "KL mean / PPL ratio: KL(reference ‖ candidate) in nats per token, and candidate ÷ reference perplexity, on "
    "held-out text, once per run (the recipe's `quality:` section); ≥ marks a stored-mode top-k lower bound"
)
GPU_MEMORY_NOTE = ("Memory in GB: Weights = the bytes of the model's tensors as measured; GPU allocated after load = "
                   "torch's allocation once loaded; peaks = torch's allocator peak in each phase, which starts after "
                   "gc.collect() and torch.cuda.empty_cache() (a phase's own, not what the last one left cached); "
                   "nvidia-smi = NVML, this process's (CUDA context included) or, where that cannot be told apart, "
                   "the whole device's, as labelled.")
CPU_MEMORY_NOTE = ("Memory in GB: Weights = the bytes of the model's tensors as measured; RSS growth at load = how "
                   "much the process's resident memory grew while loading (not the weights alone: allocator slack, "
                   "and after an earlier step in the same process, less than them); peaks = the process's whole RSS "
                   "(Python, torch and libraries included).")
SPEED_NOTE = ("Speeds: median over repeats, with min–max. Decode tok/s counts every sequence of the batch "
              "(batch × new tokens ÷ time); per sequence it is that ÷ batch; ms/step is one decode step, in which "
              "every sequence advances one token.")


def write_report(output_dir: str | Path) -> Path:
    check_measurements_folder(output_dir)  # never over a README.md that quantlab did not write
    records, problems = load_records(output_dir)
    target = Path(output_dir) / REPORT_NAME
    extra = (_estimate_section(output_dir) + _gguf_full_size_section(output_dir)
             + gguf_cpu_decode_section(output_dir) + _quality_section(output_dir, records))
    replace_file(target, render_report(records, problems, extra))
    return target


def _quality_section(output_dir: str | Path, records: list[Record]) -> list[str]:
    """Every build's weight bytes against its KL (quality/compare.py), and quality.png when matplotlib is here."""
    from quantlab.extras import installed
    from quantlab.quality import compare

    lines = compare.section([_shown(r) for r in records])
    if not lines:
        return []
    without_plot = [line for line in lines if compare.PLOT_NAME not in line]
    if not installed("matplotlib"):
        return without_plot
    try:  # the figure is optional: a quality.png that cannot be replaced (a folder) costs the figure, not the report
        replace_file(Path(output_dir) / compare.PLOT_NAME, compare.render_png(_literal(compare.comparisons(records))))
    except OSError as exc:
        return without_plot + [f"- {compare.PLOT_NAME}: not drawn ({md(exc.strerror or type(exc).__name__)}); "
                               "the table above has the same numbers.", ""]
    return lines


def _literal(found: list) -> list:
    """Comparisons whose text matplotlib draws as written: a `$` in a label would start mathtext, and a malformed
    expression there would stop the report."""
    from dataclasses import replace

    def plain(text: str) -> str:
        return text.replace("$", r"\$")
    return [replace(c, model=plain(c.model), protocol=plain(c.protocol), reference=plain(c.reference),
                    builds=tuple(replace(b, label=plain(b.label)) for b in c.builds)) for c in found]


def _shown(r: Record) -> Record:
    """A record whose text that quality/compare.py and quality_cell put into Markdown is escaped, for them only:
    escaping is one-to-one, so builds group and compare as they would unescaped."""
    update = {"method": r.method.model_copy(update={"label": md(r.method.label)}),
              "model": r.model.model_copy(update={"name": md(r.model.name)})}
    if r.runtime is not None:
        update["runtime"] = r.runtime.model_copy(update={"name": md(r.runtime.name)})
    if r.quality is not None:
        update["quality"] = _shown_quality(r.quality)
    return r.model_copy(update=update)


def _shown_quality(q: QualityResult | None) -> QualityResult | None:
    return q and q.model_copy(update={"reference": md(q.reference), "text_label": md(q.text_label)})


def _side_file(path: Path, model, heading: str):
    """A bench result the report reads beside the records, checked for shape; (None, lines saying why its section
    is left out) when it is not what the bench writes."""
    try:
        return read_model(path, model), []
    except UNREADABLE as exc:
        return None, [heading, "", f"- {md(path.name)}: skipped, not a result of the expected shape "
                      f"({md(why(exc))}); this section is left out.", ""]


def _estimate_section(output_dir: str | Path) -> list[str]:
    """The estimator's claims table and checks, when `quantlab estimate` has written estimates.json."""
    from quantlab.estimate.report_section import estimate_section

    return estimate_section(output_dir)


def _gguf_full_size_section(output_dir: str | Path) -> list[str]:
    """scripts/gguf_full_size.py's table (llama.cpp's file sizes and allocation plan at full size), linked and
    summarised: its own file holds the whole grid."""
    path = Path(output_dir) / GGUF_FULL_SIZE_NAME
    if not _present(path):
        return []
    heading = "## Qwen3.6-27B GGUF at full size, llama.cpp's own numbers"
    data, skipped = _side_file(path, GgufFullSize, heading)
    if data is None:
        return skipped
    lines = [heading, "", f"*{md(data.label)}; {md(data.llama_cpp)}.* "
             "The whole grid (4k-262k tokens, f16 and q8_0 KV, 1 and 4 slots) is in "
             "[gguf-full-size.md](gguf-full-size.md).", "",
             "| Type | Tensor data, with MTP / without | Published file | Planned buffers at 32k, f16 KV, 1 slot |",
             "|---|---:|---:|---:|"]
    for kind, published in data.published_gb.items():
        sizes = {s.mtp: s.tensor_bytes for s in data.sizes if s.type == kind}
        plan = next((a for a in data.allocations if a.type == kind and a.context == 32768
                     and a.kv_type == "f16" and a.slots == 1), None)
        lines.append(f"| {md(kind)} | {sizes[True] / 1e9:.2f} / {sizes[False] / 1e9:.2f} GB | {published:.2f} GB | "
                     + (f"{plan.total / 2**30:.2f} GiB" if plan else "—") + " |")
    return lines + [""]


def _present(path: Path) -> bool:
    """There, whatever it is: a folder or a broken link in a bench result's place is said, not passed over."""
    return path.exists() or path.is_symlink()


def gguf_cpu_decode_section(output_dir: str | Path) -> list[str]:
    """scripts/bench_gguf_cpu_decode.py's result (gguf-cpu-decode.json): decode tok/s and the read bandwidth as
    measured, and a share of the roofline only where quantlab.residency's checks pass on the stored numbers (judged
    here again, not taken from the file); otherwise why there is none."""
    from quantlab.residency import roofline_share

    path = Path(output_dir) / GGUF_CPU_DECODE_NAME
    if not _present(path):
        return []
    heading = "## Qwen3.6-27B GGUF Q4_K_M decode on a CPU, against its bandwidth roofline"
    r, skipped = _side_file(path, GgufCpuDecode, heading)
    if r is None:
        return skipped
    share, problems = roofline_share(r.model_dump())  # quantlab.residency judges the dict the bench writes
    samples = r.samples_tokens_per_s or []
    passes = (r.bandwidth_before_gb_s or []) + (r.bandwidth_after_gb_s or [])
    lines = [heading, "",
             f"*{md(r.label)}; {md(r.cpu)}, {r.threads} threads; {md(r.llama_cpp)}"
             + (f", CPU code {md(r.cpu_code)}" if r.cpu_code else "") + f"; {md(r.created_at)}.* "
             "From `make bench-gguf-cpu-decode` (scripts/bench_gguf_cpu_decode.py).", "",
             f"- Decode: {r.decode_tokens_per_s:.3f} ± {r.decode_stddev:.3f} tok/s "
             f"({len(samples)} samples); {r.bytes_read_per_token / 1e9:.2f} GB read per token.",
             f"- Read bandwidth: {r.read_bandwidth_gb_s:.1f} GB/s"
             + (f" ({min(passes):.1f}-{max(passes):.1f} in {len(passes)} passes), " if passes else ", ")
             + (md(r.bandwidth_method) if r.bandwidth_method else "torch's sum over a separate 4 GiB buffer")
             + "."]
    if share is None:
        lines.append("- No roofline share: " + "; ".join(problems) + ".")
    else:
        lines.append(_share_line(r, share, samples))
    return lines + [""]


def _share_line(r: GgufCpuDecode, share: float, samples: list[float]) -> str:
    from quantlab.residency import cv, drift

    c, before, after = r.checks, r.bandwidth_before_gb_s, r.bandwidth_after_gb_s
    return (f"- {share:.0%} of the roofline ({r.decode_tokens_per_s / share:.3f} tok/s): the model stayed in "
            f"memory (of the pages the decode reads from the file, {c.mapped_resident_start:.1%} were "
            f"cached when the timing began and {c.mapped_resident_end:.1%} when it ended; "
            f"{c.decode_major_faults} major page faults while timed), and the machine held still: the "
            f"bandwidth passes vary by {cv(before + after):.1%} and the decode samples by {cv(samples):.1%} "
            f"(standard deviation ÷ mean), and the bandwidth before and after the decode is "
            f"{drift(before, after):.1%} apart.")


def render_report(records: list[Record], problems: list[str] = (), extra: list[str] = ()) -> str:
    lines = [
        REPORT_MARKER,
        "# quantlab measurements",
        "",
        "Generated by `quantlab report` from the records in [`records/`](records/); do not edit by hand.",
        f"{len(records)} record(s). GB = 10⁹ bytes. Each table says what produced its numbers: "
        "GPU or CPU, real or synthetic weights.",
        "",
    ]
    lines += _claims_section(records)
    lines += list(extra)
    lines += _measurement_sections(records)
    lines += runtime_sections(records)
    lines += speculative_section(records)
    lines += published_section(records)
    if problems:
        lines += ["## Unreadable files", "", *[f"- {md(p)}" for p in problems], ""]
    return "\n".join(lines).rstrip() + "\n"


def _claims_section(records: list[Record]) -> list[str]:
    claims = article_claims()
    src = claims["source"]
    lines = [
        f"## The article's claims vs measurements: {claims['model']}",
        "",
        f"Claims from *{src['title']}* (`{src['file']}`, section “{src['section']}”, citing {src['cites']}). "
        f"Claimed: {claims['quantity']}. Measured: weights resident on the GPU after load "
        f"(`torch.cuda.memory_allocated`; for GGUF files run by llama.cpp, its CUDA model buffers). Verdict “matches” means inside the claimed range, give or take "
        f"{tolerance():.0%}.",
        "",
        "| Precision | Claimed | Fits on (claimed) | Measured | Measured on | Delta | Verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in claims["rows"]:
        record = latest_gpu_weights(records, claims["model"], row["measured_by"])
        if record is None:
            reason = "not measured on a GPU yet"
            lines.append(f"| {row['precision']} | {row['claimed']} | {row['fits_on']} | — | — | — | {reason} |")
            continue
        measured = gpu_weight_bytes(record) / 1e9
        judged = judge(measured, row["low_gb"], row["high_gb"])
        where = f"{md(record.hardware.name)}, {md(record.model.weights)} weights, {md(record.model.variant)} model" \
            + (f", file {md(record.file.name)}" if record.file is not None else "")
        lines.append(
            f"| {row['precision']} | {row['claimed']} | {row['fits_on']} | {measured:.2f} GB | {where} | {judged.delta} | {judged.verdict} |"
        )
    lines += ["", *[f"> Claim: “{s}” — `quantlab estimate` checks it (its section, when estimates.json exists)." for s in claims["statements"]], ""]
    return lines


def _measurement_sections(records: list[Record]) -> list[str]:
    groups: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        groups[(r.model.name, r.model.weights, r.hardware.kind, _hardware_label(r), _runtime_name(r))].append(r)
    lines: list[str] = []
    for (model, weights, kind, hw, runtime), group in sorted(groups.items()):
        lines += _group_table(model, weights, kind, hw, group, runtime)
    return lines or ["## Measurements", "", "No records yet: run `quantlab run RECIPE`.", ""]


def _hardware_label(r: Record) -> str:
    """The GPU's name; a split run's GPUs count too, so its rows stand apart from one GPU's."""
    gpus = r.split.gpus if r.split else ()
    return f"{len(gpus)} x {r.hardware.name}, split by accelerate's device map" if len(gpus) > 1 else r.hardware.name


def _runtime_name(r: Record) -> str:
    return r.runtime.name if r.runtime else "transformers"  # records from before runtimes were recorded


def _group_table(model: str, weights: str, kind: str, hardware: str, group: list[Record],
                 runtime: str = "transformers") -> list[str]:
    latest: dict[tuple, Record] = {}
    runs: dict[tuple, int] = defaultdict(int)
    for r in group:
        key = (r.method.label, r.model.variant, r.point.context, r.point.batch)
        latest[key] = r
        runs[key] += 1
    newest = group[-1]
    software = newest.software
    lines = [
        f"## {md(model)} · {md(weights)} weights · {kind.upper()}: {md(hardware)}"
        + ("" if runtime == "transformers" else f" · {md(runtime)}"),
        "",
        f"{GPU_MEMORY_NOTE if kind == 'gpu' else CPU_MEMORY_NOTE} {SPEED_NOTE} "
        f"Latest: {md(newest.created_at)}, quantlab {md(software.quantlab)} "
        f"({md((software.git_commit or 'no git')[:10])}), torch {md(software.packages.get('torch', '?'))}, "
        f"transformers {md(software.packages.get('transformers', '?'))}.",
        "",
        f"| Method | Variant | Context | Batch | Weights | {'GPU allocated after load' if kind == 'gpu' else 'RSS growth at load'} | "
        "Peak prefill | Peak decode | nvidia-smi peak | Prefill tok/s | TTFT ms | Decode tok/s, all sequences | "
        "ms/step | % of bandwidth bound | KL mean / PPL ratio | Runs |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for key in sorted(latest, key=lambda k: (k[0], k[1], k[3], k[2])):
        lines.append(_row(latest[key], kind, runs[key]))
    notes = [md(n) for n in sorted({n for r in group for n in r.notes})]
    notes += [QUALITY_NOTE] if any(r.quality for r in group) else []
    lines += ["", *[f"- {n}" for n in notes]] if notes else []
    lines += ["", "Kernels that ran:", "", *_kernel_lines(latest.values()), ""]
    lines += _runtime_lines(latest)
    return lines


LONG_SETTINGS = ("accounting", "arguments")  # the vLLM runtime's: its own section shows the accounting


def _runtime_lines(latest: dict[tuple, Record]) -> list[str]:
    """The runtime's version and settings, and its own buffer accounting per point (llama.cpp)."""
    rows = [r for _, r in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[0][2])) if r.runtime]
    if not rows or rows[-1].runtime.name == "transformers":
        return []
    newest = max(rows, key=lambda r: r.created_at).runtime
    settings = ", ".join(f"{md(k)} {md(v)}" for k, v in newest.settings.items() if k not in LONG_SETTINGS)
    lines = [f"Runtime: {md(newest.version)}; {settings}.", ""]
    buffered = [r for r in rows if r.result.runtime_buffers]
    if buffered:
        lines += [f"{md(newest.name)}'s own buffer accounting (MiB, as it logs them):", ""]
        lines += [f"- {md(r.method.label)}, context {r.point.context:,}: "
                  + ", ".join(f"{md(k)} {v / 2**20:,.2f}" for k, v in r.result.runtime_buffers.items())
                  for r in buffered]
        lines.append("")
    return lines


def _kernel_lines(records) -> list[str]:
    seen: dict[str, str] = {}
    for r in sorted(records, key=lambda r: r.created_at):
        k = r.kernels
        seen[r.method.label] = ("not recorded (a record from before quantlab recorded kernels)" if k is None else
                                f"DeltaNet {md(k.deltanet_summary)}; "
                                f"Linear {', '.join(md(c) for c in k.linear) or 'torch.nn.Linear'}; "
                                f"attention {md(k.attention)}; ran in {md(k.compute_dtype)}"
                                + (f"; CPU code {md(k.cpu_backend)}" if k.cpu_backend else ""))
    return [f"- {md(label)}: {text}" for label, text in sorted(seen.items())]


def _row(r: Record, kind: str, runs: int) -> str:
    res = r.result
    split = " (memory: sum over the split's GPUs)" if r.split else ""
    head = (f"| {md(r.method.label)}{split} | {md(r.model.variant)} | {r.point.context:,} | {r.point.batch} |"
            f" {_gb(r.weight_bytes)} | {_gb(_after_load(r.load_memory, kind))} |")
    quality = quality_cell(_shown_quality(r.quality))
    if res.status != "ok":
        return head + f" **{res.status.upper()}** | | | | | | | | {quality} | {runs} |"
    roof = f"{r.roofline.fraction_of_bound:.0%} of {r.roofline.bound_tokens_per_s:,.0f}" if r.roofline else "n/a"
    return head + " | ".join([
        f" {_gb(_peak(res.prefill_memory, kind))}",
        _gb(_peak(res.decode_memory, kind)),
        nvml_cell(res.prefill_memory, res.decode_memory) if kind == "gpu" else "n/a (CPU)",
        _spread(res.prefill_tokens_per_s, "{:,.0f}"),
        _median(res.time_to_first_token_s, "{:,.0f}", 1000),
        _spread(res.decode_tokens_per_s, "{:,.1f}"),
        _median(res.decode_ms_per_token, "{:.1f}"),
        roof,
        quality,
        f"{runs} |",
    ])


def _after_load(m, kind: str) -> int | None:
    """GPU: what torch holds once the model is loaded (the weights and buffers). CPU: how much the process's
    RSS grew while loading; the RSS itself also holds Python, torch and whatever ran before in the process."""
    return m.allocated_end_bytes if kind == "gpu" else m.rss_growth_bytes


def nvml_cell(*phases, gb=None) -> str:
    """nvidia-smi's peak over the phases, labelled: this process's (CUDA context included), or the whole
    device's (every process on it) where this process's own could not be told apart. `gb` formats the bytes
    (the report's GB by default; scripts/gpu_check_all.py's summary gives its own)."""
    gb = gb or _gb
    phases = [m for m in phases if m is not None]
    process = [m.nvml_process_used_peak_bytes for m in phases if m.nvml_process_used_peak_bytes is not None]
    if process:
        return f"{gb(max(process))} (process)"
    device = [m.nvml_device_used_peak_bytes for m in phases if m.nvml_device_used_peak_bytes is not None]
    return f"{gb(max(device))} (device, all processes)" if device else "n/a"


def _peak(m, kind: str) -> int | None:
    if m is None:  # a phase the record has no memory figures for
        return None
    return m.allocated_peak_bytes if kind == "gpu" else m.rss_peak_bytes


def _gb(value: int | None) -> str:
    """GB with two decimals, or three significant digits below 1 GB (the bundled model's weights are MB)."""
    if value is None:
        return "n/a"
    return f"{value / 1e9:.2f}" if abs(value) >= 1e9 else f"{value / 1e9:.3g}"


def _spread(s, fmt: str) -> str:
    if s is None:  # not measured: the schema allows it, the table says so
        return "n/a"
    return f"{fmt.format(s.median)} ({fmt.format(s.min)}–{fmt.format(s.max)})"


def _median(s, fmt: str, scale: float = 1) -> str:
    return "n/a" if s is None else fmt.format(s.median * scale)
