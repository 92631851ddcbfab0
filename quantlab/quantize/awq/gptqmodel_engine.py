"""The gptqmodel engine (GPT-QModel 7.6, the newest release that accepts torch 2.13).

Kept as a second engine behind the same interface. Two things are mended here, both measured on
the bundled model (see the project's AWQ notes):
- gptqmodel 7.6 folds AWQ scales into Qwen3.5's RMSNorm as `weight /= s`, but that norm multiplies
  by (1 + weight): the folded model is no longer the float model. While it runs, its
  `scale_ln_fcs` is wrapped so that such norms get `(1 + weight) / s - 1`.
- its qwen3_5 checkpoints do not list the unquantized in_proj_a/b; quantlab writes config.json
  itself, with modules_to_not_convert from the shared skip rules.
Its host memory is not bounded by a layer: on scripts/bench_awq_memory.py's 2.43 GB model its RSS
reached 3.26 GB (sampled; the run had not finished after 20 minutes on 2 busy cores).
gptqmodel is imported only when this engine runs: importing it sets CUDA/allocator variables
and prints a banner.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import PretrainedConfig

from quantlab.architecture import MTP_PREFIX
from quantlab.errors import QuantlabError
from quantlab.quantize.awq.engine import AwqJob, AwqOutcome, AwqParams
from quantlab.quantize.awq.shards import ShardReader, ShardWriter


class GptqmodelEngine:
    name = "gptqmodel"

    def check(self, params: AwqParams, config: PretrainedConfig) -> None:
        if params.mtp:
            raise QuantlabError("quantization.mtp quantize: engine gptqmodel drops the MTP head (mtp.*) and cannot "
                                "quantize it; use engine: quantlab")
        if params.skip_classes:
            # gptqmodel 7.6 does skip modules given as negative `dynamic` patterns ("-:regex"), but when a whole
            # scaling group is skipped (q/k/v) it folds the next group's scales into the norm before it
            # (awq_get_modules_for_scaling keeps that norm as prev_op for o_proj): the float model changes.
            raise QuantlabError("quantization.skip_classes: engine gptqmodel cannot keep tensor classes unquantized "
                                "without changing the model; use engine: quantlab")
        spec = importlib.util.find_spec("gptqmodel")
        if spec is None:
            raise QuantlabError("quantization.engine gptqmodel: not installed here; pip install 'gptqmodel==7.6.0'")
        model_type = getattr(config, "model_type", None)
        definitions = Path(spec.origin).parent / "models" / "definitions"
        if not (definitions / f"{model_type}.py").is_file():
            known = sorted(p.stem for p in definitions.glob("*.py") if not p.stem.startswith("_"))
            raise QuantlabError(
                f"quantization.engine gptqmodel: it has no definition for model_type {model_type!r} "
                f"({len(known)} known, e.g. {', '.join(known[:6])}); use engine: quantlab"
            )

    def quantize(self, job: AwqJob) -> AwqOutcome:
        if job.source is None:
            raise QuantlabError("quantization.engine gptqmodel needs a checkpoint folder; synthetic weights "
                                "are packed by engine: quantlab")
        # gptqmodel sizes CPU worker pools from this; its model loader alone asks for 2 (fails on 2 cores unset)
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, torch.get_num_threads())))
        from gptqmodel import BACKEND, GPTQModel
        from gptqmodel.quantization.config import AWQConfig

        samples = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in job.calibration]
        qc = AWQConfig(bits=job.params.bits, group_size=job.params.group_size, sym=not job.params.zero_point)
        backend = BACKEND.AWQ_TORCH if job.device.type == "cpu" else BACKEND.AUTO
        with tempfile.TemporaryDirectory(prefix="quantlab-gptqmodel-", dir=job.out.parent) as tmp, _norm_fix(), \
                _working_directory(tmp):  # gptqmodel writes logs/awq_log_*.log into the working directory
            model = GPTQModel.load(str(job.source), qc, device=str(job.device))
            model.quantize(samples, batch_size=job.params.batch_size, backend=backend)
            model.save(tmp)
            del model
            quantized = _copy_without_mtp(Path(tmp), job.out, job.max_shard_bytes)
            shutil.rmtree(tmp, ignore_errors=True)
        return AwqOutcome(self.name, tuple(quantized), ("gptqmodel 7.6 AWQ, with quantlab's (1 + weight) norm fix",))


def _copy_without_mtp(src: Path, out: Path, max_bytes: int) -> list[str]:
    """gptqmodel's shards, re-written without mtp.* (the build copies those from the source)."""
    reader, writer = ShardReader(src), ShardWriter(out, max_bytes)
    for name in sorted(reader.names()):
        if not name.startswith(MTP_PREFIX):
            writer.add(name, reader.get(name))
    writer.finish()
    return sorted(n[: -len(".qweight")] for n in reader.names() if n.endswith(".qweight"))


@contextlib.contextmanager
def _working_directory(folder: str):
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def _norm_fix():
    from gptqmodel.quantization.awq.quantize import scale

    original = scale.scale_ln_fcs

    @torch.inference_mode()
    def scale_ln_fcs(ln, fcs, scales):
        from quantlab.quantize.awq.native import _adds_one

        if not _adds_one(ln):
            return original(ln, fcs, scales)
        fcs = fcs if isinstance(fcs, list) else [fcs]
        scales = scales.to(ln.weight.device)
        ln.weight.copy_(((1 + ln.weight.float()) / scales.float() - 1).to(ln.weight.dtype))
        for fc in fcs:
            fc.weight.mul_(scales.view(1, -1).to(fc.weight.dtype))

    scale.scale_ln_fcs = scale_ln_fcs
    try:
        yield
    finally:
        scale.scale_ln_fcs = original
