"""A model split across devices: accelerate's device map, computed on the meta device before any weights load.

The map is accelerate's own `device_map="auto"`: `get_balanced_memory`, then `infer_auto_device_map`, with the
model's no-split classes (whole decoder layers), on a meta-device model built the way from_pretrained builds it.
Quantized layers are sized as transformers' quantizer sizes them (its `param_element_size`, e.g. half a byte per
4-bit weight), handed to accelerate as `special_dtypes`; a quantizer also gets its own say on the memory offered
(`adjust_max_memory`), as in from_pretrained. The run gives that map to from_pretrained as an explicit dict, so
the plan, the printed map and the load are one map.

transformers' own `device_map="auto"` runs a copy of accelerate's algorithm that budgets each GPU's buffer from
the largest single tensor rather than the mean module size; on Qwen3.6-27B over two GPUs that moves three
decoder layers to GPU 0. quantlab follows accelerate.
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import PretrainedConfig

from quantlab.errors import QuantlabError
from quantlab.fields import memory_bytes

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")


class DoesNotFit(QuantlabError):
    """The model's weights, as the map sizes them (`total` bytes), do not fit what was offered."""

    def __init__(self, total: int, message: str):
        super().__init__(message)
        self.total = total


@dataclass(frozen=True)
class DeviceSplit:
    """Where each module goes, and what that puts on each device. Devices are named as torch names them."""

    max_memory: dict[str, int]  # what the recipe offered, per device ("cuda:0", "cpu"), in bytes
    device_map: dict[str, str]  # module -> device
    bytes_per_device: dict[str, int]  # weights placed on each device, as accelerate sizes them
    layers_per_device: dict[str, tuple[int, ...]]  # decoder layer indices on each device
    # accelerate's device_map="auto"; "sequential" where the balanced map spills; "even": the sequential map
    # under one cap per GPU (even_split), which the estimate takes where it fits more
    strategy: str = "balanced"

    @property
    def devices(self) -> tuple[str, ...]:
        """The devices the map uses, GPUs in index order, then the CPU."""
        return tuple(sorted(set(self.device_map.values()), key=_device_order))

    @property
    def gpus(self) -> tuple[str, ...]:
        return tuple(d for d in self.devices if d.startswith("cuda"))

    @property
    def first_device(self) -> str:
        """Where the input embedding sits (model.embed_tokens, or model.language_model.embed_tokens in the
        VL layout): the inputs go there."""
        tables = [name for name, _ in self.device_map.items() if name.endswith("embed_tokens")]
        return self.device_map[tables[0]] if tables else self.device_of("model.embed_tokens")

    def device_of(self, module: str) -> str:
        """The device of a module: the map's entry for it or for the nearest module that holds it."""
        return device_of(module, self.device_map) or self.devices[0]

    def accelerate_map(self) -> dict[str, int | str]:
        """The map as from_pretrained and accelerate take it: GPU indices as integers."""
        return {name: accelerate_device(device) for name, device in self.device_map.items()}

    @property
    def unused(self) -> tuple[str, ...]:
        """Devices offered memory that the map leaves empty."""
        return tuple(d for d in sorted(self.max_memory, key=_device_order) if d not in self.devices)

    def lines(self) -> list[str]:
        """One line per device: its layers, the weight bytes placed there, and what was offered; then what the
        map chose not to use, and why the map is sequential when it is."""
        lines = [f"{device}: {_layer_text(self.layers_per_device.get(device, ()))}, "
                 f"{size_text(self.bytes_per_device.get(device, 0))} of weights "
                 f"(offered {size_text(self.max_memory.get(device, 0), binary=True)})" for device in self.devices]
        if self.unused:
            lines.append(f"unused: {device_list(self.unused)} (accelerate's map puts nothing there)")
        if self.strategy == "sequential":
            lines.append("accelerate's balanced map would spill past what was offered (each GPU but the last is capped "
                         "near an even share, less than the largest module it must hold whole): this is its "
                         "sequential map, which fills the GPUs in order")
        if self.strategy == "even":
            lines.append("an even map: accelerate's sequential map (device_map=\"sequential\") with each GPU "
                         "offered the cap above, the smallest at which the model fits")
        return lines


def offered_memory(max_memory: dict[str, str] | None, gpus: int | None,
                   free_gpu_bytes: Callable[[int], int] | None) -> dict[str, int] | None:
    """Bytes per device from the recipe's `max_memory`, or the whole free memory of the first `gpus` GPUs
    (None when that cannot be known here: no GPUs to ask)."""
    if max_memory is not None:
        return {key: memory_bytes(size) for key, size in max_memory.items()}
    if free_gpu_bytes is None:
        return None
    return {f"cuda:{i}": free_gpu_bytes(i) for i in range(gpus)}


def check_devices_visible(devices, visible_gpus: int, what: str) -> None:
    """Every GPU a split names ("cuda:N" names; "cpu" passes) must be one torch sees."""
    missing = [d for d in devices if d.startswith("cuda:") and int(d.split(":")[1]) >= visible_gpus]
    if missing:
        seen = f"only {visible_gpus} GPU(s) are visible" if visible_gpus else "torch sees no CUDA GPU here"
        raise QuantlabError(f"{what} names {', '.join(missing)} but {seen}")


@dataclass(frozen=True)
class MetaLayout:
    """A model as from_pretrained builds it on the meta device, sized as accelerate sizes it: every map of one
    model and method is computed on one layout (building it takes about a second at 27B; a map, milliseconds)."""

    model: Any
    quantizer: Any
    special: dict[str, Any]  # accelerate's special_dtypes for the quantized parameters
    sizes: dict[str, int]  # module -> bytes ('' is the whole model)
    layers: list[tuple[int, str]]  # (decoder layer index, module name)

    @classmethod
    def build(cls, config: PretrainedConfig, auto_class: type, dtype: torch.dtype,
              quantization_config: Any = None) -> MetaLayout:
        from accelerate.utils import compute_module_sizes

        model, quantizer = meta_model_as_loaded(config, auto_class, dtype, quantization_config)
        special = quantized_dtypes(model, quantizer)
        sizes = compute_module_sizes(model, special_dtypes=special)
        layers = [(int(m.group(1)), name) for name, _ in model.named_modules() if (m := _LAYER.search(name))]
        return cls(model, quantizer, special, sizes, layers)

    @property
    def largest(self) -> int:
        """The largest module a device must hold whole: a decoder layer, the embedding or lm_head."""
        return max([self.sizes[name] for _, name in self.layers]
                   + [v for k, v in self.sizes.items() if k.endswith(("embed_tokens", "lm_head"))])

    def split(self, offered: dict[str, int], balanced: bool) -> DeviceSplit:
        raw = _accelerate_map(self.model, self.quantizer, self.special, offered, balanced=balanced)
        return _split_of(raw, self.sizes, offered, self.layers)


def plan_split(config: PretrainedConfig, auto_class: type, dtype: torch.dtype, offered: dict[str, int],
               quantization_config: Any = None) -> DeviceSplit:
    """The device map for `config` loaded in `dtype` (and quantized at load by `quantization_config`, as
    bitsandbytes is), within `offered` bytes per device: accelerate's balanced map, or, where that one spills
    although the model fits, accelerate's sequential map (device_map="sequential"), said in `strategy`.
    Refuses, naming the sizes, when neither fits, and when no GPU would hold any of it."""
    return run_split(MetaLayout.build(config, auto_class, dtype, quantization_config), offered)


def run_split(layout: MetaLayout, offered: dict[str, int]) -> DeviceSplit:
    """plan_split's map on a layout already built."""
    split = layout.split(offered, balanced=True)
    if _spilled(split, offered):
        sequential = layout.split(offered, balanced=False)
        if not _spilled(sequential, offered):
            split = replace(sequential, strategy="sequential")
    _check_fits(split, layout.sizes[""], layout.largest, offered)
    return split


EVEN_CAP_STEP = 64 << 20  # the even cap is found to 64 MiB: finer changes no whole layer's place


def even_split(layout: MetaLayout, offered: dict[str, int]) -> DeviceSplit | None:
    """accelerate's sequential map with every GPU capped at one size, the smallest (to 64 MiB) at which nothing
    spills: the weights as evenly spread over the GPUs as whole modules allow. It is accelerate's own
    infer_auto_device_map given that cap as max_memory for every GPU (device_map="sequential"). None when no cap
    within `offered` fits.
    Why: accelerate's balanced map caps every GPU but the last near an even share, which can be less than the
    embedding it must hold whole; the embedding then moves on and on, and many GPUs are left empty."""
    gpus = [d for d in offered if d.startswith("cuda:")]
    if not gpus:
        return None

    def capped(cap: int) -> DeviceSplit:  # the GPUs alone: weights sent to a cpu entry count as spilled here
        return replace(layout.split({g: cap for g in gpus}, balanced=False), strategy="even")

    low, high = layout.sizes[""] // len(gpus) - 1, min(offered[g] for g in gpus)
    best = capped(high)
    if _spilled(best, best.max_memory):
        return None
    while high - low > EVEN_CAP_STEP:  # fits(high), and a cap at or below low cannot hold the weights
        mid = (low + high) // 2
        trial = capped(mid)
        low, high, best = (low, mid, trial) if not _spilled(trial, trial.max_memory) else (mid, high, best)
    return best


def _accelerate_map(model, quantizer, special: dict, offered: dict[str, int], balanced: bool) -> dict[str, int | str]:
    """accelerate's device_map="auto" (balanced) or "sequential", with the quantizer's say on memory, as
    from_pretrained gives it."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    no_split = sorted(getattr(model, "_no_split_modules", None) or ())
    memory = {accelerate_device(d): b for d, b in offered.items()}
    quiet = logging.getLogger("accelerate.utils.modeling")  # "Device 0 is not available" on a machine without it
    level, quiet.level = quiet.level, logging.ERROR
    try:
        with warnings.catch_warnings():  # its note on offload buffers: the plan says what goes where itself
            warnings.simplefilter("ignore", UserWarning)
            if balanced:
                memory = get_balanced_memory(model, max_memory=memory, no_split_module_classes=no_split,
                                             special_dtypes=special)
            if quantizer is not None:
                memory = quantizer.adjust_max_memory(memory)
            return infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split,
                                         special_dtypes=special)
    finally:
        quiet.setLevel(level)


def meta_model_as_loaded(config: PretrainedConfig, auto_class: type, dtype: torch.dtype, quantization_config: Any):
    """The model from_pretrained builds before it loads weights: on the meta device, in `dtype`, with the
    quantizer's layers in place (`quantization_config`, or a quantized checkpoint's own). Returns (model,
    quantizer or None)."""
    from accelerate import init_empty_weights

    config = copy.deepcopy(config)  # the quantizer writes its config into it, as from_pretrained's copy
    with init_empty_weights():
        model = auto_class.from_config(config, dtype=dtype)
    if quantization_config is None and getattr(config, "quantization_config", None) is None:
        return model, None
    from transformers.quantizers.auto import get_hf_quantizer

    quantizer, _, _ = get_hf_quantizer(config, quantization_config, "auto", True, {})
    with init_empty_weights():
        quantizer.preprocess_model(model=model, dtype=dtype, device_map="auto", checkpoint_files=None, use_kernels=False)
    return model, quantizer


def quantized_dtypes(model, quantizer) -> dict[str, Any]:
    """accelerate's `special_dtypes` for the parameters the quantizer stores in fewer bytes than the model holds
    them in on the meta device (transformers' `param_element_size`)."""
    if quantizer is None:
        return {}
    from accelerate.utils import CustomDtype

    by_size = {0.25: CustomDtype.INT2, 0.5: CustomDtype.INT4, 1: torch.int8, 2: torch.bfloat16, 4: torch.float32}
    special = {}
    for name, param in model.named_parameters():
        size = quantizer.param_element_size(model, name, param)
        if size != param.element_size():
            if size not in by_size:
                raise QuantlabError(f"{name}: the quantizer stores {size} bytes per weight; accelerate has no such dtype")
            special[name] = by_size[size]
    return special


def _split_of(raw: dict[str, int | str], sizes: dict[str, int], offered: dict[str, int],
              layer_names: list[tuple[int, str]]) -> DeviceSplit:
    device_map = {name: _torch_device(device) for name, device in raw.items()}
    placed: dict[str, int] = defaultdict(int)
    for name, device in device_map.items():
        placed[device] += sizes.get(name, 0)
    layers: dict[str, list[int]] = defaultdict(list)
    for index, name in layer_names:
        layers[device_of(name, device_map)].append(index)
    return DeviceSplit(dict(offered), device_map, dict(placed), {d: tuple(sorted(v)) for d, v in layers.items()})


def device_of(module: str, device_map: dict[str, str]) -> str | None:
    """accelerate's rule: a module goes where the longest map entry that is it or holds it goes ('' holds all)."""
    held_by = [k for k in device_map if k == "" or module == k or module.startswith(k + ".")]
    return device_map[max(held_by, key=len)] if held_by else None


def _spilled(split: DeviceSplit, offered: dict[str, int]) -> dict[str, int]:
    """Bytes the map sends where nothing was offered (disk, or the CPU without a cpu entry)."""
    return {d: b for d, b in split.bytes_per_device.items() if d == "disk" or d not in offered}


def _check_fits(split: DeviceSplit, total: int, largest: int, offered: dict[str, int]) -> None:
    spilled = _spilled(split, offered)
    offered_text = ", ".join(f"{d} {size_text(b, binary=True)}" for d, b in offered.items())
    if spilled:
        where = " and ".join(f"{size_text(b)} to {d}" for d, b in spilled.items())
        advice = ("offer more memory, more GPUs or more host RAM (the cpu entry)" if "cpu" in offered else
                  "offer more memory or more GPUs, or allow offload to host RAM with a cpu entry (max_memory: "
                  "{..., cpu: 64GiB})")
        raise DoesNotFit(
            total, f"the model's weights ({size_text(total)} as loaded) do not fit model.max_memory ({offered_text}): "
            f"accelerate's device map, balanced or sequential, would send {where} (each device must also hold whole "
            f"modules, the largest {size_text(largest)}). {advice[0].upper()}{advice[1:]}"
        )
    if not split.gpus:
        raise QuantlabError(f"model.max_memory ({offered_text}): accelerate's device map puts nothing on a GPU, "
                            "everything on the CPU; offer the GPUs more memory, or run with device: cpu")


def accelerate_device(device: str) -> int | str:
    return int(device.split(":")[1]) if device.startswith("cuda:") else device


def _torch_device(device: int | str | torch.device) -> str:
    if isinstance(device, int):
        return f"cuda:{device}"
    return str(device)


def _device_order(device: str) -> tuple[int, int]:
    return (0, int(device.split(":")[1])) if device.startswith("cuda:") else (1, 0)


def device_list(devices: tuple[str, ...]) -> str:
    """'cuda:3-63 (61 GPUs)' for a run of GPUs, 'cuda:0, cuda:25-31 (8 GPUs)' for several, else the names."""
    indices = [int(d.split(":")[1]) for d in devices if d.startswith("cuda:")]
    if len(indices) != len(devices) or len(indices) <= 3:
        return ", ".join(devices)
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    names = [f"cuda:{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(f"cuda:{i}" for i in r) for r in runs]
    return f"{', '.join(names)} ({len(indices)} GPUs)"


def size_text(n: float, binary: bool = False) -> str:
    """GB (or GiB) with two decimals; MB (MiB) below a tenth of one, so that small sizes do not read 0.00."""
    big, small, names = (2**30, 2**20, ("GiB", "MiB")) if binary else (1e9, 1e6, ("GB", "MB"))
    return f"{n / big:.2f} {names[0]}" if n >= big / 10 else f"{n / small:.2f} {names[1]}"


def _layer_text(layers: tuple[int, ...]) -> str:
    if not layers:
        return "no decoder layers"
    if list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}-{layers[-1]} ({len(layers)})"
    return f"layers {', '.join(map(str, layers))} ({len(layers)})"
