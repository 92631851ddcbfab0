"""The llama.cpp build runs on any x86-64 CPU: its CPU backends hold no AMX code while the pinned llama.cpp asks for
AMX permission on the main thread only, it checks itself after building, it refuses to be used stale or unchecked,
and records name the CPU backend that ran."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quantlab import llamacpp
from quantlab.errors import QuantlabError

REPO = Path(__file__).resolve().parents[1]


def _why_not_built() -> str | None:
    try:
        llamacpp.locate()
    except QuantlabError as exc:
        return str(exc)
    return None


needs_build = pytest.mark.skipif(_why_not_built() is not None, reason=_why_not_built() or "")

# The tile instructions of AMX-TILE, AMX-INT8, AMX-BF16 and AMX-FP16, as objdump spells them.
AMX_MNEMONICS = ("ldtilecfg", "sttilecfg", "tileloadd", "tileloaddt1", "tilestored", "tilerelease", "tilezero",
                 "tdpbssd", "tdpbsud", "tdpbusd", "tdpbuud", "tdpbf16ps", "tdpfp16ps")
AMX_LINE = re.compile(r"\t(" + "|".join(AMX_MNEMONICS) + r")\b")
# llama-cpp-python 0.3.36 (ggml 0c1e570) asks the kernel for AMX tile permission in ggml_amx_init only, on the main
# thread; worker threads then die with SIGILL (ggml-org/llama.cpp PR 26954 asks per thread). Set to True only when
# the pinned tree asks on every thread that runs tile instructions.
AMX_PERMISSION_PER_THREAD = False


def amx_instructions(library: Path) -> list[str]:
    """The AMX instructions in a shared library's code, as objdump disassembles it."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True,
                         check=True).stdout
    return sorted({m.group(1) for m in AMX_LINE.finditer(out)})


def test_llama_cpp_is_built_and_checked_where_required():
    """`make test` sets QUANTLAB_REQUIRE_LLAMA_CPP: there the llama.cpp tests must run, never skip."""
    if not os.environ.get("QUANTLAB_REQUIRE_LLAMA_CPP"):
        pytest.skip("QUANTLAB_REQUIRE_LLAMA_CPP is not set (make test sets it)")
    llamacpp.locate()


@pytest.mark.skipif(shutil.which("objdump") is None or shutil.which("gcc") is None, reason="needs objdump and gcc")
def test_the_amx_scan_finds_amx_code(tmp_path):
    """The scan below can fail: a library with one tile instruction in it is caught."""
    source = tmp_path / "amx.c"
    source.write_text("void release_tiles(void) { __asm__ volatile (\"tilerelease\"); }\n")
    library = tmp_path / "libamx.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", str(source), "-o", str(library)], check=True)
    assert amx_instructions(library) == ["tilerelease"]


@needs_build
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
def test_no_shipped_cpu_backend_holds_amx_code():
    if AMX_PERMISSION_PER_THREAD:
        pytest.skip("the pinned llama.cpp asks AMX permission per thread: AMX variants may ship")
    bin_dir = llamacpp.locate().bin
    libraries = sorted(bin_dir.glob("libggml-cpu*.so")) or [bin_dir / "libggml.so"]
    found = {lib.name: amx_instructions(lib) for lib in [*libraries, bin_dir / "libggml-base.so"]}
    assert not {name: ops for name, ops in found.items() if ops}, found


@needs_build
def test_the_pinned_llama_cpp_asks_amx_permission_on_the_main_thread_only():
    """The reason AMX is left out. When the pin moves and this fails, read the new tree: if every thread that runs
    tile instructions asks (PR 26954), set AMX_PERMISSION_PER_THREAD and let the build keep its AMX variant."""
    tree = llamacpp.locate().source / "ggml" / "src"
    asking = [(path.relative_to(tree), text) for path in tree.rglob("*.c*")
              if "ARCH_REQ_XCOMP_PERM" in (text := path.read_text(errors="replace"))]
    assert [str(p) for p, _ in asking] == ["ggml-cpu/amx/amx.cpp"]
    amx = asking[0][1]
    calls = [m.start() for m in re.finditer(r"syscall\(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM", amx)]
    assert len(calls) == 1 and amx.rfind("ggml_amx_init", 0, calls[0]) > amx.rfind("\n}\n", 0, calls[0])
    assert not AMX_PERMISSION_PER_THREAD


@needs_build
def test_the_build_says_how_it_was_built():
    info = llamacpp.build_info(llamacpp.locate().root)
    assert info["scheme"] == llamacpp.BUILD_SCHEME and info["sdist"] == llamacpp.SDIST_VERSION
    if info["cpu"] == "portable":
        assert "x64" in info["cpu_backends"] and not any("sapphirerapids" in v for v in info["cpu_backends"])
        on_disk = sorted(p.name for p in llamacpp.locate().bin.glob("libggml-cpu-*.so"))
        assert on_disk == sorted(f"libggml-cpu-{v}.so" for v in info["cpu_backends"])


# ---- refused: stale, unchecked ---------------------------------------------------------------------------------

def fake_build(tmp_path: Path, build: dict | None) -> Path:
    """A .llama.cpp/ with every file quantlab looks for, and the given build.json."""
    root = tmp_path / "llama"
    for path in ("src/vendor/llama.cpp/convert_hf_to_gguf.py", "src/vendor/llama.cpp/gguf-py/x",
                 "build/bin/libllama.so", *(f"build/bin/{t}" for t in llamacpp.TOOLS)):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("")
    if build is not None:
        (root / "build.json").write_text(json.dumps(build))
    return root


CURRENT = {"sdist": llamacpp.SDIST_VERSION, "scheme": llamacpp.BUILD_SCHEME, "cpu": "portable", "cuda": "off"}


@pytest.mark.parametrize("build", [None, {**CURRENT, "scheme": 1}, {**CURRENT, "sdist": "0.3.2"}],
                         ids=["before build.json", "older scheme", "older sdist"])
def test_a_stale_build_is_refused_with_the_command_that_fixes_it(tmp_path, build):
    with pytest.raises(QuantlabError) as err:
        llamacpp.locate(fake_build(tmp_path, build))
    text = str(err.value)
    assert "older llama.cpp build" in text and "`make llama-cpp`" in text and "\n" not in text


def test_a_build_not_checked_on_this_cpu_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(llamacpp.SELF_CHECK_ENV, raising=False)
    root = fake_build(tmp_path, CURRENT)
    with pytest.raises(QuantlabError, match=r"has not passed its self-check on this CPU .*make llama-cpp-check"):
        llamacpp.locate(root)
    tools = llamacpp.locate(root, checked=False)
    llamacpp.write_check(tools, {"cpu": llamacpp.cpu_identity(), "cpu_backend": "haswell"})
    assert llamacpp.locate(root).root == root
    (root / "build.json").write_text(json.dumps({**CURRENT, "exclude": "zen4"}))  # rebuilt since: checked again
    with pytest.raises(QuantlabError, match="self-check"):
        llamacpp.locate(root)
    llamacpp.write_check(tools, {"cpu": llamacpp.cpu_identity()})
    assert llamacpp.locate(root).root == root
    other = {**llamacpp.cpu_identity(), "key": "another-cpu"}  # checked elsewhere only
    shutil.rmtree(root / "checked")
    llamacpp.write_check(tools, {"cpu": other})
    with pytest.raises(QuantlabError, match="self-check"):
        llamacpp.locate(root)


# ---- the self-check --------------------------------------------------------------------------------------------

def build_with_crashing_tool(tmp_path: Path, death: str) -> Path:
    """The real build, but llama-bench dies as `death` says (a shell command: a signal, as on a CPU that refuses an
    instruction, or an error exit)."""
    real = llamacpp.locate()
    root = tmp_path / "llama"
    (root / "build" / "bin").mkdir(parents=True)
    (root / "src").symlink_to(real.root / "src")
    (root / "checked").mkdir()
    (root / "checked" / "gguf").symlink_to(real.root / "checked" / "gguf")
    shutil.copy(real.root / "build.json", root / "build.json")
    for item in real.bin.iterdir():
        (root / "build" / "bin" / item.name).symlink_to(item)
    bench = root / "build" / "bin" / "llama-bench"
    bench.unlink()
    bench.write_text(f"#!/bin/sh\necho 'error: something went wrong' >&2\n{death}\n")
    bench.chmod(0o755)
    return root


@needs_build
@pytest.mark.slow
@pytest.mark.parametrize("death, said, fix", [
    ("kill -s ILL $$", "died with SIGILL", "make llama-cpp LLAMA_CPU_EXCLUDE="),
    ("kill -s SEGV $$", "died with SIGSEGV", "make llama-cpp LLAMA_CPU_EXCLUDE="),
    ("exit 3", "exited with status 3", "the last output says why"),  # not a crash: no variant to blame
])
def test_a_crash_fails_the_self_check_with_one_line_naming_cpu_and_backend(tmp_path, death, said, fix):
    root = build_with_crashing_tool(tmp_path, death)
    done = subprocess.run([sys.executable, "-m", "quantlab.llamacpp.check", "--root", str(root)], capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    line = lines[0]
    cpu = llamacpp.cpu_identity()
    backend = json.loads((llamacpp.locate().root / "checked" / f"{cpu['key']}.json").read_text())["cpu_backend"]
    assert line.startswith("llama.cpp self-check FAILED: llama-bench on the Q8_0 GGUF " + said)
    assert cpu["model"] in line and f"CPU backend {backend}" in line
    assert "Fix: " in line and fix in line and "make llama-cpp" in line
    assert "(last output: error: something went wrong)" in line
    assert not (root / "checked" / f"{cpu['key']}.json").exists()  # a failed check is never remembered as passed


def test_a_ggml_library_from_another_folder_is_found(tmp_path):
    own = tmp_path / "build" / "bin"
    own.mkdir(parents=True)
    for name in ("libllama.so", "libggml.so.0.25.3", "libggml-cpu-haswell.so"):
        (own / name).write_bytes(b"")
    (own / "libggml.so.0").symlink_to("libggml.so.0.25.3")
    moved_from = "/tmp/elsewhere/.llama.cpp/build/bin/libggml-base.so.0.25.3"
    maps = "\n".join([
        f"7f00-7f01 r-xp 00000000 fd:01 1 {own / 'libllama.so'}",
        f"7f01-7f02 r-xp 00000000 fd:01 2 {own / 'libggml.so.0.25.3'}",
        f"7f02-7f03 r--p 00000000 fd:01 3 {own / 'libggml-cpu-haswell.so'}",
        f"7f03-7f04 r-xp 00000000 fd:01 4 {moved_from}",
        "7f04-7f05 r-xp 00000000 fd:01 5 /usr/lib/x86_64-linux-gnu/libc.so.6",
        "7f05-7f06 rw-p 00000000 00:00 0 ",
    ])
    assert llamacpp.foreign_libraries(own, maps) == [moved_from]
    assert llamacpp.foreign_libraries(own, maps.replace(moved_from, str(own / "libggml.so.0"))) == []


@needs_build
@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf")
def test_the_build_finds_its_libraries_beside_itself():
    """RUNPATH $ORIGIN only: a .llama.cpp/ moved or copied elsewhere loads its own libraries, not the old folder's."""
    tools = llamacpp.locate()
    elves = [p for p in tools.bin.iterdir() if p.is_file() and not p.is_symlink() and p.read_bytes()[:4] == b"\x7fELF"]
    assert any(p.name.startswith("libllama.so") for p in elves)
    for elf in elves:
        dynamic = subprocess.run(["readelf", "-d", str(elf)], capture_output=True, text=True, check=True).stdout
        paths = re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[(.*)\]", dynamic)
        assert all(set(filter(None, p.split(":"))) <= {"$ORIGIN"} for p in paths), (elf.name, paths)


def test_the_runtime_refuses_a_ggml_from_another_folder(monkeypatch, tmp_path):
    from quantlab.llamacpp import binding as runtime
    from quantlab.llamacpp import tools

    class FakeGgml:
        def __init__(self, *args):
            self.ggml_backend_load_all_from_path = lambda path: None
            self.ggml_backend_reg_count = lambda: 1

    bin_dir = tmp_path / ".llama.cpp" / "build" / "bin"
    bin_dir.mkdir(parents=True)
    monkeypatch.setattr(runtime.ctypes, "CDLL", FakeGgml)
    monkeypatch.setattr(tools, "foreign_libraries", lambda own: ["/old/place/build/bin/libggml-base.so"])
    with pytest.raises(QuantlabError, match=r"loaded /old/place/build/bin/libggml-base.so, not its own copy.*rm -r"):
        runtime._load_backends(bin_dir)
    monkeypatch.setattr(tools, "foreign_libraries", lambda own: [])
    runtime._load_backends(bin_dir)


@needs_build
def test_the_check_of_this_build_passed_here_and_names_the_backend():
    passed = llamacpp.check_record(llamacpp.locate())
    assert passed["types"] == ["Q8_0", "Q4_K_M"] and passed["threads"] >= 2
    info = llamacpp.build_info(llamacpp.locate().root)
    assert passed["cpu_backend"] in info["cpu_backends"]
    assert passed["system_info"].startswith("CPU :") or "CPU" in passed["system_info"]


@needs_build
def test_llama_cpp_records_name_the_cpu_backend_that_ran():
    from quantlab.llamacpp.binding import load_gguf_for_check
    from quantlab.runtimes.libllama import LlamaCppRuntime

    gguf = llamacpp.locate().root / "checked" / "gguf" / "bundled-q8_0.gguf"
    model = load_gguf_for_check(gguf, threads=2)
    try:
        kernels = LlamaCppRuntime().kernels(model)
    finally:
        model.close()
    passed = llamacpp.check_record(llamacpp.locate())
    assert kernels.cpu_backend.startswith(f"ggml-cpu {passed['cpu_backend']} (")
    assert "AVX" in kernels.cpu_backend or passed["cpu_backend"] in ("x64", "sse42")
