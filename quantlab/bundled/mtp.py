"""The bundled model's MTP (multi-token prediction) head, in Qwen3.5's layout, and the folder that joins it to the
bundled model.

Qwen3.5/3.6's MTP head predicts token t+2 from the main model's final (normed) hidden state at t and the
embedding of token t+1: ``norm(layer(fc([pre_fc_norm_embedding(e), pre_fc_norm_hidden(h)])))`` through the main
model's lm_head, where ``layer`` is one gated full-attention decoder layer. The tensor names are the checkpoint's
(`mtp.fc`, `mtp.pre_fc_norm_embedding`, `mtp.pre_fc_norm_hidden`, `mtp.norm`, `mtp.layers.0.*`): those
llama.cpp's converter remaps to `blk.N.nextn.*` and vLLM's `qwen3_5_mtp.py` loads. transformers ignores them.

``python -m quantlab.bundled.train_mtp`` trains it (the main model frozen) into ``quantlab/bundled/mtp/``.
"""

from __future__ import annotations

import copy
import json
import pathlib
import shutil

import torch
from torch import nn

from quantlab.bundled import BUNDLED_MODEL_DIR

MTP_DIR = pathlib.Path(__file__).parent / "mtp"
MTP_FILE = "mtp.safetensors"
MAIN_SHARD = "model.safetensors"
MTP_VERSION = 1  # the joined folder's layout; bump when it changes


class MtpHead(nn.Module):
    """One MTP block built from transformers' own Qwen3.5 modules, so its maths is the model's."""

    def __init__(self, config) -> None:
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer, Qwen3_5RMSNorm

        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        layer_config = copy.deepcopy(config)
        layer_config.layer_types = ["full_attention"]
        layer_config.num_hidden_layers = 1
        layer_config._attn_implementation = "sdpa"
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.pre_fc_norm_embedding = Qwen3_5RMSNorm(hidden, eps=eps)
        self.pre_fc_norm_hidden = Qwen3_5RMSNorm(hidden, eps=eps)
        self.layers = nn.ModuleList([Qwen3_5DecoderLayer(layer_config, 0)])
        self.norm = Qwen3_5RMSNorm(hidden, eps=eps)

    def forward(self, hidden: torch.Tensor, next_embeds: torch.Tensor, position_embeddings) -> torch.Tensor:
        """hidden: the main model's final hidden states at t; next_embeds: embeddings of tokens t+1. Causal."""
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        x = self.layers[0](x, position_embeddings=position_embeddings, attention_mask=None)
        return self.norm(x)


def mtp_positions(batch: int, length: int, offset: int = 1) -> torch.Tensor:
    """Text positions of the embedded tokens (t+1), in the (3, batch, length) M-RoPE form the rotary module takes."""
    return (torch.arange(length) + offset).view(1, 1, -1).expand(3, batch, -1)


def mtp_logits(model, head: MtpHead, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the main model's logits, the head's logits) over one batch of windows. The head's row i predicts token
    i+2, as the main model's row i+1 does."""
    with torch.no_grad():
        out = model.model(input_ids=input_ids, use_cache=False)
        hidden = out.last_hidden_state
        main = model.lm_head(hidden)
        next_embeds = model.model.embed_tokens(input_ids[:, 1:])
        rotary = model.model.rotary_emb(next_embeds, mtp_positions(*next_embeds.shape[:2]))
    drafted = model.lm_head(head(hidden[:, :-1], next_embeds, rotary))
    return main, drafted


def head_state(head: MtpHead) -> dict[str, torch.Tensor]:
    """The head's tensors under their checkpoint names, bfloat16 and contiguous."""
    return {f"mtp.{name}": tensor.detach().to(torch.bfloat16).contiguous() for name, tensor in head.state_dict().items()}


def load_head(config, folder: pathlib.Path = MTP_DIR) -> MtpHead:
    """The trained head from its folder, in float32."""
    from safetensors.torch import load_file

    head = MtpHead(config)
    state = {name.removeprefix("mtp."): tensor.float() for name, tensor in load_file(folder / MTP_FILE).items()}
    head.load_state_dict(state, strict=True)
    return head


def mtp_dir() -> pathlib.Path:
    """The trained head's folder, or FileNotFoundError naming how to make it."""
    if not (MTP_DIR / MTP_FILE).is_file():
        raise FileNotFoundError(f"the bundled MTP head {MTP_DIR / MTP_FILE} is missing; train it with "
                                "`python -m quantlab.bundled.train_mtp`")
    return MTP_DIR


def bundled_with_mtp():
    """The joined folder as a model quantlab makes on first use and caches (quantlab/made_sources.py), keyed by the
    bundled model's files and the head's."""
    from quantlab.checksums import sha256_file
    from quantlab.errors import QuantlabError
    from quantlab.made_sources import MadeModel

    try:
        head = mtp_dir()
    except FileNotFoundError as exc:
        raise QuantlabError(str(exc)) from None
    return MadeModel(kind="bundled-mtp", label="bundled-mtp", inputs=BUNDLED_MODEL_DIR,
                     params={"mtp_sha256": sha256_file(head / MTP_FILE)}, version=MTP_VERSION,
                     make=lambda folder: write_joined(folder, BUNDLED_MODEL_DIR, head),
                     what="the bundled model with its MTP head")


def write_joined(folder: pathlib.Path, model_dir: pathlib.Path = BUNDLED_MODEL_DIR,
                 head_dir: pathlib.Path = MTP_DIR) -> None:
    """The bundled model with its MTP head, as a two-shard checkpoint in `folder`: the bundled model's own shard
    copied byte for byte, the head in a second shard, an index, and the config with `mtp_num_hidden_layers: 1`."""
    from quantlab.checkpoint import folder_tensors

    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.name not in ("config.json", "build_info.json"):
            shutil.copyfile(path, folder / path.name)
    shutil.copyfile(head_dir / MTP_FILE, folder / MTP_FILE)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config["mtp_num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tensors = folder_tensors(folder)  # both shards' headers: no index yet, so every shard in the folder
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": {name: tensors[name].file.name for name in sorted(tensors)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
