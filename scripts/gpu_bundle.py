"""`make gpu-bundle`: the wheels an offline GPU box needs for `make gpu-check-all`, made here, in .whl/.

The lent GPU machine has Python 3.12, torch 2.11 (CUDA 13), transformers 5.17, accelerate, safetensors,
numpy, psutil, pyyaml, tqdm, nvidia-ml-py and triton, and no internet. What quantlab needs beyond that:
  core  pydantic (+ pydantic-core, annotated-types, typing-inspection, typing-extensions), bitsandbytes,
        gptqmodel (transformers loads AWQ through its kernels) and its sdist-only needs
  gpu   flash-linear-attention + fla-core (pure Python/Triton DeltaNet kernels), installed there only when
        a GPU is visible: on a CPU machine they break the qwen3_5 forward
Binary wheels come from the package index for the box's Python; packages published only as sdists are
built here with a Python of that version (GPU_PYTHON, default python3.12). .whl/core.txt and .whl/gpu.txt
pin what scripts/gpu_env.sh installs there.

It prints what would travel to the GPU box (the working tree plus the bundle) and fails above the limit.

    python scripts/gpu_bundle.py [--python-version 3.12] [--limit-mib 60]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / ".whl"
MANIFEST = BUNDLE / "bundle.json"  # the files this script made: the only ones it ever removes
BINARY_CORE = ("pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
               "typing-extensions==4.16.0", "bitsandbytes==0.50.2")
SDIST_CORE = ("gptqmodel==7.6.0", "pypcre==0.6.4", "tokenicer==0.0.14", "logbar==0.4.15", "device-smi==0.5.7",
              "defuser==0.0.28")
BINARY_GPU = ("flash-linear-attention==0.6.0", "fla-core==0.6.0")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")
MIB = 1 << 20


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    gpu_python = _gpu_python(args.python_version)
    if args.print_python:
        print(gpu_python)
        return 0
    BUNDLE.mkdir(exist_ok=True)
    _remove_previous()
    before = set(BUNDLE.glob("*.whl"))
    _download(BINARY_CORE + BINARY_GPU, args.python_version)
    _build(SDIST_CORE, gpu_python)
    made = sorted(set(BUNDLE.glob("*.whl")) - before)
    (BUNDLE / "core.txt").write_text("\n".join(BINARY_CORE + SDIST_CORE) + "\n")
    (BUNDLE / "gpu.txt").write_text("\n".join(BINARY_GPU) + "\n")
    MANIFEST.write_text(json.dumps({"python": args.python_version, "files": [p.name for p in made]}, indent=1) + "\n")
    return _report(made, args.limit_mib)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python-version", default="3.12", help="the GPU box's Python (default 3.12)")
    p.add_argument("--limit-mib", type=float, default=60.0, help="fail when the tree plus the bundle exceed this")
    p.add_argument("--print-python", action="store_true", help="print the Python of that version found here, and stop")
    return p


def _gpu_python(version: str) -> str:
    """A Python of the box's version, to build the sdist-only packages (one has a C extension)."""
    candidates = [os.environ.get("GPU_PYTHON"), f"python{version}",
                  *sorted(str(p) for p in Path.home().glob(f".pyenv/versions/{version}*/bin/python{version}"))]
    for candidate in filter(None, candidates):
        path = shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
        if path and subprocess.run([path, "--version"], capture_output=True).returncode == 0:
            return path
    raise SystemExit(f"gpu-bundle: no Python {version} found to build the sdist-only packages; install one "
                     f"(e.g. pyenv install {version}) or set GPU_PYTHON=/path/to/python{version}")


def _remove_previous() -> None:
    if not MANIFEST.is_file():
        return
    for name in json.loads(MANIFEST.read_text()).get("files", []):
        (BUNDLE / Path(name).name).unlink(missing_ok=True)


def _download(requirements: tuple[str, ...], version: str) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    _pip(sys.executable, "download", "--no-deps", "--only-binary=:all:", "--python-version", version,
         "--implementation", "cp", *platforms, "-d", str(BUNDLE), *requirements)


def _build(requirements: tuple[str, ...], python: str) -> None:
    _pip(python, "wheel", "--no-deps", "-w", str(BUNDLE), *requirements)


def _pip(python: str, *args: str) -> None:
    command = [python, "-m", "pip", "-q", "--disable-pip-version-check", *args]
    print("$", " ".join(command), flush=True)
    if subprocess.run(command, env={**os.environ, "BUILD_CUDA_EXT": "0"}).returncode != 0:
        raise SystemExit(f"gpu-bundle: pip {args[0]} failed")


def _report(made: list[Path], limit_mib: float) -> int:
    tree = _tree_bytes()
    bundle = sum(p.stat().st_size for p in BUNDLE.iterdir() if p.is_file())
    print(f"\nbundle .whl/: {len(made)} wheels, {bundle / MIB:.1f} MiB")
    for path in sorted(made, key=lambda p: -p.stat().st_size):
        print(f"  {path.stat().st_size / MIB:7.2f} MiB  {path.name}")
    total = tree + bundle
    print(f"working tree {tree / MIB:.1f} MiB + bundle {bundle / MIB:.1f} MiB = {total / MIB:.1f} MiB "
          f"to travel (limit {limit_mib:g} MiB)")
    if total > limit_mib * MIB:
        print(f"gpu-bundle: {total / MIB:.1f} MiB is over the {limit_mib:g} MiB limit", file=sys.stderr)
        return 1
    return 0


def _tree_bytes() -> int:
    """Tracked files plus untracked files git does not ignore: what the device tool sends."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / name.decode()).stat().st_size for name in listed if name and (REPO / name.decode()).is_file())


if __name__ == "__main__":
    sys.exit(main())
