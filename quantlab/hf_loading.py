"""What transformers needs to load a checkpoint, below every floor that loads one: the config and auto class a
variant instantiates, and the message for weights that are neither in the Hugging Face cache nor reachable."""

from __future__ import annotations

import os

from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig

from quantlab.errors import QuantlabError
from quantlab.known_models import known_by_hub_id


def select_variant(config: PretrainedConfig, variant: str) -> tuple[PretrainedConfig, type]:
    """The config to instantiate and the auto class that loads it."""
    text_config = getattr(config, "text_config", None)
    if variant == "text":
        return (text_config or config), AutoModelForCausalLM
    if text_config is None:
        raise QuantlabError(
            f"model.variant 'full' needs a checkpoint with a vision tower; this one ({config.model_type}) is text-only. "
            "Use variant: text."
        )
    return config, AutoModelForImageTextToText


def hub_unavailable_message(repo_id: str, exc: BaseException) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    why = "HF_HUB_OFFLINE is set" if offline else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    known = known_by_hub_id(repo_id)
    synthetic = f"\n  - or measure with random weights of the exact shapes: model: {{source: synthetic, config: {known.key}}}" if known else ""
    from huggingface_hub import constants

    return (
        f"{repo_id}: the weights are not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub "
        f"cannot be reached ({why}).\nTo get them:\n"
        f"  - on a machine with network: hf download {repo_id}   (HF_HOME decides where the cache is)\n"
        f"  - or copy a downloaded folder here and use model: {{source: local, path: /that/folder}}"
        f"{synthetic}"
    )
