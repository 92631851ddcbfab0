"""The results store (append-only, atomic, concurrent) and the report rendered from records."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from quantlab.recipe import load_recipe
from quantlab.report import render_report, write_report
from quantlab.run import run_recipe
from quantlab.store import append_record, load_records, records_dir, write_new_file


@pytest.fixture(scope="module")
def cpu_records(tmp_path_factory, tiny_config_dir):
    import yaml

    folder = tmp_path_factory.mktemp("run")
    recipe = folder / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny", "model": {"source": "synthetic", "config": str(tiny_config_dir), "device": "cpu"},
        "measure": {"contexts": [8, 16], "new_tokens": 2, "warmup": 0, "repeats": 2},
        "output": {"dir": str(folder / "measurements")},
    }))
    return run_recipe(load_recipe(recipe), progress=False, echo=lambda s: None).records


def _with_id(record, suffix):
    return record.model_copy(update={"record_id": f"{record.record_id}-{suffix}"})


def test_append_never_overwrites(cpu_records, tmp_path):
    first = append_record(tmp_path, cpu_records[0])
    before = first.read_bytes()
    with pytest.raises(FileExistsError):
        append_record(tmp_path, cpu_records[0])
    assert first.read_bytes() == before
    assert [p.name for p in records_dir(tmp_path).iterdir()] == [first.name]  # no temporary file left


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "r.json"

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_new_file(target, "{}")
    assert list(tmp_path.iterdir()) == []


def _writer(args):
    folder, record_json, worker = args
    from quantlab.schema.record import Record

    record = Record.model_validate_json(record_json)
    for i in range(25):
        append_record(folder, record.model_copy(update={"record_id": f"{record.record_id}-w{worker}-{i}"}))


@pytest.mark.slow
def test_two_concurrent_writers(cpu_records, tmp_path):
    payload = cpu_records[0].model_dump_json()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_writer, [(str(tmp_path), payload, w) for w in (0, 1)])
    records, problems = load_records(tmp_path)
    assert problems == []
    assert len(records) == 50
    assert len({r.record_id for r in records}) == 50


def test_unreadable_file_is_reported_not_fatal(cpu_records, tmp_path):
    append_record(tmp_path, cpu_records[0])
    (records_dir(tmp_path) / "broken.json").write_text("{not json")
    records, problems = load_records(tmp_path)
    assert len(records) == 1
    assert problems and "broken.json: skipped" in problems[0]


def test_cpu_records_are_labelled_as_cpu(cpu_records):
    r = cpu_records[0]
    assert r.hardware.kind == "cpu" and r.produced_by.startswith("CPU ")
    assert r.model.weights == "synthetic" and "synthetic weights" in r.produced_by
    assert r.load_memory.allocated_end_bytes is None  # never 0 as a stand-in for "no GPU"
    assert any("CPU run" in n for n in r.notes)
    assert r.software.packages["torch"] and r.recipe.sha256 and "tiny" in r.recipe.content


def _as_gpu_qwen(record, weight_bytes, context, variant="text"):
    """A CPU record relabelled as a GPU one of Qwen3.6-27B, to test how the report reads GPU figures."""
    hw = record.hardware.model_copy(update={"kind": "gpu", "name": "NVIDIA H200", "device": "cuda:0"})
    mem = record.load_memory.model_copy(update={"allocated_end_bytes": weight_bytes, "allocated_peak_bytes": weight_bytes})
    res = record.result
    res = res.model_copy(update={
        "prefill_memory": res.prefill_memory.model_copy(update={"allocated_peak_bytes": weight_bytes + 10**9}),
        "decode_memory": res.decode_memory.model_copy(update={"allocated_peak_bytes": weight_bytes + 2 * 10**9,
                                                               "nvml_process_used_peak_bytes": weight_bytes + 3 * 10**9}),
    })
    model = record.model.model_copy(update={"name": "Qwen3.6-27B", "variant": variant})
    point = record.point.model_copy(update={"context": context})
    return record.model_copy(update={
        "hardware": hw, "load_memory": mem, "result": res, "model": model, "point": point, "notes": (),
        "record_id": f"{record.record_id}-gpu-{context}",
    })


def test_report_shows_claim_measurement_hardware_and_delta(cpu_records):
    gpu = _as_gpu_qwen(cpu_records[0], 53_792_000_000, 1024)
    text = render_report([*cpu_records, gpu])
    claims = text.split("## The article's claims")[1].split("\n## ")[0]
    bf16 = next(line for line in claims.splitlines() if line.startswith("| BF16"))
    assert "~55–56 GB" in bf16 and "53.79 GB" in bf16 and "NVIDIA H200, synthetic weights, text model" in bf16
    assert "-2.2% vs low end" in bf16 and "| matches |" in bf16
    q4 = next(line for line in claims.splitlines() if line.startswith("| Q4_K_M"))
    assert "not measured on a GPU yet" in q4
    gpu_section = text.split("## Qwen3.6-27B · synthetic weights · GPU: NVIDIA H200")[1]
    row = next(line for line in gpu_section.splitlines() if line.startswith("| BF16 | text | 1,024"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # Weights (the record's own tensor bytes), then after load, the phase peaks, nvidia-smi labelled as this process's
    assert cells[5:9] == ["53.79", "54.79", "55.79", "56.79 (process)"]


def test_report_verdict_when_far_from_claim(cpu_records):
    text = render_report([_as_gpu_qwen(cpu_records[0], 70_000_000_000, 1024)])
    bf16 = next(line for line in text.splitlines() if line.startswith("| BF16 | ~55"))
    assert "+25.0% vs high end" in bf16 and "higher than claimed" in bf16


def test_report_labels_cpu_tables_and_oom_rows(cpu_records):
    oom = cpu_records[1].model_copy(update={
        "record_id": "oom", "point": cpu_records[1].point.model_copy(update={"context": 131072}),
        "result": cpu_records[1].result.model_copy(update={"status": "oom", "error": "OOM at context 131072, batch 1: x"}),
    })
    text = render_report([*cpu_records, oom])
    assert "· CPU: " in text and "n/a (CPU)" in text
    # a CPU table names its memory for what it is: RSS growth at load and the whole process's RSS, not "weights"
    assert "| RSS growth at load |" in text and "peaks = the process's whole RSS" in text
    assert "| 131,072 | 1 |" in text and "**OOM**" in text
    assert "not measured on a GPU yet" in text  # no GPU BF16 record of Qwen3.6-27B here


def test_write_report_is_regenerated_from_the_store(cpu_records, tmp_path):
    for r in cpu_records:
        append_record(tmp_path, r)
    path = write_report(tmp_path)
    text = path.read_text()
    assert text == render_report(load_records(tmp_path)[0])
    assert "2 record(s)" in text


def test_empty_store_report():
    assert "No records yet" in render_report([])


def test_a_split_run_has_its_own_table_and_says_its_memory_is_summed(cpu_records):
    from quantlab.schema.record import SplitRef

    one = _as_gpu_qwen(cpu_records[0], 53_792_000_000, 1024)
    split = one.model_copy(update={"record_id": one.record_id + "-split", "split": SplitRef(
        devices=("cuda:0", "cuda:1"), offered_bytes={"cuda:0": 1, "cuda:1": 1},
        weight_bytes_per_device={"cuda:0": 1, "cuda:1": 1}, layers_per_device={}, device_map={})})
    text = render_report([*cpu_records, one, split])
    assert "## Qwen3.6-27B · synthetic weights · GPU: NVIDIA H200\n" in text
    section = text.split("GPU: 2 x NVIDIA H200, split by accelerate's device map")[1].split("\n## ")[0]
    assert "| BF16 (memory: sum over the split's GPUs) | text | 1,024" in section


def test_the_terminal_line_says_batch_throughput_is_over_all_sequences(cpu_records):
    from quantlab.run import describe_point

    record = cpu_records[0]
    assert "sequences" not in describe_point(record)  # batch 1: one figure
    res = record.result
    batch4 = record.model_copy(update={"point": record.point.model_copy(update={"batch": 4}), "result": res.model_copy(
        update={"decode_tokens_per_s_per_sequence": res.decode_tokens_per_s.model_copy(
            update={"median": res.decode_tokens_per_s.median / 4})})})
    line = describe_point(batch4)
    assert f"{res.decode_tokens_per_s.median:,.1f} tok/s over 4 sequences ({res.decode_tokens_per_s.median / 4:,.1f} per sequence)" in line


# ---- the bench results the report reads beside the records: each through its schema class ----------------------

def test_bench_results_read_through_frozen_schema_classes_and_gguf_full_size_writes_through_its_own():
    """scripts/gguf_full_size.py writes gguf-full-size.json as GgufFullSize.json_text(): the stored file is that text
    again, key for key; both side files read into classes that keep unknown keys and cannot be changed."""
    import json
    from pathlib import Path

    from pydantic import ValidationError

    from quantlab.schema.bench import GGUF_CPU_DECODE_NAME, GGUF_FULL_SIZE_NAME, GgufCpuDecode, GgufFullSize
    from quantlab.store import read_model

    measurements = Path(__file__).resolve().parents[1] / "measurements"
    stored = measurements / GGUF_FULL_SIZE_NAME
    if not stored.is_file():
        pytest.skip("measurements/gguf-full-size.json not here: run make gguf-full-size")
    full = read_model(stored, GgufFullSize)
    assert full.json_text() == stored.read_text(encoding="utf-8")
    assert full.sizes[0].dry_run_bytes and full.allocations[0].model_bytes and full.token_embd_bytes_q4_k_m
    added = GgufFullSize.model_validate({**json.loads(stored.read_text(encoding="utf-8")), "new_field": [1]})
    assert json.loads(added.json_text())["new_field"] == [1]  # a key a newer bench adds is kept, not refused
    decode = read_model(measurements / GGUF_CPU_DECODE_NAME, GgufCpuDecode)
    for model, field in ((full, "label"), (full.sizes[0], "tensor_bytes"), (decode, "decode_tokens_per_s")):
        with pytest.raises(ValidationError, match="frozen"):
            setattr(model, field, getattr(model, field))


def test_a_published_gguf_of_the_articles_model_fills_its_claim_row(cpu_records):
    """A GGUF someone published (named by its file) whose header says Qwen3.6-27B is measured against the article's
    row for its type: the article's table is of published GGUF files."""
    from quantlab.schema.model_file import ModelFile
    from quantlab.schema.record import MethodRef, RuntimeRef

    gpu = _as_gpu_qwen(cpu_records[0], 0, 4096)
    model_bytes = 16_800_000_000
    published = gpu.model_copy(update={
        "model": gpu.model.model_copy(update={"name": "Qwen3.6-27B-Q4_K_M", "source": "gguf"}),
        "method": MethodRef(name="gguf", label="GGUF Q4_K_M", params={"type": "Q4_K_M"}),
        "runtime": RuntimeRef(name="llama.cpp"),
        "result": gpu.result.model_copy(update={"runtime_buffers": {"CUDA0 model": model_bytes}}),
        "file": ModelFile(format="GGUF", name="Qwen3.6-27B-Q4_K_M.gguf", sha256="ab" * 32, bytes=16_805_389_216,
                          architecture="qwen35", model="Qwen3.6-27B", file_type="Q4_K_M", tensor_types={},
                          made_by="not quantlab"),
    })
    text = render_report([published])
    q4 = next(line for line in text.splitlines() if line.startswith("| Q4_K_M | ~17"))
    assert "16.80 GB" in q4 and "file Qwen3.6-27B-Q4_K_M.gguf" in q4 and "| matches |" in q4
    other = published.model_copy(update={"file": published.file.model_copy(update={"model": "Qwen3.6-27B-Instruct"})})
    assert "not measured on a GPU yet" in next(line for line in render_report([other]).splitlines()
                                               if line.startswith("| Q4_K_M | ~17"))
