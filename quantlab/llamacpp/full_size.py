"""Full-size GGUFs of synthetic weights with the real shapes, without 55 GB of RAM or disk, and llama.cpp's own
answer to "how big is the file, and what does it allocate at this context".

1. A sparse safetensors checkpoint: the real model's tensor names, shapes and dtypes (transformers' model built on
   the meta device from the shipped config, plus the MTP head's tensors), every byte of data a hole.
2. llama.cpp's converter writes a sparse BF16 GGUF from it (quantlab.llamacpp.convert --sparse): its own header.
3. `llama-quantize --dry-run` says, per tensor, which type llama.cpp would write, and the exact output size.
4. A sparse GGUF of that type is written with llama.cpp's gguf-py: the BF16 header's metadata, each tensor with the
   type llama-quantize chose; its data size is checked against the dry run's total, byte for byte.
5. `llama-fit-params --fit-print` (no_alloc: nothing is allocated) gives llama.cpp's buffers for a context, and the
   largest context whose buffers fit a budget.

6. `mtp_plan` (no_alloc through libllama): the contexts llama-server makes with speculative decoding on the model's MTP
   head (the target and the MTP draft context), the buffers of each as llama.cpp logs them (see the section below).

scripts/gguf_full_size.py runs these steps and writes gguf-full-size.json through `quantlab.schema.bench.GgufFullSize`;
scripts/mtp_full_size.py runs 1-4 and 6 for Q4_K_M with and without the MTP draft (mtp-full-size.json);
scripts/gpu_check_gguf.py reads llama-fit-params on a GPU with `fit_print_rows`.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from quantlab.errors import QuantlabError
from quantlab.schema.bench import GgufAllocation, GgufSize

SAFETENSORS_DTYPES = {"torch.bfloat16": ("BF16", 2), "torch.float32": ("F32", 4), "torch.float16": ("F16", 2)}
DRY_RUN_TENSOR = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[[^\]]*\],\s+type =\s+(\S+),.*?(?:\((\S+)\))?\s*$")
DRY_RUN_TOTAL = re.compile(r"quant size\s*=\s*([\d.]+) MiB")
FIT_PRINT_BUFFERS = ("model_bytes", "context_bytes", "compute_bytes")  # the columns of a --fit-print memory line
VOCABULARY_FILES = ("tokenizer.json", "tokenizer_config.json")


def meta_tensors(config_dir: Path, mtp: bool = True) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, torch dtype) of every tensor of the checkpoint, as the real one names them."""
    import torch
    from transformers import AutoConfig

    import transformers

    config = AutoConfig.from_pretrained(config_dir)
    model_class = getattr(transformers, config.architectures[0])
    with torch.device("meta"):
        model = model_class(config)
    tensors = [(n, tuple(t.shape), str(t.dtype)) for n, t in model.state_dict().items()]
    text = getattr(config, "text_config", config)
    if mtp and int(getattr(text, "mtp_num_hidden_layers", 0) or 0):
        tensors += _mtp_tensors(tensors, text)
    return tensors


def _mtp_tensors(tensors, text) -> list[tuple[str, tuple[int, ...], str]]:
    """The MTP head: one full-attention decoder layer (mtp.layers.0.*), mtp.fc and three norms."""
    first_full = list(text.layer_types).index("full_attention")
    # the VL model's names (Qwen3_5ForConditionalGeneration), else the text model's (Qwen3_5ForCausalLM)
    prefix = next(p for p in (f"model.language_model.layers.{first_full}.", f"model.layers.{first_full}.")
                  if any(n.startswith(p) for n, _, _ in tensors))
    layer = [(f"mtp.layers.0.{n[len(prefix):]}", s, d) for n, s, d in tensors if n.startswith(prefix)]
    h = text.hidden_size
    dtype = next(d for n, s, d in tensors if n.startswith(prefix) and n.endswith("input_layernorm.weight"))
    norms = [(f"mtp.{norm}.weight", (h,), dtype) for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")]
    return layer + [("mtp.fc.weight", (h, 2 * h), "torch.bfloat16")] + norms


def sparse_bf16(tools, config: Path, vocabulary: Path, work: Path, mtp: bool) -> Path:
    """Steps 1 and 2: the sparse checkpoint of `config`'s shapes in work/hf (written once) and llama.cpp's sparse BF16
    GGUF of it, with or without the MTP head. `vocabulary` holds a stand-in tokenizer: the converter pads it to
    vocab_size, so sizes don't change."""
    from quantlab.llamacpp.steps import convert

    hf = work / "hf"
    hf.mkdir(exist_ok=True)
    shutil.copyfile(config / "config.json", hf / "config.json")
    for name in VOCABULARY_FILES:
        shutil.copyfile(vocabulary / name, hf / name)
    if not (hf / "model.safetensors").exists():
        write_sparse_safetensors(meta_tensors(hf), hf / "model.safetensors")
    out = work / f"bf16-{'mtp' if mtp else 'nomtp'}.gguf"
    convert(tools, hf, out, "bf16", mtp, sparse=True)
    return out


def write_sparse_safetensors(tensors, path: Path) -> int:
    """A safetensors file with a real header and no data (a hole of the right size); its size in bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in tensors:
        kind, size = SAFETENSORS_DTYPES[dtype]
        nbytes = size
        for d in shape:
            nbytes *= d
        header[name] = {"dtype": kind, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        handle.truncate(8 + len(blob) + offset)
    return 8 + len(blob) + offset


@dataclass(frozen=True)
class DryRun:
    kind: str
    total_bytes: int  # llama-quantize's own total (MiB, two decimals) ...
    types: dict[str, str]  # tensor -> the GGML type llama.cpp would write


def dry_run(tools, bf16: Path, kind: str, tensor_types: list[str] | None = None) -> DryRun:
    """llama-quantize --dry-run of `kind` (with `tensor_types`, e.g. ["--tensor-type", "blk\\.64\\.=q8_0"])."""
    from quantlab.llamacpp.steps import quantize

    out = quantize(tools, bf16, bf16, kind, None, dry_run=True, tensor_types=tensor_types)
    types: dict[str, str] = {}
    for line in out.splitlines():
        match = DRY_RUN_TENSOR.match(line.strip())
        if match:
            types[match.group(1)] = (match.group(3) or match.group(2)).upper()
    total = DRY_RUN_TOTAL.search(out)
    if not types or not total:
        raise QuantlabError(f"llama-quantize --dry-run {kind}: its output has no per-tensor types or total")
    return DryRun(kind, round(float(total.group(1)) * 2**20), types)


def write_sparse_quantized(bf16: Path, out: Path, run: DryRun, file_type: int) -> int:
    """A sparse GGUF: bf16's metadata and tensors, each tensor of the type the dry run chose. Its data bytes."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(bf16)
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(out, arch=arch, endianess=reader.endianess)
    alignment = reader.fields.get("general.alignment")
    if alignment is not None:
        writer.data_alignment = int(alignment.contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment"):
            continue
        value = field.contents()
        if name == "general.file_type":
            value = file_type
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub_type)
    data_bytes = 0
    for tensor in reader.tensors:
        qtype = gguf.GGMLQuantizationType[run.types.get(tensor.name, tensor.tensor_type.name)]
        shape = [int(d) for d in reversed(tensor.shape)]  # gguf-py's reader gives ggml order; the writer takes numpy's
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape)) // block * type_size
        byte_shape = [*shape[:-1], shape[-1] // block * type_size]  # gguf-py takes a quantized shape in bytes
        writer.add_tensor_info(tensor.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        data_bytes += nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    handle = writer.fout[0]
    writer.write_padding(handle, handle.tell())
    for info in writer.tensors[0].values():
        handle.seek(gguf.GGUFWriter.ggml_pad(info.nbytes, writer.data_alignment), 1)
    handle.truncate()
    writer.close()
    return data_bytes


def quantized_size(tools, bf16: Path, out: Path, kind: str, file_type: int, mtp: bool,
                   tensor_types: list[str] | None = None) -> GgufSize:
    """Steps 3 and 4 for one type: llama-quantize's dry run, the sparse GGUF of that type at `out`, and its sizes."""
    from quantlab.llamacpp.gguf_file import read_header

    run = dry_run(tools, bf16, kind, tensor_types)
    data = write_sparse_quantized(bf16, out, run, file_type)
    header = read_header(out)
    return GgufSize(type=kind, mtp=mtp, dry_run_bytes=run.total_bytes, tensor_bytes=data, file_bytes=header.file_bytes,
                    header_bytes=header.file_bytes - data, parameters_by_type=header.parameters_by_type(),
                    block_count=header.block_count)


def tensor_bytes(model: Path, name: str) -> int:
    """The data bytes of the tensor `name` in a GGUF (0 when it has none of that name)."""
    from quantlab.llamacpp.gguf_file import read_header

    return sum(t.nbytes for t in read_header(model).tensors if t.name == name)


def planned_allocation(tools, model: Path, kind: str, context: int, kv_type: str, slots: int) -> GgufAllocation:
    """Step 5: llama.cpp's planned buffers on the CPU backend ('Host') for one context, KV type and slot count."""
    plan = fit_print(tools, model, context, kv_type, slots)["Host"]
    return GgufAllocation(type=kind, context=context, kv_type=kv_type, slots=slots, **plan, total=sum(plan.values()))


def largest_fitting_context(tools, model: Path, kv_type: str, budget: int, minus: int = 0, limit: int = 262144,
                            step: int = 1024) -> int:
    """The largest context (a multiple of `step`, at most `limit`) whose planned buffers, one slot, less `minus`
    bytes, fit in `budget` bytes: a bisection over llama-fit-params."""
    low, high = 1, limit // step
    while low < high:
        mid = (low + high + 1) // 2
        plan = fit_print(tools, model, mid * step, kv_type, 1)["Host"]
        low, high = (mid, high) if sum(plan.values()) - minus <= budget else (low, mid - 1)
    return low * step


def fit_print_rows(output: str) -> dict[str, list[int]]:
    """llama-fit-params --fit-print's memory lines, per device: [model, context, compute] in MiB as it prints them
    (rounded down); {} when it printed none."""
    rows: dict[str, list[int]] = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 4 and all(p.isdigit() for p in parts[1:]):
            rows[parts[0]] = [int(p) for p in parts[1:]]
    return rows


def fit_print(tools, model: Path, context: int, kv_type: str, slots: int) -> dict[str, dict[str, int]]:
    """llama.cpp's planned buffers (MiB → bytes) per device: {'Host': {'model_bytes': .., ...}}."""
    from quantlab import llamacpp

    # -nr: no CPU repacking, so the model buffer holds the weights as a GPU would (the CPU backend otherwise
    # counts only its repacked copies, the rest staying mapped from the file)
    out = llamacpp.run_tool(tools, ["llama-fit-params", "-m", str(model), "-c", str(context), "-np", str(slots),
                                    "-nr", "-ctk", kv_type, "-ctv", kv_type, "--fit-print", "on"],
                            f"llama-fit-params at {context:,} tokens")
    found = {device: {k: mib * 2**20 for k, mib in zip(FIT_PRINT_BUFFERS, row)}
             for device, row in fit_print_rows(out).items()}
    if not found:
        raise QuantlabError(f"llama-fit-params printed no memory lines for {model.name}:\n{out[-600:]}")
    return found


# ---- the MTP draft: llama.cpp's plan for speculative decoding with the model's own MTP head ----------------------
#
# What the pinned tree allocates for `--spec-type draft-mtp --spec-draft-n-max K` (llama-server, llama-cli and
# llama-speculative-simple all go through the same common/ code), read from .llama.cpp/src/vendor/llama.cpp:
# - the target model is loaded with load_mtp (common/common.cpp:1625); without it every blk.N (N = n_layer) tensor is
#   TENSOR_SKIP (src/models/qwen35.cpp:38, 93-123), so a GGUF that holds the MTP block loads it only when asked;
# - the target context gets n_rs_seq = K recurrent-state snapshots per sequence for rollback (common/common.cpp:1635,
#   common/common.h:396-402): the DeltaNet state is slots × (1 + K) rows (src/llama-memory-recurrent.cpp:101); it keeps
#   no KV for the MTP layer (src/llama-model.cpp:2699-2704: il < n_layer());
# - both contexts reserve their compute graphs for n_outputs_max outputs: slots × (1 + K) for the target and slots for
#   the draft (common/speculative.cpp:2586-2596 and 2480-2481; tools/server/server-context.cpp:41-53, 995-997;
#   examples/speculative-simple/speculative-simple.cpp:32-36), where llama-fit-params leaves it at n_batch
#   (src/llama-context.cpp:250: 0 means n_batch) and so plans n_ubatch rows of logits;
# - the draft context is a second llama_context on the same model (common/speculative.cpp:2557-2567), ctx_type MTP
#   (2525-2527), n_ctx = the target's (2530), n_rs_seq 0 (2534), the draft's own KV types (-ctkd/-ctvd, f16 by
#   default: common/common.h:343-344; common/speculative.cpp:2478-2479); its memory is a plain KV cache over the
#   nextn layer(s) only (src/llama-model.cpp:2660-2669 and 2792-2802: il >= n_layer()), and its compute buffer is
#   graph_mtp's (src/models/qwen35.cpp:485-660) reserved at n_ubatch tokens.
# `mtp_plan` makes exactly those two contexts with no_alloc (nothing allocated: llama.cpp sizes every buffer, as
# llama-fit-params does) through libllama, in a process of its own, and reads the sizes llama.cpp logs.

KV_SIZE_LINE = re.compile(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers")
RS_SIZE_LINE = re.compile(r"llama_memory_recurrent: size =\s*([\d.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers")
COMPUTE_LINE = re.compile(r"(\S+) compute buffer size =\s*([\d.]+) MiB")
GGML_TYPE_IDS = {"f32": 0, "f16": 1, "q8_0": 8, "bf16": 30}


@dataclass(frozen=True)
class ContextBuffers:
    """One llama_context's buffers as llama.cpp logs them (MiB with two decimals, turned into bytes)."""

    kv_bytes: int
    kv_cells: int
    kv_layers: int
    recurrent_bytes: int
    compute_bytes: int


@dataclass(frozen=True)
class MtpPlan:
    """llama.cpp's planned buffers for one GGUF at one context: the target context and, with K > 0, the MTP draft
    context. `draft` is None with K = 0 (speculative decoding off: the MTP block is not even loaded)."""

    context: int
    draft_tokens: int
    kv_type: str
    draft_kv_type: str
    ubatch: int
    target: ContextBuffers
    draft: ContextBuffers | None


def mtp_plan(tools, model: Path, context: int, kv_type: str = "f16", draft_tokens: int = 0,
             draft_kv_type: str = "f16", ubatch: int = 512, batch: int = 2048) -> MtpPlan:
    """llama.cpp's plan (no_alloc) for `model` at `context` tokens, one slot, with the MTP draft of `draft_tokens`
    tokens per step (0: off), as llama-server sets up its contexts; in a fresh process (llama.cpp has one log
    callback per process, and an abort in ggml ends only that one)."""
    import os
    import subprocess
    import sys

    for kind in (kv_type, draft_kv_type):
        if kind not in GGML_TYPE_IDS:
            raise QuantlabError(f"KV type '{kind}': choose from {', '.join(GGML_TYPE_IDS)}")
    args = dict(model=str(model), context=context, kv_type=kv_type, draft_tokens=draft_tokens,
                draft_kv_type=draft_kv_type, ubatch=ubatch, batch=batch)
    code = "import json, sys; from quantlab.llamacpp.full_size import _plan_here; _plan_here(**json.loads(sys.argv[1]))"
    env = {**os.environ, "QUANTLAB_LLAMA_CPP": str(tools.root), "GGML_NO_BACKTRACE": "1"}  # the same build
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                          errors="replace", env=env)
    found = [line for line in proc.stdout.splitlines() if line.startswith("MTP_PLAN ")]
    if proc.returncode != 0 or not found:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise QuantlabError(f"llama.cpp's plan of {model.name} at {context:,} tokens (MTP draft k={draft_tokens}) "
                            f"failed (exit {proc.returncode}):\n{tail}")
    data = json.loads(found[-1][len("MTP_PLAN "):])
    draft = ContextBuffers(**data["draft"]) if data["draft"] else None
    return MtpPlan(context, draft_tokens, kv_type, draft_kv_type, ubatch, ContextBuffers(**data["target"]), draft)


def _plan_here(model: str, context: int, kv_type: str, draft_tokens: int, draft_kv_type: str, ubatch: int,
               batch: int) -> None:
    """In this process: the contexts llama-server would make, with no_alloc; prints one MTP_PLAN line of JSON."""
    from quantlab.llamacpp.binding import library, process_log

    lib, log = library(), process_log()
    mparams = lib.llama_model_default_params()
    mparams.n_gpu_layers = 0
    mparams.no_alloc = True
    mparams.load_mode = 0  # LLAMA_LOAD_MODE_NONE, as common/fit.cpp's no_alloc pass
    mparams.load_mtp = draft_tokens > 0  # common/common.cpp:1625
    mparams.use_extra_bufts = False  # -nr, as fit_print: weights as a GPU holds them, not the CPU's repacked copies
    with log.capture() as lines:
        handle = lib.llama_model_load_from_file(model.encode(), mparams)
    if not handle:
        raise SystemExit(f"llama.cpp could not load {model}: {log.last_error(lines)}")
    contexts = []
    try:
        target = _context(lib, handle, context, kv_type, ubatch, batch, n_rs_seq=draft_tokens,
                          outputs=1 + draft_tokens, ctx_type=0, other=None)
        contexts.append(target[0])
        draft = None
        if draft_tokens > 0:
            n_ctx = lib.llama_n_ctx(target[0])  # common/speculative.cpp:2530
            draft = _context(lib, handle, n_ctx, draft_kv_type, ubatch, batch, n_rs_seq=0, outputs=1, ctx_type=1,
                             other=target[0])
            contexts.append(draft[0])
        result = {"target": target[1], "draft": draft[1] if draft else None}
    finally:
        for ctx in reversed(contexts):
            lib.llama_free(ctx)
        lib.llama_model_free(handle)
    print("MTP_PLAN " + json.dumps(result), flush=True)


def _context(lib, model, n_ctx: int, kv_type: str, ubatch: int, batch: int, n_rs_seq: int, outputs: int,
             ctx_type: int, other) -> tuple:
    from quantlab.llamacpp.binding import process_log

    log = process_log()
    params = lib.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = batch
    params.n_ubatch = min(ubatch, batch)
    params.n_seq_max = 1
    params.n_rs_seq = n_rs_seq
    params.n_outputs_max = outputs
    params.n_outputs_max_per_seq = outputs
    params.ctx_type = ctx_type
    params.flash_attn_type = -1  # auto, llama-server's default
    params.type_k = params.type_v = GGML_TYPE_IDS[kv_type]
    if other is not None:
        params.ctx_other = other
    with log.capture() as lines:
        ctx = lib.llama_init_from_model(model, params)
    if not ctx:
        raise SystemExit(f"llama.cpp could not make the {'MTP draft' if ctx_type else 'target'} context: "
                         f"{log.last_error(lines)}")
    return ctx, vars(context_buffers(lines))


def context_buffers(lines: list[str]) -> ContextBuffers:
    """The sizes one context's creation logged: KV cache (with its cells and layers), recurrent state, compute (per
    device the last size logged: a context that reserves its graph again, as the MTP draft does once its sampler is
    set, logs it again)."""
    mib = 2**20
    kv = [m for m in map(KV_SIZE_LINE.search, lines) if m]
    rs = [m for m in map(RS_SIZE_LINE.search, lines) if m]
    compute = {m.group(1): round(float(m.group(2)) * mib) for m in map(COMPUTE_LINE.search, lines) if m}
    return ContextBuffers(
        kv_bytes=sum(round(float(m.group(1)) * mib) for m in kv),
        kv_cells=max((int(m.group(2)) for m in kv), default=0),
        kv_layers=sum(int(m.group(3)) for m in kv),
        recurrent_bytes=sum(round(float(m.group(1)) * mib) for m in rs),
        compute_bytes=sum(compute.values()),
    )


DRAFT_CONTEXT_LINE = "creating MTP draft context"  # common/speculative.cpp:2560


def speculative_log_buffers(log: str) -> tuple[ContextBuffers, ContextBuffers]:
    """The target's and the MTP draft's buffers from the log of a real llama.cpp run with --spec-type draft-mtp
    (llama-speculative-simple -v -fit off: without -fit off, the fit pass's no_alloc contexts come first)."""
    lines = log.splitlines()
    at = next((i for i, line in enumerate(lines) if DRAFT_CONTEXT_LINE in line), None)
    if at is None:
        raise QuantlabError("the log has no MTP draft context (llama.cpp did not start speculative decoding)")
    return context_buffers(lines[:at]), context_buffers(lines[at:])
