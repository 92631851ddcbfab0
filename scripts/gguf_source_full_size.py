"""`model.source: gguf` at full size, without the 17 GB download: a sparse Qwen3.6-27B Q4_K_M GGUF (llama.cpp's
converter and llama-quantize's own type choices, every byte of data a hole; quantlab/llamacpp/full_size.py), read
back as a published file would be. Checks that the config its header stands for (quantlab/llamacpp/header_config.py)
is the shipped Qwen3.6-27B text config, field by field; prints the plan quantlab makes from the file, and llama.cpp's
own plan for it (llama-fit-params --fit-print) at 4k and 32k. Synthetic weights of the real shapes, CPU backend: a
plan, not a measurement. Writes nothing outside a temporary folder it removes.

    make gguf-source-full-size        # about 2 minutes on 2 cores
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONFIG = REPO / "quantlab" / "data" / "qwen3.6-27b"
FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "layer_types", "linear_conv_kernel_dim", "linear_key_head_dim",
          "linear_num_key_heads", "linear_num_value_heads", "linear_value_head_dim", "max_position_embeddings",
          "rms_norm_eps", "tie_word_embeddings", "mtp_num_hidden_layers")
ROPE = ("rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved")


def compare(made, shipped) -> list[tuple[str, object, object]]:
    rows = [(f, getattr(made, f, None), getattr(shipped, f, None)) for f in FIELDS]
    rope_made, rope_shipped = made.rope_parameters or {}, shipped.rope_parameters or {}
    rows += [(f"rope_parameters.{k}", rope_made.get(k), rope_shipped.get(k)) for k in ROPE]
    return rows


def main() -> int:
    import yaml
    from transformers import AutoConfig

    from quantlab import llamacpp
    from quantlab.llamacpp.full_size import quantized_size, sparse_bf16
    from quantlab.llamacpp.gguf_file import read_header
    from quantlab.llamacpp.header_config import header_config
    from quantlab.model_file import planned_buffers
    from quantlab.plan import make_plan
    from quantlab.recipe import load_recipe
    from quantlab.run import describe_plan

    tools = llamacpp.locate()
    with tempfile.TemporaryDirectory(prefix="gguf-source-full-size-") as tmp:
        work = Path(tmp)
        bf16 = sparse_bf16(tools, CONFIG, REPO / "quantlab" / "bundled" / "model", work, mtp=True)
        q4 = work / "Qwen3.6-27B-Q4_K_M.gguf"
        quantized_size(tools, bf16, q4, "Q4_K_M", 15, True)
        bf16.unlink()
        rows = compare(header_config(read_header(q4)), AutoConfig.from_pretrained(CONFIG).text_config)
        print("| field | from the GGUF header | shipped config | same |\n|---|---|---|---|")
        for name, made, shipped in rows:
            short = lambda v: f"{len(v)} layers, full attention at {[i for i, t in enumerate(v) if t == 'full_attention'][:3]}..." \
                if isinstance(v, list) and len(v) > 8 else v  # noqa: E731
            print(f"| {name} | {short(made)} | {short(shipped)} | {'yes' if made == shipped else 'NO'} |")
        recipe = work / "published.yaml"
        recipe.write_text(yaml.safe_dump({"name": "full-size-gguf", "model": {"source": "gguf", "path": str(q4)},
                                          "measure": {"runtime": "llama.cpp", "contexts": [4096, 32768]}}))
        print("\n" + describe_plan(make_plan(load_recipe(recipe), for_this_machine=False)))
        for context in (4096, 32768):
            plan = planned_buffers(q4, context, "f16", 1)
            rows_ = "; ".join(f"{d}: " + ", ".join(f"{k.removesuffix('_bytes')} {v / 2**30:.2f} GiB" for k, v in row.items())
                              for d, row in plan.devices.items())
            print(f"llama.cpp's plan at {context:,} tokens (f16 KV, 1 slot): {plan.total / 2**30:.2f} GiB ({rows_})")
        mismatched = [name for name, made, shipped in rows if made != shipped]
    if mismatched:
        print(f"\nFAILED: the header stands for another config in {', '.join(mismatched)}")
        return 1
    print(f"\nall {len(rows)} fields match")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
