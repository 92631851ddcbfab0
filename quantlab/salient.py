"""A function-preserving transformation that gives a model salient activation channels, the thing AWQ exists for.

For each RMSNorm that feeds Linears (input_layernorm → the DeltaNet or attention input projections,
post_attention_layernorm → the MLP's gate and up projections), a few hidden channels c get the norm's gain
multiplied by `factor` and the matching input columns of every Linear it feeds divided by `factor`. Qwen3.5's
norms compute x̂ · (1 + w), so the stored weight becomes (1 + w) · factor − 1. The norm's output channel c grows
by `factor`, the Linear reads it `factor` times more weakly: the logits are unchanged (a test checks), but those
channels now carry large activations and small weights, so a quantizer that ignores activations rounds the small
weights away. Any method can be stress-tested on the result; the bundled model has almost no such channels.

Done in float32 (the stored (1 + w) · factor − 1 would lose bits in bfloat16), and saved as a float32 checkpoint:
by write_salient_model into a folder of your choice (scripts/make_salient_model.py), or, for a recipe's
`model: {source: bundled, transform: {salient: ...}}`, by `bundled_salient` into quantlab's cache on first use.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from quantlab.errors import QuantlabError
from quantlab.made_sources import MadeModel

# norm (relative to a decoder layer) → the Linears it feeds, as weight-name suffixes
FEEDS = {
    "input_layernorm": ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_a",
                        "linear_attn.in_proj_b", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}
# The transform's version: raise it whenever make_salient or write_salient_files would write other bytes for the same
# inputs, so that models quantlab made and cached (quantlab/made_sources.py) with the old code are made again.
SALIENT_VERSION = 1
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
_NORM = re.compile(r"^(?P<layer>.*\.layers\.\d+)\.(?P<norm>input_layernorm|post_attention_layernorm)\.weight$")


@dataclass(frozen=True)
class Salient:
    channels: tuple[int, ...]
    factor: float
    norms: int  # norms rescaled
    linears: int  # Linears whose input columns were divided


def make_salient(state: dict[str, torch.Tensor], hidden: int, channels: int, factor: float, seed: int = 0
                 ) -> tuple[dict[str, torch.Tensor], Salient]:
    """A new float32 state dict, transformed; the same channels in every norm (seeded choice)."""
    if not 1 <= channels <= hidden:
        raise QuantlabError(f"channels must be between 1 and the hidden size {hidden}, got {channels}")
    if factor <= 1:
        raise QuantlabError(f"factor must be above 1, got {factor}")
    chosen = torch.randperm(hidden, generator=torch.Generator().manual_seed(seed))[:channels].sort().values
    out = {name: t.float().clone() for name, t in state.items()}
    norms = linears = 0
    for name in state:
        match = _NORM.match(name)
        if not match:
            continue
        gain = 1 + out[name]
        gain[chosen] *= factor
        out[name] = gain - 1
        norms += 1
        for suffix in FEEDS[match["norm"]]:
            weight = f"{match['layer']}.{suffix}.weight"
            if weight in out:
                out[weight][:, chosen] /= factor
                linears += 1
    if norms == 0:
        raise QuantlabError("no decoder-layer RMSNorm found (expected ...layers.N.input_layernorm.weight)")
    return out, Salient(tuple(int(c) for c in chosen), factor, norms, linears)


def write_salient_model(source: Path, out: Path, channels: int, factor: float, seed: int = 0) -> Salient:
    """source (an HF checkpoint folder of one safetensors file) → out: the transformed float32 checkpoint, with the
    source's config (dtype float32) and tokenizer files, and salient.json saying what was done. Written in a hidden
    folder beside `out`, renamed to `out` when complete."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise QuantlabError(f"{out}: already exists; remove it or pick another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        done = write_salient_files(source, partial, channels, factor, seed)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # made here, by this call
        raise
    return done


def write_salient_files(source: Path, folder: Path, channels: int, factor: float, seed: int = 0) -> Salient:
    """The transformed checkpoint's files, written into the existing, empty `folder` (see write_salient_model)."""
    from safetensors.torch import load_file, save_file

    source, folder = Path(source), Path(folder)
    files = sorted(source.glob("*.safetensors"))
    if len(files) != 1:
        raise QuantlabError(f"{source}: expected one .safetensors file, found {len(files)}")
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    hidden = (config.get("text_config") or config)["hidden_size"]
    state, done = make_salient(load_file(files[0]), hidden, channels, factor, seed)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config["dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    (folder / "salient.json").write_text(json.dumps({"source": str(source), "channels": list(done.channels),
                                                      "factor": factor, "seed": seed, "norms": done.norms,
                                                      "linears": done.linears, "version": SALIENT_VERSION},
                                                     indent=2) + "\n", encoding="utf-8")
    return done


def bundled_salient(channels: int = 4, factor: float = 32.0, seed: int = 0) -> MadeModel:
    """The bundled model with salient channels, as a model quantlab makes on first use and caches
    (quantlab/made_sources.py): the same files write_salient_model writes, in a folder keyed by their inputs."""
    from quantlab.bundled import bundled_model_dir

    try:
        source = bundled_model_dir()
    except FileNotFoundError as exc:
        raise QuantlabError(str(exc)) from None
    factor = float(factor)
    return MadeModel(
        kind="bundled-salient", label=f"bundled-salient-c{channels}-x{number(factor)}-s{seed}", inputs=source,
        params={"channels": channels, "factor": factor, "seed": seed}, version=SALIENT_VERSION,
        make=lambda folder: write_salient_files(source, folder, channels, factor, seed),
        what=f"the bundled model with {channels} salient channel(s) × {number(factor)} (seed {seed})",
    )


def number(value: float) -> str:
    """32.0 → '32', 1.0000001 → '1.0000001': short, and never two factors written alike."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)
