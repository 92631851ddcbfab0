"""bitsandbytes 8-bit (LLM.int8) and 4-bit (NF4/FP4): skip list, load-time config, in-place quantization.

Which Linears stay unquantized comes from quantlab.architecture (the same rules the estimator
reads). The skip list handed to transformers (`llm_int8_skip_modules`) is derived from them and
written compactly: a module name or a suffix ('in_proj_a', 'lm_head', 'model.visual'), each
checked to match exactly the modules the rules leave alone, with transformers' own matching.

Real weights are quantized by transformers at `from_pretrained` (the handler's `load_kwargs`);
synthetic weights, created from a config, are quantized here by module replacement.

bitsandbytes is imported lazily: importing it prints a kernel message, and every 8-bit CPU
matmul logs a cast warning. `quiet_bnb_logs` keeps the first cast warning and drops the rest.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig

from quantlab.architecture import UNQUANTIZED_ROLES, quantizable_linears, supported_classes
from quantlab.errors import QuantlabError
from quantlab.quantize.configs import Bnb4bitConfig, BnbInt8Config

BnbConfig = BnbInt8Config | Bnb4bitConfig
BLOCKSIZE = 64  # bitsandbytes 4-bit block size (fixed by transformers' BitsAndBytesConfig)
DEFAULT_THRESHOLD = 6.0
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}


# ---- log noise ------------------------------------------------------------------------------------

class _OnceFilter(logging.Filter):
    """Pass the first record whose message starts with one of `once`; drop those in `never`."""

    def __init__(self, once: tuple[str, ...] = (), never: tuple[str, ...] = ()):
        super().__init__()
        self.once, self.never, self.seen = once, never, set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith(self.never):
            return False
        for prefix in self.once:
            if msg.startswith(prefix):
                if prefix in self.seen:
                    return False
                self.seen.add(prefix)
        return True


_QUIET = False


def quiet_bnb_logs() -> None:
    """Filters on the two bitsandbytes loggers that would otherwise flood quantlab's output."""
    global _QUIET
    if _QUIET:
        return
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_OnceFilter(once=("MatMul8bitLt: inputs will be cast",)))
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OnceFilter(never=("Failed to load CPU gemm_4bit_forward",)))
    _QUIET = True


# transformers 5 (BITSANDBYTES_MIN_VERSION) treats an older bitsandbytes as absent: loading would fail there.
BNB_MIN_VERSION = "0.46.1"
BNB_INSTALL = f"pip install 'bitsandbytes>={BNB_MIN_VERSION}'"


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


# ---- the skip list ----------------------------------------------------------------------------------

def skip_pattern_matches(pattern: str, name: str) -> bool:
    """transformers' rule (quantizers_utils.should_convert_module, 5.x): the pattern matches from the
    start up to a module boundary (as a regex), or is a suffix of the module name."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return bool(re.match(rf"(?:{pattern}){boundary}", name)) or name.endswith(pattern)


@dataclass(frozen=True)
class SkipPlan:
    """What a method quantizes in one model class, and the skip list that says so to transformers."""

    method: str
    model_class: str
    patterns: tuple[str, ...]  # llm_int8_skip_modules: the rules' patterns, then the recipe's extras
    rule_patterns: tuple[str, ...]
    extra_patterns: tuple[str, ...]
    quantized: tuple[str, ...]  # Linear module names that are quantized
    kept: tuple[str, ...]  # Linear module names left unquantized (rules + extras)


def skip_plan(model: torch.nn.Module, method: str, extra: list[str] | tuple[str, ...] = ()) -> SkipPlan:
    """The skip list for `model` (a meta-device instance is enough). Raises QuantlabError when a recipe
    pattern matches no quantizable Linear, or when nothing is left to quantize."""
    class_name = type(model).__name__
    try:
        by_rules = {name for name, _ in quantizable_linears(model, method)}
    except KeyError as exc:
        raise QuantlabError(
            f"quantization.method {method}: quantlab has no tensor-role rules for {class_name} ({exc.args[0]}); "
            f"it knows {', '.join(supported_classes())}. Add a role table to quantlab/architecture.py."
        ) from None
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    rule_patterns = _compact(linears, set(linears) - by_rules)
    extra = tuple(extra)
    for pattern in extra:
        _check_pattern(pattern)
        if not any(skip_pattern_matches(pattern, name) for name in by_rules):
            raise QuantlabError(
                f"quantization.skip_modules: {pattern!r} matches none of the {len(by_rules)} Linear modules "
                f"{method} would quantize in {class_name} (e.g. {sorted(by_rules)[0] if by_rules else 'none'}); "
                "use a module name, a suffix such as 'mlp.down_proj', or a regex anchored at the start"
            )
    patterns = rule_patterns + tuple(p for p in extra if p not in rule_patterns)
    quantized = tuple(n for n in linears if not any(skip_pattern_matches(p, n) for p in patterns))
    if set(quantized) != by_rules - {n for n in by_rules if any(skip_pattern_matches(p, n) for p in extra)}:
        raise QuantlabError(f"internal: the skip list {list(patterns)} does not reproduce the skip rules for {class_name}")
    if not quantized:
        always = ", ".join(sorted(UNQUANTIZED_ROLES[method]))
        raise QuantlabError(
            f"quantization: nothing left to quantize: the skip list {list(patterns)} covers all {len(linears)} "
            f"Linear modules of {class_name} (the rules for {method} always keep: {always}). "
            "Remove entries from quantization.skip_modules."
        )
    kept = tuple(n for n in linears if n not in set(quantized))
    return SkipPlan(method, class_name, patterns, rule_patterns, extra, quantized, kept)


def _check_pattern(pattern: str) -> None:
    if not pattern.strip():
        raise QuantlabError("quantization.skip_modules: entries must not be empty")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise QuantlabError(f"quantization.skip_modules: {pattern!r} is not a valid pattern ({exc})") from None


def _compact(linears: list[str], skipped: set[str]) -> tuple[str, ...]:
    """The shortest patterns that match exactly the skipped Linears, from whole subtrees down.

    A subtree whose Linears are all skipped (the vision tower) becomes its module name; a single
    skipped Linear becomes the shortest dotted suffix that matches no quantized Linear
    ('in_proj_a'), so the same list also fits a text model loaded from a VL checkpoint.
    """
    quantized = [n for n in linears if n not in skipped]
    busy = {".".join(n.split(".")[:i]) for n in quantized for i in range(1, n.count(".") + 2)}
    roots: list[str] = []
    for name in linears:
        if name not in skipped:
            continue
        parts = name.split(".")
        root = next(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) not in busy)
        if root not in roots:
            roots.append(root)
    patterns: list[str] = []
    for root in roots:
        under = [n for n in linears if n == root or n.startswith(root + ".")]
        parts = root.split(".")
        candidates = [".".join(parts[-k:]) for k in range(1, len(parts) + 1)]
        for candidate in candidates:
            covered = {n for n in linears if skip_pattern_matches(candidate, n)}
            if set(under) <= covered and covered <= skipped:
                break
        else:  # pragma: no cover - the full name always qualifies
            candidate = root
        if candidate not in patterns:
            patterns.append(candidate)
    return tuple(sorted(patterns))


# ---- configs, labels ----------------------------------------------------------------------------------

def label(qconfig: BnbConfig) -> str:
    """The table label; the estimator's scheme labels for the defaults ('bnb int8', 'bnb nf4 + double quant')."""
    if isinstance(qconfig, BnbInt8Config):
        text = "bnb int8"
        extras = [f"threshold {qconfig.threshold:g}"] if qconfig.threshold != DEFAULT_THRESHOLD else []
    else:
        text = f"bnb {qconfig.quant_type}" + (" + double quant" if qconfig.double_quant else "")
        extras = [f"compute {qconfig.compute_dtype}"] if qconfig.compute_dtype != "bfloat16" else []
        extras += [f"storage {qconfig.quant_storage}"] if qconfig.quant_storage != "uint8" else []
    if qconfig.skip_modules:
        extras.append(f"+{len(qconfig.skip_modules)} skip pattern(s)")
    return text + (f" ({', '.join(extras)})" if extras else "")


def bnb_config(qconfig: BnbConfig, patterns: tuple[str, ...] | list[str]):
    from transformers import BitsAndBytesConfig

    if isinstance(qconfig, BnbInt8Config):
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=float(qconfig.threshold), llm_int8_skip_modules=list(patterns)
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=qconfig.quant_type,
        bnb_4bit_use_double_quant=qconfig.double_quant,
        bnb_4bit_compute_dtype=_DTYPES[qconfig.compute_dtype],
        bnb_4bit_quant_storage=_DTYPES[qconfig.quant_storage],
        llm_int8_skip_modules=list(patterns),
    )


def config_from_checkpoint(qc: dict[str, Any]) -> tuple[BnbConfig, list[str]] | None:
    """A checkpoint's `quantization_config` (quant_method bitsandbytes) as a recipe config, plus its skip list."""
    if qc.get("quant_method") != "bitsandbytes":
        return None
    skip = list(qc.get("llm_int8_skip_modules") or [])
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        return BnbInt8Config(method="bnb_int8", threshold=float(qc.get("llm_int8_threshold", DEFAULT_THRESHOLD))), skip
    if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
        return Bnb4bitConfig(
            method="bnb_4bit",
            quant_type=qc.get("bnb_4bit_quant_type", "fp4"),
            double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
            compute_dtype=_dtype_name(qc.get("bnb_4bit_compute_dtype"), "float32"),
            quant_storage=_dtype_name(qc.get("bnb_4bit_quant_storage"), "uint8"),
        ), skip
    return None


def _dtype_name(value: Any, default: str) -> str:
    name = str(value or default).removeprefix("torch.")
    return name if name in _DTYPES else default


# ---- in-place quantization (synthetic weights) -----------------------------------------------------------

def is_bnb_quantized(model: torch.nn.Module) -> bool:
    return any(type(m).__name__ in ("Linear8bitLt", "Linear4bit") for m in model.modules())


@torch.no_grad()
def quantize_in_place(model: torch.nn.Module, qconfig: BnbConfig, plan: SkipPlan) -> torch.nn.Module:
    """Replace every quantized Linear by its bitsandbytes module, one at a time (the unquantized copy
    of a layer is freed as soon as it is replaced), and mark the model as transformers would."""
    bnb = import_bnb()
    config = bnb_config(qconfig, plan.patterns)
    modules = dict(model.named_modules())
    for name in plan.quantized:
        old = modules[name]
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        device = old.weight.device
        has_bias = old.bias is not None
        if isinstance(qconfig, BnbInt8Config):
            new = bnb.nn.Linear8bitLt(
                old.in_features, old.out_features, has_bias, has_fp16_weights=False,
                threshold=float(qconfig.threshold), device="meta",
            )
            # Int8Params quantizes when it moves off the CPU or is placed on it: the public path.
            weight = bnb.nn.Int8Params(old.weight.data.to("cpu"), requires_grad=False, has_fp16_weights=False)
            new.weight = weight.to(device)
        else:
            new = bnb.nn.Linear4bit(
                old.in_features, old.out_features, has_bias,
                compute_dtype=_DTYPES[qconfig.compute_dtype], compress_statistics=qconfig.double_quant,
                quant_type=qconfig.quant_type, quant_storage=_DTYPES[qconfig.quant_storage], device="meta",
            )
            weight = bnb.nn.Params4bit(
                old.weight.data, requires_grad=False, blocksize=BLOCKSIZE, compress_statistics=qconfig.double_quant,
                quant_type=qconfig.quant_type, quant_storage=_DTYPES[qconfig.quant_storage], module=new,
            )
            new.weight = weight.to(device)
        if has_bias:
            new.bias = torch.nn.Parameter(old.bias.data, requires_grad=False)
        new.train(old.training)  # a new module starts in training mode: bitsandbytes' kernels differ there
        setattr(parent, child, new)
        del old
    if any(d.type == "cuda" for d in {p.device for p in model.parameters()}):
        torch.cuda.empty_cache()  # the unquantized copies are gone: give their blocks back (nvidia-smi figures)
    model.config.quantization_config = config
    setattr(model, "is_loaded_in_8bit" if isinstance(qconfig, BnbInt8Config) else "is_loaded_in_4bit", True)
    return model


def quant_state_bytes(model: torch.nn.Module) -> int:
    """Bytes bitsandbytes keeps beside its weights, outside parameters and buffers: the int8 row
    scales (SCB) and the 4-bit quantization state (absmax, code, nested statistics)."""
    total, seen = 0, set()

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen and t.device.type != "meta":
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for p in model.parameters():
        add(getattr(p, "SCB", None))
        state = getattr(p, "quant_state", None)
        if state is not None:
            for attr in ("absmax", "code"):
                add(getattr(state, attr, None))
            nested = getattr(state, "state2", None)
            if nested is not None:
                for attr in ("absmax", "code"):
                    add(getattr(nested, attr, None))
    return total


# ---- the handlers -----------------------------------------------------------------------------------

class _BnbHandler:
    method: str

    def skip_plan(self, qconfig: BnbConfig, config: PretrainedConfig) -> SkipPlan:
        from quantlab.plan import meta_model

        return skip_plan(meta_model(config), self.method, qconfig.skip_modules)

    def check(self, qconfig: BnbConfig, config: PretrainedConfig) -> None:
        problem = bitsandbytes_problem()
        if problem:
            raise QuantlabError(f"quantization.method {self.method}: {problem}")
        self.skip_plan(qconfig, config)

    def label(self, qconfig: BnbConfig, dtype: str) -> str:
        return label(qconfig)

    def load_kwargs(self, qconfig: BnbConfig, config: PretrainedConfig) -> dict[str, Any]:
        """transformers quantizes while it loads real weights: pass this to from_pretrained."""
        import_bnb()
        return {"quantization_config": bnb_config(qconfig, self.skip_plan(qconfig, config).patterns)}

    def apply(self, model: torch.nn.Module, qconfig: BnbConfig) -> torch.nn.Module:
        if is_bnb_quantized(model):  # quantized at load (load_kwargs)
            return model
        return quantize_in_place(model, qconfig, skip_plan(model, self.method, qconfig.skip_modules))


class BnbInt8Handler(_BnbHandler):
    method = "bnb_int8"


class Bnb4bitHandler(_BnbHandler):
    method = "bnb_4bit"


def save_quantized_copy(model: torch.nn.Module, folder, qconfig: BnbConfig | dict) -> None:
    """Save `model` quantized the way `quantlab build` does: through transformers' from_pretrained
    with the derived skip list, saved before any forward pass. For tests and one-off conversions."""
    import tempfile

    from quantlab.quantize.configs import config_class

    if isinstance(qconfig, dict):
        qconfig = config_class(qconfig["method"]).model_validate(qconfig)
    plan = skip_plan(model, qconfig.method, qconfig.skip_modules)
    import_bnb()
    with tempfile.TemporaryDirectory(prefix="quantlab-bnb-") as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)
        quantized = type(model).from_pretrained(
            tmp, dtype=torch.bfloat16, device_map="cpu", quantization_config=bnb_config(qconfig, plan.patterns)
        )
        quantized.save_pretrained(folder)
