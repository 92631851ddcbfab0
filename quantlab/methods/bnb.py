"""`bnb_int8` and `bnb_4bit`: bitsandbytes LLM.int8 and 4-bit (NF4/FP4) weights.

Which Linears stay unquantized comes from quantlab.architecture (the rules the estimator reads); the skip list
handed to transformers (`llm_int8_skip_modules`) is derived from them (quantlab/quantize/skips.py). Real weights
are quantized by transformers at `from_pretrained` (`load_kwargs`); synthetic weights, created from a config,
are quantized here by module replacement (`apply`).

bitsandbytes is imported lazily: importing it prints a kernel message, and every 8-bit CPU matmul logs a cast
warning. `quiet_bnb_logs` (quantlab/console.py) keeps the first cast warning and drops the rest.
"""

from __future__ import annotations

import importlib.util
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from quantlab.console import quiet_bnb_logs
from quantlab.errors import QuantlabError
from quantlab.fields import SkipClasses
from quantlab.methods.base import CardFacts, Method, MethodConfig, register
from quantlab.quantize.skips import SkipPlan, classes_label, skip_plan

BLOCKSIZE = 64  # bitsandbytes 4-bit block size (fixed by transformers' BitsAndBytesConfig)
DEFAULT_THRESHOLD = 6.0
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}
# transformers 5 (BITSANDBYTES_MIN_VERSION) treats an older bitsandbytes as absent: loading would fail there.
BNB_MIN_VERSION = "0.46.1"
BNB_INSTALL = f"pip install 'bitsandbytes>={BNB_MIN_VERSION}'"
SkipModules = list[Annotated[str, Field(max_length=200)]]


class BnbInt8Config(MethodConfig):
    """bitsandbytes LLM.int8: int8 weights, one absmax scale per output row, outliers above `threshold` computed in
    16-bit (0 turns the mixed-precision decomposition off). `skip_modules` adds module names or patterns
    (transformers' llm_int8_skip_modules syntax) to those quantlab's rules keep unquantized; `skip_classes` adds
    whole tensor classes (quantlab.architecture.TENSOR_CLASSES, e.g. mlp.down)."""

    method: Literal["bnb_int8"]
    threshold: float = Field(DEFAULT_THRESHOLD, ge=0.0, le=1000.0)
    skip_modules: SkipModules = Field(default_factory=list, max_length=64)
    skip_classes: SkipClasses = Field(default_factory=list)


class Bnb4bitConfig(MethodConfig):
    """bitsandbytes 4-bit (NF4 or FP4) in blocks of 64, optionally with the absmax statistics themselves quantized
    (double quant). `compute_dtype` is the matmul dtype; `quant_storage` the container dtype of the packed
    weights (uint8, or a float for FSDP-style sharding). `skip_modules` and `skip_classes` as for bnb_int8."""

    method: Literal["bnb_4bit"]
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = False
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    skip_modules: SkipModules = Field(default_factory=list, max_length=64)
    skip_classes: SkipClasses = Field(default_factory=list)


class _Bitsandbytes(Method):
    in_process = ("bitsandbytes quantizes as transformers loads the model, in quantlab's process; vLLM's bitsandbytes "
                  "path is for GPUs, and quantlab writes no bitsandbytes checkpoint for it")
    builds = True
    flag: str  # the model attribute transformers sets once quantized: is_loaded_in_8bit / is_loaded_in_4bit

    def check(self, qconfig, source) -> None:
        problem = bitsandbytes_problem()
        if problem:
            raise QuantlabError(f"quantization.method {self.name}: {problem}")
        self.skip_rules(qconfig, source)

    def skip_rules(self, qconfig, source) -> SkipPlan:
        return self._plan(source.meta, qconfig)

    def _plan(self, model: torch.nn.Module, qconfig) -> SkipPlan:
        return skip_plan(model, self.name, qconfig.skip_modules, qconfig.skip_classes)

    def load_kwargs(self, qconfig, source) -> dict[str, Any]:
        """transformers quantizes while it loads real weights: this goes to from_pretrained."""
        import_bnb()
        return {"quantization_config": self.transformers_config(qconfig, self.skip_rules(qconfig, source).patterns)}

    def apply(self, model: torch.nn.Module, qconfig) -> torch.nn.Module:
        if is_bnb_quantized(model):  # quantized at load (load_kwargs)
            return model
        return self._quantize_in_place(model, qconfig, self._plan(model, qconfig))

    def from_checkpoint(self, qc: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        parsed = self.config_from_checkpoint(qc) if qc.get("quant_method") == "bitsandbytes" else None
        if parsed is None:
            return None
        params = {**parsed.model_dump(), "checkpoint_skip_modules": list(qc.get("llm_int8_skip_modules") or [])}
        return self.label(parsed, "bfloat16"), params

    @torch.no_grad()
    def _quantize_in_place(self, model: torch.nn.Module, qconfig, plan: SkipPlan) -> torch.nn.Module:
        """Replace every quantized Linear by its bitsandbytes module, one at a time (the unquantized copy of a
        layer is freed as soon as it is replaced), and mark the model as transformers would."""
        bnb = import_bnb()
        modules = dict(model.named_modules())
        for name in plan.quantized:
            old = modules[name]
            parent_name, _, child = name.rpartition(".")
            new = self.quantized_module(bnb, old, qconfig)
            if old.bias is not None:
                new.bias = torch.nn.Parameter(old.bias.data, requires_grad=False)
            new.train(old.training)  # a new module starts in training mode: bitsandbytes' kernels differ there
            setattr(modules[parent_name] if parent_name else model, child, new)
            del old
        if any(d.type == "cuda" for d in {p.device for p in model.parameters()}):
            torch.cuda.empty_cache()  # the unquantized copies are gone: give their blocks back (nvidia-smi figures)
        model.config.quantization_config = self.transformers_config(qconfig, plan.patterns)
        setattr(model, self.flag, True)
        return model

    def as_loaded(self, qconfig, config, skip_patterns: tuple[str, ...]):
        """bitsandbytes quantizes while transformers loads: its config goes to from_pretrained."""
        return config, self.transformers_config(qconfig, list(skip_patterns))

    def transformers_config(self, qconfig, patterns):
        """from_pretrained's quantization_config (BitsAndBytesConfig) for `qconfig`, skipping `patterns`."""
        raise NotImplementedError

    def _extras(self, qconfig) -> list[str]:
        extras = [classes_label(qconfig.skip_classes)] if qconfig.skip_classes else []
        return extras + ([f"+{len(qconfig.skip_modules)} skip pattern(s)"] if qconfig.skip_modules else [])


@register
class BnbInt8Method(_Bitsandbytes):
    name = "bnb_int8"
    config = BnbInt8Config
    flag = "is_loaded_in_8bit"
    card = CardFacts("bitsandbytes", f"needs bitsandbytes>={BNB_MIN_VERSION}", "llm_int8_skip_modules",
                     ("bitsandbytes", "8-bit", "int8"))

    def label(self, qconfig: BnbInt8Config, dtype: str) -> str:
        """The estimator's scheme label for the defaults ('bnb int8'), then what differs from them."""
        extras = [f"threshold {qconfig.threshold:g}"] if qconfig.threshold != DEFAULT_THRESHOLD else []
        return _with_extras("bnb int8", extras + self._extras(qconfig))

    def transformers_config(self, qconfig: BnbInt8Config, patterns):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(qconfig.threshold),
                                  llm_int8_skip_modules=list(patterns))

    def quantized_module(self, bnb, old: torch.nn.Linear, qconfig: BnbInt8Config) -> torch.nn.Module:
        new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, old.bias is not None, has_fp16_weights=False,
                                  threshold=float(qconfig.threshold), device="meta")
        # Int8Params quantizes when it moves off the CPU or is placed on it: the public path.
        weight = bnb.nn.Int8Params(old.weight.data.to("cpu"), requires_grad=False, has_fp16_weights=False)
        new.weight = weight.to(old.weight.device)
        return new

    def config_from_checkpoint(self, qc: dict[str, Any]) -> BnbInt8Config | None:
        if not (qc.get("load_in_8bit") or qc.get("_load_in_8bit")):
            return None
        return BnbInt8Config(method="bnb_int8", threshold=float(qc.get("llm_int8_threshold", DEFAULT_THRESHOLD)))

    def estimator_scheme(self, params: dict, dtype: str) -> str | None:
        return None if _keeps_more(params) else "int8"

    def scheme_config(self, scheme: str) -> BnbInt8Config | None:
        return BnbInt8Config(method="bnb_int8") if scheme == "int8" else None

    def card_rows(self, params: dict) -> list[tuple[str, object]]:
        return [("method", self.name), ("weights", "int8, one absmax scale per output row (LLM.int8)"),
                ("threshold", params.get("threshold")), *_skip_rows(params)]


@register
class Bnb4bitMethod(_Bitsandbytes):
    name = "bnb_4bit"
    config = Bnb4bitConfig
    flag = "is_loaded_in_4bit"
    card = CardFacts("bitsandbytes", f"needs bitsandbytes>={BNB_MIN_VERSION}", "llm_int8_skip_modules",
                     ("bitsandbytes", "4-bit"))

    def label(self, qconfig: Bnb4bitConfig, dtype: str) -> str:
        """The estimator's scheme labels for the defaults ('bnb nf4 + double quant'), then what differs."""
        text = f"bnb {qconfig.quant_type}" + (" + double quant" if qconfig.double_quant else "")
        extras = [f"compute {qconfig.compute_dtype}"] if qconfig.compute_dtype != "bfloat16" else []
        extras += [f"storage {qconfig.quant_storage}"] if qconfig.quant_storage != "uint8" else []
        return _with_extras(text, extras + self._extras(qconfig))

    def transformers_config(self, qconfig: Bnb4bitConfig, patterns):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=qconfig.quant_type, bnb_4bit_use_double_quant=qconfig.double_quant,
            bnb_4bit_compute_dtype=DTYPES[qconfig.compute_dtype], bnb_4bit_quant_storage=DTYPES[qconfig.quant_storage],
            llm_int8_skip_modules=list(patterns),
        )

    def quantized_module(self, bnb, old: torch.nn.Linear, qconfig: Bnb4bitConfig) -> torch.nn.Module:
        storage = DTYPES[qconfig.quant_storage]
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, old.bias is not None,
                                compute_dtype=DTYPES[qconfig.compute_dtype], compress_statistics=qconfig.double_quant,
                                quant_type=qconfig.quant_type, quant_storage=storage, device="meta")
        weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, blocksize=BLOCKSIZE,
                                   compress_statistics=qconfig.double_quant, quant_type=qconfig.quant_type,
                                   quant_storage=storage, module=new)
        new.weight = weight.to(old.weight.device)
        return new

    def config_from_checkpoint(self, qc: dict[str, Any]) -> Bnb4bitConfig | None:
        if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
            return None
        return Bnb4bitConfig(
            method="bnb_4bit", quant_type=qc.get("bnb_4bit_quant_type", "fp4"),
            double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
            compute_dtype=_dtype_name(qc.get("bnb_4bit_compute_dtype"), "float32"),
            quant_storage=_dtype_name(qc.get("bnb_4bit_quant_storage"), "uint8"),
        )

    def estimator_scheme(self, params: dict, dtype: str) -> str | None:
        if _keeps_more(params):
            return None  # the recipe kept extra modules unquantized: the scheme table cannot price that
        kind = str(params.get("quant_type") or params.get("bnb_4bit_quant_type") or "nf4")
        double = any(params.get(k) for k in ("double_quant", "use_double_quant", "bnb_4bit_use_double_quant"))
        return f"{kind}-dq" if double else kind

    def scheme_config(self, scheme: str) -> Bnb4bitConfig | None:
        kind, _, double = scheme.partition("-")
        if kind not in ("nf4", "fp4") or double not in ("", "dq"):
            return None
        return Bnb4bitConfig(method="bnb_4bit", quant_type=kind, double_quant=double == "dq")

    def card_rows(self, params: dict) -> list[tuple[str, object]]:
        return [("method", self.name), ("weights", f"4-bit {params.get('quant_type')}, blocks of {BLOCKSIZE}"),
                *[(k, params.get(k)) for k in ("quant_type", "double_quant", "compute_dtype", "quant_storage")],
                *_skip_rows(params)]

    def card_tags(self, params: dict) -> list[str]:
        return [*self.card.tags, params.get("quant_type", "nf4"), *(["double-quant"] if params.get("double_quant") else [])]


# ---- bitsandbytes itself ------------------------------------------------------------------------------------

def bitsandbytes_problem() -> str | None:
    """Why bitsandbytes cannot be used here (missing, or older than transformers accepts); None when it can."""
    from importlib import metadata

    from packaging.version import Version

    if importlib.util.find_spec("bitsandbytes") is None:
        return f"bitsandbytes is not installed here: {BNB_INSTALL}"
    try:
        found = metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        return f"bitsandbytes has no package metadata here (a stray copy?): {BNB_INSTALL}"
    if Version(found) < Version(BNB_MIN_VERSION):
        return (f"bitsandbytes {found} is older than {BNB_MIN_VERSION}, the oldest transformers 5 accepts "
                f"(it treats older releases as absent): {BNB_INSTALL}")
    return None


def import_bnb():
    quiet_bnb_logs()
    problem = bitsandbytes_problem()
    if problem:
        raise QuantlabError(f"quantization with bitsandbytes: {problem}")
    import bitsandbytes

    return bitsandbytes


def is_bnb_quantized(model: torch.nn.Module) -> bool:
    return any(type(m).__name__ in ("Linear8bitLt", "Linear4bit") for m in model.modules())


def _keeps_more(params: dict) -> bool:
    return bool(params.get("skip_modules") or params.get("skip_classes"))


def _skip_rows(params: dict) -> list[tuple[str, object]]:
    return [("extra skip_modules", params.get("skip_modules") or []),
            ("kept tensor classes (skip_classes)", params.get("skip_classes") or [])]


def _with_extras(text: str, extras: list[str]) -> str:
    return text + (f" ({', '.join(extras)})" if extras else "")


def _dtype_name(value: Any, default: str) -> str:
    name = str(value or default).removeprefix("torch.")
    return name if name in DTYPES else default
