"""Model configs that ship with quantlab as data, so shapes are known without the Hub."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class KnownModel:
    key: str
    display_name: str
    hub_id: str
    data_dir: str


KNOWN_MODELS = {
    m.key: m
    for m in (
        KnownModel("qwen3.6-27b", "Qwen3.6-27B", "Qwen/Qwen3.6-27B", "qwen3.6-27b"),
        # Text config only (the MoE predecessor the article compares against); see its SOURCE.md.
        KnownModel("qwen3.5-397b-a17b", "Qwen3.5-397B-A17B", "Qwen/Qwen3.5-397B-A17B", "qwen3.5-397b-a17b"),
    )
}


def known_config_dir(key: str) -> Path:
    return Path(str(resources.files("quantlab.data").joinpath(KNOWN_MODELS[key].data_dir)))


def known_by_hub_id(hub_id: str) -> KnownModel | None:
    return next((m for m in KNOWN_MODELS.values() if m.hub_id.lower() == hub_id.lower()), None)
