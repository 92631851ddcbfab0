"""The self-check of a llama.cpp build on this CPU: quantized GGUFs run through llama-bench and through libllama as
quantlab's runtime loads it, each in a process of its own, so that an instruction this CPU (or its kernel) refuses
fails here, with one line naming the CPU and the CPU backend, and never as a segfault later in a run or a test.

    python -m quantlab.llamacpp.check [--root .llama.cpp]      (scripts/build_llama_cpp.sh runs it after building)

The GGUFs are the bundled model's, made once by llama.cpp's own converter and quantizer into <root>/checked/.
Q8_0 and Q4_K_M reach the quantized matmul kernels (AMX on Intel CPUs that have it, in a native build); BF16 does
not, so it proves nothing. A pass is remembered per CPU in <root>/checked/<cpu key>.json; quantlab.llamacpp refuses
a build that has not passed on the CPU it runs on.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from quantlab import llamacpp
from quantlab.errors import QuantlabError

TYPES = ("Q8_0", "Q4_K_M")
PROMPT_TOKENS, DECODE_TOKENS = 32, 8
TIMEOUT_S = 300


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=None, help="the llama.cpp build folder (default .llama.cpp/)")
    p.add_argument("--in-process", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.in_process:
        return _decode_in_process(args.in_process)
    try:
        tools = llamacpp.locate(args.root, checked=False)
        line = check(tools)
    except SelfCheckFailed as exc:
        print(f"llama.cpp self-check FAILED: {exc}", file=sys.stderr)
        return 1
    except QuantlabError as exc:
        print(f"llama.cpp self-check could not run: {exc}", file=sys.stderr)
        return 1
    print(line)
    return 0


class SelfCheckFailed(Exception):
    """One line: what died, on which CPU and CPU backend, and the command that fixes it."""


def check(tools: llamacpp.LlamaCpp) -> str:
    start = time.monotonic()
    cpu = llamacpp.cpu_identity()
    backend = _probe_backend(tools, cpu)
    ggufs = _fixtures(tools)
    threads = max(2, os.cpu_count() or 2)  # worker threads too: the AMX permission fault hits them, not the main one
    for kind, path in ggufs.items():
        _run_step(tools, cpu, backend, f"llama-bench on the {kind} GGUF",
                  [str(tools.tool("llama-bench")), "-m", str(path), "-p", str(PROMPT_TOKENS), "-n", str(DECODE_TOKENS),
                   "-r", "1", "-t", str(threads), "-o", "json"])
        _run_step(tools, cpu, backend, f"libllama (quantlab's runtime) on the {kind} GGUF",
                  [sys.executable, "-m", "quantlab.llamacpp.check", "--in-process", str(path)],
                  env={"QUANTLAB_LLAMA_CPP": str(tools.root), "QUANTLAB_THREADS": str(threads)})
    passed = {"cpu": cpu, "cpu_backend": backend["variant"], "system_info": backend["system_info"],
              "types": list(TYPES), "threads": threads, "seconds": round(time.monotonic() - start, 1),
              "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    llamacpp.write_check(tools, passed)
    return (f"llama.cpp self-check passed on {cpu['model']}: CPU backend {backend['variant']}; "
            f"{' and '.join(TYPES)} through llama-bench and libllama, {threads} threads, {passed['seconds']:.0f} s")


def _probe_backend(tools: llamacpp.LlamaCpp, cpu: dict) -> dict:
    """Which CPU backend libllama loads here, and llama.cpp's system-info line, from a process that runs no kernel."""
    code = ("import json; from quantlab.llamacpp.binding import library, cpu_backend; library(); "
            "print(json.dumps(cpu_backend()))")
    out = _run_step(tools, cpu, {"variant": "not yet known"}, "loading libllama and its CPU backend",
                    [sys.executable, "-c", code], env={"QUANTLAB_LLAMA_CPP": str(tools.root)})
    return json.loads(out.strip().splitlines()[-1])


def _fixtures(tools: llamacpp.LlamaCpp) -> dict[str, Path]:
    """The bundled model as BF16, Q8_0 and Q4_K_M GGUFs, made once (each written aside, then renamed)."""
    from quantlab.bundled import bundled_model_dir

    folder = tools.root / "checked" / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    bf16 = folder / "bundled-bf16.gguf"
    if not bf16.is_file():
        partial = bf16.with_suffix(".partial")
        llamacpp.run_tool(tools, ["-m", "quantlab.llamacpp.convert", str(bundled_model_dir()), "--outfile", str(partial),
                                  "--outtype", "bf16", "--no-mtp"], "convert_hf_to_gguf.py (self-check fixture)",
                              python=True)
        partial.rename(bf16)
    made = {}
    for kind in TYPES:
        path = folder / f"bundled-{kind.lower()}.gguf"
        if not path.is_file():
            partial = path.with_suffix(".partial")
            llamacpp.run_tool(tools, ["llama-quantize", str(bf16), str(partial), kind, "1"],
                              f"llama-quantize {kind} (self-check fixture)")
            partial.rename(path)
        made[kind] = path
    return made


def _run_step(tools, cpu: dict, backend: dict, what: str, command: list[str], env: dict | None = None) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=TIMEOUT_S,
                              env={**os.environ, llamacpp.SELF_CHECK_ENV: "1", **(env or {})})
    except subprocess.TimeoutExpired:
        raise SelfCheckFailed(f"{what} did not finish in {TIMEOUT_S} s on {_cpu_text(cpu, backend)}") from None
    if done.returncode == 0:
        return done.stdout
    fix = _fix(tools, backend) if done.returncode < 0 else _fix_failure(tools)
    raise SelfCheckFailed(f"{what} {_death(done.returncode)} on {_cpu_text(cpu, backend)}. {fix} "
                          f"(last output: {_last_line(done)})")


def _death(code: int) -> str:
    if code >= 0:
        return f"exited with status {code}"
    name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
    why = {"SIGILL": " (an instruction this CPU, or its kernel's permission for it, does not allow)",
           "SIGSEGV": " (a segmentation fault)"}.get(name, "")
    return f"died with {name}{why}"


def _cpu_text(cpu: dict, backend: dict) -> str:
    isa = " ".join(cpu["isa"]) or "no AVX"
    return f"{cpu['model']} ({isa}), CPU backend {backend['variant']}"


def _fix(tools: llamacpp.LlamaCpp, backend: dict) -> str:
    build = llamacpp.build_info(tools.root) or {}
    if build.get("cpu") == "native":
        return "Fix: rebuild it portable, `make llama-cpp LLAMA_CPU=portable`"
    variant = backend.get("variant", "")
    if variant and variant not in ("not yet known", "x64"):
        return (f"Fix: rebuild without that variant, `make llama-cpp LLAMA_CPU_EXCLUDE={variant}` "
                "(the next one down is then used), and please report it")
    return "Fix: none known here; please report it with this line"


def _fix_failure(tools: llamacpp.LlamaCpp) -> str:
    """An error exit, not a crash: the CPU code ran or was never reached; its own message says why."""
    return (f"Fix: the last output says why; if it is about the build, rebuild it: `rm -r {tools.root} && "
            "make llama-cpp`")


def _last_line(done: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    return (lines[-1] if lines else "none")[:200]


def _decode_in_process(path: Path) -> int:
    """Load the GGUF with quantlab's llama.cpp runtime and decode a few tokens, on several threads."""
    from quantlab.llamacpp.binding import load_gguf_for_check

    model = load_gguf_for_check(path, threads=int(os.environ.get("QUANTLAB_THREADS", "2")))
    try:
        model.ensure_context(PROMPT_TOKENS + DECODE_TOKENS + 1)
        logits = model.decode(list(range(1, PROMPT_TOKENS + 1)), 0, 1)
        token = int(logits[0].argmax())
        for step in range(DECODE_TOKENS):
            token = int(model.decode([token], PROMPT_TOKENS + step, 1)[0].argmax())
    finally:
        model.close()
    print(json.dumps({"ok": True, "last_token": token}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
