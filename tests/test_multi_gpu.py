"""A model split across GPUs: accelerate's device map planned on the meta device, recipes that ask for it, the
load and the trackers across devices, and `quantlab estimate --gpus` (accelerate's split and vLLM's TP)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError

from conftest import forbid_weight_loads
from quantlab.device_map import DeviceSplit, device_of, plan_split
from quantlab.errors import QuantlabError
from quantlab.estimate.estimator import weights_for
from quantlab.estimate.model import read_estimation_model
from quantlab.estimate.multi_gpu import accelerate_shares, longest_context, parse_gpu_sets, share_memory
from quantlab.estimate.runtime import max_context, runtime_profile
from quantlab.estimate.schemes import get_scheme
from quantlab.plan import make_plan
from quantlab.recipe import ModelSpec, load_recipe
from quantlab.sources import resolve

GIB = 2**30
TWO_GPUS = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@pytest.fixture(scope="module")
def qwen27b():
    config, auto_class = resolve(ModelSpec(source="synthetic", config="qwen3.6-27b")).variant()
    return config, auto_class


def _accelerates_own_map(config, auto_class, max_memory: dict) -> dict:
    """What accelerate itself gives for device_map="auto" (balanced memory, then infer_auto_device_map)."""
    from accelerate import init_empty_weights
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    with init_empty_weights():
        model = auto_class.from_config(config, dtype=torch.bfloat16)
    no_split = list(model._no_split_modules)
    balanced = get_balanced_memory(model, max_memory=dict(max_memory), no_split_module_classes=no_split)
    return infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split)


@pytest.mark.parametrize("offered", [
    {"cuda:0": 30 * GIB, "cuda:1": 30 * GIB},
    {"cuda:0": 20 * GIB, "cuda:1": 20 * GIB, "cuda:2": 20 * GIB},
    {"cuda:0": 8 * GIB, "cuda:1": 60 * GIB},
    {"cuda:0": 20 * GIB, "cpu": 64 * GIB},
])
def test_the_planned_map_is_accelerates_own(qwen27b, offered):
    config, auto_class = qwen27b
    split = plan_split(config, auto_class, torch.bfloat16, offered)
    accelerate_memory = {int(k.split(":")[1]) if k.startswith("cuda:") else k: v for k, v in offered.items()}
    assert split.accelerate_map() == _accelerates_own_map(config, auto_class, accelerate_memory)
    layers = [i for device in split.devices for i in split.layers_per_device.get(device, ())]
    assert sorted(layers) == list(range(64))  # every decoder layer, each on one device
    placed = sum(split.bytes_per_device.values()) - 2 * 26_895_998_464  # the BF16 text model, all of it placed ...
    assert 0 <= placed <= 4096  # ... with its buffers (the rotary frequencies)
    assert all(split.bytes_per_device[d] <= offered[d] for d in split.devices)


def test_a_model_that_does_not_fit_is_refused_with_its_sizes(qwen27b):
    config, auto_class = qwen27b
    with pytest.raises(QuantlabError, match=r"53\.79 GB as loaded\) do not fit .*cuda:0 12\.00 GiB.*balanced or "
                       r"sequential, would send 31\.45 GB to disk .*the largest 2\.54 GB.*cpu entry"):
        plan_split(config, auto_class, torch.bfloat16, {"cuda:0": 12 * GIB, "cuda:1": 12 * GIB})
    with pytest.raises(QuantlabError, match=r"more host RAM \(the cpu entry\)"):
        plan_split(config, auto_class, torch.bfloat16, {"cuda:0": 20 * GIB, "cpu": 10 * GIB})
    with pytest.raises(QuantlabError, match="puts nothing on a GPU"):
        plan_split(config, auto_class, torch.bfloat16, {"cuda:0": 1000, "cpu": 64 * GIB})


def test_where_the_balanced_map_spills_the_sequential_one_is_used_and_said(qwen27b):
    """accelerate's balanced map caps each GPU but the last near an even share; with many GPUs that share is less
    than the 2.5 GB embedding, which then moves on and on, and the map spills although the model fits."""
    config, auto_class = qwen27b
    offered = {f"cuda:{i}": 24 * GIB for i in range(64)}
    split = plan_split(config, auto_class, torch.bfloat16, offered)
    assert split.strategy == "sequential" and split.devices == ("cuda:0", "cuda:1", "cuda:2")
    lines = split.lines()
    assert "unused: cuda:3-63 (61 GPUs)" in lines[-2] and "sequential map" in lines[-1]
    two = plan_split(config, auto_class, torch.bfloat16, {"cuda:0": 30 * GIB, "cuda:1": 30 * GIB})
    assert two.strategy == "balanced" and two.unused == ()


def test_bitsandbytes_layers_are_sized_by_its_quantizer(qwen27b):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    config, auto_class = qwen27b
    offered = {"cuda:0": 16 * GIB, "cuda:1": 16 * GIB}
    with pytest.raises(QuantlabError, match="do not fit"):
        plan_split(config, auto_class, torch.bfloat16, offered)  # BF16 does not fit 2 x 16 GiB ...
    nf4 = plan_split(config, auto_class, torch.bfloat16, offered, BitsAndBytesConfig(load_in_4bit=True))
    assert nf4.devices == ("cuda:0", "cuda:1") and sum(nf4.bytes_per_device.values()) < 20e9  # ... 4-bit does


def test_a_module_goes_where_the_nearest_entry_that_holds_it_goes():
    device_map = {"": "cuda:0", "model.layers.3": "cuda:1", "model.layers.30": "cpu"}
    assert device_of("model.layers.3.mlp", device_map) == "cuda:1"
    assert device_of("model.layers.31", device_map) == "cuda:0"  # not model.layers.3's: a name, not a prefix
    assert device_of("lm_head", device_map) == "cuda:0"
    split = DeviceSplit({"cuda:0": 1}, {"": "cuda:0"}, {"cuda:0": 1}, {"cuda:0": (0, 1)})
    assert split.first_device == "cuda:0" and split.gpus == ("cuda:0",)


# ---- recipes ----------------------------------------------------------------------------------------------

def _spec(**split):
    return ModelSpec(source="synthetic", config="qwen3.6-27b", **split)


@pytest.mark.parametrize("split, message", [
    ({"max_memory": {"cuda:0": "-1GB"}}, "is not a memory size"),
    ({"max_memory": {"cuda:0": "twenty"}}, "is not a memory size"),
    ({"max_memory": {"cuda:0": "0GiB"}}, "more than zero"),
    ({"max_memory": {"gpu0": "20GiB"}}, "is not a device; write cuda:0"),
    ({"max_memory": {"cuda:01": "20GiB"}}, "is not a device; write cuda:0"),
    ({"max_memory": {"cuda:0": 20}}, "needs a unit, e.g. 20GiB"),
    ({"max_memory": {"cpu": "20GiB"}}, "names no GPU"),
    ({"max_memory": {}}, "at least 1 item"),
    ({"gpus": 0}, "greater than or equal to 1"),
    ({"gpus": 2, "max_memory": {"cuda:0": "20GiB"}}, "not both"),
    ({"gpus": 2, "device": "cuda:0"}, "needs model.device: auto"),
])
def test_bad_split_settings_are_recipe_errors(split, message):
    with pytest.raises(ValidationError, match=message):
        _spec(**split)


def _split_recipe(write_recipe, **split):
    model = {"source": "synthetic", "config": "qwen3.6-27b", "device": "auto", **split}
    return load_recipe(write_recipe({"name": "split", "model": model, "measure": {"contexts": [128]}}))


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() >= 64, reason="has 64 GPUs")
@pytest.mark.parametrize("split, message", [
    ({"max_memory": {"cuda:0": "20GiB", "cuda:63": "20GiB"}}, "names .*cuda:63 but"),
    ({"gpus": 64}, "model.gpus: 64 names .*cuda:63 but"),
])
def test_gpus_that_are_not_here_are_refused_before_any_load(monkeypatch, write_recipe, split, message):
    forbid_weight_loads(monkeypatch)
    with pytest.raises(QuantlabError, match=message):
        make_plan(_split_recipe(write_recipe, **split))


def test_validate_plans_the_map_on_the_meta_device(monkeypatch, write_recipe):
    forbid_weight_loads(monkeypatch)
    plan = make_plan(_split_recipe(write_recipe, max_memory={"cuda:0": "30GiB", "cuda:1": "30GiB"}),
                     for_this_machine=False)
    assert plan.split.devices == ("cuda:0", "cuda:1") and plan.device == torch.device("cuda", 0)
    assert plan.devices == (torch.device("cuda", 0), torch.device("cuda", 1))
    with pytest.raises(QuantlabError, match="do not fit"):
        make_plan(_split_recipe(write_recipe, max_memory={"cuda:0": "10GiB", "cuda:1": "10GiB"}), for_this_machine=False)
    gpus = make_plan(_split_recipe(write_recipe, gpus=2), for_this_machine=False)
    assert gpus.split is None and any("computed on the machine that runs it" in n for n in gpus.notes)


@pytest.mark.slow
def test_validate_prints_the_map(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: split\nmodel: {source: synthetic, config: qwen3.6-27b, device: auto, "
                      "max_memory: {cuda:0: 40GiB, cuda:1: 40GiB}}\n")
    out = subprocess.run([sys.executable, "-m", "quantlab", "validate", str(recipe)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "split across cuda:0, cuda:1 (accelerate's device map)" in out.stdout
    assert "cuda:0: layers 0-28 (29), 24.62 GB of weights (offered 40.00 GiB)" in out.stdout
    assert "cuda:1: layers 29-63 (35), 29.17 GB of weights (offered 40.00 GiB)" in out.stdout


# ---- loading and measuring across devices -----------------------------------------------------------------

def test_synthetic_weights_are_created_module_by_module_where_the_map_says(tiny_config_dir):
    from quantlab.runtimes.transformers import _synthetic, synthetic_split

    config, auto_class = resolve(ModelSpec(source="synthetic", config=str(tiny_config_dir))).variant()
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "cpu" for i in range(config.num_hidden_layers)}}
    split = synthetic_split(config, auto_class, device_map, torch.float32, 0)
    whole = _synthetic(config, auto_class, torch.device("cpu"), torch.float32, 0)
    assert {n: p.shape for n, p in split.named_parameters()} == {n: p.shape for n, p in whole.named_parameters()}
    for name, buffer in whole.named_buffers():  # computed buffers (rotary frequencies) are rebuilt, not left empty
        assert torch.equal(dict(split.named_buffers())[name], buffer), name
    ids = torch.randint(0, config.vocab_size, (1, 12))
    with torch.no_grad():
        logits = split(ids).logits
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_a_checkpoint_is_loaded_with_the_planned_map(monkeypatch):
    import quantlab.runtimes.transformers as runtime

    seen = {}

    def fake_load(auto_class, location, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(runtime, "load_pretrained", fake_load)
    source = resolve(ModelSpec(source="bundled"))
    split = DeviceSplit({"cuda:0": 1, "cuda:1": 1}, {"model": "cuda:0", "lm_head": "cuda:1"}, {}, {})
    with pytest.raises(QuantlabError, match="stop here"):
        runtime.load_model(source, torch.device("cuda", 0), split=split)
    assert seen["device_map"] == {"model": 0, "lm_head": 1}  # accelerate's form: GPU indices


class _FakeCudaDevices:
    """torch.cuda for two fake GPUs: each device's figures differ, so sums and per-device values can be told apart."""

    def __init__(self, monkeypatch):
        self.empty_cache_calls = 0
        per = {0: 1000, 1: 3000}
        index = lambda d: torch.device(d).index or 0  # noqa: E731
        for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
            monkeypatch.setattr(torch.cuda, name, lambda d=None: per[index(d)])
        monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: None)
        monkeypatch.setattr(torch.cuda, "empty_cache", self._empty)

    def _empty(self):
        self.empty_cache_calls += 1


class _FakeNvml:
    unavailable = process_unknown = None
    process_basis = "this process (NVML PID match)"

    def __init__(self, used):
        self.used = used

    def device_used(self):
        return self.used

    def process_used(self):
        return self.used - 100


def test_memory_is_tracked_on_every_gpu_of_a_split(monkeypatch):
    import quantlab.trackers.memory as memory

    _FakeCudaDevices(monkeypatch)
    monkeypatch.setattr(memory, "NvmlProbe", lambda d: _FakeNvml(7000))
    devices = (torch.device("cuda", 0), torch.device("cuda", 1))
    with memory.MemoryTracker(devices[0], nvml=_FakeNvml(5000), settle_first=True, devices=devices) as tracker:
        pass
    result = tracker.result
    assert [d.device for d in result.per_device] == ["cuda:0", "cuda:1"]
    assert [d.allocated_peak_bytes for d in result.per_device] == [1000, 3000]
    assert result.allocated_peak_bytes == 4000 and result.reserved_peak_bytes == 4000
    assert [d.nvml_device_used_peak_bytes for d in result.per_device] == [5000, 7000]
    assert result.nvml_device_used_peak_bytes == 12000 and result.nvml_process_used_peak_bytes == 11800
    assert any("sum of each GPU's own peak" in n for n in result.notes)
    assert result.start_state == memory.SETTLED_CUDA
    with memory.MemoryTracker(devices[0], nvml=_FakeNvml(5000)) as one:
        pass
    assert one.result.per_device == () and one.result.allocated_peak_bytes == 1000  # one GPU: as before


@TWO_GPUS
@pytest.mark.gpu
def test_a_split_run_records_every_gpu(write_recipe, tiny_config_dir):
    from quantlab.run import run_recipe

    recipe = load_recipe(write_recipe({"name": "split", "model": {
        "source": "synthetic", "config": str(tiny_config_dir), "device": "auto",
        "max_memory": {"cuda:0": "8MiB", "cuda:1": "2GiB"}}, "measure": {"contexts": [64], "repeats": 1}}))
    record = run_recipe(recipe, progress=False, echo=lambda _: None).records[0]
    assert record.split is not None and len(record.split.devices) == 2
    assert [d.device for d in record.result.decode_memory.per_device] == ["cuda:0", "cuda:1"]
    assert all(d.allocated_peak_bytes > 0 for d in record.result.decode_memory.per_device)
    assert "split across" in record.produced_by


# ---- the estimator ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def estimation_27b():
    return read_estimation_model("qwen3.6-27b")


@pytest.mark.parametrize("text, message", [("2x", "not COUNTxSIZE"), ("x24", "not COUNTxSIZE"), ("2x-24", "not COUNTxSIZE"),
                                           ("0x24", "1 to 64 GPUs"), ("2xabc", "not COUNTxSIZE"), ("65x24", "1 to 64"),
                                           ("", "at least one GPU set"), (",".join(f"1x{g}" for g in range(1, 10)), "at most 8")])
def test_bad_gpu_sets_are_refused(text, message):
    with pytest.raises(QuantlabError, match=message):
        parse_gpu_sets(text)


def test_gpu_sets_parse():
    assert [(g.count, g.gib, g.label) for g in parse_gpu_sets("2x24, 1x48,8×80,2x24")] == [
        (2, 24.0, "2x24"), (1, 48.0, "1x48"), (8, 80.0, "8x80")]


@pytest.mark.parametrize("key", ["bf16", "nf4"])
def test_one_gpu_split_is_the_single_gpu_estimate(estimation_27b, key):
    if key == "nf4":
        pytest.importorskip("bitsandbytes")
    scheme, rt = get_scheme(key), runtime_profile("transformers")
    weights = weights_for(estimation_27b, scheme)
    gpus = parse_gpu_sets("1x80")[0]
    shares = accelerate_shares(estimation_27b, scheme, weights.bytes(), gpus, rt)
    assert len(shares) == 1 and shares[0].full_attention_layers == 16 and shares[0].deltanet_layers == 48
    tokens, _ = longest_context(shares, estimation_27b, weights, gpus, 1, rt)
    assert tokens == max_context(weights, weights.bytes(), estimation_27b.shape, 80 * GIB, 1, rt).tokens


def test_split_shares_add_up_to_the_model(estimation_27b):
    scheme, rt = get_scheme("bf16"), runtime_profile("transformers")
    weights = weights_for(estimation_27b, scheme)
    shares = accelerate_shares(estimation_27b, scheme, weights.bytes(), parse_gpu_sets("4x24")[0], rt)
    assert abs(sum(s.weight_bytes for s in shares) - weights.bytes()) <= len(shares)
    assert sum(s.full_attention_layers for s in shares) == 16 and sum(s.deltanet_layers for s in shares) == 48
    assert sum(s.has_lm_head for s in shares) == 1
    assert "does not fit" in accelerate_shares(estimation_27b, scheme, weights.bytes(), parse_gpu_sets("2x24")[0], rt)


@pytest.mark.slow
def test_estimate_gpus_writes_both_splits(tmp_path):
    out = subprocess.run([sys.executable, "-m", "quantlab", "estimate", "--methods", "bf16", "--gpus", "2x48,8x24",
                          "--contexts", "4096", "--output", str(tmp_path / "m")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Across GPUs" in out.stdout
    rows = json.loads((tmp_path / "m" / "estimates.json").read_text())["multi_gpu"]
    # 2x48: the even map (one cap on both GPUs) fits more than accelerate's balanced one, and is chosen
    assert {(r["gpus"], r["split"]) for r in rows} == {("2x48", "accelerate-even"), ("2x48", "vllm-tp"),
                                                       ("8x24", "accelerate"), ("8x24", "vllm-tp")}
    tp8 = next(r for r in rows if r["gpus"] == "8x24" and r["split"] == "vllm-tp")
    assert len(tp8["per_gpu"]) == 8 and tp8["max_context"] > 0
    assert "Across GPUs (estimate)" in (tmp_path / "m" / "README.md").read_text()
    llama = subprocess.run([sys.executable, "-m", "quantlab", "estimate", "--methods", "bf16", "--gpus", "2x48", "--contexts",
                            "4096", "--runtime", "llama.cpp", "--output", str(tmp_path / "l")], capture_output=True, text=True)
    assert llama.returncode == 0, llama.stderr  # accelerate's split runs in transformers: the same rows on any --runtime
    same = json.loads((tmp_path / "l" / "estimates.json").read_text())["multi_gpu"]
    assert [r for r in same if r["gpus"] == "2x48"] == [r for r in rows if r["gpus"] == "2x48"]
    bad = subprocess.run([sys.executable, "-m", "quantlab", "estimate", "--gpus", "2x", "--no-write"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not COUNTxSIZE" in bad.stderr and "Traceback" not in bad.stderr


def test_gpus_the_map_leaves_empty_are_listed_as_empty(estimation_27b):
    pytest.importorskip("bitsandbytes")

    scheme, rt = get_scheme("nf4"), runtime_profile("transformers")
    weights = weights_for(estimation_27b, scheme)
    shares = accelerate_shares(estimation_27b, scheme, weights.bytes(), parse_gpu_sets("8x80")[0], rt)
    assert [s.device for s in shares] == [f"cuda:{i}" for i in range(8)]  # every GPU of the set, in order
    empty = [s for s in shares if not s.weight_bytes]
    assert empty and all(share_memory(s, estimation_27b, weights, 4096, 1, rt).total == 0 for s in empty)


def test_an_estimate_row_says_when_accelerates_map_is_the_sequential_one(estimation_27b):
    from quantlab.estimate.multi_gpu import accelerate_estimate

    scheme, rt = get_scheme("bf16"), runtime_profile("transformers")
    weights = weights_for(estimation_27b, scheme)
    many = accelerate_estimate(estimation_27b, scheme, weights, weights.bytes(), parse_gpu_sets("64x24")[0], 1, rt)
    two = accelerate_estimate(estimation_27b, scheme, weights, weights.bytes(), parse_gpu_sets("2x48")[0], 1, rt)
    assert (many.split, two.split) == ("accelerate-sequential", "accelerate")
    assert len(many.per_gpu) == 64
    # the sequential map fills each GPU it uses up to what it offers: no room is left there for a context
    assert many.max_context == 0 and many.limit.startswith("memory (cuda:")
