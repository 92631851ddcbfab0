"""A quality result shown three ways: a report's table cell, a model card's section, the terminal (a table and one
line). Torch-free: the report draws from it."""

from __future__ import annotations

from quantlab.schema.quality import QualityResult


def quality_cell(q: QualityResult | None) -> str:
    """The report's 'KL mean / PPL ratio' cell, with its 95% interval and its protocol (published KLs at 512 and
    4096 tokens of context differ several-fold); '≥' marks a stored-mode (lower-bound) KL."""
    if q is None:
        return "—"
    ci = f" [{q.kl_mean_ci[0]:.4f}, {q.kl_mean_ci[1]:.4f}]" if q.kl_mean_ci else ""
    return (f"{'' if q.kl_exact else '≥'}{q.kl_mean:.4f}{ci} / {q.ppl_ratio:.3f} "
            f"({protocol(q)})")


def protocol(q: QualityResult) -> str:
    """The test protocol, short: scored tokens, window, stride, text."""
    return f"{q.tokens:,} tokens, context {q.context:,}, stride {q.stride:,}, {q.text_label.split(' (')[0]}"


def depth_text(q: QualityResult) -> str:
    if not q.kl_by_position:
        return "—"
    return "; ".join(f"{_k(b['from'])}–{_k(b['to'])}: {b['kl_mean']:.5f} ({b['tokens']:,} tokens)"
                     for b in q.kl_by_position)


def _k(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _rows(q: QualityResult) -> list[tuple[str, str]]:
    bound = "" if q.kl_exact else " (lower bound)"
    return [
        ("Perplexity, reference", f"{q.ppl_reference:.4f}"),
        ("Perplexity, candidate", f"{q.ppl_candidate:.4f}"),
        ("Perplexity ratio", f"{q.ppl_ratio:.4f}"),
        (f"KL mean, nats/token{bound}", f"{q.kl_mean:.5f}"),
        (f"KL median{bound}", f"{q.kl_median:.5f}"),
        (f"KL p90 / p99 / p99.9{bound}", f"{q.kl_p90:.5f} / {q.kl_p99:.5f} / "
                                          + (f"{q.kl_p999:.5f}" if q.kl_p999 is not None else "—")),
        (f"KL max{bound}", f"{q.kl_max:.5f}"),
        ("KL mean, 95% interval (bootstrap over windows)",
         f"[{q.kl_mean_ci[0]:.5f}, {q.kl_mean_ci[1]:.5f}]" if q.kl_mean_ci else "— (one window)"),
        ("Perplexity ratio, 95% interval",
         f"[{q.ppl_ratio_ci[0]:.4f}, {q.ppl_ratio_ci[1]:.4f}]" if q.ppl_ratio_ci else "— (one window)"),
        (f"KL mean by tokens of context before the token{bound}", depth_text(q)),
        ("Top-1 agreement (llama.cpp's \"same top p\")", f"{q.top1_agreement:.2%}"),
        ("Δp of the correct token, mean / RMS (llama.cpp's \"RMS Δp\")", f"{q.delta_p_mean:+.5f} / {q.delta_p_rms:.5f}"),
    ]


def _method_line(q: QualityResult) -> str:
    if q.kl_exact:
        how = "paired: reference and candidate on the same windows, exact full-vocabulary KL"
    else:
        how = (
            f"stored: reference statistics first (top-{q.top_k} log-probs + tail mass), then the candidate; "
            f"KL over the top-{q.top_k} tokens and one tail bucket, a lower bound on the exact KL "
            f"(mean reference tail mass {q.reference_tail_mass_mean:.2e})"
        )
    return how


def quality_card_lines(q: QualityResult) -> list[str]:
    """Markdown for a model card: what was compared, on which text, and the figures."""
    lines = [
        "## Quality against the reference",
        "",
        f"Candidate **{q.candidate}** against reference **{q.reference}**, measured by quantlab on "
        f"{q.tokens:,} scored tokens of {q.text_label} (sliding windows of {q.context:,} tokens, "
        f"stride {q.stride:,}, {q.windows} windows, on {q.device}). Log-softmax in fp32.",
        "",
        "| Figure | Value |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in _rows(q)],
        "",
        f"Mode: {_method_line(q)}. KL is KL(reference ‖ candidate) per token, in nats; Δp is the candidate's "
        "probability of the correct next token minus the reference's.",
    ]
    sha = q.text.get("sha256")
    if sha:
        lines += ["", f"Held-out text sha256: `{sha}`."]
    lines += [f"- {n}" for n in q.notes]
    return lines + [""]


def quality_table(q: QualityResult) -> str:
    """The terminal table of `quantlab quality`."""
    rows = _rows(q)
    width = max(len(name) for name, _ in rows)
    lines = [
        f"quality: {q.candidate}  vs  reference {q.reference}",
        f"  text     {q.text_label}",
        f"  tokens   {q.tokens:,} scored of {q.text_tokens:,} (context {q.context:,}, stride {q.stride:,}, "
        f"{q.windows} windows, {q.device})",
        f"  mode     {_method_line(q)}",
        "",
        *[f"  {name:<{width}}  {value}" for name, value in rows],
    ]
    lines += [f"  note     {n}" for n in q.notes]
    return "\n".join(lines)


def quality_line(q: QualityResult) -> str:
    """One line for `quantlab run`'s output."""
    kl = f"{'≥' if not q.kl_exact else ''}{q.kl_mean:.5f}"
    ci = f" [95%: {q.kl_mean_ci[0]:.5f}-{q.kl_mean_ci[1]:.5f}]" if q.kl_mean_ci else ""
    return (
        f"quality vs {q.reference}: KL mean {kl}{ci} nats (p99 {q.kl_p99:.4f}), PPL {q.ppl_candidate:.3f} vs "
        f"{q.ppl_reference:.3f} (ratio {q.ppl_ratio:.4f}), top-1 agreement {q.top1_agreement:.2%}; "
        f"{protocol(q)}"
    )
