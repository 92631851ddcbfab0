"""The one GPU check (`make gpu-check-all`): every GPU measurement quantlab owes the article's table, in
priority order, each step in its own process, stopping cleanly as the time runs out.

  1. bf16   BF16 full-size synthetic Qwen3.6-27B text model at 1k, 32k and 128k: VRAM after load, peak and
            nvidia-smi per phase, prefill and decode tok/s, share of the bandwidth roofline
  2. nf4    bitsandbytes NF4 at 1k and 32k
     awq    AWQ W4A16 g128, round-to-nearest packed (random weights have nothing to calibrate on), 1k and 32k
  3. int8   bitsandbytes LLM.int8 at 1k
  4. tests  the gpu-marked tests

Recipes: recipes/gpu-check/. Records are appended point by point, so a step stopped at its time limit keeps
every point it finished; with $OUT set (the device tool), they are also packed into $OUT after every step
with the log and a summary table, so an interrupted run still returns what it measured.

Time budget (default 500 s of wall time in all, --budget-s): a step starts only when its minimum fits in
what is left, and is stopped (SIGINT, then SIGKILL) at its cap or at the deadline. What the CPU side can
measure (scripts/bench_gpu_check_cpu_side.py, on this project's 2-core CPU machine):
  plans on the meta device       0.06-1.6 s per recipe (no weights are touched before a step's load)
  AWQ checkpoint                 18.70 GB to write (VL layout); quantlab's shard writer put 0.26 GB/s on this
                                 machine's disk (72 s) and 0.5-1.0 GB/s on its /dev/shm (19-37 s): the AWQ step
                                 writes to /dev/shm when it has room
  AWQ synthetic packing          5.4 s per full-size layer on 2 CPU threads (343 s for 64): an upper bound; on
                                 a GPU, initialising and packing a layer is a few hundred milliseconds
The GPU side is estimated, not measured (no GPU has run it yet): instantiating 54 GB of BF16 on the GPU takes
seconds; per point, 1 warm-up + 3 repeats of a prefill and 64 decode steps, with the 128k prefill the longest.
  preflight (versions, fla check)    ~25 s   Triton compiles fla's kernels once
  bf16   cap 240 s      nf4   cap 110 s      awq   cap 180 s      int8   cap 80 s      tests   cap 60 s
The caps add up to more than the budget on purpose: what runs first gets the time it needs.

`--rehearse` runs the same steps, through the same code, on the CPU with the bundled model's config in place
of the 27B (contexts 128 / 256 / 512, AWQ on gptqmodel's CPU kernel) and writes to a temporary folder:
`make gpu-rehearse` does that in a fresh environment built like the GPU box, with no network.

    python scripts/gpu_check_all.py [--budget-s 500] [--only bf16,awq] [--output DIR] [--rehearse]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes" / "gpu-check"
RESERVE_S = 12  # kept back at the end for the summary and the last pack
REHEARSAL_CONTEXTS = {1024: 128, 32768: 256, 131072: 512}
AWQ_TMPFS = Path("/dev/shm")
AWQ_TMPFS_NEEDS = 25e9  # the 27B's AWQ shards are ~17 GB


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    recipe: str | None  # None: the gpu-marked tests
    cap_s: int
    min_s: int


STEPS = (
    Step("bf16", "BF16, contexts 1k / 32k / 128k", "qwen3.6-27b-bf16.yaml", 240, 90),
    Step("nf4", "bitsandbytes NF4, contexts 1k / 32k", "qwen3.6-27b-nf4.yaml", 110, 60),
    Step("awq", "AWQ W4A16 g128 (RTN-packed), contexts 1k / 32k", "qwen3.6-27b-awq.yaml", 180, 70),
    Step("int8", "bitsandbytes LLM.int8, context 1k", "qwen3.6-27b-int8.yaml", 80, 45),
    Step("tests", "the gpu-marked tests", None, 60, 25),
)


class Log:
    """Everything printed goes to the terminal and, line by line, to the log file."""

    def __init__(self, path: Path | None):
        self.file = open(path, "a", encoding="utf-8") if path else None
        self.lock = threading.Lock()

    def __call__(self, line: str = "") -> None:
        with self.lock:
            print(line, flush=True)
            if self.file:
                self.file.write(line + "\n")
                self.file.flush()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    started_utc = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    out_env = os.environ.get("OUT")
    pack_dir = Path(out_env) if out_env else None
    output = Path(args.output) if args.output else _default_output(args.rehearse, pack_dir)
    log = Log(pack_dir / "gpu-check.log" if pack_dir else None)
    steps = _selected(args.only)
    if not args.rehearse and not _gpu_visible():
        log("error: no NVIDIA GPU is visible (nvidia-smi -L). On a CPU machine, `make gpu-rehearse` runs this check's "
            "rehearsal with the bundled model.")
        return 2
    log(f"quantlab GPU check{' REHEARSAL (CPU, bundled model)' if args.rehearse else ''}: budget {args.budget_s} s, "
        f"steps {', '.join(s.name for s in steps)}; records to {output}/records/")
    env = dict(os.environ)
    _environment(log, env)
    outcomes = []
    if not args.rehearse and env.get("QUANTLAB_FLA_SITE"):
        outcomes.append(_fla_preflight(env, log, min(90, _left(deadline))))
    recipes = _recipes(steps, args.rehearse, log)
    for step in steps:
        outcomes.append(_run_step(step, recipes.get(step.name), output, env, deadline, args.rehearse, log))
        _pack(pack_dir, output, log)
    summary = _summary(output, started_utc, outcomes, args.rehearse)
    log()
    for line in summary:
        log(line)
    if pack_dir:
        (pack_dir / "gpu-check-summary.md").write_text("\n".join(summary) + "\n", encoding="utf-8")
    _pack(pack_dir, output, log)
    return 0 if all(o.ok for o in outcomes) else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=int, default=500, help="wall-clock budget for all steps (default 500)")
    p.add_argument("--only", help=f"comma-separated steps, of: {', '.join(s.name for s in STEPS)}")
    p.add_argument("--output", help="measurements folder (default: measurements/, or a temporary one for --rehearse)")
    p.add_argument("--rehearse", action="store_true", help="CPU rehearsal with the bundled model's config")
    return p


def _selected(only: str | None) -> tuple[Step, ...]:
    if not only:
        return STEPS
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in {s.name for s in STEPS}]
    if unknown:
        raise SystemExit(f"--only: unknown step(s) {unknown}; steps: {', '.join(s.name for s in STEPS)}")
    return tuple(s for s in STEPS if s.name in names)


def _default_output(rehearse: bool, pack_dir: Path | None) -> Path:
    if rehearse or pack_dir:  # a rehearsal's records are never real; the device tool returns a pack, not a folder
        return Path(tempfile.mkdtemp(prefix="quantlab-gpu-check-")) / "measurements"
    return REPO / "measurements"


def _gpu_visible() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _left(deadline: float) -> float:
    return deadline - time.monotonic() - RESERVE_S


# ---- what the machine has ------------------------------------------------------------------------------

_VERSIONS = """
import importlib.metadata as md, platform, sys
import torch
names = ("torch", "transformers", "accelerate", "safetensors", "triton", "bitsandbytes", "gptqmodel", "pydantic",
         "flash-linear-attention", "fla-core", "causal-conv1d", "numpy")
found = []
for n in names:
    try:
        found.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        found.append(f"{n} -")
print(f"python {platform.python_version()}; " + ", ".join(found))
print(f"torch CUDA {torch.version.cuda}; GPU visible to torch: {torch.cuda.is_available()}")
"""


def _environment(log: Log, env: dict[str, str]) -> None:
    if _gpu_visible():
        _stream(["nvidia-smi", "--query-gpu=name,memory.total,memory.used,driver_version", "--format=csv"], env, log, 30)
    _stream([sys.executable, "-c", _VERSIONS], env, log, 120)


# ---- flash-linear-attention: checked against transformers' own torch reference before it is trusted ------

_FLA_CHECK = ("from quantlab.kernels import check_deltanet_against_reference\n"
              "check_deltanet_against_reference('cuda')\n")  # a process of its own: CUDA and fla stay out of this one


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str  # ok | failed | stopped | skipped
    seconds: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _fla_preflight(env: dict[str, str], log: Log, timeout: float) -> Outcome:
    """flash-linear-attention's DeltaNet kernels vs transformers' torch reference, on this GPU. If they fail or
    disagree, the steps run without fla (transformers then falls back to torch), and the records say so."""
    log("\n== preflight: flash-linear-attention against transformers' torch reference")
    start = time.monotonic()
    rc = _stream([sys.executable, "-c", _FLA_CHECK], env, log, timeout)
    seconds = time.monotonic() - start
    if rc == 0:
        return Outcome("fla preflight", "ok", seconds, "DeltaNet runs on flash-linear-attention")
    site = env.pop("QUANTLAB_FLA_SITE")
    env["PYTHONPATH"] = os.pathsep.join(p for p in env["PYTHONPATH"].split(os.pathsep) if p != site)
    log("fla preflight failed: the steps run without it (DeltaNet on transformers' torch fallback)")
    return Outcome("fla preflight", "failed", seconds, "fla left out: DeltaNet on the torch fallback")


# ---- the steps ------------------------------------------------------------------------------------------

def _recipes(steps: tuple[Step, ...], rehearse: bool, log: Log) -> dict[str, Path]:
    recipes = {s.name: RECIPES / s.recipe for s in steps if s.recipe}
    if not rehearse:
        return {k: v.relative_to(REPO) for k, v in recipes.items()}
    import yaml

    folder = Path(tempfile.mkdtemp(prefix="quantlab-rehearsal-recipes-"))
    log(f"rehearsal: model.config qwen3.6-27b -> bundled, device cuda -> cpu, contexts {REHEARSAL_CONTEXTS}, "
        f"no awq_kernel (gptqmodel picks its CPU kernel); recipes in {folder}")
    rewritten = {}
    for name, path in recipes.items():
        data = yaml.safe_load(path.read_text())
        data["model"].update(config="bundled", device="cpu")
        data["model"].pop("awq_kernel", None)
        data["measure"]["contexts"] = [REHEARSAL_CONTEXTS[c] for c in data["measure"]["contexts"]]
        rewritten[name] = folder / path.name
        rewritten[name].write_text(yaml.safe_dump(data, sort_keys=False))
    return rewritten


def _run_step(step: Step, recipe: Path | None, output: Path, env: dict[str, str], deadline: float, rehearse: bool,
              log: Log) -> Outcome:
    left = _left(deadline)
    log(f"\n== step {step.name}: {step.what} ({left:.0f} s left of the budget)")
    if left < step.min_s:
        log(f"skipped: it needs at least {step.min_s} s")
        return Outcome(step.name, "skipped", 0.0, f"not started: {left:.0f} s left, it needs {step.min_s} s")
    if recipe is None:
        command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *_gpu_test_files()]
    else:
        command = [sys.executable, "-m", "quantlab", "measure", str(recipe), "--output", str(output), "--no-progress"]
    step_env = dict(env)
    if step.name == "awq" and not rehearse and _tmpfs_has_room():
        step_env["TMPDIR"] = str(AWQ_TMPFS)  # the temporary checkpoint: RAM-backed, not the disk
        log(f"the AWQ checkpoint is written to {AWQ_TMPFS} (tmpfs)")
    timeout = min(step.cap_s, left)
    start = time.monotonic()
    rc = _stream(command, step_env, log, timeout)
    seconds = time.monotonic() - start
    if rc is None:
        return Outcome(step.name, "stopped", seconds, f"stopped at its limit ({timeout:.0f} s); finished points are kept")
    return Outcome(step.name, "ok" if rc == 0 else "failed", seconds, "" if rc == 0 else f"exit code {rc}")


def _gpu_test_files() -> list[str]:
    tests = sorted((REPO / "tests").glob("test_*.py"))
    return [str(t.relative_to(REPO)) for t in tests if "mark.gpu" in t.read_text(encoding="utf-8")]


def _tmpfs_has_room() -> bool:
    try:
        return AWQ_TMPFS.is_dir() and shutil.disk_usage(AWQ_TMPFS).free > AWQ_TMPFS_NEEDS
    except OSError:
        return False


def _stream(command: list[str], env: dict[str, str], log: Log, timeout: float) -> int | None:
    """Run a command, its output line by line into the log. None when it was stopped at `timeout`."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=REPO, start_new_session=True, errors="replace")
    pump = threading.Thread(target=lambda: [log("  " + line.rstrip()) for line in proc.stdout], daemon=True)
    pump.start()
    try:
        rc = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        _stop(proc, log)
        rc = None
    pump.join(timeout=10)
    return rc


def _stop(proc: subprocess.Popen, log: Log) -> None:
    """SIGINT first: quantlab stops between points and keeps every record it wrote; then SIGKILL."""
    log("  (time limit reached: interrupting)")
    for sig, grace in ((signal.SIGINT, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


# ---- what comes back ------------------------------------------------------------------------------------

def _pack(pack_dir: Path | None, output: Path, log: Log) -> None:
    """The records so far as one tar in $OUT (the device tool returns at most 8 files, 2 folders deep)."""
    records = output / "records"
    if pack_dir is None or not records.is_dir():
        return
    tmp = pack_dir / ".gpu-check-records.tar.partial"
    with tarfile.open(tmp, "w") as tar:
        for path in sorted(records.glob("*.json")):
            tar.add(path, arcname=f"records/{path.name}")
    os.replace(tmp, pack_dir / "gpu-check-records.tar")


def _summary(output: Path, started_utc: str, outcomes: list[Outcome], rehearse: bool) -> list[str]:
    from quantlab.store import load_records

    records = [r for r in load_records(output)[0] if r.created_at[:19] >= started_utc]
    title = "quantlab GPU check" + (" - REHEARSAL on the CPU (bundled model config; not a GPU result)" if rehearse else "")
    lines = [f"## {title}", "", "| Step | Status | Seconds | Detail |", "|---|---|--:|---|"]
    lines += [f"| {o.name} | {o.status} | {o.seconds:.0f} | {o.detail} |" for o in outcomes]
    lines += ["", "| Method | Context | After load | Prefill peak | Decode peak | nvidia-smi peak | Prefill tok/s | "
              "Decode tok/s | Roofline | DeltaNet | Linear | Runs in |", "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|---|"]
    lines += [_summary_row(r) for r in records]
    hardware = sorted({f"{r.hardware.kind.upper()} {r.hardware.name}, {r.model.weights} weights" for r in records})
    lines += ["", f"Records: {len(records)} in {output}/records/ ({'; '.join(hardware) or 'none'}). GB = 1e9 bytes; "
              "GPU: torch allocated (after load) and allocator peaks; CPU: RSS growth while loading and the "
              "process's RSS peaks; nvidia-smi = NVML, labelled process or device; "
              "peaks are each phase's own (it starts after gc.collect() and torch.cuda.empty_cache())."]
    return lines


def _summary_row(r) -> str:
    res, kind = r.result, r.hardware.kind
    after = r.load_memory.allocated_end_bytes if kind == "gpu" else r.load_memory.rss_growth_bytes
    kernels = r.kernels
    tail = (f" {kernels.deltanet_summary} | {', '.join(kernels.linear) or 'nn.Linear'} | {kernels.compute_dtype} |"
            if kernels else " ? | ? | ? |")
    head = f"| {r.method.label} | {r.point.context:,} | {_gb(after)} |"
    if res.status != "ok":
        return head + f" {res.error} | | | | | |" + tail
    peak = (lambda m: m.allocated_peak_bytes) if kind == "gpu" else (lambda m: m.rss_peak_bytes)
    roof = f"{r.roofline.fraction_of_bound:.0%}" if r.roofline else "n/a"
    return head + (f" {_gb(peak(res.prefill_memory))} | {_gb(peak(res.decode_memory))} | {_nvml(res)} | "
                   f"{res.prefill_tokens_per_s.median:,.0f} | {res.decode_tokens_per_s.median:,.1f} | {roof} |") + tail


def _nvml(res) -> str:
    """nvidia-smi's peak, labelled as the report labels it (process or device), in this summary's GB."""
    from quantlab.report import nvml_cell

    return nvml_cell(res.prefill_memory, res.decode_memory, gb=_gb)


def _gb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1e9:.2f}"


if __name__ == "__main__":
    sys.exit(main())
