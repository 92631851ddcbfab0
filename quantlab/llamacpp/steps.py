"""llama.cpp's steps as a library: the converter (convert_hf_to_gguf.py, through quantlab.llamacpp.convert),
llama-imatrix on calibration text, llama-quantize (and its dry run), and what a GGUF's header says each tensor
became. The gguf method, `quantlab sensitivity`, the full-size GGUFs and the scripts all call these.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from quantlab.errors import QuantlabError
from quantlab.llamacpp import convert as converter  # run as `python -m`, in a process of its own
from quantlab.llamacpp import tools as llamacpp
from quantlab.llamacpp.gguf_file import read_header
from quantlab.text.calibration import CalibrationSpec, calibration_samples

# Types written by the converter itself (no llama-quantize step)
CONVERTER_TYPES = {"BF16": "bf16", "F16": "f16", "F32": "f32"}
GGUF_NAME = "model.gguf"
IMATRIX_NAME = "imatrix.gguf"
BF16_NAME = "model-bf16.gguf"


def timed(echo):
    def step(what: str, work) -> None:
        echo(f"{what} ...")
        start = time.perf_counter()
        work()
        echo(f"{what}: {time.perf_counter() - start:,.1f} s")
    return step


def _calibration_text(calibration, tokenizer) -> str:
    """The calibration windows as text, one after another, for llama-imatrix to tokenize with the GGUF's own
    vocabulary (the tokenizer test shows both give the same ids)."""
    return "".join(tokenizer.decode(row.tolist()) for row in calibration.input_ids)


def has_mtp(config) -> bool:
    """Whether the checkpoint carries an MTP head (mtp.* tensors; config's mtp_num_hidden_layers)."""
    text = getattr(config, "text_config", None) or config
    return int(getattr(text, "mtp_num_hidden_layers", 0) or 0) > 0


def check_convertible(tools, config) -> None:
    """A clear error, before any work, for a model llama.cpp's converter has no class for."""
    archs = list(getattr(config, "architectures", None) or [])
    text = "\n".join(p.read_text(encoding="utf-8") for p in (tools.source / "conversion").glob("*.py"))
    registered = set(re.findall(r'"([A-Za-z0-9_]+For[A-Za-z0-9_]+)"', text))
    if not archs or not any(a in registered for a in archs):
        named = ", ".join(archs) or "config.json names no architectures"
        raise QuantlabError(f"llama.cpp's converter does not know this model ({named}); it converts "
                            f"{len(registered)} architectures, Qwen3_5ForConditionalGeneration and "
                            "Qwen3_5ForCausalLM among them")


def convert(tools, hf_folder: Path, out: Path, outtype: str, mtp: bool, sparse: bool = False, echo=None) -> None:
    args = ["-m", converter.__name__, str(hf_folder), "--outfile", str(out), "--outtype", outtype]
    args += [] if mtp else ["--no-mtp"]
    args += ["--sparse"] if sparse else []
    llamacpp.run_tool(tools, args, "convert_hf_to_gguf.py", echo=echo, python=True)


def compute_imatrix(tools, model: Path, text: Path, out: Path, ctx: int, chunks: int) -> None:
    llamacpp.run_tool(tools, ["llama-imatrix", "-m", str(model), "-f", str(text), "-o", str(out), "-c", str(ctx),
                              "--chunks", str(chunks), "-b", str(ctx), "--no-ppl"], "llama-imatrix")


def quantize(tools, src: Path, dst: Path, kind: str, imatrix: Path | None, dry_run: bool = False,
             tensor_types: list[str] | None = None, what: str | None = None) -> str:
    args = ["llama-quantize", *(["--imatrix", str(imatrix)] if imatrix else []), *(["--dry-run"] if dry_run else []),
            *(tensor_types or []), str(src), *([] if dry_run else [str(dst)]), kind]
    return llamacpp.run_tool(tools, args, what or f"llama-quantize {kind}")


def tensor_types(path: Path) -> dict[str, str]:
    """Tensor name → GGML type name, read from a GGUF's header."""
    return {t.name: t.type_name for t in read_header(path).tensors}


def has_experts(config) -> bool:
    text = getattr(config, "text_config", None) or config
    return any(int(getattr(text, key, 0) or 0) > 0 for key in ("num_experts", "num_local_experts", "n_routed_experts"))


def check_needs_no_imatrix(tools, bf16: Path, kind: str) -> None:
    """llama-quantize's own dry run says whether this type, on this model, needs an importance matrix."""
    out = quantize(tools, bf16, bf16, kind, None, dry_run=True)
    if "will require an imatrix" in out:
        raise QuantlabError(f"GGUF type {kind} needs an importance matrix on this model (llama-quantize's dry run "
                            "says so); set quantization.imatrix: true")


def make_imatrix(tools, spec: CalibrationSpec, tokenizer, bf16: Path, folder: Path, step) -> tuple[Path, str]:
    """llama-imatrix on the calibration text `spec` names (the same windows AWQ calibrates on): (folder/imatrix.gguf,
    the calibration's label)."""
    calibration = calibration_samples(spec, tokenizer)
    text = folder / "calibration.txt"
    text.write_text(_calibration_text(calibration, tokenizer), encoding="utf-8")
    imatrix = folder / IMATRIX_NAME
    step(f"llama-imatrix on {calibration.label}", lambda: compute_imatrix(
        tools, bf16, text, imatrix, spec.seq_len, spec.samples))
    text.unlink()
    return imatrix, calibration.label
