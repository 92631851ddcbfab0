"""Builds of the bundled model as other people publish them, made here by the tools that write those formats, with no
quantlab manifest: what `model.source: gguf` and the checkpoint-format sources are tested and measured on.

    python scripts/make_published_builds.py OUT [--only gguf|gptq]

- OUT/gguf/bundled-BF16.gguf, OUT/gguf/bundled-Q4_K_M.gguf: llama.cpp's converter (through quantlab.llamacpp.convert,
  whose one addition names the bundled tokenizer's GPT-2 pre-tokenizer), then llama-quantize Q4_K_M, no imatrix.
- OUT/gptq-w4g128/: gptqmodel 7.6.0 (quantlab's dependency), GPTQ 4-bit, group 128, symmetric, no act-order, on 32
  windows of 256 tokens of the standard library's sources; saved as gptqmodel saves it.

Compressed-tensors and AutoRound builds need llm-compressor (it pins transformers <= 5.17) and auto-round, each in a
venv of its own: scripts/published/make_compressed_tensors.py and make_autoround.py say how.

OUT must not exist, or be empty: nothing is overwritten.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BUNDLED = REPO / "quantlab" / "bundled" / "model"
SAMPLES, SEQ_LEN = 32, 256


def make_ggufs(out: Path) -> list[Path]:
    from quantlab import llamacpp
    from quantlab.llamacpp.steps import convert

    tools = llamacpp.locate()
    out.mkdir()
    bf16, q4 = out / "bundled-BF16.gguf", out / "bundled-Q4_K_M.gguf"
    convert(tools, BUNDLED, bf16, "bf16", mtp=False)
    llamacpp.run_tool(tools, ["llama-quantize", str(bf16), str(q4), "Q4_K_M"], "llama-quantize")
    return [bf16, q4]


def calibration(tokenizer) -> list[dict]:
    """32 windows of 256 tokens, a seeded choice, from the standard library's own sources."""
    import sysconfig

    import torch

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[::7]
    ids = tokenizer("\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files),
                    add_special_tokens=False)["input_ids"]
    slots = torch.randperm(len(ids) // SEQ_LEN, generator=torch.Generator().manual_seed(0))[:SAMPLES].sort().values
    rows = [ids[int(s) * SEQ_LEN:(int(s) + 1) * SEQ_LEN] for s in slots]
    return [{"input_ids": r, "attention_mask": [1] * len(r)} for r in rows]


def make_gptq(out: Path) -> list[Path]:
    import torch

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, torch.get_num_threads())))  # its loader wants 2
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.quantization.config import QuantizeConfig
    from transformers import AutoTokenizer

    samples = calibration(AutoTokenizer.from_pretrained(BUNDLED))
    here, out = Path.cwd(), out.resolve()
    with tempfile.TemporaryDirectory(prefix="gptqmodel-") as work:
        os.chdir(work)  # gptqmodel writes logs/gptq_log_*.log into the working folder: here, not the caller's
        try:
            model = GPTQModel.load(str(BUNDLED), QuantizeConfig(method="gptq", bits=4, group_size=128, desc_act=False,
                                                                sym=True), device="cpu")
            model.quantize(samples, batch_size=1, backend=BACKEND.GPTQ_TORCH)
            model.save(str(out))
        finally:
            os.chdir(here)
    return sorted(out.iterdir())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", choices=["gguf", "gptq"])
    args = parser.parse_args(argv)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        print(f"error: {args.out} exists and is not an empty folder; give a new one (nothing is overwritten)",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    from quantlab.checksums import sha256_file

    for kind, make in (("gguf", lambda: make_ggufs(args.out / "gguf")),
                       ("gptq", lambda: make_gptq(args.out / "gptq-w4g128"))):
        if args.only in (None, kind):
            start = time.perf_counter()
            files = make()
            print(f"{kind}: {time.perf_counter() - start:.1f} s")
            for f in files:
                if f.suffix in (".gguf", ".safetensors"):
                    print(f"  {f.relative_to(args.out)}  {f.stat().st_size:,} bytes  sha256 {sha256_file(f)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
