"""The measurement loop on a tiny model: correct greedy decoding, sane figures, OOM as a finding."""

from __future__ import annotations

import pytest
import torch

from quantlab.errors import QuantlabError
from quantlab.measure import PointSettings, measure_point, prompt_ids
from quantlab.recipe import ModelSpec, load_recipe
from quantlab.run import run_recipe
from quantlab.runtimes.transformers import TransformersRuntime, decode, prefill, tensor_bytes
from quantlab.store import load_records

from conftest import load_source

RUNTIME = TransformersRuntime()


@pytest.fixture(scope="module")
def tiny_model(tiny_config_dir):
    spec = ModelSpec(source="synthetic", config=str(tiny_config_dir), device="cpu", dtype="float32")
    return load_source(spec, torch.device("cpu")).model


def test_cached_decode_equals_uncached_greedy(tiny_model):
    ids = prompt_ids(512, batch=2, context=12, seed=0, device=torch.device("cpu"))
    with torch.inference_mode():
        next_ids, cache = prefill(tiny_model, ids)
        cached = decode(tiny_model, next_ids, cache, steps=6)
        seq = ids
        for _ in range(7):
            logits = tiny_model(input_ids=seq, use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq[:, 12:])


def test_measure_point_gives_consistent_figures(tiny_model):
    s = PointSettings(context=32, batch=2, new_tokens=5, warmup=1, repeats=3)
    r = measure_point(RUNTIME, tiny_model, s, torch.device("cpu"), progress=False)
    assert r.status == "ok"
    assert r.decode_tokens_per_s.n == 3  # warm-up excluded
    assert r.decode_tokens_per_s.median == pytest.approx(2 * 1000 / r.decode_ms_per_token.median, rel=0.35)
    # batch 2: the aggregate counts both sequences; one sequence sees half of it
    assert r.decode_tokens_per_s_per_sequence.median == pytest.approx(r.decode_tokens_per_s.median / 2)
    assert r.prefill_tokens_per_s.median > 0 and r.time_to_first_token_s.min > 0
    assert r.decode_tokens_per_s.min <= r.decode_tokens_per_s.median <= r.decode_tokens_per_s.max
    assert len(r.first_tokens) == 6
    assert r.prefill_memory.rss_peak_bytes > 0 and r.prefill_memory.allocated_peak_bytes is None
    # One full-attention layer in the tiny model: K and V of (batch 2, 1 head, 32+5 positions, 64) in fp32 ...
    kv = 2 * 2 * 1 * 37 * 64 * 4
    # ... plus, per DeltaNet layer, the conv state and the recurrent state.
    assert r.cache_bytes > kv


def test_tensor_bytes_walks_nested_objects():
    class Holder:
        def __init__(self):
            self.a = torch.zeros(10, dtype=torch.float32)
            self.items = [torch.zeros(4, dtype=torch.int8), {"x": torch.zeros(2, dtype=torch.float64)}]
            self.same = self.a

    assert tensor_bytes(Holder()) == 40 + 4 + 16


class _OomAbove(torch.nn.Module):
    """Wraps a model; raises CUDA's OOM error for prompts longer than `limit`, as a GPU would."""

    def __init__(self, model, limit):
        super().__init__()
        self.inner, self.limit = model, limit

    def forward(self, input_ids=None, **kwargs):
        if input_ids.shape[1] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.inner(input_ids=input_ids, **kwargs)

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()


def test_oom_is_a_finding_not_a_crash(tiny_model):
    wrapped = _OomAbove(tiny_model, limit=40)
    oom = measure_point(RUNTIME, wrapped, PointSettings(64, 1, 3, 0, 1), torch.device("cpu"), progress=False)
    assert oom.status == "oom"
    assert oom.error.startswith("OOM at context 64, batch 1: CUDA out of memory")
    ok = measure_point(RUNTIME, wrapped, PointSettings(16, 1, 3, 0, 1), torch.device("cpu"), progress=False)
    assert ok.status == "ok"


def test_other_errors_are_not_swallowed(tiny_model):
    class Broken(_OomAbove):
        def forward(self, input_ids=None, **kwargs):
            raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        measure_point(RUNTIME, Broken(tiny_model, 0), PointSettings(8, 1, 2, 0, 1), torch.device("cpu"), progress=False)


def test_run_records_oom_and_goes_on(write_recipe, tiny_config_dir, monkeypatch, tmp_path):
    import quantlab.run as run_module

    real_method_for = run_module.method_for

    class OomMethod:
        def __init__(self, method):
            self.method = method

        def __getattr__(self, name):
            return getattr(self.method, name)

        def apply(self, model, qconfig):
            return _OomAbove(self.method.apply(model, qconfig), limit=40)

    monkeypatch.setattr(run_module, "method_for", lambda q: OomMethod(real_method_for(q)))
    path = write_recipe({"name": "oom-test", "model": {"source": "synthetic", "config": str(tiny_config_dir), "device": "cpu"},
                         "measure": {"contexts": [64, 16], "new_tokens": 3, "warmup": 0, "repeats": 1}})
    result = run_recipe(load_recipe(path), progress=False, echo=lambda s: None)
    records, problems = load_records(tmp_path / "measurements")
    assert not problems
    by_context = {r.point.context: r for r in records}
    assert by_context[64].result.status == "oom" and "OOM at context 64" in by_context[64].result.error
    assert by_context[16].result.status == "ok"
    assert len(result.paths) == 2


@pytest.mark.gpu
def test_gpu_run_records_allocator_nvml_and_roofline(write_recipe, tiny_config_dir, tmp_path):
    path = write_recipe({"name": "gpu-tiny", "model": {"source": "synthetic", "config": str(tiny_config_dir), "device": "cuda"},
                         "measure": {"contexts": [64], "new_tokens": 8, "warmup": 1, "repeats": 3}})
    (record,) = run_recipe(load_recipe(path), progress=False, echo=lambda s: None).records
    assert record.hardware.kind == "gpu" and record.produced_by.startswith("GPU ")
    assert record.load_memory.allocated_end_bytes >= record.weight_bytes
    decode = record.result.decode_memory
    assert decode.allocated_peak_bytes >= record.load_memory.allocated_end_bytes
    assert decode.reserved_peak_bytes >= decode.allocated_peak_bytes
    if not decode.notes:
        assert decode.nvml_device_used_peak_bytes >= decode.reserved_peak_bytes
    if record.roofline is not None:
        assert 0 < record.roofline.fraction_of_bound


def test_threads_fit_the_cores_other_processes_leave_idle(monkeypatch):
    import os

    import psutil

    from quantlab import threads

    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    monkeypatch.delenv("QUANTLAB_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        monkeypatch.setattr(psutil, "cpu_percent", lambda interval, percpu: [100.0] + [0.0] * (cores - 1))
        note = threads.fit_threads()
        if cores > 1:  # one core busy elsewhere: one thread fewer, and the records say why
            assert torch.get_num_threads() == cores - 1 and "other processes kept 1 core(s) busy" in note
        monkeypatch.setattr(psutil, "cpu_percent", lambda interval, percpu: [0.0] * cores)
        assert threads.fit_threads() is None and torch.get_num_threads() == cores
        monkeypatch.setenv("QUANTLAB_THREADS", "1")
        assert threads.fit_threads() == "CPU threads: 1 (QUANTLAB_THREADS)" and torch.get_num_threads() == 1
        monkeypatch.setenv("QUANTLAB_THREADS", "many")
        with pytest.raises(QuantlabError, match="QUANTLAB_THREADS='many': must be a whole number"):
            threads.fit_threads()
    finally:
        torch.set_num_threads(before)
