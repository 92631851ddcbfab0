"""The `quantlab estimate` subcommand: its arguments and what it prints and writes."""

from __future__ import annotations

import argparse

from quantlab.estimate import DEFAULT_CONTEXTS as _CONTEXTS
from quantlab.estimate import DEFAULT_METHODS

DEFAULT_CONTEXTS = ",".join(str(c) for c in _CONTEXTS)


def add_estimate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "estimate",
        help="estimate memory from a config alone, beside the article's claims and the GPU records",
        description="Weights per component and method, KV cache, DeltaNet state, activations and overheads at each "
        "context, and the longest context that fits a GPU. Writes OUTPUT/estimates.json and OUTPUT/memory.png "
        "and regenerates OUTPUT/README.md.",
    )
    p.add_argument("--model", default="qwen3.6-27b",
                   help="qwen3.6-27b (default), qwen3.5-397b-a17b, bundled, a config.json or its folder, or a Hub id")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated, or 'all' (default: {DEFAULT_METHODS})")
    p.add_argument("--contexts", default=DEFAULT_CONTEXTS, help=f"tokens, comma-separated (default: {DEFAULT_CONTEXTS})")
    # whole numbers read by cmd_estimate, not argparse: a bad one is one line (exit 2), not the usage text
    p.add_argument("--batch", default="1", help="sequences (default: 1)")
    p.add_argument("--kv-dtype", choices=["bf16", "fp16", "fp8", "q8_0", "f32"],
                   help="KV cache dtype (default: bf16 on the transformers profile, fp16 on llama.cpp)")
    p.add_argument("--state-dtype", choices=["float32", "bfloat16", "float16"], help="DeltaNet state dtype (default: float32)")
    p.add_argument("--prefill-chunk",
                   help="tokens per prefill forward (default: the whole prompt on transformers, 512 on llama.cpp)")
    p.add_argument("--runtime", choices=["transformers", "llama.cpp"],
                   help="runtime profile (default: transformers, as quantlab measures; llama.cpp with --mtp-draft)")
    p.add_argument("--gpu-gb", default="24", help="GPU sizes for the longest-context column, comma-separated (default: 24)")
    p.add_argument("--gpus", help="GPU sets to split each method across, COUNTxGB comma-separated (e.g. 2x24,1x48): "
                   "per-GPU memory under accelerate's device map and under vLLM's tensor parallelism")
    vllm = p.add_argument_group(
        "vLLM's KV-cache accounting", "with --vllm-kv-gib: print only what vLLM reports for a KV space (its block size, "
        "mamba page padding, cache groups, blocks, KV cache tokens and maximum concurrency; "
        "quantlab/estimate/vllm_cache.py), and write nothing; --kv-dtype and --state-dtype stand for vLLM's "
        "--kv-cache-dtype and --mamba-ssm-cache-dtype")
    vllm.add_argument("--vllm-kv-gib", help="KV space per GPU in GiB (--kv-cache-memory-bytes; on the CPU, "
                      "VLLM_CPU_KVCACHE_SPACE)")
    vllm.add_argument("--max-num-seqs", help="vLLM's --max-num-seqs (default: 256; it sizes nothing in the cache)")
    vllm.add_argument("--context", help="vLLM's --max-model-len (default: the config's max_position_embeddings)")
    vllm.add_argument("--no-prefix-caching", action="store_true", help="vLLM's --no-enable-prefix-caching")
    vllm.add_argument("--vllm-device", choices=["gpu", "cpu"], help="where vLLM runs: its block sizes differ "
                      "(default: gpu)")
    vllm.add_argument("--tensor-parallel-size", help="GPUs the model is split across (default: 1)")
    # --mtp-draft K with --vllm-kv-gib: MTP speculative decoding's num_speculative_tokens (vllm_cache.py)
    mtp = p.add_argument_group(
        "MTP speculative decoding in llama.cpp", "with --mtp-draft K: print only what llama.cpp's MTP draft of K "
        "tokens per step adds to each GGUF method's memory at each context (the MTP block's weights, the draft "
        "context's KV cache and compute buffer, the target's DeltaNet state snapshots; quantlab/estimate/"
        "mtp_draft.py), the totals with and without it, and the longest context fitting each --gpu-gb either way; "
        "write nothing. The llama.cpp profile, one slot (--methods default: q4_k_m; --contexts default: "
        "32768,131072)")
    mtp.add_argument("--mtp-draft", help="K, tokens drafted per step (llama.cpp --spec-type draft-mtp "
                     "--spec-draft-n-max K; 1 to 8). With --vllm-kv-gib: vLLM's --speculative-config "
                     "'{\"method\": \"mtp\", \"num_speculative_tokens\": K}' in its KV-cache accounting")
    mtp.add_argument("--mtp-block-type", help="the MTP block kept at this type (llama-quantize --tensor-type "
                     "'blk\\.N\\.=TYPE'), e.g. Q8_0 (default: the file type's own rules)")
    mtp.add_argument("--draft-kv-dtype", choices=["f16", "bf16", "q8_0", "f32"],
                     help="the draft context's KV cache type (llama.cpp -ctkd/-ctvd; default f16, whatever --kv-dtype "
                     "says)")
    p.add_argument("--with-vision", action="store_true", help="count the vision tower as loaded")
    p.add_argument("--with-mtp", action="store_true", help="count the MTP head as loaded")
    p.add_argument("--markdown", action="store_true", help="print Markdown instead of aligned text")
    p.add_argument("--output", default="measurements", help="measurements folder (default: measurements)")
    p.add_argument("--no-write", action="store_true", help="print only; write nothing")
    p.set_defaults(func=cmd_estimate)


MTP_ONLY = {"mtp_block_type": "--mtp-block-type", "draft_kv_dtype": "--draft-kv-dtype"}
VLLM_ONLY = {"max_num_seqs": "--max-num-seqs", "context": "--context", "no_prefix_caching": "--no-prefix-caching",
             "vllm_device": "--vllm-device", "tensor_parallel_size": "--tensor-parallel-size"}


def cmd_estimate(args: argparse.Namespace) -> int:
    from quantlab.estimate.command import EstimateOptions, check_output_files, run_estimate, write_outputs
    from quantlab.estimate.render import markdown_text, terminal_text
    from quantlab.outputs import check_measurements_folder

    from quantlab.errors import QuantlabError

    given = [flag for dest, flag in MTP_ONLY.items() if getattr(args, dest) is not None]
    if given and (args.mtp_draft is None or args.vllm_kv_gib is not None):
        raise QuantlabError(f"{given[0]} goes with --mtp-draft K and llama.cpp (not with --vllm-kv-gib)")
    if args.mtp_draft is not None and args.vllm_kv_gib is None:
        return cmd_mtp_draft(args)
    if args.vllm_kv_gib is not None:
        return cmd_vllm_cache(args)
    given = [flag for dest, flag in VLLM_ONLY.items() if getattr(args, dest) not in (None, False)]
    if given:
        raise QuantlabError(f"{given[0]} goes with --vllm-kv-gib (vLLM's KV-cache accounting for a KV space)")
    batch, chunk = whole_number(args.batch, "--batch"), whole_number(args.prefill_chunk, "--prefill-chunk")
    options = EstimateOptions(
        model=args.model, methods=args.methods, contexts=args.contexts, batch=batch, gpu_gb=args.gpu_gb,
        runtime=args.runtime or "transformers", kv_dtype=args.kv_dtype, state_dtype=args.state_dtype,
        prefill_chunk=chunk,
        with_vision=args.with_vision, with_mtp=args.with_mtp, gpus=args.gpus, output=args.output,
    )
    if not args.no_write:
        check_measurements_folder(args.output)  # refused before the estimate, not after its table is printed
        check_output_files(args.output)
    result = run_estimate(options)
    print(markdown_text(result) if args.markdown else terminal_text(result), end="")
    if not args.no_write:
        for path in write_outputs(result, args.output):
            print(f"wrote {path}")
    return 0  # the report is regenerated by quantlab/cli.py, a floor above both


def cmd_mtp_draft(args: argparse.Namespace) -> int:
    """`quantlab estimate --mtp-draft K ...`: what llama.cpp's MTP draft adds, per GGUF method and context."""
    from quantlab.errors import QuantlabError
    from quantlab.estimate.mtp_command import MtpDraftOptions, mtp_draft_lines

    if args.runtime == "transformers":
        raise QuantlabError("--mtp-draft is llama.cpp's MTP speculative decoding: give --runtime llama.cpp, or no "
                            "--runtime")
    if args.gpus is not None or args.with_vision or args.with_mtp:
        flag = "--gpus" if args.gpus is not None else "--with-vision" if args.with_vision else "--with-mtp"
        raise QuantlabError(f"{flag} does not go with --mtp-draft (one llama.cpp process on one device; the MTP "
                            "block is counted in its own row)")
    defaults = MtpDraftOptions()
    options = MtpDraftOptions(
        model=args.model, methods=args.methods if args.methods != DEFAULT_METHODS else defaults.methods,
        contexts=args.contexts if args.contexts != DEFAULT_CONTEXTS else defaults.contexts,
        draft_tokens=whole_number(args.mtp_draft, "--mtp-draft"), kv_dtype=args.kv_dtype,
        draft_kv_dtype=args.draft_kv_dtype or defaults.draft_kv_dtype, block_type=args.mtp_block_type,
        state_dtype=args.state_dtype, ubatch=whole_number(args.prefill_chunk, "--prefill-chunk"), gpu_gb=args.gpu_gb,
        batch=whole_number(args.batch, "--batch"),
    )
    print("\n".join(mtp_draft_lines(options)))
    args.no_write = True  # it wrote nothing: quantlab/cli.py regenerates the report only after a write
    return 0


def cmd_vllm_cache(args: argparse.Namespace) -> int:
    """`quantlab estimate --vllm-kv-gib GIB ...`: vLLM's own accounting of that KV space for the model."""
    from quantlab.estimate.command import VllmCacheOptions, vllm_cache_lines

    options = VllmCacheOptions(
        model=args.model, kv_gib=args.vllm_kv_gib, max_num_seqs=whole_number(args.max_num_seqs, "--max-num-seqs"),
        context=whole_number(args.context, "--context"), prefix_caching=not args.no_prefix_caching,
        device=args.vllm_device or "gpu", tp=whole_number(args.tensor_parallel_size, "--tensor-parallel-size"),
        kv_dtype=args.kv_dtype, ssm_dtype=args.state_dtype,
        spec_tokens=whole_number(args.mtp_draft, "--mtp-draft"),
    )
    print("\n".join(vllm_cache_lines(options)))
    return 0


def whole_number(text: str | None, flag: str) -> int | None:
    """An integer option as typed (1_000 too), or one QuantlabError naming it; None stays None."""
    from quantlab.errors import QuantlabError

    if text is None:
        return None
    digits = str(text).strip().replace("_", "")
    try:
        return int(digits)
    except ValueError:
        if digits.lstrip("+-").isdigit():  # Python refuses to read 4,300+ digits
            raise QuantlabError(f"{flag}: a number of {len(digits):,} digits is out of range") from None
        raise QuantlabError(f"{flag}: '{str(text)[:40]}' is not a whole number (e.g. {flag} 4)") from None
