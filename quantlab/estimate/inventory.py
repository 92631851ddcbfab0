"""Every weight tensor of a model, from its config alone: shapes and roles, no weights.

The model is instantiated on the meta device (shapes only, a fraction of a second at 27B) and
each tensor is classified with the architecture's role table. Tensors that differ only by their
layer index are grouped, so a 64-layer model is ~50 groups. MTP tensors, which transformers
does not instantiate, are added from the config: `mtp_num_hidden_layers` copies of one
full-attention decoder layer, plus `mtp.fc` (2h → h) and its three norms.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig

from quantlab.architecture import ROLES, TENSOR_ROLES, role_of, supported_classes
from quantlab.errors import QuantlabError

_LAYER = re.compile(r"\.(layers|blocks)\.(\d+)\.")  # decoder layers; vision blocks


@dataclass(frozen=True)
class TensorGroup:
    """Tensors with one name pattern, role and shape: one per layer in `layers`, or one outside the stack."""

    name: str  # e.g. "model.layers.{i}.mlp.down_proj.weight"
    role: str
    shape: tuple[int, ...]
    layers: tuple[int, ...] = ()

    @property
    def count(self) -> int:
        return len(self.layers) or 1

    @property
    def numel(self) -> int:
        """Elements of one tensor of the group."""
        return math.prod(self.shape)

    @property
    def parameters(self) -> int:
        return self.numel * self.count

    @property
    def row_length(self) -> int:
        """Elements per row (the input features of a Linear): quantization blocks run along it."""
        return self.shape[-1]

    @property
    def rows(self) -> int:
        """Rows of one tensor (output features; × experts for a fused 3-D expert tensor)."""
        return self.numel // self.row_length


@dataclass(frozen=True)
class ModelInventory:
    model_class: str
    groups: tuple[TensorGroup, ...]

    def parameters(self, roles: Iterable[str] | None = None) -> int:
        wanted = None if roles is None else set(roles)
        return sum(g.parameters for g in self.groups if wanted is None or g.role in wanted)

    def by_role(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for g in self.groups:
            counts[g.role] += g.parameters
        return {role: counts[role] for role in ROLES if counts[role]}


def text_config_of(config: PretrainedConfig) -> PretrainedConfig:
    return getattr(config, "text_config", None) or config


def model_inventory(config: PretrainedConfig, include_mtp: bool = True) -> ModelInventory:
    """All tensors of the checkpoint described by `config` (vision tower included when it has one)."""
    auto_class = _auto_class(config)
    class_name = estimator_class(config)
    with torch.device("meta"):
        model = auto_class.from_config(config)
    groups = group_tensors(class_name, ((name, tuple(p.shape)) for name, p in model.named_parameters()))
    if include_mtp:
        groups += mtp_groups(class_name, groups, text_config_of(config))
    return ModelInventory(class_name, groups)


def _auto_class(config: PretrainedConfig) -> type:
    return AutoModelForImageTextToText if hasattr(config, "text_config") else AutoModelForCausalLM


def estimator_class(config: PretrainedConfig) -> str:
    """The HF class the config instantiates; QuantlabError if the role tables do not know it."""
    model_class = _auto_class(config)._model_mapping.get(type(config), None)
    name = model_class.__name__ if model_class is not None else type(config).__name__
    if name not in TENSOR_ROLES:
        raise QuantlabError(
            f"unknown architecture for the estimator: {name} (model_type '{config.model_type}'). "
            f"It knows {', '.join(supported_classes())}; add a role table to quantlab/architecture.py."
        )
    return name


def group_tensors(class_name: str, shapes: Iterable[tuple[str, tuple[int, ...]]]) -> tuple[TensorGroup, ...]:
    """Group (name, shape) pairs by name pattern, role and shape, keeping the layer indices."""
    layers: dict[tuple[str, str, tuple[int, ...]], list[int]] = defaultdict(list)
    for name, shape in shapes:
        match = _LAYER.search(name)
        pattern = _LAYER.sub(r".\1.{i}.", name, count=1) if match else name
        key = (pattern, role_of(class_name, name), shape)
        layers[key].append(int(match.group(2)) if match else -1)
    return tuple(
        TensorGroup(pattern, role, shape, () if indices == [-1] else tuple(indices))
        for (pattern, role, shape), indices in layers.items()
    )


def mtp_groups(class_name: str, groups: tuple[TensorGroup, ...], text: PretrainedConfig) -> tuple[TensorGroup, ...]:
    """MTP tensors from the config: n × one full-attention decoder layer, mtp.fc and three norms."""
    n_mtp = int(getattr(text, "mtp_num_hidden_layers", 0) or 0)
    layer_types = list(getattr(text, "layer_types", None) or [])
    if n_mtp == 0 or "full_attention" not in layer_types:
        return ()
    first_full = layer_types.index("full_attention")
    h = text.hidden_size
    shapes = [
        (f"mtp.layers.{j}.{_layer_suffix(g.name)}", g.shape)
        for j in range(n_mtp)
        for g in groups
        if first_full in g.layers and g.role != "vision"
    ]
    shapes += [("mtp.fc.weight", (h, 2 * h))]
    shapes += [(f"mtp.{norm}.weight", (h,)) for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")]
    return group_tensors(class_name, shapes)


def _layer_suffix(pattern: str) -> str:
    return pattern.split(".layers.{i}.", 1)[1]
