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
