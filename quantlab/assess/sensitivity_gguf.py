"""`quantlab sensitivity` on a GGUF recipe: llama.cpp's own tools quantize one tensor class at a time.

The model is converted once (a BF16 GGUF) and the importance matrix computed once. llama-quantize then writes the
recipe's uniform build, and one file per class in which that class's tensors get exactly the types llama.cpp gave
them in the uniform build (one --tensor-type per tensor) while every other tensor stays BF16 (a last `.=bf16`,
since llama-quantize applies the first pattern that matches). Bytes come from the files' headers, not a formula.
The baseline is the all-BF16 GGUF itself, run by the same llama.cpp: what a class adds is its KL minus the
baseline's, so llama.cpp's own distance from the reference is not charged to any class.

Every file is written to a temporary folder under TMPDIR and deleted when the sweep ends. A 27B's BF16 GGUF and
each class file are about 54 GB: with a stored-mode quality section the files are made, scored and deleted one
at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from quantlab.errors import QuantlabError
from quantlab.runtimes.base import LoadRequest
from quantlab.llamacpp.names import UNQUANTIZED_TYPES, class_tensors, tensor_type_args
from quantlab.llamacpp.steps import BF16_NAME, CONVERTER_TYPES, convert, has_mtp, make_imatrix, quantize, timed

# The next type up in llama.cpp's ladder: the uniform build whose size is the default budget, and the build the
# suggested mixed one is checked against.
NEXT_TYPE_UP = {
    "Q2_K": "Q3_K_M", "Q3_K_S": "Q3_K_M", "Q3_K_M": "Q3_K_L", "Q3_K_L": "Q4_K_M", "Q4_0": "Q5_0", "Q4_1": "Q5_1",
    "Q4_K_S": "Q4_K_M", "Q4_K_M": "Q5_K_M", "Q5_0": "Q8_0", "Q5_1": "Q8_0", "Q5_K_S": "Q5_K_M", "Q5_K_M": "Q6_K",
    "Q6_K": "Q8_0", "IQ4_XS": "Q4_K_M", "IQ4_NL": "Q4_K_M",
}
def class_file_args(tensors, level: str | None = None) -> list[str]:
    """llama-quantize's --tensor-type flags: these tensors at their given types (or all at `level`), every other
    one BF16."""
    args = []
    for t in tensors:
        args += ["--tensor-type", f"^{re.escape(t.name)}$={(level or t.type_name).lower()}"]
    return args + ["--tensor-type", ".=bf16"]


@dataclass
class _Built:
    path: Path
    header: object


class GgufSweep:
    """The steps of a GGUF sensitivity run, in a work folder; candidates are loaded llama.cpp models."""

    baseline_label = "baseline: every class BF16 (llama.cpp)"

    def __init__(self, plan, high_types: list[str] | None, work: Path, echo=print):
        from quantlab import llamacpp
        from quantlab.runtimes.libllama import LlamaCppRuntime

        self.plan, self.q, self.work, self.echo = plan, plan.recipe.quantization, Path(work), echo
        self.tools = llamacpp.locate()
        self.kind = llamacpp.check_type(self.tools, self.q.type)
        if self.kind in CONVERTER_TYPES:
            raise QuantlabError(f"quantlab sensitivity: type {self.kind} is written by the converter and quantizes "
                                "nothing; give a recipe with a llama-quantize type (e.g. Q4_K_M)")
        if high_types is None:
            high_types = default_levels(self.kind)
        self.high = list(dict.fromkeys(llamacpp.check_tensor_type(t, "--high-types") for t in high_types if t.strip()))
        if not self.high:
            raise QuantlabError("--high-types: give at least one tensor type, e.g. Q6_K,Q8_0")
        check_above(self.kind, self.high)
        check_levels_writable(self.tools, self.high, self.q.imatrix)
        self.class_bytes: dict[tuple[str, str | None], int] = {}  # (class, level) → its tensors' bytes, as written
        self.next_up = NEXT_TYPE_UP.get(self.kind)
        self.runtime = LlamaCppRuntime()
        self.settings = self.runtime.options(plan.recipe.measure, plan.device)
        self.step = timed(echo)
        self.imatrix: Path | None = None

    @property
    def label(self) -> str:
        return self.kind

    def prepare(self) -> None:
        """Convert, compute the importance matrix, write the uniform build (and the next type up)."""
        from quantlab.llamacpp.gguf_file import read_header

        source = self.plan.source
        files = source.files(download=True)
        if files is None:
            raise QuantlabError("quantlab sensitivity on a GGUF recipe converts the model's files; synthetic "
                                "weights have none")
        self.bf16 = self.work / BF16_NAME
        mtp = self.q.mtp and has_mtp(source.config)
        self.step(f"convert_hf_to_gguf.py → {self.bf16.name}", lambda: convert(self.tools, files, self.bf16, "bf16", mtp))
        if self.q.imatrix:
            self.imatrix, _ = make_imatrix(self.tools, self.q.calibration, source.tokenizer(), self.bf16, self.work,
                                             self.step)
        self.uniform = self.write(f"uniform-{self.kind}", self.kind, [])
        self.bf16_header = read_header(self.bf16)
        self.classes = class_tensors(self.uniform.header)
        self.classes.pop("mtp", None)  # the MTP head never changes the next-token logits scored here
        self.next_up_build = self.write(f"uniform-{self.next_up}", self.next_up, []) if self.next_up else None

    def write(self, name: str, kind: str, tensor_types: list[str]) -> _Built:
        from quantlab.llamacpp.gguf_file import read_header

        path = self.work / f"{name}.gguf"
        self.step(f"llama-quantize {name}", lambda: quantize(self.tools, self.bf16, path, kind, self.imatrix,
                                                             tensor_types=tensor_types, what=f"llama-quantize {name}"))
        return _Built(path, read_header(path))

    # -- what the driver asks ---------------------------------------------------------------------------------

    def parameters(self) -> dict[str, int]:
        return {kind: sum(t.elements for t in tensors) for kind, tensors in self.classes.items()}

    def uniform_bytes(self) -> float:
        return self.uniform.header.tensor_bytes

    def bytes_saved(self, kind: str) -> int:
        at_bf16 = {t.name: t.nbytes for t in self.bf16_header.tensors}
        return sum(at_bf16[t.name] - t.nbytes for t in self.classes[kind])

    def levels(self) -> list[str]:
        return list(self.high)

    def upgrade_cost(self, kind: str, level: str) -> float:
        """Bytes the class adds at `level`, from the file written for it (llama.cpp's fallbacks included)."""
        return self.class_bytes[(kind, level)] - sum(t.nbytes for t in self.classes[kind])

    def build_baseline(self):
        return self.load(self.bf16)

    def build_class(self, kind: str, level: str | None = None):
        """The class at its uniform-build types (level None) or all at `level`; every other tensor BF16."""
        tensors = self.classes[kind]
        name = f"class-{kind}" + (f"-{level}" if level else "")
        built = self.write(name, self.kind, class_file_args(tensors, level))
        check_class_file(built.header, tensors, level)
        names = {t.name for t in tensors}
        self.class_bytes[(kind, level)] = sum(t.nbytes for t in built.header.tensors if t.name in names)
        return self.load(built.path)

    def load(self, path: Path):
        return self.runtime.load(LoadRequest(self.plan.source, self.plan.device, gguf=path, settings=self.settings)).model

    def candidate_bytes(self) -> int:
        return self.bf16_header.file_bytes  # a class file is mostly BF16

    def release(self, model) -> None:
        model.close()
        if model.path.parent == self.work and model.path != self.bf16:
            model.path.unlink()  # this sweep's own file; the BF16 GGUF is needed until the end

    def mixed_overrides(self, chosen: dict[str, str]) -> dict[str, str]:
        """The recipe's per-class types: only the raised classes; the others keep llama.cpp's own mix."""
        return dict(chosen)

    def check_builds(self, chosen: dict[str, str]) -> list[tuple[str, float, object]]:
        """(label, weight bytes, loader) of the uniform build, the suggested mixed build and the next type up."""
        mixed = self.write("mixed", self.kind, tensor_type_args(self.mixed_overrides(chosen)))
        builds = [(f"uniform {self.kind}", self.uniform), ("suggested mixed", mixed)]
        if self.next_up_build is not None:
            builds.append((f"uniform {self.next_up}", self.next_up_build))
        return [(label, b.header.tensor_bytes, lambda b=b: self.load(b.path)) for label, b in builds]

    def default_budget(self) -> float | None:
        return self.next_up_build.header.tensor_bytes if self.next_up_build else None

    def budget_words(self) -> str:
        return f"the uniform {self.next_up} build" if self.next_up else ""


DEFAULT_LEVELS = ("Q5_K", "Q6_K", "Q8_0")


def default_levels(kind: str) -> list[str]:
    """Q5_K, Q6_K and Q8_0, those above the recipe's type; BF16 above Q8_0."""
    from quantlab.llamacpp import bits_per_weight, main_tensor_type

    main = main_tensor_type(kind)
    above = [t for t in DEFAULT_LEVELS if main is None or bits_per_weight(t) > bits_per_weight(main)]
    return above or ["BF16"]


def check_above(kind: str, levels: list[str]) -> None:
    """Every level must hold more bits per weight than the tensor type the recipe's type is built around."""
    from quantlab.llamacpp import bits_per_weight, main_tensor_type

    main = main_tensor_type(kind)
    if main is None:
        return
    low = [t for t in levels if bits_per_weight(t) <= bits_per_weight(main)]
    if low:
        raise QuantlabError(f"--high-types {','.join(low)}: not above {kind}'s {main} ({bits_per_weight(main):.2f} bits "
                            f"per weight); raise classes to types with more bits, e.g. Q6_K,Q8_0"
                            + ("" if kind != "Q8_0" else " (for Q8_0: BF16)"))


def check_levels_writable(tools, levels: list[str], imatrix: bool) -> None:
    """Before any work, llama.cpp's own rules for the levels: types that need an importance matrix (none without
    one), and types ggml writes only with matrix data for the tensor itself, which token_embd never has."""
    from quantlab import llamacpp

    no_data = [t for t in levels if t in llamacpp.imatrix_data_types(tools)]
    if no_data:
        raise QuantlabError(f"--high-types {','.join(no_data)}: ggml writes {no_data[0]} only with importance-matrix "
                            "data for the tensor itself, and the token embeddings never have any (llama-quantize "
                            "aborts); raise classes to other types, e.g. IQ3_S,Q4_K,Q6_K")
    needs = [t for t in levels if t in llamacpp.imatrix_tensor_types(tools)]
    if needs and not imatrix:
        raise QuantlabError(f"--high-types {','.join(needs)}: llama-quantize writes {needs[0]} only with an importance "
                            "matrix, and the recipe has quantization.imatrix: false")


def check_class_file(header, tensors, level: str | None = None) -> None:
    """The class file has the class's tensors at the uniform build's types (or at `level`, where llama.cpp may fall
    back to another quantized type) and nothing else quantized: a guard against a llama.cpp whose --tensor-type
    rules changed."""
    wanted = {t.name: level or t.type_name for t in tensors}
    for t in header.tensors:
        expected = wanted.get(t.name)
        if expected is None:
            wrong = t.type_name not in UNQUANTIZED_TYPES
        elif level is None or level in UNQUANTIZED_TYPES:
            wrong = t.type_name != expected
        else:
            wrong = t.type_name in UNQUANTIZED_TYPES
        if wrong:
            raise QuantlabError(f"{header.path}: {t.name} is {t.type_name}, expected {expected or 'BF16'}: "
                                "llama-quantize did not follow the per-tensor types")
