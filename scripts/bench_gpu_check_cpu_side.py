"""The GPU check's budget, measured on the CPU side as far as a CPU can: the plans (meta device), the AWQ
step's checkpoint (how many bytes, and how fast this machine's writer puts them on disk and on tmpfs), and
the AWQ engine's synthetic packing of full-size Qwen3.6-27B layers on this CPU (an upper bound for a GPU).

    python scripts/bench_gpu_check_cpu_side.py [--write-gb 2] [--layers 4]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def plan_seconds() -> None:
    from quantlab.plan import make_plan
    from quantlab.recipe import load_recipe

    for path in sorted((REPO / "recipes" / "gpu-check").glob("*.yaml")):
        start = time.perf_counter()
        make_plan(load_recipe(path), for_this_machine=False)
        print(f"plan (meta device, no weights)  {path.name:<28} {time.perf_counter() - start:6.2f} s")


def awq_checkpoint_bytes() -> int:
    """The 27B AWQ W4A16 g128 checkpoint the AWQ step writes: packed Linears plus everything kept in BF16."""
    from transformers import AutoConfig

    from quantlab.architecture import quantizable_linears
    from quantlab.known_models import known_config_dir
    from quantlab.sources import meta_model

    model = meta_model(AutoConfig.from_pretrained(known_config_dir("qwen3.6-27b")))
    quantized = dict(quantizable_linears(model, "awq"))
    total = 0
    for name, tensor in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in quantized and name.endswith(".weight"):
            out, inp = tensor.shape
            total += inp * out // 2 + (inp // 128) * out * 2 + (inp // 128) * out // 2  # qweight, scales, qzeros
        else:
            total += tensor.numel() * 2
    return total


def write_throughput(folder: Path, gigabytes: float) -> float:
    """GB/s of quantlab's streaming shard writer (data file, then the shard, fsync'd) into `folder`."""
    from quantlab.quantize.awq.shards import ShardWriter

    block = torch.randint(-2**31, 2**31 - 1, (64 << 20,), dtype=torch.int32)  # 256 MB
    count = max(1, int(gigabytes * 1e9 / (block.numel() * 4)))
    out = Path(tempfile.mkdtemp(dir=folder, prefix="quantlab-write-"))
    try:
        start = time.perf_counter()
        writer = ShardWriter(out, 5 * 10**9)
        for i in range(count):
            writer.add(f"t{i}", block)
        writer.finish()
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return count * block.numel() * 4 / 1e9 / seconds


def layer_pack_seconds(layers: int) -> None:
    """The AWQ engine's synthetic path (init, round-to-nearest, pack, write) on `layers` full-size layers."""
    from transformers import AutoConfig

    from quantlab.known_models import known_config_dir
    from quantlab.quantize.awq.engine import AwqJob, AwqParams
    from quantlab.quantize.awq.native import QuantlabEngine

    config = AutoConfig.from_pretrained(known_config_dir("qwen3.6-27b")).text_config
    config.num_hidden_layers = layers
    config.layer_types = config.layer_types[:layers]
    config.vocab_size = 1024  # the embeddings and lm_head are copies, timed by the writer above
    with tempfile.TemporaryDirectory() as tmp:
        job = AwqJob(source=None, config=config, out=Path(tmp), params=AwqParams(config.architectures[0]), calibration=None,
                     device=torch.device("cpu"), dtype=torch.bfloat16, max_shard_bytes=5 * 10**9, progress=False)
        start = time.perf_counter()
        QuantlabEngine().quantize(job)
        seconds = time.perf_counter() - start
    print(f"AWQ synthetic pack on this CPU ({torch.get_num_threads()} threads): {layers} full-size layers "
          f"({', '.join(config.layer_types)}) in {seconds:.1f} s = {seconds / layers:.1f} s per layer; "
          f"64 layers: {64 * seconds / layers:.0f} s on this CPU (a GPU does the same arithmetic far faster)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-gb", type=float, default=2.0)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    plan_seconds()
    size = awq_checkpoint_bytes()
    print(f"AWQ W4A16 g128 checkpoint of Qwen3.6-27B (VL layout, vision tower kept): {size / 1e9:.2f} GB")
    for folder in (Path(tempfile.gettempdir()), Path("/dev/shm")):
        if folder.is_dir():
            rate = write_throughput(folder, args.write_gb)
            print(f"shard writer into {folder}: {rate:.2f} GB/s -> {size / 1e9 / rate:.0f} s for the 27B checkpoint")
    layer_pack_seconds(args.layers)


if __name__ == "__main__":
    main()
