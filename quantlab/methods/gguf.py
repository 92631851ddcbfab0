"""`gguf`: a GGUF file made by llama.cpp's own tools, as quant producers make one: convert_hf_to_gguf.py writes a
BF16 GGUF, llama-imatrix computes an importance matrix on the calibration text, llama-quantize writes the type.

Which tensors get which type is llama.cpp's decision (src/llama-quant.cpp), not quantlab's. The GGUF is measured
through the llama.cpp runtime (quantlab/runtimes/libllama.py); a recipe with this method says
`measure.runtime: llama.cpp`. The steps themselves, and the GGUF tensor names, are quantlab/llamacpp/'s.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from quantlab.errors import QuantlabError
from quantlab.llamacpp import tools as llamacpp
from quantlab.llamacpp.gguf_file import header_file_type
from quantlab.llamacpp.names import MTP_CLASS, OVERRIDE_CLASSES, tensor_type_args
from quantlab.llamacpp.steps import (
    BF16_NAME, CONVERTER_TYPES, GGUF_NAME, check_convertible, check_needs_no_imatrix, convert, has_experts, has_mtp,
    make_imatrix, quantize, tensor_types, timed,
)
from quantlab.methods.base import CardFacts, Method, MethodConfig, WrittenCheckpoint, register
from quantlab.text.calibration import CalibrationSpec, calibration_samples



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
                                      "llama-quantize as --tensor-type (e.g. {mlp.down: Q6_K}); `mtp` is the whole "
                                      "MTP block (e.g. {mtp: Q8_0})")

    @field_validator("overrides")
    @classmethod
    def _known_classes(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(OVERRIDE_CLASSES))
        if unknown:
            raise ValueError(f"tensor class(es) {unknown} have no GGUF name; classes: {', '.join(OVERRIDE_CLASSES)}")
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
    makes = "gguf"
    measured_form = "GGUF files"
    unquantized_hint = "type: BF16 for the unquantized model"
    sensitivity_option = "--high-types"
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
        tools = llamacpp.locate()
        kind = llamacpp.check_type(tools, qconfig.type)
        if kind in llamacpp.NEEDS_IMATRIX and not qconfig.imatrix:
            raise QuantlabError(f"quantization: GGUF type {kind} needs an importance matrix (llama.cpp refuses to write "
                                f"it without one); set quantization.imatrix: true")
        check_convertible(tools, source.config)
        for cls, kind_of in qconfig.overrides.items():
            llamacpp.check_tensor_type(kind_of, f"quantization.overrides.{cls}")
        if MTP_CLASS in qconfig.overrides and not (qconfig.mtp and has_mtp(source.config)):
            why = "quantization.mtp is false" if not qconfig.mtp else "the model has no MTP head"
            raise QuantlabError(f"quantization.overrides.mtp: the GGUF will have no MTP block ({why})")
        check_llama_rules(tools, qconfig, kind, source.config)
        if qconfig.overrides and kind in CONVERTER_TYPES:
            raise QuantlabError(f"quantization.overrides: type {kind} is written by the converter, which takes no "
                                "per-tensor types; pick a llama-quantize type")

    def check_model(self, qconfig: GgufConfig, model) -> None:
        if model.source == "synthetic":
            raise ValueError("quantization.method gguf converts a checkpoint's files; synthetic weights have none "
                             "(scripts/gguf_full_size.py makes full-size GGUFs of synthetic weights)")
        if model.split:
            raise ValueError("a GGUF is split across GPUs by llama.cpp (measure.llama_cpp), not by model.gpus")

    def check_source(self, qconfig: GgufConfig, source) -> tuple[str, ...]:
        if not self.uses_imatrix(qconfig):
            return ()
        if source.synthetic:
            return ("synthetic weights: no imatrix (random weights have no activations worth weighting)",)
        if source.files() is None:
            return ("imatrix calibration: checked after the model's files are downloaded",)
        return (f"imatrix calibration: {calibration_samples(qconfig.calibration, source.tokenizer()).label}",)

    def uses_imatrix(self, qconfig: GgufConfig) -> bool:
        return qconfig.imatrix and qconfig.type.upper() not in CONVERTER_TYPES

    def apply(self, model, qconfig: GgufConfig):
        raise QuantlabError("quantization.method gguf writes a GGUF file with llama.cpp's tools; use `quantlab run` "
                            "or `quantlab build` on the recipe")

    def write_checkpoint(self, qconfig: GgufConfig, source, folder: Path, device, max_shard_bytes: int,
                         progress: bool, echo) -> WrittenCheckpoint:
        """Convert, (imatrix), quantize, into `folder`: model.gguf (and imatrix.gguf)."""
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
                imatrix, calibration_label = make_imatrix(tools, qconfig.calibration, source.tokenizer(), bf16,
                                                           folder, step)
            if imatrix is None:
                check_needs_no_imatrix(tools, bf16, kind)
            step(f"llama-quantize {kind}", lambda: quantize(tools, bf16, folder / GGUF_NAME, kind, imatrix,
                                                            tensor_types=tensor_type_args(qconfig.overrides,
                                                                                         _mtp_block(source.config))))
            bf16.unlink()
        quantized = tuple(f"{name}: {t}" for name, t in tensor_types(folder / GGUF_NAME).items())
        return WrittenCheckpoint("llama.cpp", quantized, tuple(notes), calibration_label)

    def from_gguf(self, header) -> tuple[str, dict[str, Any]]:
        """(label, params) of a GGUF someone else made, from its header: the file type, whether llama-quantize was
        given an importance matrix (it writes quantize.imatrix.* when it was), the MTP block, the tensor-type mix."""
        kind = header_file_type(header)
        imatrix = any(k.startswith("quantize.imatrix.") for k in header.metadata)
        label = f"GGUF {kind}" + ("" if imatrix or kind in CONVERTER_TYPES else " (no imatrix)")
        return label, {"type": kind, "imatrix": imatrix, "mtp": header.has_mtp(), "file_type": header.file_type,
                       "tensor_types": header.parameters_by_type()}

    def estimator_scheme(self, params: dict[str, Any], dtype: str) -> str | None:
        kind = str(params.get("type", "")).upper()
        return {"Q8_0": "gguf-q8_0", "Q6_K": "gguf-q6_k", "Q4_K_M": "gguf-q4_k_m"}.get(kind)

    def card_rows(self, params: dict[str, Any]) -> list[tuple[str, object]]:
        return [("method", self.name), ("type", params.get("type")), ("imatrix", params.get("imatrix")),
                ("per-class types", params.get("overrides") or "none"),
                ("MTP head", "kept (blk.N)" if params.get("mtp", True) else "left out (--no-mtp)")]


def _mtp_block(config) -> int:
    """The converter writes the MTP head as the block after the main model's last."""
    return int((getattr(config, "text_config", None) or config).num_hidden_layers)


def check_llama_rules(tools, qconfig: GgufConfig, kind: str, config) -> None:
    """llama.cpp's own rules, read from its source, before any work: which tensor types need an importance matrix,
    how much text llama-imatrix needs, and which file types are for MoE models only."""
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
    if kind in llamacpp.imatrix_data_types(tools) and (cls in NO_MATRIX_DATA or not imatrix):
        why = "llama-imatrix records no data for it" if cls in NO_MATRIX_DATA else "quantization.imatrix is false"
        raise QuantlabError(f"quantization.overrides.{cls}: ggml writes {kind} only with importance-matrix data for "
                            f"the tensor, and {why} (llama-quantize would abort); pick another type")
    if kind in llamacpp.imatrix_tensor_types(tools) and not imatrix and cls not in NO_MATRIX_DATA:
        raise QuantlabError(f"quantization.overrides.{cls}: tensor type {kind} needs an importance matrix "
                            "(llama-quantize refuses it without one); set quantization.imatrix: true")
