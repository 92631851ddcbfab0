"""Weight bytes per component (tensor role) under a scheme, from a model inventory alone."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from quantlab.architecture import FLOAT32_ROLES, ROLES, UNQUANTIZED_ROLES
from quantlab.estimate import gguf_mix
from quantlab.estimate.inventory import ModelInventory, TensorGroup
from quantlab.estimate.schemes import DTYPE_BYTES, Scheme

# Never dequantized whole at run time: an embedding lookup reads rows, and only the last position's
# logits are computed (a matrix-vector product).
_NOT_DEQUANTIZED = frozenset({"embed_tokens", "lm_head"})

# Roles outside the text model: counted separately, included on request.
EXTRA_ROLES = ("vision", "mtp")



@dataclass(frozen=True)
class ComponentBytes:
    role: str
    parameters: int
    bytes: int
    formats: tuple[tuple[str, int], ...]  # (storage format, parameters stored in it)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.parameters


@dataclass(frozen=True)
class WeightsEstimate:
    scheme: Scheme
    components: tuple[ComponentBytes, ...]
    largest_quantized_numel: int  # the biggest quantized layer tensor: a dequantization workspace

    def bytes(self, include_vision: bool = False, include_mtp: bool = False) -> int:
        return sum(c.bytes for c in self._loaded(include_vision, include_mtp))

    def parameters(self, include_vision: bool = False, include_mtp: bool = False) -> int:
        return sum(c.parameters for c in self._loaded(include_vision, include_mtp))

    def component(self, role: str) -> ComponentBytes | None:
        return next((c for c in self.components if c.role == role), None)

    def formats(self, include_vision: bool = False, include_mtp: bool = False) -> dict[str, int]:
        """Storage format → parameters stored in it, most first."""
        totals: Counter[str] = Counter()
        for c in self._loaded(include_vision, include_mtp):
            totals.update(dict(c.formats))
        return dict(totals.most_common())

    def _loaded(self, include_vision: bool, include_mtp: bool) -> list[ComponentBytes]:
        skip = {role for role, keep in zip(EXTRA_ROLES, (include_vision, include_mtp)) if not keep}
        return [c for c in self.components if c.role not in skip]


def estimate_weights(inventory: ModelInventory, scheme: Scheme, n_layers: int, dtype: str = "bfloat16") -> WeightsEstimate:
    """Bytes per role. `dtype` is what unquantized tensors are kept in (the recipe's model dtype)."""
    dtype = scheme.dtype or dtype
    ctx = gguf_mix.mix_context(inventory.groups, n_layers)
    per_role: dict[str, list[tuple[str, int, int]]] = {}
    largest = 0
    for group in inventory.groups:
        stored = _group_storage(group, scheme, dtype, ctx)
        per_role.setdefault(group.role, []).extend(stored)
        if _is_quantized(group, scheme) and group.role not in _NOT_DEQUANTIZED:
            largest = max(largest, group.numel)
    components = tuple(_component(role, per_role[role]) for role in ROLES if role in per_role)
    return WeightsEstimate(scheme, components, largest)


def _component(role: str, stored: list[tuple[str, int, int]]) -> ComponentBytes:
    params: Counter[str] = Counter()
    for fmt, n, _ in stored:
        params[fmt] += n
    return ComponentBytes(
        role=role,
        parameters=sum(n for _, n, _ in stored),
        bytes=sum(b for _, _, b in stored),
        formats=tuple(params.most_common()),
    )


def _is_quantized(group: TensorGroup, scheme: Scheme) -> bool:
    if scheme.method == "none" or len(group.shape) < 2:
        return False
    return group.role not in UNQUANTIZED_ROLES[scheme.method]


def _group_storage(group: TensorGroup, scheme: Scheme, dtype: str, ctx: gguf_mix.MixContext) -> list[tuple[str, int, int]]:
    """(format, parameters, bytes) for the tensors of one group."""
    if not _is_quantized(group, scheme):
        one_d_gguf = scheme.is_gguf and len(group.shape) < 2 and group.role != "vision"  # the converter writes F32
        kept = "float32" if group.role in FLOAT32_ROLES.get(scheme.method, ()) or one_d_gguf else dtype
        return [(kept, group.parameters, group.parameters * DTYPE_BYTES[kept])]
    if scheme.is_gguf:
        types = gguf_mix.tensor_types(group, scheme.ggml_type, scheme.mix, ctx)
        return [
            (t, n * group.numel, n * group.rows * gguf_mix.row_bytes(t, group.row_length)) for t, n in types.items()
        ]
    per_tensor = scheme.quantized_bytes(group.rows, group.row_length)
    return [(scheme.label, group.parameters, per_tensor * group.count)]
