"""What a GPU run records and how its builds are read: skip lists for transformers and vLLM, the kernels and
dtype that really ran, the bitsandbytes floor, NVML labels, phases that start settled, and the GPU check
script's own logic (rehearsed here on the CPU)."""

from __future__ import annotations

import importlib.util
import json
import sys
import tarfile
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from quantlab.architecture import quantizable_linears
from quantlab.bundled import bundled_model_dir
from quantlab.errors import QuantlabError
from quantlab.kernels import kernels_of
from quantlab.measure import PointSettings, measure_point
from quantlab.methods import bnb
from quantlab.methods.awq import AwqConfig, AwqMethod
from quantlab.plan import make_plan
from quantlab.quantize.vllm_layout import VLLM_NAMING, vllm_layers, vllm_skips_layer
from quantlab.recipe import ModelSpec, load_recipe
from quantlab.run import run_recipe
from quantlab.runtimes.transformers import TransformersRuntime, lookup_table_bytes
from quantlab.sources import meta_model, resolve
from quantlab.trackers import memory as memory_module
from quantlab.trackers.nvml import PID_MATCH, SOLE_PROCESS, process_figure

from conftest import load_source

REPO = Path(__file__).resolve().parent.parent
QWEN = REPO / "quantlab" / "data" / "qwen3.6-27b"
quiet = lambda *_: None  # noqa: E731


# ---- the AWQ skip list, read by transformers and by vLLM -------------------------------------------------

def _mtp_linears(config) -> list[str]:
    """The checkpoint's MTP Linears (transformers drops mtp.* at load, so the meta model has none)."""
    text = config.get_text_config()
    names = ["mtp.fc"]
    for i in range(getattr(text, "mtp_num_hidden_layers", 1)):
        names += [f"mtp.layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"mtp.layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    return names


@pytest.mark.parametrize("config_dir", [QWEN, bundled_model_dir()], ids=["qwen3.6-27b-vl", "bundled-text"])
def test_awq_skip_list_means_the_same_to_transformers_and_vllm(config_dir):
    from transformers.quantizers.quantizers_utils import should_convert_module

    config = AutoConfig.from_pretrained(config_dir)
    skips = AwqMethod().skip_rules(AwqConfig(method="awq"), resolve(ModelSpec(source="synthetic", config=str(config_dir)))).patterns
    model = meta_model(config)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    intended = {n for n, _ in quantizable_linears(model, "awq")}
    assert {n for n in linears if should_convert_module(n, list(skips))} == intended  # transformers' own rule
    naming = VLLM_NAMING[type(model).__name__]
    layers = vllm_layers(linears + _mtp_linears(config), naming)
    for layer, parts in layers.items():  # vLLM: substring after its mapper; fused parts must agree
        assert vllm_skips_layer(layer, skips, naming) == (not set(parts) <= intended), layer
    assert any(layer.startswith("mtp.") for layer in layers) and all(
        vllm_skips_layer(layer, skips, naming) for layer in layers if layer.startswith("mtp."))


def test_the_old_skip_list_quantizes_vllms_vision_tower_and_mtp_draft():
    config = AutoConfig.from_pretrained(QWEN)
    naming = VLLM_NAMING["Qwen3_5ForConditionalGeneration"]
    old = ("in_proj_a", "in_proj_b", "lm_head", "model.visual")
    assert not vllm_skips_layer("visual.blocks.0.mlp.linear_fc2", old, naming)  # in_features 4304: AWQ fails there
    assert not vllm_skips_layer("mtp.layers.0.self_attn.qkv_proj", old, naming)
    assert vllm_skips_layer("language_model.model.layers.0.linear_attn.in_proj_ba", old, naming)
    with pytest.raises(ValueError, match="some but not all parts"):
        vllm_skips_layer("language_model.model.layers.0.linear_attn.in_proj_ba", ("in_proj_a",), naming)
    layers = vllm_layers([n for n, m in meta_model(config).named_modules() if isinstance(m, torch.nn.Linear)], naming)
    assert "language_model.model.layers.0.linear_attn.in_proj_qkvz" in layers
    assert layers["language_model.model.layers.3.self_attn.qkv_proj"] == tuple(
        f"model.language_model.layers.3.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj"))


# ---- kernels and dtype ------------------------------------------------------------------------------------

def test_kernels_of_the_bundled_model_on_this_cpu():
    spec = ModelSpec(source="bundled", device="cpu")
    model = load_source(spec, torch.device("cpu")).model
    k = kernels_of(model)
    assert set(k.deltanet) >= {"torch_chunk_gated_delta_rule", "causal_conv1d_fn"}
    assert k.deltanet_summary == "torch fallback"  # flash-linear-attention must never be installed on a CPU machine
    assert k.linear == () and k.compute_dtype == "bfloat16" and k.attention


def test_records_say_the_dtype_the_model_ran_in(write_recipe, monkeypatch):
    """transformers turns an AWQ model's bf16 into fp16 on CUDA; here a loader that does the same stands in."""
    import quantlab.runtimes.transformers as runtime

    real = runtime._from_pretrained

    def loads_in_fp16(auto_class, location, revision, dtype, device, **extra):
        return real(auto_class, location, revision, torch.float16, device, **extra)

    monkeypatch.setattr(runtime, "_from_pretrained", loads_in_fp16)
    path = write_recipe({"name": "dtype", "model": {"source": "bundled", "device": "cpu", "dtype": "bfloat16"},
                         "measure": {"contexts": [16], "new_tokens": 2, "warmup": 0, "repeats": 1}})
    (record,) = run_recipe(load_recipe(path), progress=False, echo=quiet).records
    assert record.model.dtype == "float16" and record.model.requested_dtype == "bfloat16"
    assert record.kernels.compute_dtype == "float16"
    assert any("ran in float16, not the recipe's bfloat16" in n for n in record.notes)


def test_awq_kernel_is_checked_before_any_load(write_recipe):
    bad = write_recipe({"name": "k", "model": {"source": "bundled", "device": "cpu", "awq_kernel": "gemm_triton"}})
    with pytest.raises(QuantlabError, match="only AWQ checkpoints take a kernel choice"):
        make_plan(load_recipe(bad))
    unknown = write_recipe({"name": "k", "model": {"source": "bundled", "device": "cpu", "awq_kernel": "fastest"},
                            "quantization": {"method": "awq"}}, name="u.yaml")
    with pytest.raises(QuantlabError, match="model.awq_kernel 'fastest': not an AWQ kernel transformers knows; "
                                            "allowed: .*gemm_triton"):
        make_plan(load_recipe(unknown))


def test_awq_kernel_reaches_from_pretrained_for_awq_checkpoints_only():
    from quantlab.runtimes.transformers import awq_kernel_kwargs

    config = AutoConfig.from_pretrained(bundled_model_dir())
    spec = ModelSpec(source="local", path="/x", awq_kernel="gemm_triton")
    assert awq_kernel_kwargs(spec.awq_kernel, config) == {}
    config.quantization_config = {"quant_method": "awq", "bits": 4, "group_size": 128}
    (qc,) = awq_kernel_kwargs(spec.awq_kernel, config).values()
    assert str(getattr(qc.backend, "value", qc.backend)) == "gemm_triton"


def test_lookup_table_is_not_read_whole_per_decode_step(tiny_config_dir):
    spec = ModelSpec(source="bundled", device="cpu")
    model = load_source(spec, torch.device("cpu")).model
    table = model.get_input_embeddings().weight
    assert lookup_table_bytes(model) == table.numel() * table.element_size()
    model.lm_head.weight = table  # tied: lm_head reads the whole table every step
    assert lookup_table_bytes(model) == 0


# ---- bitsandbytes floor ---------------------------------------------------------------------------------

def test_bitsandbytes_older_than_transformers_accepts_is_refused(monkeypatch, write_recipe):
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.45.5" if name == "bitsandbytes" else real(name))
    assert "0.45.5 is older than 0.46.1" in bnb.bitsandbytes_problem()
    path = write_recipe({"name": "old-bnb", "model": {"source": "bundled", "device": "cpu"},
                         "quantization": {"method": "bnb_int8"}})
    with pytest.raises(QuantlabError, match=r"quantization.method bnb_int8: bitsandbytes 0.45.5 is older than 0.46.1"):
        make_plan(load_recipe(path))
    monkeypatch.setattr(metadata, "version", real)
    assert bnb.bitsandbytes_problem() is None


def test_declared_bitsandbytes_floor_is_the_one_transformers_needs():
    text = (REPO / "pyproject.toml").read_text()
    assert f'"bitsandbytes>={bnb.BNB_MIN_VERSION}"' in text and bnb.BNB_MIN_VERSION == "0.46.1"


# ---- NVML: this process, or the device, and which ------------------------------------------------------------

def _proc(pid, used):
    return types.SimpleNamespace(pid=pid, usedGpuMemory=used)


def test_nvml_process_figure_says_how_it_was_found():
    assert process_figure([_proc(7, 100), _proc(9, 5)], 7) == (100, PID_MATCH, None)
    assert process_figure([_proc(4242, 300)], 7) == (300, SOLE_PROCESS, None)  # container PID namespace
    used, basis, why = process_figure([_proc(1, 10), _proc(2, 20)], 7)
    assert used is None and basis is None and "cannot be told apart" in why
    assert process_figure([], 7) == (None, None, None)


# ---- each phase starts settled: a fake CUDA device ------------------------------------------------------------

class _FakeCuda:
    """Stands in for torch.cuda on this CPU machine and logs the calls the trackers make."""

    def __init__(self):
        self.calls: list[str] = []
        self.allocated = 1000

    def install(self, monkeypatch):
        for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
            monkeypatch.setattr(torch.cuda, name, lambda *a, _n=name, **k: self.calls.append(_n))
        for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
            monkeypatch.setattr(torch.cuda, name, lambda *a, **k: self.allocated)


class _FakeNvml:
    unavailable = None
    process_unknown = None
    process_basis = PID_MATCH

    def device_used(self):
        return 5000

    def process_used(self):
        return 4000


def test_every_phase_starts_after_empty_cache(monkeypatch, tiny_config_dir):
    spec = ModelSpec(source="synthetic", config=str(tiny_config_dir), device="cpu", dtype="float32")
    model = load_source(spec, torch.device("cpu")).model
    fake = _FakeCuda()
    fake.install(monkeypatch)
    monkeypatch.setattr("quantlab.measure.prompt_ids",
                        lambda vocab, batch, context, seed, device: torch.randint(0, vocab, (batch, context)))
    result = measure_point(TransformersRuntime(), model, PointSettings(16, 1, 2, 1, 2), torch.device("cuda", 0),
                           _FakeNvml(), progress=False)
    assert result.status == "ok"
    phases = 2 * (1 + 2)  # prefill and decode, warm-up and repeats
    resets = [i for i, c in enumerate(fake.calls) if c == "reset_peak_memory_stats"]
    assert len(resets) == phases
    for i in resets:  # the cache is emptied before every phase's peak counter starts
        assert "empty_cache" in fake.calls[max(0, i - 3):i]
    for mem in (result.prefill_memory, result.decode_memory):
        assert mem.start_state == memory_module.SETTLED_CUDA
        assert mem.allocated_start_bytes == 1000 and mem.nvml_device_used_start_bytes == 5000
        assert mem.nvml_process_basis == PID_MATCH


# ---- the GPU check script -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("gpu_check_all", REPO / "scripts" / "gpu_check_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_gpu_check_steps_are_in_priority_order_and_fit_the_device_budget(check):
    assert [s.name for s in check.STEPS] == ["bf16", "nf4", "awq", "int8", "tests"]
    for step in check.STEPS:
        assert step.min_s <= step.cap_s
        if step.recipe:
            plan = make_plan(load_recipe(check.RECIPES / step.recipe), for_this_machine=False)
            assert plan.source.name == "Qwen3.6-27B" and plan.recipe.model.source == "synthetic"
    defaults = check._parser().parse_args([])
    assert defaults.budget_s <= 9 * 60  # the ceiling for one call of the lent GPU
    with pytest.raises(SystemExit, match="unknown step"):
        check._selected("bf16,fp8")


def test_rehearsal_recipes_use_the_bundled_config_on_the_cpu(check):
    rewritten = check._recipes(check.STEPS, rehearse=True, log=quiet)
    for name, path in rewritten.items():
        recipe = load_recipe(path).recipe
        assert recipe.model.config == "bundled" and recipe.model.device == "cpu" and recipe.model.awq_kernel is None
        assert max(recipe.measure.contexts) <= 512
        make_plan(load_recipe(path), for_this_machine=False)


def test_pack_puts_the_records_in_one_file_the_device_tool_returns(check, tmp_path):
    records = tmp_path / "m" / "records"
    records.mkdir(parents=True)
    for i in range(12):  # more records than the tool returns files
        (records / f"r{i}.json").write_text(json.dumps({"i": i}))
    out = tmp_path / "out"
    out.mkdir()
    check._pack(out, tmp_path / "m", quiet)
    with tarfile.open(out / "gpu-check-records.tar") as tar:
        assert sorted(tar.getnames()) == sorted(f"records/r{i}.json" for i in range(12))
    assert [p.name for p in out.iterdir()] == ["gpu-check-records.tar"]


def test_gpu_check_refuses_to_run_without_a_gpu(check, monkeypatch, capsys):
    monkeypatch.setattr(check, "_gpu_visible", lambda: False)
    monkeypatch.delenv("OUT", raising=False)
    assert check.main([]) == 2
    assert "make gpu-rehearse" in capsys.readouterr().out


def test_fla_preflight_runs_the_librarys_public_check(check):
    """The preflight's subprocess calls quantlab.kernels' public check, nothing private; on this CPU (no fla) the
    check compares transformers' torch reference with itself, and says so."""
    from quantlab.kernels import check_deltanet_against_reference

    assert "check_deltanet_against_reference('cuda')" in check._FLA_CHECK
    assert " _" not in check._FLA_CHECK and "import _" not in check._FLA_CHECK
    lines: list[str] = []
    check_deltanet_against_reference("cpu", echo=lines.append)
    assert lines[0].startswith("torch_chunk_gated_delta_rule: torch fallback")
    assert lines[1] == "  relative error vs transformers' torch reference: output 0.00e+00, final state 0.00e+00"
    assert lines[2].startswith("torch_recurrent_gated_delta_rule: ") and lines[-1] == "fla preflight ok"
    with pytest.raises(AssertionError, match="fla disagrees with the torch reference"):
        check_deltanet_against_reference("cpu", tolerance=0.0, echo=quiet)


def test_summary_labels_nvidia_smi_as_the_report_does_in_its_own_gb(check):
    phase = lambda process, device: types.SimpleNamespace(  # noqa: E731
        nvml_process_used_peak_bytes=process, nvml_device_used_peak_bytes=device)
    res = types.SimpleNamespace(prefill_memory=phase(None, 3_000_000_000), decode_memory=phase(512_000_000, None))
    assert check._nvml(res) == "0.51 (process)"  # the report would write 0.512: the summary keeps two decimals
    res = types.SimpleNamespace(prefill_memory=phase(None, 3_000_000_000), decode_memory=phase(None, 2_000_000_000))
    assert check._nvml(res) == "3.00 (device, all processes)"
    unread = types.SimpleNamespace(prefill_memory=phase(None, None), decode_memory=phase(None, None))
    assert check._nvml(unread) == "n/a"
