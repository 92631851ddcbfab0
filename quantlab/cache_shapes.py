"""Qwen3.6-27B's cache shapes in a narrow model: `model: {source: synthetic, config: qwen3.6-27b-cache-shapes}`.

Why it exists: vLLM sizes its KV cache from the cache shapes alone (the full-attention layers' KV heads × head_dim,
the DeltaNet layers' conv and recurrent state, the layer pattern), never from the hidden size, the FFN or the
vocabulary. A model with the 27B's exact cache shapes and narrow everything else starts in vLLM's CPU build with
dummy weights in under a minute and a few hundred MB, so vLLM's own accounting of the 27B's cache (block size,
mamba page padding, cache groups, KV tokens, maximum concurrency) can be read on a machine with no GPU and no Hub,
and checked against quantlab's model of it (quantlab/estimate/vllm_cache.py; scripts/check_vllm_accounting.py).

The config is the shipped Qwen3.6-27B text config (quantlab/data/qwen3.6-27b) as a text-only Qwen3_5ForCausalLM,
with hidden 256, FFN 512 and vocab 2048; every layer, head, head dim, state dim and dtype is kept. `made_folder()`
writes it (config.json and generation_config.json: what vLLM needs with --load-format dummy
--skip-tokenizer-init) into quantlab's cache of made models (quantlab/made_sources.py), once.
"""

from __future__ import annotations

import json
from pathlib import Path

from quantlab.known_models import known_config_dir
from quantlab.made_sources import MadeModel

NAME = "qwen3.6-27b-cache-shapes"
DISPLAY_NAME = "Qwen3.6-27B-cache-shapes"
BASE = "qwen3.6-27b"
# The widths vLLM's cache accounting never reads, narrowed; everything else is the 27B's.
NARROWED = {"hidden_size": 256, "intermediate_size": 512, "vocab_size": 2048}
VERSION = 1  # raise when write_files would write other bytes for the same inputs
ARCHITECTURE = "Qwen3_5ForCausalLM"


def config_dict() -> dict:
    """The narrow text config as config.json holds it."""
    full = json.loads((known_config_dir(BASE) / "config.json").read_text(encoding="utf-8"))
    text = dict(full["text_config"])
    text.update(NARROWED)
    text.pop("mtp_num_hidden_layers", None)  # no MTP head: vLLM skips it without speculative decoding anyway
    return {"architectures": [ARCHITECTURE], **text, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}


def config():
    """The narrow config as transformers reads it (a Qwen3_5TextConfig), nothing written."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    raw = config_dict()
    return CONFIG_MAPPING[raw["model_type"]].from_dict(raw)


def write_files(folder: Path) -> None:
    """config.json and generation_config.json into `folder` (an empty one)."""
    (folder / "config.json").write_text(json.dumps(config_dict(), indent=2) + "\n", encoding="utf-8")
    generation = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")


def made_model() -> MadeModel:
    """The made model's description: its cache folder is keyed by the shipped 27B config and the narrowed widths."""
    return MadeModel(kind=NAME, label=NAME, inputs=known_config_dir(BASE), params=dict(NARROWED), version=VERSION,
                     make=write_files, what=f"{DISPLAY_NAME} (Qwen3.6-27B's cache shapes, narrow widths)")


def made_folder() -> Path:
    """The config folder for vLLM (`--model FOLDER --load-format dummy --skip-tokenizer-init`), made on first use."""
    return made_model().ensure()
