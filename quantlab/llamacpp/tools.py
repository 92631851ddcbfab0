"""llama.cpp's own tools, at the one version `make llama-cpp` builds (scripts/build_llama_cpp.sh): where they are,
which quantization types they know, and how each is called. Nothing of llama.cpp is copied into quantlab: the
converter, quantizer, importance-matrix tool and memory planner run as llama.cpp ships them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from quantlab.errors import QuantlabError

SDIST_VERSION = "0.3.36"  # llama-cpp-python, whose sdist carries the llama.cpp tree quantlab builds
BUILD_SCHEME = 3  # scripts/build_llama_cpp.sh's SCHEME: builds of an older scheme are refused
BUILD_HINT = "build it once with `make llama-cpp` (about 10 minutes on 2 cores; `make setup` does it too)"
CHECK_HINT = "check it here with `make llama-cpp-check` (about a minute)"
SELF_CHECK_ENV = "QUANTLAB_LLAMA_CPP_SELF_CHECK"  # set by quantlab.llamacpp.check for the processes it checks with
# The CPU features that decide which of ggml's CPU backends runs (ggml-cpu's variant scores), as /proc/cpuinfo names them
ISA_FLAGS = ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx_vnni", "avx512f", "avx512vbmi", "avx512_vnni",
             "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
# Types llama.cpp refuses to write without an importance matrix (src/llama-quant.cpp, tensor_requires_imatrix:
# IQ1_S/IQ1_M/IQ2_XXS/IQ2_XS/IQ2_S/IQ3_XXS tensors, which IQ3_XS files have too, and Q2_K in a Q2_K_S file).
# The build also asks
# `llama-quantize --dry-run`, which knows exactly, before it quantizes.
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"})
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench", "llama-fit-params",
         "llama-speculative-simple", "llama-completion")
TAIL_LINES = 12


@dataclass(frozen=True)
class LlamaCpp:
    root: Path  # .llama.cpp/
    source: Path  # the llama.cpp tree (convert_hf_to_gguf.py, gguf-py, src/)
    bin: Path  # libllama.so and the tools

    @property
    def converter(self) -> Path:
        return self.source / "convert_hf_to_gguf.py"

    @property
    def gguf_py(self) -> Path:
        return self.source / "gguf-py"

    def tool(self, name: str) -> Path:
        return self.bin / name

    @property
    def version(self) -> str:
        return version_text(self)


def default_root() -> Path:
    env = os.environ.get("QUANTLAB_LLAMA_CPP")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".llama.cpp"


def locate(root: Path | None = None, checked: bool = True) -> LlamaCpp:
    """The built llama.cpp, or a QuantlabError that says how to build it. With `checked`, only a build that passed
    its self-check (quantlab.llamacpp.check) on this CPU: a build made or checked on another machine may hold
    instructions this one refuses."""
    root = root or default_root()
    found = LlamaCpp(root, root / "src" / "vendor" / "llama.cpp", root / "build" / "bin")
    missing = [p for p in (found.converter, found.gguf_py, found.bin / "libllama.so", *(found.tool(t) for t in TOOLS))
               if not p.exists()]
    if missing:
        raise QuantlabError(f"llama.cpp is not built ({missing[0]} is missing): {BUILD_HINT}")
    info = build_info(root)
    if info is None or info.get("scheme") != BUILD_SCHEME or info.get("sdist") != SDIST_VERSION:
        raise QuantlabError(f"{root} holds an older llama.cpp build ({_built_as(info)}; this quantlab needs "
                            f"llama-cpp-python {SDIST_VERSION}'s llama.cpp built by scheme {BUILD_SCHEME}: CPU code for "
                            f"any x86-64 CPU, checked here, relocatable): rebuild it with `make llama-cpp`")
    if checked and not os.environ.get(SELF_CHECK_ENV) and check_record(found) is None:
        raise QuantlabError(f"llama.cpp in {root} has not passed its self-check on this CPU "
                            f"({cpu_identity()['model']}): {CHECK_HINT}")
    return found


def _built_as(info: dict | None) -> str:
    if info is None:
        return "no build.json: from before quantlab's portable, self-checked build"
    return f"llama-cpp-python {info.get('sdist', '?')}'s llama.cpp, build scheme {info.get('scheme', '?')}"


def build_info(root: Path) -> dict | None:
    """What scripts/build_llama_cpp.sh wrote into <root>/build.json; None without it (an older build)."""
    try:
        info = json.loads((root / "build.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def cpu_identity() -> dict:
    """This CPU's model name and the ISA features that pick ggml's CPU backend; `key` names its self-check."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif name.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    isa = [f for f in ISA_FLAGS if f in flags]
    key = hashlib.sha256(json.dumps([model, isa]).encode()).hexdigest()[:16]
    return {"model": model, "isa": isa, "key": key}


def check_record(tools: LlamaCpp) -> dict | None:
    """The self-check this build (as build.json describes it now) passed on this CPU, or None."""
    try:
        passed = json.loads((tools.root / "checked" / f"{cpu_identity()['key']}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return passed if isinstance(passed, dict) and passed.get("build") == build_key(tools.root) else None


def build_key(root: Path) -> str | None:
    """A hash of build.json and of libllama.so's size and time: a check passed by another build does not count."""
    try:
        lib = (root / "build" / "bin" / "libllama.so").stat()
        text = (root / "build.json").read_text(encoding="utf-8")
    except OSError:
        return None
    return hashlib.sha256(f"{text}|{lib.st_size}|{lib.st_mtime_ns}".encode()).hexdigest()[:16]


def loaded_cpu_backend(maps: str | None = None) -> str:
    """The CPU backend mapped into this process (/proc/self/maps): a portable build's variant (haswell, zen4, ...),
    or "linked in" for a build with one CPU backend (native, or the GPU box's CUDA build)."""
    if maps is None:
        maps = Path("/proc/self/maps").read_text()
    found = sorted({v or "linked in" for v in re.findall(r"libggml-cpu(?:-([\w.]+))?\.so", maps)})
    return ", ".join(found) or "none loaded"


def foreign_libraries(bin_dir: Path, maps: str | None = None) -> list[str]:
    """libllama and ggml libraries mapped into this process from anywhere but `bin_dir`: another copy's (a build
    whose RUNPATH names the folder it was built in, then moved) or one LD_LIBRARY_PATH put first. Two ggml copies in
    one process keep two backend registries, and libllama then finds no backend in its own."""
    if maps is None:
        maps = Path("/proc/self/maps").read_text()
    own = {item.resolve() for item in Path(bin_dir).iterdir()}  # the kernel names a mapped symlink by its target
    paths = set(re.findall(r"(/\S*/lib(?:ggml|llama)[\w.-]*\.so[\w.]*)$", maps, flags=re.M))
    return sorted(p for p in paths if Path(p).resolve() not in own)


_CPU_CODE = r"""
import ctypes, sys
from pathlib import Path
from quantlab.llamacpp import loaded_cpu_backend
bin_dir = Path(sys.argv[1])
ggml = ctypes.CDLL(str(bin_dir / "libggml.so"))
ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
ggml.ggml_backend_load_all_from_path(str(bin_dir).encode())
llama = ctypes.CDLL(str(bin_dir / "libllama.so"))
llama.llama_print_system_info.restype = ctypes.c_char_p
print(f"ggml-cpu {loaded_cpu_backend()} ({' '.join(llama.llama_print_system_info().decode().split())})")
"""


def cpu_code(bin_dir: Path) -> str:
    """'ggml-cpu haswell (CPU : SSE3 = 1 | ... )': the CPU backend a build's binaries load here and llama.cpp's
    system-info line, read in a separate process (loading runs no kernel, but a process of its own keeps it apart)."""
    here = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run([sys.executable, "-c", _CPU_CODE, str(bin_dir)], capture_output=True, text=True,
                              errors="replace", timeout=120, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown (reading it failed: {exc})"
    lines = done.stdout.strip().splitlines()
    return lines[-1] if done.returncode == 0 and lines else f"unknown (reading it failed: {done.stderr.strip()[-200:]})"


def write_check(tools: LlamaCpp, passed: dict) -> None:
    """Remember a passed self-check, for this CPU and this build."""
    passed = {**passed, "build": build_key(tools.root)}
    path = tools.root / "checked" / f"{passed['cpu']['key']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    partial.write_text(json.dumps(passed, indent=2) + "\n", encoding="utf-8")
    partial.replace(path)


def available(root: Path | None = None) -> bool:
    try:
        locate(root)
    except QuantlabError:
        return False
    return True


@functools.lru_cache(maxsize=4)
def version_text(tools: LlamaCpp) -> str:
    """'llama.cpp b<build> (<commit>), from llama-cpp-python <sdist>' as the tools themselves report it."""
    out = _completed([str(tools.tool("llama-bench")), "--version"], timeout=60)
    text = (out.stdout + out.stderr).strip()
    match = re.search(r"version:\s*(\S+)\s*\(([^)]*)\)", text)
    build = f"{match.group(1)} ({match.group(2)})" if match else "unknown build"
    return f"llama.cpp {build}, from llama-cpp-python {SDIST_VERSION}"


@functools.lru_cache(maxsize=4)
def quant_types(tools: LlamaCpp) -> tuple[str, ...]:
    """The type names `llama-quantize` accepts, read from its own help text."""
    out = _completed([str(tools.tool("llama-quantize")), "--help"], timeout=60)
    names = re.findall(r"^\s+(?:\d+\s+or\s+)?([A-Z0-9_]+)\s+:", out.stdout, flags=re.MULTILINE)
    if not names:
        raise QuantlabError(f"{tools.tool('llama-quantize')} --help lists no quantization types; is the build broken? "
                            f"{BUILD_HINT}")
    return tuple(n for n in names if n != "COPY")


def check_type(tools: LlamaCpp, name: str) -> str:
    """`name` in llama.cpp's spelling (case-insensitive, as llama-quantize takes it), or a clear error."""
    known = quant_types(tools)
    upper = name.upper()
    if upper not in known:
        raise QuantlabError(f"GGUF type {name!r} is not one llama.cpp knows; its types: {', '.join(known)}")
    return upper


def check_tensor_type(name: str, what: str) -> str:
    """A GGML tensor type (Q5_K, Q8_0, BF16: what llama-quantize's --tensor-type takes), in llama.cpp's spelling,
    or a clear error; a file type (Q4_K_M, a mix of tensor types) is not one."""
    from gguf import GGMLQuantizationType

    upper = name.strip().upper()
    if upper in GGMLQuantizationType.__members__:
        return upper
    main = main_tensor_type(upper)
    hint = f"{upper} is a file type, a mix of tensor types around {main}; " if main else ""
    raise QuantlabError(f"{what}: {name.strip()!r} is not a tensor type: {hint}give one of "
                        f"{', '.join(TENSOR_TYPES_SHOWN)} (or another GGML type)")


# tensor_requires_imatrix in src/llama-quant.cpp, as the pinned tree has it: used only if its source cannot be read
IMATRIX_TENSOR_TYPES = frozenset({"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"})


def imatrix_tensor_types(tools: LlamaCpp) -> frozenset[str]:
    """The tensor types llama-quantize refuses to write without an importance matrix (token_embd and output
    aside), read from its own rule in src/llama-quant.cpp, so that a recipe is refused before any work."""
    try:
        text = (tools.source / "src" / "llama-quant.cpp").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return IMATRIX_TENSOR_TYPES
    body = re.search(r"bool tensor_requires_imatrix\(.*?switch \(dst_type\) \{(.*?)return true;", text, flags=re.S)
    found = frozenset(re.findall(r"case GGML_TYPE_(\w+):", body.group(1))) if body else frozenset()
    return found or IMATRIX_TENSOR_TYPES


def imatrix_data_types(tools: LlamaCpp) -> frozenset[str]:
    """The tensor types ggml quantizes only with importance-matrix data for the tensor itself (ggml.c,
    ggml_quantize_requires_imatrix: it aborts without): never possible for token_embd, which no matmul reads."""
    try:
        text = (tools.source / "ggml" / "src" / "ggml.c").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset({"IQ2_XXS", "IQ2_XS", "IQ1_S"})
    body = re.search(r"bool ggml_quantize_requires_imatrix\(.*?\{(.*?)\n\}", text, flags=re.S)
    code = "\n".join(line.split("//")[0] for line in body.group(1).splitlines()) if body else ""
    return frozenset(re.findall(r"GGML_TYPE_(\w+)", code)) or frozenset({"IQ2_XXS", "IQ2_XS", "IQ1_S"})


def imatrix_min_chunks(tools: LlamaCpp) -> int:
    """llama-imatrix's minimum text, in contexts: it refuses fewer than N × n_ctx tokens (tools/imatrix/imatrix.cpp)."""
    try:
        text = (tools.source / "tools" / "imatrix" / "imatrix.cpp").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return 2
    found = re.search(r"int\(tokens\.size\(\)\)\s*<\s*(\d+)\s*\*\s*n_ctx", text)
    return int(found.group(1)) if found else 2


def moe_only(file_type: str) -> bool:
    """A file type that quantizes the experts of an MoE model only (MXFP4_MOE: every other tensor is Q8_0)."""
    return file_type.upper().endswith("_MOE")


TENSOR_TYPES_SHOWN = ("Q4_K", "Q5_K", "Q6_K", "Q8_0", "IQ4_XS", "BF16", "F16")


def main_tensor_type(file_type: str) -> str | None:
    """The tensor type a llama.cpp file type is built around (Q4_K_M → Q4_K, Q8_0 → Q8_0); None if unknown."""
    from gguf import GGMLQuantizationType

    upper = file_type.upper()
    for candidate in (upper, upper.rsplit("_", 1)[0]):
        if candidate in GGMLQuantizationType.__members__:
            return candidate
    return None


def bits_per_weight(tensor_type: str) -> float:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[tensor_type]]
    return size * 8 / block


def tool_env(tools: LlamaCpp) -> dict[str, str]:
    """The converter runs with llama.cpp's own gguf-py (the PyPI gguf lacks Qwen3.5's MTP tensors)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tools.gguf_py), str(tools.source), env.get("PYTHONPATH")]))
    env["NO_LOCAL_GGUF"] = ""
    return env


def run_tool(tools: LlamaCpp, args: list[str], what: str, echo: Callable[[str], None] | None = None,
             timeout: float | None = None, python: bool = False) -> str:
    """Run a llama.cpp tool (or, with `python`, a Python script under its gguf-py); its output, or a QuantlabError
    with the last lines of it. `echo` gets each line as it comes (progress for long steps)."""
    command = [sys.executable, *args] if python else [str(tools.tool(args[0])), *args[1:]]
    lines: list[str] = []
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                env=tool_env(tools))
    except OSError as exc:
        raise QuantlabError(f"{what}: could not start {command[0]}: {exc}. {BUILD_HINT}") from None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if echo:
                echo(line.rstrip("\n"))
        code = proc.wait(timeout=timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if code != 0:
        tail = "\n".join("    " + line for line in lines[-TAIL_LINES:])
        how = f"died with {_signal_name(-code)}" if code < 0 else f"failed (exit {code})"
        raise QuantlabError(f"{what} {how}; its last lines:\n{tail}")
    return "\n".join(lines)


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _completed(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=timeout)
    except OSError as exc:
        raise QuantlabError(f"could not start {command[0]}: {exc}. {BUILD_HINT}") from None
