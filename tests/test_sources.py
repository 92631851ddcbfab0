"""The three model sources: synthetic, local folder, Hub (offline), and the real shapes on meta."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from quantlab.errors import QuantlabError
from quantlab.plan import make_plan
from quantlab.recipe import ModelSpec, load_recipe
from quantlab.sources import meta_model

from conftest import load_source, QWEN_CONFIG_DIR, count_by_role, layer_pattern

QWEN_TEXT_PARAMETERS = 26_895_998_464
# shared/reference/models.md, measured by instantiating the config on the meta device.
REFERENCE_COMPONENTS = {
    "mlp": 17_112_760_320,
    "deltanet_linear+small": 5_560_074_240,
    "full_attention_linear": 1_677_721_600,
    "embed_tokens": 1_271_398_400,
    "lm_head": 1_271_398_400,
    "deltanet_conv_and_params": 1_970_688,
    "norm": 674_816,
}


def test_full_size_qwen_on_meta_has_exact_parameter_count():
    config = AutoConfig.from_pretrained(QWEN_CONFIG_DIR)
    assert sum(p.numel() for p in meta_model(config.text_config, AutoModelForCausalLM).parameters()) == QWEN_TEXT_PARAMETERS


def test_full_size_qwen_components_match_reference():
    config = AutoConfig.from_pretrained(QWEN_CONFIG_DIR).text_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    counts = count_by_role(type(model).__name__, ((n, p.numel()) for n, p in model.named_parameters()))
    counts["deltanet_linear+small"] = counts.pop("deltanet_linear") + counts.pop("deltanet_small_linear")
    assert counts == REFERENCE_COMPONENTS
    assert layer_pattern(config.layer_types) == "16 × (3 linear_attention + 1 full_attention)"
    attn = model.model.layers[3].self_attn
    assert attn.q_proj.out_features == 2 * 24 * 256  # gated attention
    assert model.model.layers[0].linear_attn.in_proj_a.out_features == 48


def test_synthetic_plan_on_meta_counts_real_shapes(write_recipe):
    path = write_recipe({"name": "x", "model": {"source": "synthetic", "config": "qwen3.6-27b", "device": "cuda"}})
    plan = make_plan(load_recipe(path), for_this_machine=False)
    assert plan.parameters == QWEN_TEXT_PARAMETERS
    assert plan.model_class == "Qwen3_5ForCausalLM"


@pytest.mark.parametrize("variant, cls", [("text", "Qwen3_5ForCausalLM"), ("full", "Qwen3_5ForConditionalGeneration")])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_synthetic_tiny_has_config_shapes_dtype_and_label(tiny_config_dir, variant, cls, dtype):
    spec = ModelSpec(source="synthetic", config=str(tiny_config_dir), variant=variant, dtype=dtype, device="cpu")
    loaded = load_source(spec, torch.device("cpu"))
    assert type(loaded.model).__name__ == cls
    assert loaded.info.weights == "synthetic"
    params = list(loaded.model.parameters())
    assert {p.dtype for p in params} == {getattr(torch, dtype)}
    assert {p.device.type for p in params} == {"cpu"}
    emb = loaded.model.get_input_embeddings().weight
    assert tuple(emb.shape) == (512, 128)
    assert emb.float().std() > 0  # random, not zeros


def test_synthetic_weights_depend_on_seed(tiny_config_dir):
    def first_weight(seed):
        spec = ModelSpec(source="synthetic", config=str(tiny_config_dir), device="cpu", seed=seed)
        return load_source(spec, torch.device("cpu")).model.lm_head.weight.clone()

    assert torch.equal(first_weight(1), first_weight(1))
    assert not torch.equal(first_weight(1), first_weight(2))


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tiny_config_dir):
    """A tiny text model saved twice: as one file, and as shards with an index."""
    config = AutoConfig.from_pretrained(tiny_config_dir).text_config
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    single = tmp_path_factory.mktemp("single")
    sharded = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="500KB")
    return model, single, sharded


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_local_folder_loads_the_saved_weights(saved_tiny, layout):
    model, single, sharded = saved_tiny
    folder = single if layout == "single" else sharded
    if layout == "sharded":
        assert (folder / "model.safetensors.index.json").is_file()
    spec = ModelSpec(source="local", path=str(folder), device="cpu")
    loaded = load_source(spec, torch.device("cpu"))
    assert loaded.info.weights == "real" and loaded.info.source == "local"
    assert torch.equal(loaded.model.lm_head.weight, model.lm_head.weight)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _load_local(folder: Path):
    spec = ModelSpec(source="local", path=str(folder), device="cpu")
    return load_source(spec, torch.device("cpu"))


def test_truncated_shard_is_named_with_missing_bytes(saved_tiny, tmp_path):
    folder = _copy(saved_tiny[2], tmp_path / "m")
    shard = sorted(folder.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(QuantlabError, match=rf"{shard.name}: truncated shard: .* \(1,000 missing\)"):
        _load_local(folder)


def test_corrupt_shard_header(saved_tiny, tmp_path):
    folder = _copy(saved_tiny[1], tmp_path / "m")
    shard = folder / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\x00garbage!!!\xff"
    shard.write_bytes(bytes(data))
    with pytest.raises(QuantlabError, match="corrupt shard: its header is not valid JSON"):
        _load_local(folder)


def test_missing_shard_listed_in_index(saved_tiny, tmp_path):
    folder = _copy(saved_tiny[2], tmp_path / "m")
    sorted(folder.glob("*.safetensors"))[0].unlink()
    with pytest.raises(QuantlabError, match="lists shards that are not in the folder"):
        _load_local(folder)


def test_missing_config(saved_tiny, tmp_path):
    folder = _copy(saved_tiny[1], tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(QuantlabError, match="no config.json"):
        _load_local(folder)


def test_unknown_architecture(saved_tiny, tmp_path):
    folder = _copy(saved_tiny[1], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "qwen9_moe_hyper"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantlabError, match="unknown architecture \\(model_type 'qwen9_moe_hyper'\\)"):
        _load_local(folder)


def test_missing_folder():
    with pytest.raises(QuantlabError, match="model folder not found"):
        _load_local(Path("/nonexistent/model"))


def _run_cli_offline(args, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    return subprocess.run([sys.executable, "-m", "quantlab", *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


@pytest.mark.slow
def test_hub_offline_not_cached_says_how_to_get_weights(write_recipe, tmp_path):
    path = write_recipe({"name": "x", "model": {"source": "hub", "id": "Qwen/Qwen3.6-27B", "device": "cpu", "dtype": "bfloat16"},
                         "measure": {"contexts": [8]}})
    out = _run_cli_offline(["validate", str(path)], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Qwen3.6-27B (hub, text)" in out.stdout
    other = write_recipe({"name": "y", "model": {"source": "hub", "id": "someone/unknown-model", "device": "cpu"}}, "other.yaml")
    out = _run_cli_offline(["run", str(other)], tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "someone/unknown-model: the weights are not in the Hugging Face cache" in out.stderr
    assert "HF_HUB_OFFLINE is set" in out.stderr
    assert "hf download someone/unknown-model" in out.stderr
    assert str(tmp_path / "hf-home") in out.stderr


@pytest.mark.slow
def test_hub_load_offline_for_known_model_fails_cleanly(tmp_path, tiny_config_dir):
    """Loading (not planning) Qwen/Qwen3.6-27B offline: a clear message, pointing to synthetic weights too."""
    code = (
        "import torch\n"
        "from quantlab.recipe import ModelSpec\n"
        "from quantlab.runtimes.transformers import load_model\n"
        "from quantlab.sources import resolve\n"
        "from quantlab.errors import QuantlabError\n"
        "spec = ModelSpec(source='hub', id='Qwen/Qwen3.6-27B', device='cpu')\n"
        "try:\n"
        "    load_model(resolve(spec), torch.device('meta'))\n"
        "except QuantlabError as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "hf download Qwen/Qwen3.6-27B" in out.stdout, out.stderr
    assert "source: synthetic, config: qwen3.6-27b" in out.stdout
