"""`gguf`: a GGUF file made by llama.cpp's own tools, as quant producers make one: convert_hf_to_gguf.py writes a
BF16 GGUF, llama-imatrix computes an importance matrix on the calibration text, llama-quantize writes the type.

Which tensors get which type is llama.cpp's decision (src/llama-quant.cpp), not quantlab's. The GGUF is measured
through the llama.cpp runtime (quantlab/runtimes/llama_cpp.py); a recipe with this method says
`measure.runtime: llama.cpp`.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from quantlab.errors import QuantlabError
from quantlab.methods.awq import CalibrationSpec
from quantlab.methods.base import CardFacts, Method, MethodConfig, WrittenCheckpoint, register

# Tensor classes (quantlab.architecture.TENSOR_CLASSES) → the GGUF tensor names llama.cpp gives them in qwen35 files,
# for llama-quantize's --tensor-type NAME=TYPE
GGUF_TENSOR_NAMES = {
    "deltanet.in_proj_qkv": ("attn_qkv",), "deltanet.in_proj_z": ("attn_gate",),
    "deltanet.in_proj_ab": ("ssm_alpha", "ssm_beta"), "deltanet.out_proj": ("ssm_out",),
    "attention.q": ("attn_q",), "attention.k": ("attn_k",), "attention.v": ("attn_v",),
    "attention.o": ("attn_output",), "mlp.gate": ("ffn_gate",), "mlp.up": ("ffn_up",), "mlp.down": ("ffn_down",),
    "lm_head": ("output",), "embeddings": ("token_embd",),
}
# Types written by the converter itself (no llama-quantize step)
CONVERTER_TYPES = {"BF16": "bf16", "F16": "f16", "F32": "f32"}
GGUF_NAME = "model.gguf"
IMATRIX_NAME = "imatrix.gguf"
BF16_NAME = "model-bf16.gguf"


class GgufCalibration(CalibrationSpec):
    WHERE: ClassVar[str] = "quantization.calibration"

    samples: int = Field(32, ge=1, le=100_000, description="imatrix chunks")
    seq_len: int = Field(512, ge=16, le=32_768, description="tokens per chunk (llama-imatrix -c)")


class GgufConfig(MethodConfig):
    """A llama.cpp quantization type (any llama-quantize accepts; checked against its own list before any load)."""

    method: Literal["gguf"]
    type: str = Field("Q4_K_M", pattern=r"^[A-Za-z0-9_]{1,16}$", description="llama.cpp type, e.g. Q4_K_M, Q6_K, Q8_0")
    imatrix: bool = Field(True, description="compute an importance matrix on the calibration text (llama-imatrix)")
    mtp: bool = Field(True, description="keep the MTP head as blk.N (llama.cpp's default); false: --no-mtp")
    calibration: GgufCalibration = Field(default_factory=GgufCalibration)
    overrides: dict[str, str] = Field(default_factory=dict, description="tensor class → llama.cpp type, given to "
                                      "llama-quantize as --tensor-type (e.g. {mlp.down: Q6_K})")

    @field_validator("overrides")
    @classmethod
    def _known_classes(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(GGUF_TENSOR_NAMES))
        if unknown:
            raise ValueError(f"tensor class(es) {unknown} have no GGUF name; classes: {', '.join(GGUF_TENSOR_NAMES)}")
        bad = sorted(t for t in value.values() if not re.fullmatch(r"[A-Za-z0-9_]{1,16}", t))
        if bad:
            raise ValueError(f"not a llama.cpp type: {bad[0]!r}")
        return value


@register
class GgufMethod(Method):
    name = "gguf"
    config = GgufConfig
    writes_checkpoint = True
    builds = True
    artifact_file = GGUF_NAME
    card = CardFacts("llama.cpp", "needs llama.cpp (or Ollama, LM Studio, llama-cpp-python)", "", ("gguf", "llama.cpp"))

    def label(self, qconfig: GgufConfig, dtype: str) -> str:
        kind = qconfig.type.upper()
        if kind in CONVERTER_TYPES:
            return f"GGUF {kind}"
        mixed = "".join(f", {k} {v.upper()}" for k, v in sorted(qconfig.overrides.items()))
        if len(qconfig.overrides) > 2:  # the card and the records' parameters list them; a table cell cannot
            mixed = f", {len(qconfig.overrides)} classes at other types (mixed)"
        return f"GGUF {kind}{mixed}" + ("" if qconfig.imatrix else " (no imatrix)")

    def check(self, qconfig: GgufConfig, source) -> None:
        from quantlab import llamacpp

        tools = llamacpp.locate()
        kind = llamacpp.check_type(tools, qconfig.type)
        if kind in llamacpp.NEEDS_IMATRIX and not qconfig.imatrix:
            raise QuantlabError(f"quantization: GGUF type {kind} needs an importance matrix (llama.cpp refuses to write "
                                f"it without one); set quantization.imatrix: true")
        check_convertible(tools, source.config)
        for cls, kind_of in qconfig.overrides.items():
            llamacpp.check_tensor_type(kind_of, f"quantization.overrides.{cls}")
        check_llama_rules(tools, qconfig, kind, source.config)
        if qconfig.overrides and kind in CONVERTER_TYPES:
            raise QuantlabError(f"quantization.overrides: type {kind} is written by the converter, which takes no "
                                "per-tensor types; pick a llama-quantize type")

    def check_source(self, qconfig: GgufConfig, source) -> tuple[str, ...]:
        if not self.uses_imatrix(qconfig):
            return ()
        if source.synthetic:
            return ("synthetic weights: no imatrix (random weights have no activations worth weighting)",)
        if source.files() is None:
            return ("imatrix calibration: checked after the model's files are downloaded",)
        from quantlab.quantize.awq.calibration import calibration_samples

        return (f"imatrix calibration: {calibration_samples(qconfig.calibration, source.tokenizer()).label}",)

    def uses_imatrix(self, qconfig: GgufConfig) -> bool:
        return qconfig.imatrix and qconfig.type.upper() not in CONVERTER_TYPES

    def apply(self, model, qconfig: GgufConfig):
        raise QuantlabError("quantization.method gguf writes a GGUF file with llama.cpp's tools; use `quantlab run` "
                            "or `quantlab build` on the recipe")

    def write_checkpoint(self, qconfig: GgufConfig, source, folder: Path, device, max_shard_bytes: int,
                         progress: bool, echo) -> WrittenCheckpoint:
        """Convert, (imatrix), quantize, into `folder`: model.gguf (and imatrix.gguf)."""
        from quantlab import llamacpp

        tools = llamacpp.locate()
        kind = llamacpp.check_type(tools, qconfig.type)
        files = source.files(download=True)
        if files is None:
            raise QuantlabError("quantization.method gguf converts the model's files; synthetic weights have none "
                                "(scripts/gguf_full_size.py makes full-size GGUFs of synthetic weights)")
        folder = Path(folder)
        notes = [f"made by {tools.version}"]
        mtp = qconfig.mtp and has_mtp(source.config)
        if qconfig.mtp and not mtp:
            notes.append("the checkpoint has no MTP head, so the GGUF has none (converted with --no-mtp)")
        bf16 = folder / (GGUF_NAME if kind in CONVERTER_TYPES else BF16_NAME)
        step = timed(echo)
        step(f"convert_hf_to_gguf.py → {bf16.name}", lambda: convert(tools, files, bf16, CONVERTER_TYPES.get(kind, "bf16"),
                                                                     mtp))
        calibration_label = None
        if kind not in CONVERTER_TYPES:
            imatrix = None
            if qconfig.imatrix:
                imatrix, calibration_label = make_imatrix(tools, qconfig, source, bf16, folder, step)
            if imatrix is None:
                check_needs_no_imatrix(tools, bf16, kind)
            step(f"llama-quantize {kind}", lambda: quantize(tools, bf16, folder / GGUF_NAME, kind, imatrix,
                                                            tensor_types=tensor_type_args(qconfig.overrides)))
            bf16.unlink()
        quantized = tuple(f"{name}: {t}" for name, t in tensor_types(folder / GGUF_NAME).items())
        return WrittenCheckpoint("llama.cpp", quantized, tuple(notes), calibration_label)

    def estimator_scheme(self, params: dict[str, Any], dtype: str) -> str | None:
        kind = str(params.get("type", "")).upper()
        return {"Q8_0": "gguf-q8_0", "Q6_K": "gguf-q6_k", "Q4_K_M": "gguf-q4_k_m"}.get(kind)

    def card_rows(self, params: dict[str, Any]) -> list[tuple[str, object]]:
        return [("method", self.name), ("type", params.get("type")), ("imatrix", params.get("imatrix")),
                ("per-class types", params.get("overrides") or "none"),
                ("MTP head", "kept (blk.N)" if params.get("mtp", True) else "left out (--no-mtp)")]


def check_llama_rules(tools, qconfig: GgufConfig, kind: str, config) -> None:
    """llama.cpp's own rules, read from its source, before any work: which tensor types need an importance matrix,
    how much text llama-imatrix needs, and which file types are for MoE models only."""
    from quantlab import llamacpp

    for cls, kind_of in sorted(qconfig.overrides.items()):
        check_override_writable(tools, cls, kind_of.upper(), qconfig.imatrix)
    chunks = llamacpp.imatrix_min_chunks(tools)
    if qconfig.imatrix and kind not in CONVERTER_TYPES and qconfig.calibration.samples < chunks:
        raise QuantlabError(f"quantization.calibration.samples {qconfig.calibration.samples}: llama-imatrix needs at "
                            f"least {chunks} chunks of seq_len tokens; give samples: {chunks} or more")
    if llamacpp.moe_only(kind) and not has_experts(config):
        raise QuantlabError(f"quantization.type {kind} quantizes the experts of MoE models only; this model is dense, "
                            "so every tensor would be Q8_0: use type Q8_0 (or another type)")


# llama-imatrix collects data for the blocks' matmuls only: token_embd is read by no matmul, and output.weight only
# with --process-output, which quantlab does not pass (tools/imatrix/imatrix.cpp)
NO_MATRIX_DATA = ("embeddings", "lm_head")


def check_override_writable(tools, cls: str, kind: str, imatrix: bool) -> None:
    """llama-quantize refuses a type of tensor_requires_imatrix without a matrix (token_embd and output exempt), and
    ggml aborts on a type of ggml_quantize_requires_imatrix for a tensor without matrix data."""
    from quantlab import llamacpp

    if kind in llamacpp.imatrix_data_types(tools) and (cls in NO_MATRIX_DATA or not imatrix):
        why = "llama-imatrix records no data for it" if cls in NO_MATRIX_DATA else "quantization.imatrix is false"
        raise QuantlabError(f"quantization.overrides.{cls}: ggml writes {kind} only with importance-matrix data for "
                            f"the tensor, and {why} (llama-quantize would abort); pick another type")
    if kind in llamacpp.imatrix_tensor_types(tools) and not imatrix and cls not in NO_MATRIX_DATA:
        raise QuantlabError(f"quantization.overrides.{cls}: tensor type {kind} needs an importance matrix "
                            "(llama-quantize refuses it without one); set quantization.imatrix: true")


def has_experts(config) -> bool:
    text = getattr(config, "text_config", None) or config
    return any(int(getattr(text, key, 0) or 0) > 0 for key in ("num_experts", "num_local_experts", "n_routed_experts"))


def check_needs_no_imatrix(tools, bf16: Path, kind: str) -> None:
    """llama-quantize's own dry run says whether this type, on this model, needs an importance matrix."""
    out = quantize(tools, bf16, bf16, kind, None, dry_run=True)
    if "will require an imatrix" in out:
        raise QuantlabError(f"GGUF type {kind} needs an importance matrix on this model (llama-quantize's dry run "
                            "says so); set quantization.imatrix: true")


def make_imatrix(tools, qconfig: GgufConfig, source, bf16: Path, folder: Path, step) -> tuple[Path, str]:
    """llama-imatrix on the recipe's calibration text: (folder/imatrix.gguf, the calibration's label)."""
    from quantlab.quantize.awq.calibration import calibration_samples

    calibration = calibration_samples(qconfig.calibration, source.tokenizer())
    text = folder / "calibration.txt"
    text.write_text(_calibration_text(calibration, source.tokenizer()), encoding="utf-8")
    imatrix = folder / IMATRIX_NAME
    step(f"llama-imatrix on {calibration.label}", lambda: compute_imatrix(
        tools, bf16, text, imatrix, qconfig.calibration.seq_len, qconfig.calibration.samples))
    text.unlink()
    return imatrix, calibration.label


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
    import re

    archs = list(getattr(config, "architectures", None) or [])
    text = "\n".join(p.read_text(encoding="utf-8") for p in (tools.source / "conversion").glob("*.py"))
    registered = set(re.findall(r'"([A-Za-z0-9_]+For[A-Za-z0-9_]+)"', text))
    if not archs or not any(a in registered for a in archs):
        named = ", ".join(archs) or "config.json names no architectures"
        raise QuantlabError(f"llama.cpp's converter does not know this model ({named}); it converts "
                            f"{len(registered)} architectures, Qwen3_5ForConditionalGeneration and "
                            "Qwen3_5ForCausalLM among them")


def convert(tools, hf_folder: Path, out: Path, outtype: str, mtp: bool, sparse: bool = False, echo=None) -> None:
    from quantlab import llamacpp

    args = ["-m", "quantlab.gguf_convert", str(hf_folder), "--outfile", str(out), "--outtype", outtype]
    args += [] if mtp else ["--no-mtp"]
    args += ["--sparse"] if sparse else []
    llamacpp.run_tool(tools, args, "convert_hf_to_gguf.py", echo=echo, python=True)


def compute_imatrix(tools, model: Path, text: Path, out: Path, ctx: int, chunks: int) -> None:
    from quantlab import llamacpp

    llamacpp.run_tool(tools, ["llama-imatrix", "-m", str(model), "-f", str(text), "-o", str(out), "-c", str(ctx),
                              "--chunks", str(chunks), "-b", str(ctx), "--no-ppl"], "llama-imatrix")


def tensor_type_args(overrides: dict[str, str]) -> list[str]:
    """llama-quantize's --tensor-type flags for per-class overrides. Anchored: llama-quantize searches each pattern
    in the tensor name, so a bare `attn_q` would also take attn_qkv, and `output` attn_output."""
    return [arg for cls, kind in sorted(overrides.items()) for name in GGUF_TENSOR_NAMES[cls]
            for arg in ("--tensor-type", f"{_tensor_pattern(name)}={kind.lower()}")]


def _tensor_pattern(name: str) -> str:
    return rf"^{name}\.weight$" if name in ("output", "token_embd") else rf"^blk\.\d+\.{name}\.weight$"


def quantize(tools, src: Path, dst: Path, kind: str, imatrix: Path | None, dry_run: bool = False,
             tensor_types: list[str] | None = None, what: str | None = None) -> str:
    from quantlab import llamacpp

    args = ["llama-quantize", *(["--imatrix", str(imatrix)] if imatrix else []), *(["--dry-run"] if dry_run else []),
            *(tensor_types or []), str(src), *([] if dry_run else [str(dst)]), kind]
    return llamacpp.run_tool(tools, args, what or f"llama-quantize {kind}")


def tensor_types(path: Path) -> dict[str, str]:
    """Tensor name → GGML type name, read from a GGUF's header."""
    from quantlab.gguf_file import read_header

    return {t.name: t.type_name for t in read_header(path).tensors}
