"""vLLM's own KV-cache accounting against quantlab's model of it (quantlab/estimate/vllm_cache.py), on a model with
Qwen3.6-27B's exact cache shapes and narrow widths (quantlab/cache_shapes.py), dummy weights, vLLM's CPU build.

    .venv/bin/python scripts/check_vllm_accounting.py [--quick] [--max-model-len 16384] [--out table.json]

For each setting (KV space 2, 4, 8 GiB × --max-num-seqs 1, 4, 16 × prefix caching on/off: 18 servers, about a
minute each on 2 cores; --quick: 3 of them) it starts vLLM's server (quantlab/vllm_server), reads the KV tokens, the
maximum concurrency, the block size, the mamba page padding and the groups vLLM reports (its /metrics and log,
quantlab/vllm_server/accounting.py), and prints a Markdown table beside the estimate. Exit 1 when a token or
concurrency figure differs by more than 1%, or the block size, padding or groups differ; 2 when vLLM is missing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantlab import cache_shapes  # noqa: E402
from quantlab.errors import QuantlabError  # noqa: E402
from quantlab.estimate.hybrid import hybrid_shape  # noqa: E402
from quantlab.estimate.vllm_cache import GIB, VllmCache, state_dtypes, vllm_cache  # noqa: E402

KV_GIB = (2, 4, 8)
MAX_NUM_SEQS = (1, 4, 16)
PREFIX_CACHING = (True, False)
QUICK = ((2, 16, False), (8, 1, True), (4, 4, True))
TOLERANCE_PCT = 1.0
DEFAULT_MAX_MODEL_LEN = 16384  # 32,768 does not fit 2 GiB (vLLM refuses: one request needs 43 blocks of 35)


@dataclass(frozen=True)
class Setting:
    kv_gib: int
    max_num_seqs: int
    prefix_caching: bool
    max_model_len: int

    @property
    def label(self) -> str:
        return (f"{self.kv_gib} GiB, seqs {self.max_num_seqs}, prefix {'on' if self.prefix_caching else 'off'}, "
                f"len {self.max_model_len:,}")


def settings(quick: bool, max_model_len: int) -> list[Setting]:
    grid = QUICK if quick else itertools.product(KV_GIB, MAX_NUM_SEQS, PREFIX_CACHING)
    return [Setting(gib, seqs, prefix, max_model_len) for gib, seqs, prefix in grid]


def estimate(setting: Setting) -> VllmCache:
    """quantlab's figure for the narrow model on vLLM's CPU build (bf16 weights and KV, float32 SSM state)."""
    config = cache_shapes.config()
    conv, ssm = state_dtypes("bfloat16", "cpu", getattr(config, "mamba_ssm_dtype", None))
    return vllm_cache(hybrid_shape(config), setting.kv_gib * GIB, setting.max_model_len, setting.max_num_seqs,
                      setting.prefix_caching, "bfloat16", conv, ssm, tp=1, device="cpu")


def measure(setting: Setting):
    """vLLM's own accounting (a VllmAccounting) for one setting; a VllmError when vLLM refuses to start."""
    from quantlab.vllm_server.accounting import read_accounting
    from quantlab.vllm_server.client import VllmClient
    from quantlab.vllm_server.server import ServerConfig, VllmServer

    config = ServerConfig(model=str(cache_shapes.made_folder()), max_model_len=setting.max_model_len,
                          max_num_seqs=setting.max_num_seqs, kv_cache_gib=setting.kv_gib,
                          prefix_caching=setting.prefix_caching, load_format="dummy", skip_tokenizer_init=True)
    with VllmServer(config) as server:
        return read_accounting(server.log_text(), VllmClient(server.url, config.model).metrics())


def diff_pct(measured: float | None, estimated: float) -> float | None:
    if measured is None:
        return None
    return 100 * (estimated - measured) / measured if measured else (0.0 if not estimated else float("inf"))


def compare(setting: Setting, measured, refused: str | None = None) -> dict:
    """One row: vLLM's figures, the estimate's, and whether they agree."""
    est = estimate(setting)
    if refused is not None:
        return {"setting": setting.__dict__, "label": setting.label, "vllm_refused": refused,
                "estimate_fits": est.fits, "ok": not est.fits}
    row = {"setting": setting.__dict__, "label": setting.label,
           "vllm_tokens": measured.kv_cache_tokens, "estimate_tokens": est.kv_cache_tokens,
           "tokens_diff_pct": diff_pct(measured.kv_cache_tokens, est.kv_cache_tokens),
           "vllm_max_concurrency": measured.max_concurrency, "estimate_max_concurrency": est.max_concurrency,
           "concurrency_diff_pct": diff_pct(measured.max_concurrency, est.max_concurrency),
           "vllm_block_size": measured.block_size, "estimate_block_size": est.block_size,
           "vllm_padding_pct": measured.mamba_page_padding_pct, "estimate_padding_pct": est.mamba_page_padding_pct,
           "vllm_groups": list(measured.cache_groups), "estimate_groups": list(est.cache_groups),
           "vllm_num_blocks": measured.num_blocks, "estimate_num_blocks": est.num_blocks,
           "vllm_mamba_cache_mode": measured.mamba_cache_mode, "estimate_mamba_cache_mode": est.mamba_cache_mode}
    row["ok"] = agree(row)
    return row


def agree(row: dict) -> bool:
    diffs = (row["tokens_diff_pct"], row["concurrency_diff_pct"])
    close = all(d is not None and abs(d) <= TOLERANCE_PCT for d in diffs)
    same = all(row[f"vllm_{k}"] == row[f"estimate_{k}"] for k in ("block_size", "padding_pct", "groups"))
    return close and same


def check(setting: Setting) -> dict:
    from quantlab.vllm_server.server import VllmError

    try:
        return compare(setting, measure(setting))
    except VllmError as exc:
        return compare(setting, None, refused=str(exc))


def _number(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def markdown(rows: list[dict]) -> str:
    head = ("| settings | vLLM tokens | estimate tokens | diff % | vLLM max concurrency | estimate | diff % | "
            "block size (vLLM / est.) | mamba padding % (vLLM / est.) | groups (vLLM / est.) | ok |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "vllm_refused" in r:
            lines.append(f"| {r['label']} | refused: {r['vllm_refused'][:120]} | "
                         f"{'fits' if r['estimate_fits'] else 'refused too'} | | | | | | | | {_ok(r)} |")
            continue
        lines.append(
            f"| {r['label']} | {_number(r['vllm_tokens'], ',')} | {r['estimate_tokens']:,} | "
            f"{_number(r['tokens_diff_pct'], '+.2f')} | {_number(r['vllm_max_concurrency'], '.4f')} | "
            f"{r['estimate_max_concurrency']:.4f} | {_number(r['concurrency_diff_pct'], '+.2f')} | "
            f"{r['vllm_block_size']} / {r['estimate_block_size']} | {r['vllm_padding_pct']} / {r['estimate_padding_pct']} | "
            f"{_groups(r['vllm_groups'])} / {_groups(r['estimate_groups'])} | "
            f"{_ok(r)} |")
    return "\n".join(lines) + "\n"


def _groups(sizes: list[int]) -> str:
    """(896, 896, 896, 896) → '4×896'."""
    return " + ".join(f"{sizes.count(s)}×{s}" for s in dict.fromkeys(sizes)) or "—"


def _ok(row: dict) -> str:
    return "yes" if row["ok"] else "**NO**"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{len(QUICK)} settings instead of 18")
    parser.add_argument("--max-model-len", type=int, default=DEFAULT_MAX_MODEL_LEN)
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    from quantlab.vllm_server.server import installed_version, vllm_python

    try:
        vllm_python()
    except QuantlabError as exc:
        print(f"check_vllm_accounting: {exc}", file=sys.stderr)
        return 2
    rows = []
    for setting in settings(args.quick, args.max_model_len):
        rows.append(check(setting))
        print(f"{setting.label}: {'ok' if rows[-1]['ok'] else 'DIFFERS'}", file=sys.stderr, flush=True)
    print(f"vLLM {installed_version()}, CPU build; model: {cache_shapes.DISPLAY_NAME} (quantlab/cache_shapes.py), "
          f"dummy weights, bf16 KV cache, float32 SSM state\n")
    print(markdown(rows), end="")
    if args.out:
        args.out.write_text(json.dumps({"vllm": installed_version(), "rows": rows}, indent=1) + "\n", encoding="utf-8")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
