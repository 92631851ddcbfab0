"""libllama through the llama-cpp-python binding's C API: the library loaded once per process with the build's own
CPU backend, a GGUF loaded with the settings that ran, its one context, batches decoded, logits read, and
llama.cpp's own buffer accounting per device (model, KV cache, recurrent state, compute, output), read from its log
as each context is made. The llama.cpp runtime (quantlab/runtimes/libllama.py) and the build's self-check
(check.py) both load GGUFs through it.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from quantlab.errors import QuantlabError
from quantlab.llamacpp import tools as llamacpp
from quantlab.llamacpp.gguf_file import read_header

BUFFER_LINE = re.compile(r"(\S+)\s+(model|KV|RS|compute|output)\s+buffer size\s*=\s*([\d.]+)\s*MiB")
KV_TYPES = {"f16": 1, "q8_0": 8, "f32": 0, "bf16": 30}  # GGML_TYPE_* ids
FLASH = {"auto": -1, "off": 0, "on": 1}


@dataclass
class LlamaCppSettings:
    threads: int
    gpu_layers: int
    flash_attn: str
    kv_type: str
    slots: int
    ubatch: int
    batch: int

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class LlamaCppModel:
    """A loaded GGUF and the one context it runs in; `__call__` is the quality harness's forward."""

    lib: Any
    model: Any
    vocab_size: int
    path: Path
    settings: LlamaCppSettings
    log: "_Log"
    header: Any = None  # the GGUF's header (quantlab.llamacpp.gguf_file), read once at load
    context: Any = None
    n_ctx: int = 0
    buffers: dict[str, int] = field(default_factory=dict)  # llama.cpp's accounting: "CPU model" -> bytes

    def ensure_context(self, n_ctx: int) -> None:
        """A context holding at least n_ctx tokens per slot; made again only when a larger one is needed."""
        if self.context is not None and self.n_ctx >= n_ctx:
            return
        self.free_context()
        lib, s = self.lib, self.settings
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx * s.slots
        params.n_batch = s.batch
        params.n_ubatch = min(s.ubatch, s.batch)
        params.n_seq_max = s.slots
        params.n_threads = params.n_threads_batch = s.threads
        params.flash_attn_type = FLASH[s.flash_attn]
        params.type_k = params.type_v = KV_TYPES[s.kv_type]
        params.no_perf = False
        with self.log.capture() as lines:
            context = lib.llama_init_from_model(self.model, params)
        if not context:
            raise QuantlabError(f"llama.cpp could not make a context of {n_ctx:,} tokens: "
                                f"{self.log.last_error(lines)}")
        self.context, self.n_ctx = context, n_ctx
        self.buffers = {**model_buffers(self.buffers), **parse_buffers(lines)}

    def free_context(self) -> None:
        if self.context is not None:
            self.lib.llama_free(self.context)
            self.context = None
            self.buffers = model_buffers(self.buffers)

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.context), True)

    def decode(self, tokens: list[int], start: int, want_logits: int) -> torch.Tensor:
        """Tokens at positions start.. in sequence 0, in batches of the context's n_batch (llama.cpp caps it at the
        context); the logits of the last `want_logits` tokens, as a (want_logits, vocab) float32 tensor."""
        lib = self.lib
        room = lib.llama_n_ctx_seq(self.context)
        if start + len(tokens) > room:
            raise QuantlabError(f"llama.cpp: {start + len(tokens):,} tokens do not fit a context of {room:,} per slot")
        n_batch = lib.llama_n_batch(self.context)
        first_wanted = len(tokens) - want_logits
        batch = lib.llama_batch_init(n_batch, 0, 1)
        rows: list[torch.Tensor] = []
        try:
            for offset in range(0, len(tokens), n_batch):
                chunk = tokens[offset:offset + n_batch]
                batch.n_tokens = len(chunk)
                for i, token in enumerate(chunk):
                    batch.token[i] = token
                    batch.pos[i] = start + offset + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = offset + i >= first_wanted
                with self.log.capture() as lines:
                    code = lib.llama_decode(self.context, batch)
                if code != 0:
                    raise QuantlabError(f"llama_decode returned {code} at position {start + offset:,}: "
                                        + ("no room left in the context" if code == 1 else self.log.last_error(lines)))
                outputs = sum(1 for i in range(len(chunk)) if offset + i >= first_wanted)
                if outputs:
                    rows.append(self.logits(outputs))
        finally:
            lib.llama_batch_free(batch)
        return torch.cat(rows) if rows else torch.empty(0, self.vocab_size)

    def logits(self, rows: int) -> torch.Tensor:
        """The last `rows` outputs of the latest decode, as a (rows, vocab) float32 tensor (a copy)."""
        out = torch.empty(rows, self.vocab_size, dtype=torch.float32)
        for r in range(rows):
            pointer = self.lib.llama_get_logits_ith(self.context, -rows + r)
            out[r] = torch.from_numpy(_as_array(pointer, self.vocab_size)).clone()
        return out

    def __call__(self, input_ids: torch.Tensor, use_cache: bool = False, logits_to_keep: int = 0, **_: Any):
        """The forward the quality harness calls: logits of the last `logits_to_keep` positions of one window."""
        tokens = input_ids[0].tolist()
        keep = logits_to_keep or len(tokens)
        self.ensure_context(len(tokens))
        self.clear()
        return _Output(self.decode(tokens, 0, keep).unsqueeze(0))

    def close(self) -> None:
        self.free_context()
        if self.model is not None:
            self.lib.llama_model_free(self.model)
            self.model = None


@dataclass
class _Output:
    logits: torch.Tensor


def _as_array(pointer, n: int):
    import numpy as np

    return np.ctypeslib.as_array(pointer, shape=(n,))


class _Log:
    """llama.cpp's log, kept (not printed): the buffer sizes are read from it, and errors quote it."""

    def __init__(self, lib):
        self._lines: list[str] | None = None
        self._partial = ""
        self._lock = threading.Lock()
        self.callback = lib.llama_log_callback(self._on_message)  # kept alive as long as the runtime
        lib.llama_log_set(self.callback, ctypes.c_void_p(0))

    def _on_message(self, level, text, user_data) -> None:
        with self._lock:
            self._partial += (text or b"").decode("utf-8", "replace")
            *done, self._partial = self._partial.split("\n")
            if self._lines is not None:
                self._lines.extend(done)

    @contextmanager
    def capture(self):
        """The log lines written inside the block."""
        self._lines = lines = []
        try:
            yield lines
        finally:
            self._lines = None

    @staticmethod
    def last_error(lines: list[str]) -> str:
        errors = [line.strip() for line in lines if "error" in line.lower() or "failed" in line.lower()]
        return (errors or lines or ["no message"])[-1][:300]


def parse_buffers(lines: list[str]) -> dict[str, int]:
    """'CPU_Mapped model buffer size = 7.12 MiB' → {'CPU_Mapped model': 7466000}; sizes of one kind summed."""
    found: dict[str, int] = {}
    for line in lines:
        match = BUFFER_LINE.search(line)
        if match:
            key = f"{match.group(1)} {match.group(2)}"
            found[key] = found.get(key, 0) + round(float(match.group(3)) * 2**20)
    return found


def model_buffers(buffers: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in buffers.items() if k.endswith(" model")}


_LIB = None
_LOG = None


def library():
    """The binding, loading .llama.cpp/build/bin/libllama.so (LLAMA_CPP_LIB_PATH), once per process, with the CPU
    backend that build chose for this CPU."""
    global _LIB
    if _LIB is None:
        tools = llamacpp.locate()
        os.environ["LLAMA_CPP_LIB_PATH"] = str(tools.bin)
        try:
            import llama_cpp.llama_cpp as lib
        except ImportError as exc:
            raise QuantlabError(f"the llama_cpp Python binding is not installed ({exc}): {llamacpp.BUILD_HINT}") from None
        _load_backends(tools.bin)
        lib.llama_backend_init()
        _LIB = lib
    return _LIB


def _load_backends(bin_dir: Path) -> None:
    """ggml's backends from the build's own folder: left to itself, ggml looks beside the executable (python's bin)
    and in the working directory, where a stray libggml-cpu-*.so could win."""
    ggml = ctypes.CDLL(str(bin_dir / "libggml.so"))
    ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_load_all_from_path(str(bin_dir).encode())
    if ggml.ggml_backend_reg_count() == 0:
        raise QuantlabError(f"llama.cpp found no backend in {bin_dir}: rebuild it with `make llama-cpp`")
    foreign = llamacpp.foreign_libraries(bin_dir)
    if foreign:
        raise QuantlabError(f"llama.cpp in {bin_dir.parents[1]} loaded {foreign[0]}, not its own copy (a build moved "
                            "from where it was built, or LD_LIBRARY_PATH); rebuild it in place: `rm -r "
                            f"{bin_dir.parents[1]} && make llama-cpp`, or unset LD_LIBRARY_PATH")


def cpu_backend() -> dict[str, str]:
    """The CPU backend this process loaded (a portable build's variant; "linked in" for a build with one) and
    llama.cpp's system-info line (the features that backend was compiled for)."""
    lib = library()
    return {"variant": llamacpp.loaded_cpu_backend(),
            "system_info": " ".join(lib.llama_print_system_info().decode("utf-8", "replace").split())}


def process_log() -> "_Log":
    """llama.cpp has one log callback per process: one _Log, kept alive as long as the process, serves every
    runtime (a second callback would silence the first's accounting, and a freed one would crash llama.cpp)."""
    global _LOG
    if _LOG is None:
        _LOG = _Log(library())
    return _LOG


def open_gguf(path: Path, settings: LlamaCppSettings) -> LlamaCppModel:
    """A GGUF loaded by libllama, with no context yet."""
    lib, log = library(), process_log()
    header = read_header(path)  # not a GGUF, or cut short: a clear error before llama.cpp sees it
    params = lib.llama_model_default_params()
    params.n_gpu_layers = settings.gpu_layers
    with log.capture() as lines:
        model = lib.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise QuantlabError(f"{path}: llama.cpp could not load it: {log.last_error(lines)}")
    vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    ran = settings_that_run(settings, _layers(lib, model, header), bool(lib.llama_supports_gpu_offload()))
    return LlamaCppModel(lib, model, vocab, path, ran, log, header, buffers=parse_buffers(lines))


def settings_that_run(asked: LlamaCppSettings, layers: int, offload: bool) -> LlamaCppSettings:
    """The settings as llama.cpp applies them, which records state: it offloads at most n_layer + 1 layers (none
    without a GPU backend) and runs micro-batches of min(ubatch, batch)."""
    return replace(asked, gpu_layers=min(asked.gpu_layers, layers + 1) if offload else 0,
                   ubatch=min(asked.ubatch, asked.batch))


def _layers(lib, model, header) -> int:
    count = getattr(lib, "llama_model_n_layer", None)
    return int(count(model)) if count is not None else int(header.block_count or 0)


def load_gguf_for_check(path: Path, threads: int) -> LlamaCppModel:
    """The build's self-check (quantlab.llamacpp.check): a GGUF on the CPU with llama-bench's defaults."""
    return open_gguf(path, LlamaCppSettings(threads=threads, gpu_layers=0, flash_attn="auto", kv_type="f16", slots=1,
                                            ubatch=512, batch=2048))


def describe_types(header) -> str:
    """'Q4_K 62%, Q6_K 21%, F32 ...': the GGUF's parameters by type."""
    total = header.parameters or 1
    return ", ".join(f"{t} {100 * n / total:.0f}%" for t, n in header.parameters_by_type().items())
