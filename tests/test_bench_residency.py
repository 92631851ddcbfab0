"""quantlab.residency (page-cache residency by mincore, major faults by wait4, the roofline verdict), the CPU decode
bench that uses it (scripts/bench_gguf_cpu_decode.py, with its llama.cpp steps faked) and the report's section on
its stored result. Small temp files only: nothing here needs the 16.5 GB model."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from quantlab import residency
from quantlab.report import gguf_cpu_decode_section, write_report

REPO = Path(__file__).resolve().parent.parent
PAGES = 256  # 1 MiB of 4 KiB pages


def _written(path: Path, pages: int = PAGES) -> Path:
    with path.open("wb") as f:
        f.write(os.urandom(pages * residency.PAGE_SIZE))
        f.flush()
        os.fsync(f.fileno())  # clean pages: DONTNEED drops only those
    return path


def _evicted(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return residency.residency(path).resident_pages == 0


def test_a_file_just_read_is_resident_and_dontneed_evicts_it(tmp_path):
    path = _written(tmp_path / "f.bin")
    path.read_bytes()
    assert residency.residency(path) == residency.Residency(PAGES, PAGES)
    assert residency.residency(path).fraction == 1.0
    if not _evicted(path):
        pytest.skip("this kernel or file system keeps the pages after POSIX_FADV_DONTNEED")
    assert residency.residency(path).fraction == 0.0
    with path.open("rb") as f:
        f.read(residency.PAGE_SIZE)  # one page back (and whatever readahead brings)
    assert 0 < residency.residency(path).resident_pages


def test_pages_never_read_are_not_resident(tmp_path):
    """A hole that nothing has read has no page in the cache: mincore does not answer 'resident' for everything."""
    path = tmp_path / "sparse.bin"
    with path.open("wb") as f:
        f.truncate(PAGES * residency.PAGE_SIZE)
    assert residency.residency(path) == residency.Residency(0, PAGES)
    assert residency.residency(tmp_path / "sparse.bin").total_pages == PAGES
    (tmp_path / "empty.bin").write_bytes(b"")
    assert residency.residency(tmp_path / "empty.bin").fraction == 1.0  # nothing to miss


def test_residency_is_refused_where_mincore_would_answer_every_page_resident(tmp_path, monkeypatch):
    path = _written(tmp_path / "f.bin", 4)
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(PermissionError, match="owner"):
        residency.residency(path)


def test_a_process_reading_an_evicted_file_takes_major_faults(tmp_path):
    path = _written(tmp_path / "f.bin")
    if not _evicted(path):
        pytest.skip("this kernel or file system keeps the pages after POSIX_FADV_DONTNEED")
    touch = ("import mmap, sys\nf = open(sys.argv[1], 'rb')\nm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)\n"
             "print(sum(m[i] for i in range(0, len(m), mmap.PAGESIZE)) >= 0)\n")
    done = residency.run_counting_faults([sys.executable, "-c", touch, str(path)], tmp_path)
    assert (done.returncode, done.stdout.strip()) == (0, "True")
    assert done.major_faults > 0
    failed = residency.run_counting_faults([sys.executable, "-c", "import sys; print('x', file=sys.stderr); "
                                            "sys.exit(3)"], tmp_path)
    assert (failed.returncode, failed.stderr.strip()) == (3, "x")


def test_read_bandwidth_times_each_pass_over_the_file(tmp_path):
    path = _written(tmp_path / "f.bin")
    path.read_bytes()
    speeds, faults = residency.read_bandwidth(path, threads=1, passes=3, warmup_s=0.0)
    assert len(speeds) == 3 and all(s > 0 for s in speeds)
    # the file was in the page cache; the count is the whole process's, whose own pages (libraries) may come back
    # from disk under memory pressure, as in a full suite beside other work
    assert faults < residency.MAX_MAJOR_FAULTS


def test_residency_of_byte_ranges_counts_the_pages_that_hold_them(tmp_path):
    page = residency.PAGE_SIZE
    path = _written(tmp_path / "f.bin")
    if not _evicted(path):
        pytest.skip("this kernel or file system keeps the pages after POSIX_FADV_DONTNEED")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: only the page read comes in
        os.pread(fd, 1, 10 * page)
    finally:
        os.close(fd)
    whole = residency.residency(path)
    if whole.resident_pages != 1:
        pytest.skip(f"reading one page brought {whole.resident_pages} in (large folios): no single-page control")
    assert residency.residency(path, [(10 * page + 5, 1)]) == residency.Residency(1, 1)
    assert residency.residency(path, [(0, 10 * page)]) == residency.Residency(0, 10)
    assert residency.residency(path, [(9 * page + 1, page), (0, 1)]) == residency.Residency(1, 3)


def test_pinned_pages_stay_in_the_page_cache_until_released(tmp_path):
    page = residency.PAGE_SIZE
    path = _written(tmp_path / "f.bin")
    if not _evicted(path):
        pytest.skip("this kernel or file system keeps the pages after POSIX_FADV_DONTNEED")
    with residency.pinned(path, [(0, 3 * page), (100 * page, 1)]) as locked:
        if locked == 0:
            pytest.skip("mlock is refused here (RLIMIT_MEMLOCK without CAP_IPC_LOCK)")
        assert locked == 4 * page
        assert residency.residency(path, [(0, 3 * page), (100 * page, 1)]) == residency.Residency(4, 4)  # read in
        _evicted(path)  # DONTNEED leaves locked pages alone
        assert residency.residency(path, [(0, 3 * page), (100 * page, 1)]) == residency.Residency(4, 4)
    assert _evicted(path)  # released: now they go


def test_page_spans_merge_overlaps_and_stay_inside_the_file():
    page = residency.PAGE_SIZE
    assert residency.page_spans([(0, 1), (page - 1, 2), (5 * page, 0), (9 * page, 10 * page)], 12) == [(0, 2), (9, 12)]
    assert residency.page_spans([], 3) == []


def test_the_timed_window_starts_at_the_mark(tmp_path):
    """Faults counted at the mark (/proc/<pid>/stat) are the process's own so far: reading an evicted file before
    the mark shows up there, and none after it."""
    path = _written(tmp_path / "f.bin")
    if not _evicted(path):
        pytest.skip("this kernel or file system keeps the pages after POSIX_FADV_DONTNEED")
    code = ("import mmap, sys, time\nf = open(sys.argv[1], 'rb')\nm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)"
            "\nsum(m[i] for i in range(0, len(m), mmap.PAGESIZE))\nprint('generation run 1/3', file=sys.stderr, "
            "flush=True)\ntime.sleep(0.5)\n")
    seen = []
    done = residency.run_counting_faults([sys.executable, "-c", code, str(path)], tmp_path, "generation run 1/",
                                         lambda: seen.append(1) or "called")
    assert done.returncode == 0 and seen == [1] and done.at_mark == "called"
    assert done.major_faults_at_mark is not None and 0 < done.major_faults_at_mark <= done.major_faults
    assert done.major_faults - done.major_faults_at_mark <= 2  # nothing read after the mark
    unmarked = residency.run_counting_faults([sys.executable, "-c", "pass"], tmp_path, "never printed", lambda: 1)
    assert unmarked.major_faults_at_mark is None and unmarked.at_mark is None


REPACK_LOG = ("load_tensors:   CPU_Mapped model buffer size =     0.10 MiB\n"
              "load_tensors:   CPU_REPACK model buffer size =     3.00 MiB\n"
              "repack: repack tensor blk.0.ffn_up.weight with q4_K_8x8\n"
              "repack: repack tensor blk.0.ffn_gate.weight with q4_K_8x8\n")
MIB = 2**20
TENSORS = {"token_embd.weight": (0, 4 * MIB), "blk.0.ffn_up.weight": (4 * MIB, MIB),
           "blk.0.ffn_gate.weight": (5 * MIB, 2 * MIB), "blk.0.ffn_down.weight": (7 * MIB, MIB)}


def test_the_decode_reads_from_the_file_only_what_llama_cpp_did_not_repack():
    ranges, repacked, trusted = residency.read_through_mapping(TENSORS, REPACK_LOG)
    assert (ranges, repacked, trusted) == ([(0, 4 * MIB), (7 * MIB, MIB)], 3 * MIB, True)  # the embedding table too
    assert residency.read_through_mapping(TENSORS, "no repack here") == (list(TENSORS.values()), 0, True)


@pytest.mark.parametrize("log", [REPACK_LOG.replace("3.00 MiB", "9.00 MiB"),  # the names miss most of the buffer
                                 "load_tensors:   CPU_REPACK model buffer size =     3.00 MiB\n",  # no names
                                 REPACK_LOG.replace("CPU_REPACK", "CPU_OTHER")])  # names, no buffer
def test_a_repack_log_that_does_not_add_up_counts_every_tensor(log):
    ranges, repacked, trusted = residency.read_through_mapping(TENSORS, log)
    assert not trusted and repacked == 0
    assert ranges == list(TENSORS.values())


def passing() -> dict:
    return {
        "label": "CPU test", "created_at": "2026-12-01T00:00:00+00:00", "cpu": "Test CPU", "threads": 2,
        "llama_cpp": "llama.cpp test", "bytes_read_per_token": 16_000_000_000,
        "bandwidth_method": "torch sum over the model file's own page-cache pages", "read_bandwidth_gb_s": 30.0,
        "bandwidth_before_gb_s": [29.0, 30.0, 31.0], "bandwidth_after_gb_s": [30.0, 29.5, 30.5],
        "roofline_tokens_per_s": 1.875,
        "decode_tokens_per_s": 1.5, "decode_stddev": 0.01, "samples_tokens_per_s": [1.49, 1.5, 1.51],
        "checks": {"mapped_resident_start": 1.0, "mapped_resident_end": 0.999, "file_resident_before": 1.0,
                   "file_resident_after": 0.7, "decode_major_faults": 0, "bandwidth_major_faults": 0},
        "fraction_of_roofline": 0.8,
    }


def test_every_check_passing_gives_the_share_measured_in_that_run():
    share, problems = residency.roofline_share(passing())
    assert problems == []
    assert share == pytest.approx(1.5 / (30.0e9 / 16e9))  # the median pass, not the stored fraction


def test_the_roofline_takes_the_median_pass():
    r = passing()
    r["bandwidth_before_gb_s"] = [30.0, 30.0, 30.0, 31.0]
    r["bandwidth_after_gb_s"] = [29.0, 30.0, 30.0, 36.0]  # one fast outlier does not raise the bound
    assert residency.roofline_bandwidth(r) == 30.0


def test_checks_exactly_at_their_thresholds_pass():
    r = passing()
    r["checks"].update(mapped_resident_start=residency.MIN_RESIDENT, decode_major_faults=residency.MAX_MAJOR_FAULTS)
    r["bandwidth_before_gb_s"] = [30.0] * 3
    r["bandwidth_after_gb_s"] = [30.0 * (1 + residency.MAX_DRIFT) - 1e-9] * 3
    assert residency.drift(r["bandwidth_before_gb_s"], r["bandwidth_after_gb_s"]) == pytest.approx(residency.MAX_DRIFT)
    assert residency.cv(r["bandwidth_before_gb_s"] + r["bandwidth_after_gb_s"]) < residency.MAX_CV
    assert residency.roofline_problems(r) == []


def _set(key, value):
    def change(r):
        (r["checks"] if key in r["checks"] else r)[key] = value
    return change


FAILING = {
    "no checks stored": (lambda r: r.pop("checks"), "measured without residency checks"),
    "evicted at the start": (_set("mapped_resident_start", 0.6),
                             "only 60.0% of the model pages the decode reads from the file were in the page cache at "
                             "the start"),
    "evicted by the end": (_set("mapped_resident_end", 0.98), "only 98.0% of the model pages"),
    "residency unread": (_set("mapped_resident_start", None), "residency of the model at the start of the timed "
                                                              "decode was not read"),
    "decode faults": (_set("decode_major_faults", 5000), "the timed llama-bench took 5000 major page faults"),
    "bandwidth faults": (_set("bandwidth_major_faults", residency.MAX_MAJOR_FAULTS + 1),
                         f"the bandwidth passes took {residency.MAX_MAJOR_FAULTS + 1} major page faults"),
    "faults uncounted": (_set("decode_major_faults", None),
                         "the major page faults of the timed llama-bench were not counted"),
    "bandwidth moved": (_set("bandwidth_after_gb_s", [28.0, 28.2, 28.1]),  # steady, but 7% below before
                        "the read bandwidth moved from 30.0 GB/s before the decode to 28.1 GB/s after it"),
    "bandwidth noisy": (_set("bandwidth_after_gb_s", [27.0, 30.0, 33.5]), "the read-bandwidth passes vary too much"),
    "decode noisy": (_set("samples_tokens_per_s", [0.2, 0.14, 0.26]), "the decode samples vary too much"),
    "two samples": (_set("samples_tokens_per_s", [1.5, 1.5]), "fewer than 3 decode samples"),
    "no samples": (_set("samples_tokens_per_s", None), "fewer than 3 decode samples"),
    "no passes after": (_set("bandwidth_after_gb_s", []), "fewer than 3 read-bandwidth passes before or after"),
}


@pytest.mark.parametrize("case", FAILING)
def test_each_failing_check_gives_no_share_and_says_why(case):
    change, reason = FAILING[case]
    r = passing()
    change(r)
    share, problems = residency.roofline_share(r)
    assert share is None
    assert len(problems) == 1 and reason in problems[0]


# measurements/gguf-cpu-decode.json as the bench stored it before it checked anything (commit 00fa73c)
UNCHECKED = {
    "label": "CPU, synthetic weights (zeros) of Qwen3.6-27B's real shapes, GGUF Q4_K_M without MTP, llama.cpp CPU "
             "backend (llama-bench), decode at depth 0",
    "created_at": "2026-11-30T17:47:48+00:00", "cpu": "AMD EPYC", "threads": 2,
    "llama_cpp": "llama.cpp 0.5.0-dev (build 1, commit 0c1e570), from llama-cpp-python 0.3.36",
    "file_bytes": 16542074848, "bytes_read_per_token": 15821247296, "read_bandwidth_gb_s": 31.40848803354056,
    "roofline_tokens_per_s": 1.9852093482845312, "decode_tokens_per_s": 1.842267, "decode_stddev": 0.110549,
    "samples_tokens_per_s": [1.72504, 1.85712, 1.94464], "fraction_of_roofline": 0.9279963352942846,
    "quantize_seconds": 83.0,
}


def test_the_report_does_not_show_a_stored_result_without_checks_as_a_share(tmp_path):
    """A result stored before the bench checked anything: a fraction_of_roofline, but no checks."""
    stored = UNCHECKED
    (tmp_path / "gguf-cpu-decode.json").write_text(json.dumps(stored), encoding="utf-8")
    text = "\n".join(gguf_cpu_decode_section(tmp_path))
    assert "No roofline share: measured without residency checks" in text
    assert f"{stored['decode_tokens_per_s']:.3f}" in text  # the measured numbers stay
    assert "of the roofline (" not in text and f"{stored['fraction_of_roofline']:.0%}" not in text


def test_the_report_shows_the_share_only_when_the_stored_checks_pass(tmp_path):
    (tmp_path / "gguf-cpu-decode.json").write_text(json.dumps(passing()), encoding="utf-8")
    text = "\n".join(gguf_cpu_decode_section(tmp_path))
    assert "80% of the roofline (1.875 tok/s)" in text and "No roofline share" not in text
    failing = passing()
    failing["checks"]["mapped_resident_end"] = 0.6  # its stored fraction_of_roofline (0.8) must not be shown
    (tmp_path / "gguf-cpu-decode.json").write_text(json.dumps(failing), encoding="utf-8")
    text = "\n".join(gguf_cpu_decode_section(tmp_path))
    assert ("No roofline share: only 60.0% of the model pages the decode reads from the file were in the page cache "
            "at the end of the timed decode") in text
    assert "of the roofline (" not in text and "80%" not in text


def test_the_report_has_the_section_only_with_the_result(tmp_path):
    assert gguf_cpu_decode_section(tmp_path) == []
    assert "GGUF Q4_K_M decode on a CPU" not in write_report(tmp_path).read_text(encoding="utf-8")
    (tmp_path / "gguf-cpu-decode.json").write_text(json.dumps(passing()), encoding="utf-8")
    assert "80% of the roofline" in write_report(tmp_path).read_text(encoding="utf-8")


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_gguf_cpu_decode", REPO / "scripts" / "bench_gguf_cpu_decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Tools:
    version = "llama.cpp fake"
    bin = Path("bin")

    def tool(self, name):
        return Path(name)


def _fake_run(monkeypatch, tmp_path, bench, decode_faults: int):
    from types import SimpleNamespace

    model = tmp_path / "model.gguf"
    model.write_bytes(b"x")
    tensors = [SimpleNamespace(name="token_embd.weight", nbytes=1000, shape=[10, 100])]
    monkeypatch.setattr(bench.llamacpp, "locate", lambda: _Tools())
    monkeypatch.setattr(bench.llamacpp, "cpu_code", lambda bin_dir: "ggml-cpu fake (CPU : AVX2 = 1 |)")
    monkeypatch.setattr(bench, "quantized_model", lambda tools, work, threads: (model, 0.0))
    monkeypatch.setattr(bench, "read_header", lambda p: SimpleNamespace(tensors=tensors, tensor_bytes=16_000_000_990,
                                                                       file_bytes=16_000_000_000))
    monkeypatch.setattr(bench, "tensor_ranges", lambda p: {"token_embd.weight": (0, 1000), "a": (1000, MIB),
                                                           "b": (1000 + MIB, 50)})
    rows = [{"n_gen": 16, "avg_ts": 1.5, "stddev_ts": 0.01, "samples_ts": [1.49, 1.5, 1.51]}]
    warm = residency.Finished(0, "", "repack: repack tensor a with q4_K_8x8\nCPU_REPACK model buffer size = "
                                     "1.00 MiB\n", 7)
    timed = residency.Finished(0, "", "", 100 + decode_faults, 100, residency.Residency(100, 100))
    runs = iter([warm, timed])
    monkeypatch.setattr(bench, "llama_bench", lambda *a, **k: (rows, next(runs)))
    monkeypatch.setattr(bench.residency, "read_bandwidth", lambda path, threads, passes: ([30e9] * passes, 0))
    monkeypatch.setattr(bench.residency, "residency", lambda path, ranges=None: residency.Residency(100, 100))
    pins = []

    @contextmanager
    def pinned(path, ranges):
        pins.append(list(ranges))
        yield 100
    monkeypatch.setattr(bench.residency, "pinned", pinned)
    monkeypatch.setattr(sys, "argv", ["bench", "--out", str(tmp_path)])
    return pins


def test_the_bench_prints_and_stores_the_share_when_every_check_passes(monkeypatch, tmp_path, capsys):
    bench = _bench_module()
    pins = _fake_run(monkeypatch, tmp_path, bench, decode_faults=0)
    bench.main()
    assert pins == [[(0, 1000), (1000 + MIB, 50)]]  # what the decode reads from the file: all but the repacked "a"
    stored = json.loads((tmp_path / "gguf-cpu-decode.json").read_text(encoding="utf-8"))
    assert stored["fraction_of_roofline"] == pytest.approx(0.8) and stored["problems"] == []
    assert stored["checks"]["decode_major_faults"] == 0 and stored["checks"]["llama_bench_major_faults"] == 100
    assert stored["read_bandwidth_gb_s"] == 30.0 and stored["checks"]["pinned_bytes"] == 100
    assert stored["cpu_code"] == "ggml-cpu fake (CPU : AVX2 = 1 |)"  # which CPU backend ran
    assert "= 80% of the roofline (every check passed)" in capsys.readouterr().out


def test_the_bench_gives_no_share_and_says_why_when_a_check_fails(monkeypatch, tmp_path, capsys):
    bench = _bench_module()
    _fake_run(monkeypatch, tmp_path, bench, decode_faults=4000)
    with pytest.raises(SystemExit) as exited:
        bench.main()
    assert exited.value.code == 2
    stored = json.loads((tmp_path / "gguf-cpu-decode.json").read_text(encoding="utf-8"))
    assert stored["fraction_of_roofline"] is None and stored["decode_tokens_per_s"] == 1.5
    assert stored["checks"]["decode_major_faults"] == 4000 and len(stored["problems"]) == 1
    out = capsys.readouterr().out
    assert "no roofline share: the timed llama-bench took 4000 major page faults" in out  # 100 were before timing
    assert "% of the roofline" not in out
