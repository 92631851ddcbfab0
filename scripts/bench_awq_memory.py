"""Memory to quantize: peak host RSS while an AWQ engine quantizes a synthetic qwen3_5 model of at least
2 GB in BF16, as a ratio to the model's BF16 bytes. Goal: <= 0.5 (a 27B then quantizes in 64 GB of RAM).

Each step runs in its own process, so that one step's memory never counts in another's:
1. create the synthetic model (seeded random weights, the bundled model's tokenizer) and save it in shards;
2. quantize it with each engine asked for (`--engines quantlab,gptqmodel`), sampling RSS every 20 ms.
The compute settings (few calibration tokens, no clip search) keep the CPU time short; they do not
change what is resident, which is the layer being quantized, the calibration activations and one shard.

    python scripts/bench_awq_memory.py [--engines quantlab] [--layers 12] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL = 0.5


def synthetic_config(layers: int):
    from transformers import AutoConfig

    from quantlab.sources import resolve_config
    from quantlab.recipe import ModelSpec

    bundled = resolve_config(ModelSpec(source="bundled")).config.to_dict()
    pattern = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]
    bundled.update(
        hidden_size=2560, intermediate_size=8704, num_hidden_layers=layers,
        layer_types=[pattern[i % 4] for i in range(layers)], vocab_size=32768,
        num_attention_heads=16, num_key_value_heads=4, head_dim=128,
        linear_num_key_heads=8, linear_key_head_dim=128, linear_num_value_heads=16, linear_value_head_dim=128,
    )
    for key in ("architectures", "transformers_version", "_name_or_path"):
        bundled.pop(key, None)
    return AutoConfig.for_model(**bundled)


def create(folder: Path, layers: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from quantlab.sources import resolve_config
    from quantlab.recipe import ModelSpec

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(synthetic_config(layers), dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="500MB")
    bundled = Path(resolve_config(ModelSpec(source="bundled")).location)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (bundled / name).is_file():
            shutil.copyfile(bundled / name, folder / name)


def quantize(folder: Path, out: Path, engine: str, samples: int, seq_len: int) -> dict:
    import psutil
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from quantlab.quantize.awq import ENGINES
    from quantlab.quantize.awq.calibration import calibration_samples
    from quantlab.quantize.awq.engine import AwqJob
    from quantlab.quantize.configs import AwqConfig
    from quantlab.trackers import MemoryTracker

    qconfig = AwqConfig(method="awq", engine=engine, clip=False, batch_size=samples,
                        calibration={"samples": samples, "seq_len": seq_len})
    calibration = calibration_samples(qconfig.calibration, AutoTokenizer.from_pretrained(folder))
    config = AutoConfig.from_pretrained(folder)
    baseline = psutil.Process().memory_info().rss
    job = AwqJob(folder, config, out, qconfig, calibration.input_ids, torch.device("cpu"), torch.bfloat16,
                 max_shard_bytes=500 * 10**6, progress=False)
    start = time.perf_counter()
    with MemoryTracker("cpu", interval_s=0.02) as memory:
        ENGINES[engine].quantize(job)
    return {"engine": engine, "seconds": time.perf_counter() - start, "rss_before": baseline,
            "rss_peak": memory.result.rss_peak_bytes, "samples": samples, "seq_len": seq_len}


def folder_bytes(folder: Path) -> int:
    from quantlab.build.tensors import payload_bytes

    return payload_bytes(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="quantlab", help="comma-separated: quantlab, gptqmodel")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--keep", help="keep the synthetic model in this folder (default: a temporary folder)")
    parser.add_argument("--stage", choices=["create", "quantize"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.stage == "create":
        create(Path(args.folder), args.layers)
        return 0
    if args.stage == "quantize":
        result = quantize(Path(args.folder), Path(args.out), args.engines, args.samples, args.seq_len)
        print("RESULT " + json.dumps(result))
        return 0

    work = Path(args.keep or tempfile.mkdtemp(prefix="quantlab-awq-bench-"))
    model_dir = work / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, __file__, "--layers", str(args.layers), "--samples", str(args.samples),
            "--seq-len", str(args.seq_len)]
    if not any(model_dir.glob("*.safetensors")):
        print(f"creating a synthetic qwen3_5 model with {args.layers} layers in {model_dir} ...", flush=True)
        subprocess.run([*base, "--stage", "create", "--folder", str(model_dir)], check=True)
    bf16 = folder_bytes(model_dir)
    print(f"synthetic qwen3_5 (hidden 2560, FFN 8704, {args.layers} layers, 3 DeltaNet : 1 attention), "
          f"BF16 tensors: {bf16 / 1e9:.3f} GB")
    failed = False
    try:
        for engine in args.engines.split(","):
            out = work / f"awq-{engine}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            done = subprocess.run([*base, "--stage", "quantize", "--folder", str(model_dir), "--out", str(out),
                                   "--engines", engine], capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                print(f"  {engine}: failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
                failed = True
                continue
            r = json.loads(lines[-1][len("RESULT "):])
            ratio = r["rss_peak"] / bf16
            growth = (r["rss_peak"] - r["rss_before"]) / bf16
            verdict = "meets" if ratio <= GOAL else "misses"
            print(f"  {engine:9s}: peak RSS {r['rss_peak'] / 1e9:.3f} GB (process before quantizing "
                  f"{r['rss_before'] / 1e9:.3f} GB), {r['seconds']:.0f} s, {r['samples']} × {r['seq_len']} "
                  f"calibration tokens, wrote {folder_bytes(out) / 1e9:.3f} GB")
            print(f"             peak RSS / BF16 bytes = {ratio:.3f} ({verdict} the <= {GOAL} goal); "
                  f"growth while quantizing / BF16 bytes = {growth:.3f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
