"""Host memory to AWQ-quantize Qwen3.6-27B on the CPU, measured on a full-width slice of its real shapes.

quantlab's engine streams one decoder layer at a time, so its peak depends on a layer's width and on the
calibration tokens, not on the depth. This benchmark therefore quantizes a slice with the 27B's exact widths
(hidden 5120, FFN 17408, its DeltaNet and gated-attention heads, its 248,320-token vocabulary; synthetic
weights) with the calibration settings of a shipped recipe, and samples the process's RSS throughout:
- the peak after 2 layers (one DeltaNet, one full attention) and after 4 (the same pair again): what grows
  with depth is their difference; a layer's tensors, activations and search buffers are freed after it;
- the 64-layer figure = the 4-layer peak + 30 x that per-pair growth, as a ratio to the 27B's BF16 bytes.
The goal: the whole 27B quantized in less host RAM than a 32 GB machine has.

Each step runs in its own process (creating the slice; quantizing it), so one step's memory never counts in
the other's. Every calibration token of the recipe is used. The scale and clip searches try their grid points
one after another, so the grid sets the time and not the memory: `--grid` (default: the engine's 20) lets a
2-core machine finish in about an hour instead of most of a day, and the script says which grid ran. Measured
on this slice with 2 x 64 tokens: the same peak RSS at grid 20 and grid 2 (see the project's notes).

    python scripts/bench_awq_memory.py [--recipe recipes/qwen3.6-27b-awq.yaml] [--layers 4] [--grid 20] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOAL_BYTES = 32 * 2**30  # a 32 GB machine
FULL_LAYERS = 64


def slice_config(layers: int):
    """The 27B's text config with `layers` layers, DeltaNet and full attention alternating."""
    from transformers import AutoConfig

    from quantlab.known_models import known_config_dir

    text = AutoConfig.from_pretrained(known_config_dir("qwen3.6-27b")).text_config
    data = text.to_dict()
    data.update(num_hidden_layers=layers, layer_types=[("linear_attention", "full_attention")[i % 2] for i in range(layers)])
    for key in ("architectures", "transformers_version", "_name_or_path"):
        data.pop(key, None)
    return AutoConfig.for_model(**data)


def bf16_bytes_of_27b() -> int:
    from transformers import AutoConfig

    from quantlab.known_models import known_config_dir
    from quantlab.sources import meta_model

    text = AutoConfig.from_pretrained(known_config_dir("qwen3.6-27b")).text_config
    return sum(p.numel() * 2 for p in meta_model(text).parameters())


def create(folder: Path, layers: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from quantlab.bundled import bundled_model_dir

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(slice_config(layers), dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="2GB")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # calibration text: the bundled tokenizer's ids
        shutil.copyfile(bundled_model_dir() / name, folder / name)


class RssSampler(threading.Thread):
    """The process's RSS every 20 ms; `peak` so far, and a mark per finished layer."""

    def __init__(self):
        import psutil

        super().__init__(daemon=True)
        self.process, self.peak, self.marks, self.stop = psutil.Process(), 0, [], threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def mark(self, index: int) -> None:
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.marks.append((index, self.peak, time.perf_counter()))
        print(f"  layer {index + 1}: peak RSS so far {self.peak / 1e9:.3f} GB", flush=True)


def quantize(folder: Path, out: Path, recipe: Path, grid: int | None) -> dict:
    import psutil
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from quantlab.quantize.awq import ENGINES
    from quantlab.text.calibration import calibration_samples
    from quantlab.methods.awq import engine_params
    from quantlab.quantize.awq.engine import AwqJob
    from quantlab.quantize.awq.search import GRID
    from quantlab.recipe import load_recipe
    from quantlab.threads import fit_threads

    fit_threads()
    qconfig = load_recipe(recipe).recipe.quantization
    calibration = calibration_samples(qconfig.calibration, AutoTokenizer.from_pretrained(folder))
    sampler = RssSampler()
    before = psutil.Process().memory_info().rss
    sampler.start()
    config = AutoConfig.from_pretrained(folder)
    job = AwqJob(folder, config, out, engine_params(qconfig, config.architectures[0]), calibration.input_ids, torch.device("cpu"),
                 torch.bfloat16, max_shard_bytes=2 * 10**9, progress=False, on_layer=sampler.mark, search_grid=grid)
    start = time.perf_counter()
    ENGINES[qconfig.engine].quantize(job)
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    return {"before": before, "peak": sampler.peak, "marks": sampler.marks, "seconds": seconds, "start": start,
            "threads": torch.get_num_threads(), "tokens": list(calibration.input_ids.shape),
            "settings": {**{k: getattr(qconfig, k) for k in ("group_size", "clip", "batch_size", "engine")},
                         "search grid": grid or GRID}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/qwen3.6-27b-awq.yaml", help="the AWQ recipe whose settings to use")
    parser.add_argument("--layers", type=int, default=4, help="even, at least 4 (default 4)")
    parser.add_argument("--grid", type=int, help="points of the search grids (default: the engine's, 20)")
    parser.add_argument("--keep", help="keep the slice in this folder (default: a temporary folder)")
    parser.add_argument("--stage", choices=["create", "quantize"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.layers < 4 or args.layers % 2:
        parser.error("--layers must be even and at least 4 (the peaks after 2 and after 4 layers are compared)")
    if args.stage == "create":
        create(Path(args.folder), args.layers)
        return 0
    if args.stage == "quantize":
        print("RESULT " + json.dumps(quantize(Path(args.folder), Path(args.out), Path(args.recipe), args.grid)), flush=True)
        return 0
    work = Path(args.keep or tempfile.mkdtemp(prefix="quantlab-awq-bench-"))
    model_dir, out = work / "model", work / "awq"
    model_dir.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, __file__, "--layers", str(args.layers), "--recipe", args.recipe,
            *(["--grid", str(args.grid)] if args.grid else [])]
    try:
        if not any(model_dir.glob("*.safetensors")):
            print(f"creating a full-width {args.layers}-layer slice of Qwen3.6-27B (synthetic) in {model_dir} ...", flush=True)
            subprocess.run([*base, "--stage", "create", "--folder", str(model_dir)], check=True)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        child = subprocess.Popen([*base, "--stage", "quantize", "--folder", str(model_dir), "--out", str(out)],
                                 stdout=subprocess.PIPE, text=True)
        result = None
        for line in child.stdout:  # layer by layer as they finish: a long run shows its progress
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
            else:
                print(line, end="", flush=True)
        if child.wait() or result is None:
            print(f"quantizing failed (exit {child.returncode})", file=sys.stderr)
            return 1
        report(result, args, out)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def report(r: dict, args, out: Path) -> None:
    from quantlab.checkpoint import payload_bytes

    marks = {index + 1: peak for index, peak, _ in r["marks"]}
    times = [t for _, _, t in r["marks"]]
    per_layer = [b - a for a, b in zip([r["start"], *times], times)]
    growth_per_pair = marks[4] - marks[2]  # layers 3 and 4: one more DeltaNet + attention pair
    full = marks[args.layers] + (FULL_LAYERS - args.layers) / 2 * growth_per_pair
    bf16 = bf16_bytes_of_27b()
    samples, seq_len = r["tokens"]
    print(f"\nQwen3.6-27B full-width slice, {args.layers} layers (DeltaNet and full attention alternating), synthetic "
          f"weights; settings of {args.recipe}: {samples} x {seq_len} calibration tokens, {r['settings']}; "
          f"{r['threads']} CPU threads")
    print(f"  RSS before quantizing {r['before'] / 1e9:.3f} GB; peak after 2 layers {marks[2] / 1e9:.3f} GB, after 4 "
          f"{marks[4] / 1e9:.3f} GB, after {args.layers} {marks[args.layers] / 1e9:.3f} GB")
    print(f"  growth with depth: {growth_per_pair / 1e6:+.1f} MB per DeltaNet + attention pair")
    print(f"  64-layer Qwen3.6-27B: {full / 1e9:.2f} GB peak RSS = {full / bf16:.3f} x its BF16 text-model bytes "
          f"({bf16 / 1e9:.2f} GB); goal < 32 GiB: {'met' if full < GOAL_BYTES else 'NOT met'}")
    print(f"  time: {r['seconds']:.0f} s in all; per layer {', '.join(f'{s:.0f} s' for s in per_layer)}; "
          f"wrote {payload_bytes(out) / 1e9:.2f} GB")


if __name__ == "__main__":
    sys.exit(main())
