"""Whether a file stays in the page cache, how fast its cached pages read, and whether a CPU decode timed over that
file may be set against a bandwidth roofline.

scripts/bench_gguf_cpu_decode.py measures with these helpers and quantlab/report.py judges its stored result with
`roofline_problems`, so a share is shown only where the same checks pass (thresholds here, in one place). The
module needs only the standard library at import (the report imports it without torch); `read_bandwidth` imports
torch when it is called.

The checks, and why these thresholds:
- the pages the decode reads from the model file are resident (mincore), MIN_RESIDENT of them, when the timed decode
  starts and when it ends: a decode that reads a page from disk is timing the disk, not memory; 1% of the 5.2 GB
  that llama.cpp reads from the file (the rest it repacks into its own memory) is 52 MB, a few tensors;
- the timed process took at most MAX_MAJOR_FAULTS major page faults from the start of its timed decode to its exit,
  and the timed bandwidth passes as many: with the model in memory there are none; each one is a disk read of up to
  the device's readahead window (MiBs), so a few dozen already mean the model was being read back from disk;
- the read-bandwidth passes and the decode samples each vary by at most MAX_CV (standard deviation ÷ mean), and the
  passes before the decode and those after it agree within MAX_DRIFT (medians): the share is a ratio of the two, so
  its error is about the sum of theirs, and 5% + 5% still tells 55% from 90% (the gap this check was made for);
  more means the machine changed while it was measured (other work, memory pressure), and the two were not taken
  under the same conditions.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import re
import resource
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PAGE_SIZE = mmap.PAGESIZE
MIN_RESIDENT = 0.99
MAX_MAJOR_FAULTS = 32
MAX_CV = 0.05
MAX_DRIFT = 0.05
MIN_SAMPLES = 3
WARMUP_S = 3.0  # untimed bandwidth passes before the timed ones
NO_CHECKS = ("measured without residency checks (this result does not say whether the model stayed in the page "
             "cache while it was timed, nor was its bandwidth read under the same conditions)")



@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library, with the prototypes used here (looked up when first needed: the report never needs it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    for name in ("munmap", "mlock", "munlock"):
        getattr(libc, name).argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    return libc


@dataclass(frozen=True)
class Residency:
    resident_pages: int
    total_pages: int

    @property
    def fraction(self) -> float:
        return self.resident_pages / self.total_pages if self.total_pages else 1.0


@contextmanager
def _mapping(path: Path, size: int) -> Iterator[int]:
    """The address of a read-only shared mapping of the whole file (size > 0), unmapped at the end."""
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc().mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            yield addr
        finally:
            _libc().munmap(addr, size)
    finally:
        os.close(fd)


def residency(path: str | Path, ranges: Iterable[tuple[int, int]] | None = None) -> Residency:
    """How many of the file's pages (or of the pages that hold `ranges`, (offset, length) byte ranges) are in the
    page cache, by mincore(2) over a fresh read-only shared mapping.

    Linux reports the page cache through mincore only to a caller who owns the file or may write it; for anyone
    else it reports every page resident, so that case is refused rather than answered wrongly."""
    path = Path(path)
    st = path.stat()
    if not (os.geteuid() in (0, st.st_uid) or os.access(path, os.W_OK)):
        raise PermissionError(f"{path}: mincore tells page-cache residency only to the file's owner or a writer")
    pages = -(-st.st_size // PAGE_SIZE)
    if pages == 0:
        return Residency(0, 0)
    vec = (ctypes.c_ubyte * pages)()
    with _mapping(path, st.st_size) as addr:
        if _libc().mincore(addr, st.st_size, vec) != 0:
            raise OSError(ctypes.get_errno(), f"mincore {path}")
    flags = bytes(vec).translate(bytes(i & 1 for i in range(256)))  # only the lowest bit of each byte is defined
    if ranges is None:
        return Residency(flags.count(1), pages)
    spans = page_spans(ranges, pages)
    return Residency(sum(flags[a:b].count(1) for a, b in spans), sum(b - a for a, b in spans))


def page_spans(ranges: Iterable[tuple[int, int]], pages: int) -> list[tuple[int, int]]:
    """The [first, end) page spans that hold the (offset, length) byte ranges, merged, within the file's pages."""
    spans: list[tuple[int, int]] = []
    for first, end in sorted((off // PAGE_SIZE, min(pages, -(-(off + n) // PAGE_SIZE))) for off, n in ranges if n > 0):
        if spans and first <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        elif first < end:
            spans.append((first, end))
    return spans


@contextmanager
def pinned(path: str | Path, ranges: Iterable[tuple[int, int]]) -> Iterator[int]:
    """Hold the pages that hold `ranges` of the file in memory until the block ends: mlock(2) over a read-only
    shared mapping reads them in and keeps the kernel from dropping them (under memory pressure, or a proactive
    reclaimer such as DAMON's pageout) while other processes read them through their own mappings. Yields the
    bytes locked; 0 where mlock is refused (RLIMIT_MEMLOCK without CAP_IPC_LOCK), and then nothing is held."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        yield 0
        return
    with _mapping(path, size) as addr:
        locked = 0
        for first, end in page_spans(ranges, -(-size // PAGE_SIZE)):
            if _libc().mlock(addr + first * PAGE_SIZE, (end - first) * PAGE_SIZE) != 0:
                _libc().munlock(addr, size)
                locked = 0
                break
            locked += (end - first) * PAGE_SIZE
        yield locked  # unmapping unlocks


def read_bandwidth(path: str | Path, threads: int, passes: int = 5,
                   warmup_s: float = WARMUP_S) -> tuple[list[float], int]:
    """Bytes/s of each of `passes` timed reads of the whole file through a shared mapping on 4 KiB pages (torch's
    sum over it as int64, on `threads` threads), after `warmup_s` seconds of untimed ones (two at least: the first maps
    every page, reading back any that were dropped; on a VM the passes after an idle moment or a fresh mapping ran
    15-40% slow for a second or two); and the major page faults this process took during the timed passes (pages
    that had left the page cache and came from disk).

    4 KiB pages (MADV_NOHUGEPAGE), because the kernel may map a cached file's large folios with 2 MiB pages or not,
    depending on how the file came into the cache, and in a VM that alone gave 33 GB/s against 28; llama.cpp's
    repacked copies of the weights sit on 4 KiB pages."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    speeds = []
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            view.madvise(mmap.MADV_NOHUGEPAGE)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a read-only buffer: torch warns that it is not writable
                data = torch.frombuffer(view, dtype=torch.int64, count=len(view) // 8)
            start, done = time.perf_counter(), 0
            while done < 2 or time.perf_counter() - start < warmup_s:  # untimed, see above
                data.sum()
                done += 1
            faults = major_faults_self()
            for _ in range(passes):
                start = time.perf_counter()
                data.sum()
                speeds.append(data.numel() * 8 / (time.perf_counter() - start))
            faults = major_faults_self() - faults
            del data  # the tensor holds the mapping's buffer: let go of it before the mapping closes
    finally:
        torch.set_num_threads(before)
    return speeds, faults


def major_faults_self() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str
    major_faults: int  # over the process's whole life, from wait4's rusage
    major_faults_at_mark: int | None = None  # when `mark` first showed on its stderr (None: it never did)
    at_mark: object = None  # what `on_mark` returned then


def run_counting_faults(command: list[str], log_dir: str | Path, mark: str | None = None,
                        on_mark: Callable[[], object] | None = None) -> Finished:
    """Run `command` to the end and read its major page faults from the kernel's rusage (wait4) as it exits; when
    a line of its stderr first holds `mark`, also read its count so far (/proc/<pid>/stat) and call `on_mark`.
    Its stdout goes to a file in `log_dir`, so only stderr is read while it runs."""
    out, lines, faults_at, marked = Path(log_dir) / "stdout.txt", [], None, None
    with out.open("w") as o:
        proc = subprocess.Popen(command, stdout=o, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                errors="replace")
        try:
            for line in proc.stderr:
                lines.append(line)
                if mark is not None and faults_at is None and mark in line:
                    faults_at = major_faults_of(proc.pid)
                    marked = on_mark() if on_mark else None
        except BaseException:
            proc.kill()
            raise
        finally:
            proc.stderr.close()
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return Finished(proc.returncode, out.read_text(errors="replace"), "".join(lines), usage.ru_majflt, faults_at,
                    marked)


def major_faults_of(pid: int) -> int:
    """A running process's major page faults so far, all its threads (field 12 of /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[9])


REPACK_LINE = re.compile(r"repack: repack tensor (\S+) with ")
REPACK_BUFFER = re.compile(r"CPU_REPACK model buffer size =\s*([\d.]+) MiB")


def read_through_mapping(tensors: dict[str, tuple[int, int]], log: str) -> tuple[list[tuple[int, int]], int, bool]:
    """The (offset, length) ranges of the model file that a llama.cpp CPU decode reads through its mapping, the
    bytes it repacked, and whether its log accounts for them. `tensors`: name → (offset, bytes) in the file; `log`:
    llama.cpp's verbose load log. llama.cpp copies the tensors it can repack for this CPU (Q4_K on AVX2, for one)
    into its own memory at load and names each (`repack: repack tensor NAME with TYPE`); the decode reads those
    from there, never again from the file. Every other tensor counts whole (of the embedding table a token reads one
    row, but which row is the token's). When the tensors named do not add up to the CPU_REPACK buffer it reports
    (within 1%: another log format), every tensor counts, which can only make a residency check stricter."""
    named = {m.group(1) for m in REPACK_LINE.finditer(log)} & tensors.keys()
    repacked = sum(tensors[n][1] for n in named)
    buffer = REPACK_BUFFER.search(log)
    reported = float(buffer.group(1)) * 2**20 if buffer else 0.0
    trusted = abs(repacked - reported) <= 0.01 * max(reported, 1.0) or (not named and not buffer)
    return [r for n, r in tensors.items() if n not in named or not trusted], repacked if trusted else 0, trusted


def cv(values: list[float]) -> float:
    """Standard deviation ÷ mean: 0 when every value agrees."""
    mean = statistics.fmean(values)
    return statistics.stdev(values) / mean if mean > 0 else float("inf")


def drift(before: list[float], after: list[float]) -> float:
    """How far apart the medians of two sets are: larger ÷ smaller − 1."""
    low, high = sorted((statistics.median(before), statistics.median(after)))
    return high / low - 1 if low > 0 else float("inf")


def roofline_bandwidth(result: dict) -> float:
    """GB/s for the roofline: the median of every pass (short passes scatter by a few percent on a VM; one fast
    outlier should not raise the bound)."""
    return statistics.median(result["bandwidth_before_gb_s"] + result["bandwidth_after_gb_s"])


def roofline_problems(result: dict) -> list[str]:
    """Why a stored CPU decode result may not be shown as a share of its roofline; [] when every check passes.
    `result` is what scripts/bench_gguf_cpu_decode.py writes (gguf-cpu-decode.json)."""
    checks = result.get("checks")
    if not isinstance(checks, dict):
        return [NO_CHECKS]
    problems = []
    for when in ("start", "end"):
        share = checks.get(f"mapped_resident_{when}")
        if share is None:
            problems.append(f"the page-cache residency of the model at the {when} of the timed decode was not read")
        elif share < MIN_RESIDENT:
            problems.append(f"only {share:.1%} of the model pages the decode reads from the file were in the page "
                            f"cache at the {when} of the timed decode (needs {MIN_RESIDENT:.0%})")
    for what, key in (("the timed llama-bench", "decode_major_faults"),
                      ("the bandwidth passes", "bandwidth_major_faults")):
        faults = checks.get(key)
        if faults is None:
            problems.append(f"the major page faults of {what} were not counted")
        elif faults > MAX_MAJOR_FAULTS:
            problems.append(f"{what} took {faults} major page faults (reads from disk; at most {MAX_MAJOR_FAULTS})")
    return problems + _steadiness_problems(result)


def _steadiness_problems(result: dict) -> list[str]:
    before, after = result.get("bandwidth_before_gb_s") or [], result.get("bandwidth_after_gb_s") or []
    samples = result.get("samples_tokens_per_s") or []
    problems, steady = [], []
    if min(len(before), len(after)) < MIN_SAMPLES:
        problems.append(f"fewer than {MIN_SAMPLES} read-bandwidth passes before or after the decode")
    else:
        steady.append(("read-bandwidth passes", before + after, "GB/s"))
        if drift(before, after) > MAX_DRIFT:
            problems.append(f"the read bandwidth moved from {statistics.median(before):.1f} GB/s before the decode "
                            f"to {statistics.median(after):.1f} GB/s after it ({drift(before, after):.0%} apart; at "
                            f"most {MAX_DRIFT:.0%})")
    if len(samples) < MIN_SAMPLES:
        problems.append(f"fewer than {MIN_SAMPLES} decode samples")
    else:
        steady.append(("decode samples", samples, "tok/s"))
    for what, values, unit in steady:
        if cv(values) > MAX_CV:
            problems.append(f"the {what} vary too much: {min(values):.3g}-{max(values):.3g} {unit}, standard "
                            f"deviation {cv(values):.0%} of the mean (at most {MAX_CV:.0%})")
    return problems


def roofline_share(result: dict) -> tuple[float | None, list[str]]:
    """Decode tok/s ÷ (read bandwidth ÷ bytes read per token), or None and the reasons it may not be given."""
    problems = roofline_problems(result)
    if problems:
        return None, problems
    bound = roofline_bandwidth(result) * 1e9 / result["bytes_read_per_token"]
    return result["decode_tokens_per_s"] / bound, []
