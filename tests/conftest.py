"""Shared fixtures: tiny qwen3_5 configs and recipe files, all in temporary folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from transformers import AutoConfig
from transformers.utils import logging as hf_logging

REPO = Path(__file__).resolve().parent.parent
QWEN_CONFIG_DIR = REPO / "quantlab" / "data" / "qwen3.6-27b"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run where torch sees a CUDA GPU and are skipped elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


REQUIRE_VLLM_ENV = "QUANTLAB_REQUIRE_VLLM"


def require_vllm():
    """vLLM's Python (.vllm/, quantlab/vllm_server), or the calling test skipped where vLLM is not installed; with
    QUANTLAB_REQUIRE_VLLM=1 (as QUANTLAB_REQUIRE_LLAMA_CPP for llama.cpp) a missing vLLM fails the test instead."""
    from quantlab.errors import QuantlabError
    from quantlab.vllm_server.server import vllm_python

    try:
        return vllm_python()
    except QuantlabError as exc:
        if os.environ.get(REQUIRE_VLLM_ENV, "") not in ("", "0"):
            pytest.fail(f"{REQUIRE_VLLM_ENV} is set, but {exc}")
        pytest.skip(str(exc))


HF_CACHE_VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE")


@pytest.fixture(autouse=True)
def _hf_cache_variables_unchanged():
    """Importing gptqmodel (through transformers' AWQ loading) sets these in os.environ (tokenicer does);
    tests that start subprocesses with their own HF_HOME must not inherit them."""
    saved = {k: os.environ.get(k) for k in HF_CACHE_VARIABLES}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers():
    hf_logging.set_verbosity_error()


def tiny_qwen3_5_config():
    """The real Qwen3.6-27B config, shrunk: same classes, same 3:1 layer pattern, vision tower included."""
    config = AutoConfig.from_pretrained(QWEN_CONFIG_DIR)
    text = config.text_config
    text.update(dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, layer_types=text.layer_types[:4],
        vocab_size=512, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=32, linear_value_head_dim=32,
        max_position_embeddings=1024,
    ))
    config.vision_config.update(dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128))
    return config


def save_vl_checkpoint(config, folder: Path) -> Path:
    """A Qwen3.6-shaped VL checkpoint of `config`, random BF16 weights (seed 0), in two shards, the second holding
    mtp.* tensors (one decoder layer shaped like the full-attention layer 3, fc, norms), as Qwen ships them."""
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    h, layer = config.text_config.hidden_size, "model.language_model.layers.3."
    mtp = {f"mtp.layers.0.{n[len(layer):]}": torch.randn(p.shape).to(torch.bfloat16)
           for n, p in model.state_dict().items() if n.startswith(layer)}
    mtp["mtp.fc.weight"] = torch.randn(h, 2 * h).to(torch.bfloat16)
    for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        mtp[f"mtp.{norm}.weight"] = torch.ones(h, dtype=torch.bfloat16)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    save_file(mtp, folder / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {n: "model-00001-of-00002.safetensors" for n in model.state_dict()}
    weight_map.update({n: "model-00002-of-00002.safetensors" for n in mtp})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="session")
def tiny_config_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-qwen3_5")
    tiny_qwen3_5_config().save_pretrained(folder)
    return folder


@pytest.fixture
def write_recipe(tmp_path):
    """write_recipe(dict) -> path of a YAML recipe in a temporary folder (output there too)."""
    def write(data: dict, name: str = "recipe.yaml") -> Path:
        data = {"output": {"dir": str(tmp_path / "measurements")}, **data}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


def forbid_weight_loads(monkeypatch) -> None:
    """The one seam for "no weights may load": every load of real or random weights goes through the transformers
    runtime's two loaders or the AWQ engine's shard reader; each fails the test when called."""
    import quantlab.quantize.awq.shards as shards
    import quantlab.runtimes.transformers as runtime

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the check")

    monkeypatch.setattr(runtime, "load_pretrained", refuse)
    monkeypatch.setattr(runtime, "_synthetic", refuse)
    monkeypatch.setattr(runtime, "synthetic_split", refuse)
    monkeypatch.setattr(shards.ShardReader, "get", refuse)


@pytest.fixture
def no_weights_load(monkeypatch):
    forbid_weight_loads(monkeypatch)


def load_source(spec, device="cpu"):
    """The model a ModelSpec names, loaded as a run loads it (the transformers runtime)."""
    import torch

    from quantlab.runtimes.transformers import load_model
    from quantlab.sources import resolve

    return load_model(resolve(spec), torch.device(device))


def save_bnb_copy(model, folder, method: str, **params) -> None:
    """Save `model` quantized the way `quantlab build` does: through transformers' from_pretrained with quantlab's
    skip list, saved before any forward pass."""
    import tempfile

    import torch

    from quantlab.methods import METHODS
    from quantlab.quantize.skips import skip_plan

    bnb_method = METHODS[method]
    qconfig = bnb_method.config.model_validate({"method": method, **params})
    plan = skip_plan(model, method, qconfig.skip_modules, qconfig.skip_classes)
    with tempfile.TemporaryDirectory(prefix="quantlab-bnb-") as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)
        quantized = type(model).from_pretrained(
            tmp, dtype=torch.bfloat16, device_map="cpu",
            quantization_config=bnb_method.transformers_config(qconfig, plan.patterns),
        )
        quantized.save_pretrained(folder)


# ---- helpers that only tests need -----------------------------------------------------------------------------

def count_by_role(class_name: str, shapes) -> dict[str, int]:
    """Parameter count per role (quantlab.architecture's table), from (tensor name, element count) pairs."""
    from collections import Counter

    from quantlab.architecture import ROLES, role_of

    counts: Counter[str] = Counter()
    for name, numel in shapes:
        counts[role_of(class_name, name)] += numel
    return {role: counts[role] for role in ROLES if counts[role]}


def layer_pattern(layer_types) -> str:
    """A compact description of a hybrid layer layout, e.g. '16 × (3 linear_attention + 1 full_attention)'."""
    from collections import Counter

    types = list(layer_types)
    for period in range(1, len(types) + 1):
        block = types[:period]
        if len(types) % period == 0 and block * (len(types) // period) == types:
            inner = " + ".join(f"{n} {kind}" for kind, n in Counter(block).items())
            return f"{len(types) // period} × ({inner})"
    return " + ".join(types)
