"""quantlab's locked Python stack: `make setup` installs exactly the versions in requirements/lock-*.txt (hashes
checked), and `make lock` resolves the newest versions pyproject.toml allows, runs the whole test suite with them,
and writes the lock only if it passed.

    python3 scripts/pystack.py setup [--venv .venv] [--torch torch==2.13.0]
    python3 scripts/pystack.py lock  [--venv .lock-venv] [--torch torch==2.13.0] [--skip-tests]

One lock per CPython minor version on Linux x86-64 (requirements/lock-cp311-linux-x86_64.txt): wheels differ per
version. torch is not in a lock: it is pinned by version (TORCH in the Makefile) and installed first, since the same
version is a CPU build on a machine without a GPU and a CUDA build elsewhere, with different files and hashes; its
own dependencies are in the lock. pyproject.toml keeps the supported ranges; a lock records a hash of them, and a
lock made for other ranges is refused. Standard library only: it runs before the venv exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ROOT / "requirements"
EXTRAS = "dev,quant,plot,gguf"
DEFAULT_TORCH = "torch==2.13.0"
STAMP = ".installed"
LOCKING_ENV = "QUANTLAB_LOCKING"  # set while `make lock` runs the suite: the lock it tests is not written yet
UNLOCKED = {"torch", "quantlab", "llama-cpp-python", "pip"}  # pinned elsewhere, or not from an index
# What only a CUDA build of torch brings (its CUDA libraries and triton): they come with torch's own file, by its
# own pins, and a CPU build has none of them.
TORCH_BUILD_PREFIXES = ("nvidia-", "cuda-", "triton")  # of torch's own install only
LLAMA_SDIST = ROOT / ".llama.cpp" / "download" / "llama_cpp_python-0.3.36.tar.gz"


class StackError(Exception):
    """One line for the user: what is wrong and the command that fixes it."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("setup", "lock", "check", "path"))
    p.add_argument("--venv", type=Path, default=None)
    p.add_argument("--torch", default=DEFAULT_TORCH, help="the torch requirement installed first")
    p.add_argument("--skip-tests", action="store_true", help="lock: write it without running the suite (not for main)")
    args = p.parse_args(argv)
    try:
        if args.command == "path":
            print(lock_path().relative_to(ROOT))
        elif args.command == "check":
            check_lock(lock_path())
            print(f"{lock_path().relative_to(ROOT)} fits Python {platform.python_version()} and pyproject.toml")
        elif args.command == "setup":
            setup(args.venv or ROOT / ".venv", args.torch)
        else:
            lock(args.venv or ROOT / ".lock-venv", args.torch, run_tests=not args.skip_tests)
    except StackError as exc:
        print(f"{args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


# ---- which lock, and does it fit -------------------------------------------------------------------------------

def python_tag(version: tuple[int, int] | None = None) -> str:
    major, minor = version or sys.version_info[:2]
    return f"cp{major}{minor}"


def platform_tag() -> str:
    return f"{platform.system().lower()}-{platform.machine().lower()}"


def lock_path(version: tuple[int, int] | None = None) -> Path:
    return LOCKS / f"lock-{python_tag(version)}-{platform_tag()}.txt"


def available_locks() -> list[str]:
    return sorted(p.name for p in LOCKS.glob("lock-*.txt"))


def _python_of(lock_name: str) -> str:
    """lock-cp312-linux-x86_64.txt -> python3.12"""
    digits = lock_name.split("-")[1].removeprefix("cp")
    return f"python{digits[0]}.{digits[1:]}"


def ranges_hash(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """A hash of what the lock must satisfy: requires-python, the dependencies and the optional dependencies."""
    project = _toml(pyproject).get("project", {})
    ranges = {k: project.get(k) for k in ("requires-python", "dependencies", "optional-dependencies")}
    return hashlib.sha256(json.dumps(ranges, sort_keys=True).encode()).hexdigest()[:16]


def _toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pip carries tomli
        from pip._vendor import tomli as tomllib
    return tomllib.loads(path.read_text(encoding="utf-8"))


def header_fields(lock: Path) -> dict[str, str]:
    fields = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        if line.startswith("# ") and ": " in line and line[2:].split(": ", 1)[0].isidentifier():
            key, value = line[2:].split(": ", 1)
            fields[key] = value.strip()
    return fields


def check_supported() -> None:
    """A StackError when pyproject.toml's requires-python does not admit this Python (no lock can be made for it)."""
    try:
        from pip._vendor.packaging.specifiers import SpecifierSet
    except ImportError:  # a Python without pip: making its venv fails next, with pip's own message
        return
    wanted = _toml(ROOT / "pyproject.toml").get("project", {}).get("requires-python", "")
    if platform.python_version() not in SpecifierSet(wanted):
        have = available_locks()
        use = f": `make setup PYTHON={_python_of(have[0])}`" if have else ""
        raise StackError(f"quantlab supports Python {wanted} (pyproject.toml), not {platform.python_version()}; use "
                         f"one of those{use}")


def check_lock(lock: Path) -> dict[str, str]:
    """The lock's header, or a StackError saying why this Python or this pyproject cannot use it."""
    here = f"Python {platform.python_version()} on {platform_tag()}"
    check_supported()
    if not lock.is_file():
        have = available_locks()
        other = next((_python_of(name) for name in have if platform_tag() in name), None)
        use = f"use a Python that has one (`make setup PYTHON={other}`), or " if other else ""
        raise StackError(f"no lock for {here} (locks: {', '.join(have) or 'none'}); {use}lock for this one: "
                         f"`make lock PYTHON={sys.executable}` (resolves the newest versions in range and runs the "
                         "whole suite)")
    fields = header_fields(lock)
    if fields.get("python") != python_tag() or fields.get("platform") != platform_tag():
        raise StackError(f"{lock.name} says it is for {fields.get('python')} on {fields.get('platform')}, not {here}: "
                         f"remake it with `make lock PYTHON={sys.executable}`")
    if fields.get("ranges") != ranges_hash():
        raise StackError(f"{lock.name} was made for other dependency ranges than pyproject.toml's now: refresh it with "
                         f"`make lock PYTHON={sys.executable}` (resolves and runs the whole suite)")
    return fields


# ---- setup: a venv with exactly the locked versions --------------------------------------------------------------

def setup(venv: Path, torch: str) -> None:
    fields = check_lock(lock_path())
    _replace_own_venv(venv)
    start = time.monotonic()
    print(f"setting up {venv.name} from {lock_path().name}: Python {platform.python_version()}, {torch}, "
          "then the locked packages (a few minutes the first time)", flush=True)
    _make_venv(venv, fields.get("pip"))
    python = venv / "bin" / "python"
    _pip(python, "install", "--quiet", torch)
    _pip(python, "install", "--quiet", "--no-deps", "--require-hashes", "-r", str(lock_path()))
    _pip(python, "install", "--quiet", "--no-deps", "-e", str(ROOT))
    _pip_check(python)
    (venv / STAMP).write_text(json.dumps({"lock": lock_path().name, "torch": torch}) + "\n", encoding="utf-8")
    print(f"{venv.name}: ready in {time.monotonic() - start:.0f} s ({lock_path().name})")


def _replace_own_venv(venv: Path) -> None:
    """A venv this script made is replaced whole (a lock changed); any other folder there is left alone."""
    if not venv.exists():
        return
    if not (venv / STAMP).is_file() and not (venv / ".quantlab-partial").is_file():
        raise StackError(f"{venv} exists but quantlab's setup did not make it; move it away (or set VENV=...) and "
                         "run `make setup` again")
    shutil.rmtree(venv)


def _make_venv(venv: Path, pip_version: str | None) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    (venv / ".quantlab-partial").write_text("made by scripts/pystack.py; not finished\n", encoding="utf-8")
    _pip(venv / "bin" / "python", "install", "--quiet", f"pip=={pip_version}" if pip_version else "--upgrade", "pip")


def _pip(python: Path, *args: str) -> None:
    done = subprocess.run([str(python), "-m", "pip", *args, "--disable-pip-version-check"])
    if done.returncode != 0:
        raise StackError(f"`pip {' '.join(a for a in args if a != '--quiet')}` failed (above)")


def _pip_check(python: Path) -> None:
    done = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True)
    if done.returncode != 0:
        raise StackError(f"the installed packages do not fit together: {done.stdout.strip().splitlines()[0]}")


# ---- lock: resolve, test, write ----------------------------------------------------------------------------------

def lock(venv: Path, torch: str, run_tests: bool) -> None:
    check_supported()
    if venv.exists():
        _replace_own_venv(venv)
    start = time.monotonic()
    print(f"lock: resolving the newest versions pyproject.toml allows for Python {platform.python_version()}, "
          f"in a fresh {venv.name}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    (venv / ".quantlab-partial").write_text("made by scripts/pystack.py lock\n", encoding="utf-8")
    python = venv / "bin" / "python"
    _pip(python, "install", "--quiet", "--upgrade", "pip")
    with tempfile.TemporaryDirectory() as tmp:
        reports = [Path(tmp) / "torch.json", Path(tmp) / "quantlab.json"]
        _pip(python, "install", "--quiet", "--report", str(reports[0]), torch)
        _pip(python, "install", "--quiet", "--report", str(reports[1]), "-e", f"{ROOT}[{EXTRAS}]")
        pins = locked_pins(reports[1:], torch_report=reports[0])
    _install_llama_binding(python)
    _pip_check(python)
    outcome = _run_suite(python) if run_tests else "the suite was NOT run (--skip-tests)"
    text = lock_text(pins, _pip_version(python), torch, outcome)
    target = lock_path()
    target.parent.mkdir(exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(target)
    (venv / STAMP).write_text(json.dumps({"lock": target.name}) + "\n", encoding="utf-8")
    (venv / ".quantlab-partial").unlink()
    print(f"lock: wrote {target.relative_to(ROOT)} ({len(pins)} packages; {outcome}) in {time.monotonic() - start:.0f} s")


def locked_pins(reports: list[Path], torch_report: Path | None = None) -> dict[str, tuple[str, str]]:
    """name -> (version, sha256) of every distribution pip installed from an index, from its install reports; of
    torch's own install (`torch_report`), not what only its CUDA build brings."""
    pins = {}
    for report in ([torch_report] if torch_report else []) + reports:
        for item in json.loads(report.read_text(encoding="utf-8")).get("install", []):
            meta = item["metadata"]
            name = meta["name"].lower().replace("_", "-")
            if name in UNLOCKED or (report == torch_report and name.startswith(TORCH_BUILD_PREFIXES)):
                continue
            hashes = item.get("download_info", {}).get("archive_info", {}).get("hashes", {})
            if "sha256" not in hashes:
                raise StackError(f"pip gave no sha256 for {name} {meta['version']} "
                                 f"({item.get('download_info', {}).get('url')}); it cannot be locked")
            pins[name] = (meta["version"], hashes["sha256"])
    return dict(sorted(pins.items()))


def _install_llama_binding(python: Path) -> None:
    """The llama_cpp binding, as scripts/build_llama_cpp.sh installs it (its dependencies are in the lock)."""
    if not LLAMA_SDIST.is_file():
        raise StackError(f"{LLAMA_SDIST} is missing: build llama.cpp first (`make llama-cpp`), the suite needs it")
    env = {**os.environ, "CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"}
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(LLAMA_SDIST)], env=env)
    if done.returncode != 0:
        raise StackError("installing the llama_cpp binding failed (above)")


def _run_suite(python: Path) -> str:
    print("lock: the whole test suite, with exactly these versions (about 10 minutes on 2 cores)", flush=True)
    env = {**os.environ, "QUANTLAB_REQUIRE_LLAMA_CPP": "1", LOCKING_ENV: "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = "no output"
    for line in proc.stdout:  # pytest's own progress, as it comes
        print(line, end="", flush=True)
        last = line.strip() or last
    summary = last.strip("= ")
    if proc.wait() != 0:
        raise StackError(f"the suite failed with the newest versions ({summary}); the lock was not written. Fix "
                         "the code or narrow the range in pyproject.toml, then `make lock` again")
    return f"suite: {summary}"


def _pip_version(python: Path) -> str:
    out = subprocess.run([str(python), "-m", "pip", "--version"], capture_output=True, text=True).stdout
    return out.split()[1]


def lock_text(pins: dict[str, tuple[str, str]], pip_version: str, torch: str, outcome: str) -> str:
    head = [
        "# quantlab's locked Python stack, written by `make lock` (scripts/pystack.py); `make setup` installs exactly this.",
        "# Each line is one file, checked by its sha256. torch is not here: `make setup` installs it first, by version.",
        f"# python: {python_tag()}",
        f"# platform: {platform_tag()}",
        f"# ranges: {ranges_hash()}",
        f"# pip: {pip_version}",
        f"# torch: {torch}",
        f"# tested: {outcome}",
        f"# made: {time.strftime('%Y-%m-%d', time.gmtime())}",
        "",
    ]
    body = [f"{name}=={version} \\\n    --hash=sha256:{digest}" for name, (version, digest) in pins.items()]
    return "\n".join(head + body) + "\n"


if __name__ == "__main__":
    sys.exit(main())
