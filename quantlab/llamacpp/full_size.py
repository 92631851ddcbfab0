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

scripts/gguf_full_size.py runs these steps and writes gguf-full-size.json through `quantlab.schema.bench.GgufFullSize`;
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
    prefix = f"model.language_model.layers.{first_full}."
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


def dry_run(tools, bf16: Path, kind: str) -> DryRun:
    from quantlab.llamacpp.steps import quantize

    out = quantize(tools, bf16, bf16, kind, None, dry_run=True)
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


def quantized_size(tools, bf16: Path, out: Path, kind: str, file_type: int, mtp: bool) -> GgufSize:
    """Steps 3 and 4 for one type: llama-quantize's dry run, the sparse GGUF of that type at `out`, and its sizes."""
    from quantlab.llamacpp.gguf_file import read_header

    run = dry_run(tools, bf16, kind)
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
