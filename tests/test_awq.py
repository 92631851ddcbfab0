"""AWQ: packing, the searches, the fold, the engines, the build, and bad input caught before any load."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from quantlab.schema.build import read_manifest
from quantlab.checkpoint import folder_tensors
from quantlab.artifact.writer import build_recipe
from quantlab.errors import QuantlabError, RecipeError
from quantlab.plan import make_plan
from quantlab.quantize.awq import ENGINES
from quantlab.quantize.awq.engine import AwqJob
from quantlab.quantize.awq.mappings import AwqMapping
from quantlab.quantize.awq.native import _adds_one, _balance, _capture, _fold
from quantlab.quantize.awq.pack import AWQ_ORDER, PACK_BITS, PER_WORD, pack_gemm
from quantlab.quantize.awq.search import apply_clip, search_clip, search_scales
from quantlab.methods.awq import AwqConfig, AwqMethod, engine_params
from quantlab.quantize.groupwise import dequantize_groups, fake_quantize, quantize_groups
from quantlab.recipe import load_recipe
from quantlab.sources import resolve
from quantlab.recipe import ModelSpec

from conftest import tiny_qwen3_5_config

BUNDLED = Path(resolve(ModelSpec(source="bundled")).location)
SMALL_CALIBRATION = {"samples": 8, "seq_len": 128}


def unpack_gemm(tensors: dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
    """Dequantized weight [out, in] in float32 from the three packed tensors: the inverse of pack_gemm."""
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"].float()
    inverse = [AWQ_ORDER.index(i) for i in range(PER_WORD)]
    shifts = torch.arange(0, 32, PACK_BITS, device=qweight.device, dtype=torch.int64)

    def unpack(words: torch.Tensor) -> torch.Tensor:
        codes = (words.to(torch.int64)[..., None] >> shifts) & 0xF
        return codes[..., inverse].reshape(words.shape[0], -1)

    codes, zeros = unpack(qweight), unpack(qzeros).repeat_interleave(group_size, dim=0)
    return ((codes - zeros).float() * scales.repeat_interleave(group_size, dim=0)).t()



def quiet(_: str) -> None:
    return None


# ---- packing --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("zero_point", [True, False])
def test_gemm_packing_round_trips_and_matches_gptqmodel(zero_point):
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    torch.manual_seed(0)
    w = torch.randn(64, 256)
    q = quantize_groups(w, 4, 64, zero_point)
    packed = pack_gemm(q, torch.float32)
    assert packed["qweight"].shape == (256, 8) and packed["qweight"].dtype == torch.int32
    assert packed["qzeros"].shape == (4, 8) and packed["scales"].shape == (4, 64)
    ours = unpack_gemm(packed, 64)
    assert torch.equal(ours, dequantize_groups(q, 64))
    theirs = dequantize_gemm(packed["qweight"], packed["qzeros"], packed["scales"], 4, 64).t()
    assert torch.equal(ours, theirs)
    assert (ours - w).abs().max() < 0.6 * q.scales.max()  # rounding error is at most about half a step


def test_symmetric_stores_the_constant_zero():
    q = quantize_groups(torch.randn(8, 128), 4, 128, zero_point=False)
    assert torch.all(q.zeros == 8) and q.codes.min() >= 0 and q.codes.max() <= 15


# ---- the searches -----------------------------------------------------------------------------------------

@torch.no_grad()
def test_scale_search_protects_salient_channels():
    """Inputs with a few large channels: AWQ's scales cut the output error well below plain rounding."""
    torch.manual_seed(0)
    fc = torch.nn.Linear(256, 64, bias=False)
    x = torch.randn(512, 256)
    x[:, :4] *= 40  # salient input channels
    run = lambda: [fc(x)]  # noqa: E731
    reference = fc(x).detach()
    w = fc.weight.data.clone()
    fc.weight.data = fake_quantize(w, 4, 128, True)
    rtn_error = float((fc(x) - reference).pow(2).sum())
    fc.weight.data = w
    scales, _ = search_scales([fc], [x], run, 4, 128, True)
    assert torch.equal(fc.weight.data, w)  # restored
    fc.weight.data = fake_quantize(w * scales, 4, 128, True) / scales
    awq_error = float((fc(x) - reference).pow(2).sum())
    assert awq_error < 0.7 * rtn_error  # measured: 0.54
    assert scales[:4].mean() > scales[4:].mean()


@torch.no_grad()
def test_scale_search_never_loses_to_plain_rounding():
    torch.manual_seed(1)
    fc = torch.nn.Linear(128, 32, bias=False)
    x = torch.randn(64, 128)
    reference = fc(x).detach()
    rtn = float((x @ fake_quantize(fc.weight.data, 4, 128, True).t() - reference).pow(2).sum())
    scales, relative = search_scales([fc], [x], lambda: [fc(x)], 4, 128, True)
    assert relative * float(reference.pow(2).sum()) <= rtn + 1e-6


@pytest.mark.parametrize("zero_point", [True, False])
@torch.no_grad()
def test_clip_search_lowers_the_output_error(zero_point):
    torch.manual_seed(0)
    fc = torch.nn.Linear(256, 32, bias=False)
    fc.weight.data = torch.distributions.StudentT(3.0).sample((32, 256)) * 0.02  # heavy tails: clipping pays
    x = torch.randn(1024, 256)
    reference = fc(x).detach()
    error = lambda: float((x @ fake_quantize(fc.weight.data, 4, 64, zero_point).t() - reference).pow(2).sum())  # noqa: E731
    before = error()
    factors = search_clip(fc.weight.data, [x], 4, 64, zero_point)
    assert factors.shape == (32, 4, 2) and factors.min() >= 0.5 and factors.max() <= 1.0
    apply_clip(fc, factors, 64, zero_point)
    assert error() < 0.95 * before  # measured: 0.92 (asymmetric)


# ---- folding scales into the previous op ------------------------------------------------------------------

def _qwen_norms():
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm, Qwen3_5RMSNormGated
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return Qwen3_5RMSNorm, Qwen3_5RMSNormGated, LlamaRMSNorm


def test_norm_kind_is_probed():
    one_plus, gated, llama = _qwen_norms()
    assert _adds_one(one_plus(16)) and not _adds_one(llama(16))
    norm = one_plus(16)
    norm.weight.data.normal_()
    saved = norm.weight.data.clone()
    _adds_one(norm)
    assert torch.equal(norm.weight.data, saved)


@pytest.mark.parametrize("kind", ["one_plus", "llama", "linear"])
@torch.no_grad()
def test_fold_keeps_the_float_function(kind):
    one_plus, _, llama = _qwen_norms()
    torch.manual_seed(0)
    smooth = {"one_plus": lambda: one_plus(64), "llama": lambda: llama(64), "linear": lambda: torch.nn.Linear(32, 64)}[kind]()
    if kind != "linear":
        smooth.weight.data.normal_(0, 0.3)
    fcs = [torch.nn.Linear(64, 16, bias=False), torch.nn.Linear(64, 8, bias=False)]
    x = torch.randn(5, 32 if kind == "linear" else 64)
    before = [fc(smooth(x)) for fc in fcs]
    _fold(smooth, fcs, torch.rand(64) + 0.5)
    for b, fc in zip(before, fcs):
        torch.testing.assert_close(fc(smooth(x)), b, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_gptqmodel_folds_qwen3_5_norms_wrongly_and_the_engine_mends_it():
    """gptqmodel 7.6 divides a (1 + w) norm's weight by s; the gptqmodel engine wraps that while it runs."""
    from gptqmodel.quantization.awq.quantize import scale

    from quantlab.quantize.awq.gptqmodel_engine import _norm_fix

    one_plus, _, _ = _qwen_norms()
    torch.manual_seed(0)
    results = {}
    for fixed in (False, True):
        norm, fc = one_plus(64), torch.nn.Linear(64, 8, bias=False)
        norm.weight.data.normal_(0, 0.3)
        x = torch.randn(4, 64)
        before = fc(norm(x)).detach()
        if fixed:
            with _norm_fix():
                scale.scale_ln_fcs(norm, [fc], torch.rand(64) + 0.5)
        else:
            scale.scale_ln_fcs(norm, [fc], torch.rand(64) + 0.5)
        results[fixed] = float((fc(norm(x)) - before).abs().max() / before.abs().max())
    assert results[False] > 0.05 and results[True] < 1e-4


# ---- the engines on real models -----------------------------------------------------------------------------

def _job(source: Path | None, out: Path, config, engine="quantlab", calibration=True, **qc) -> AwqJob:
    from quantlab.text.calibration import calibration_samples

    qconfig = AwqConfig(method="awq", engine=engine, calibration=SMALL_CALIBRATION, **qc)
    ids = calibration_samples(qconfig.calibration, AutoTokenizer.from_pretrained(source)).input_ids if calibration else None
    params = engine_params(qconfig, config.architectures[0])
    return AwqJob(source, config, out, params, ids, torch.device("cpu"), torch.bfloat16, 5 * 10**9, progress=False)


def _finish(out: Path, config, source: Path | None = None, qconfig: AwqConfig | None = None) -> None:
    from quantlab.methods.awq import quantization_config, write_config
    from quantlab.sources import ModelSource

    qconfig = qconfig or AwqConfig(method="awq")
    spec = ModelSpec(source="synthetic", config="bundled")  # only the config matters to the skip list
    skip = AwqMethod().skip_rules(qconfig, ModelSource(spec, config, "x", "x"))
    write_config(config, quantization_config(qconfig, skip.patterns), out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if source is not None and (source / name).is_file():
            (out / name).write_bytes((source / name).read_bytes())


def _kl(reference, candidate, ids) -> float:
    with torch.no_grad():
        p = torch.log_softmax(reference(ids).logits.float(), -1)
        q = torch.log_softmax(candidate(ids).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.fixture(scope="module")
def bundled_awq(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundled-awq")
    config = AutoConfig.from_pretrained(BUNDLED)
    outcome = ENGINES["quantlab"].quantize(_job(BUNDLED, out, config))
    assert len(outcome.quantized) == 25  # 3 DeltaNet layers × 6 + 1 attention layer × 7
    _finish(out, config, BUNDLED)
    return out


@pytest.mark.slow
def test_bundled_awq_reloads_with_plain_transformers_and_generates(bundled_awq):
    tensors = load_file(str(bundled_awq / "model.safetensors"))
    assert tensors["model.layers.0.mlp.down_proj.qweight"].dtype == torch.int32
    assert "model.layers.0.linear_attn.in_proj_a.weight" in tensors and "lm_head.weight" in tensors
    qc = json.loads((bundled_awq / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": ["in_proj_a", "in_proj_b", "lm_head", "mtp"]}
    model = AutoModelForCausalLM.from_pretrained(bundled_awq)
    assert not any(isinstance(m, torch.nn.Linear) and name.endswith("down_proj") for name, m in model.named_modules())
    tokenizer = AutoTokenizer.from_pretrained(bundled_awq)
    ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
    reference = AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.bfloat16)
    assert _kl(reference, model, ids) < 0.05


@pytest.mark.slow
def test_awq_beats_round_to_nearest_on_held_out_text(bundled_awq):
    """Same bits, same groups, same packing: AWQ's KL to the BF16 model is lower than plain rounding's.
    (The full measurement, `quantlab quality`, is in the records; this is a fast, smaller version.)"""
    from quantlab.text.heldout import default_text
    from quantlab.methods.rtn import RtnConfig, RtnMethod

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic enough, and fast on a busy 2-core machine
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED)
    ids = torch.tensor(tokenizer(default_text("heldout").text[:60_000]).input_ids[:2048]).view(4, 512)
    reference = AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.bfloat16)
    rtn = RtnMethod().apply(AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.bfloat16),
                            RtnConfig(method="rtn", bits=4, group_size=128))
    awq = AutoModelForCausalLM.from_pretrained(bundled_awq)
    try:
        kl_rtn, kl_awq = _kl(reference, rtn, ids), _kl(reference, awq, ids)
    finally:
        torch.set_num_threads(threads)
    assert kl_awq < 0.95 * kl_rtn, (kl_awq, kl_rtn)


# ---- tensor classes kept unquantized (skip_classes) -------------------------------------------------------------

class _NormAndTwo(torch.nn.Module):
    """A norm feeding two Linears, as input_layernorm feeds q/k/v."""

    def __init__(self):
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm

        super().__init__()
        self.norm, self.a, self.b = Qwen3_5RMSNorm(128), torch.nn.Linear(128, 32), torch.nn.Linear(128, 64)
        self.norm.weight.data.normal_(0, 0.3)

    def forward(self, h):
        n = self.norm(h)
        return torch.cat([self.a(n), self.b(n)], dim=-1)


@torch.no_grad()
def test_balance_folds_into_unquantized_members_and_leaves_groups_with_none_quantized():
    torch.manual_seed(0)
    hidden = torch.randn(2, 16, 128)
    hidden[..., :4] *= 30  # salient channels: the search moves off s = 1
    mapping, qc = AwqMapping("norm", ("a", "b"), None), AwqConfig(method="awq")
    for quantized in ([], ["b"]):
        layer = _NormAndTwo()
        saved, before = {k: v.clone() for k, v in layer.state_dict().items()}, layer(hidden)
        linears = {name: layer.get_submodule(name) for name in quantized}
        inputs, calls, _ = _capture(layer, [hidden], [{}], linears, (mapping,))
        assert sorted(inputs) == (["a", "b"] if quantized else [])  # nothing captured for a group not searched
        _balance(layer, mapping, linears, inputs, calls, qc)
        changed = [k for k, v in layer.state_dict().items() if not torch.equal(v, saved[k])]
        assert changed == (["norm.weight", "a.weight", "b.weight"] if quantized else [])
        torch.testing.assert_close(layer(hidden), before, rtol=1e-4, atol=1e-4)  # the float function is kept


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's default of one per core is several times slower beside a busy process
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _quick_job(out: Path, **qc) -> AwqJob:
    """The bundled model on a coarse search grid: what is searched, folded and written, not how well."""
    return dataclasses.replace(_job(BUNDLED, out, AutoConfig.from_pretrained(BUNDLED), **qc), search_grid=4)


@pytest.fixture(scope="module")
def bundled_awq_down_kept(tmp_path_factory) -> tuple[Path, tuple[str, ...]]:
    out = tmp_path_factory.mktemp("bundled-awq-down-kept")
    job = _quick_job(out, skip_classes=["mlp.down"])
    with _one_thread():
        outcome = ENGINES["quantlab"].quantize(job)
    _finish(out, job.config, BUNDLED, AwqConfig(method="awq", calibration=SMALL_CALIBRATION, skip_classes=["mlp.down"]))
    return out, outcome.quantized


@pytest.mark.slow
def test_a_kept_class_is_written_at_the_model_dtype_and_loads_as_plain_linears(bundled_awq_down_kept, tmp_path):
    out, quantized = bundled_awq_down_kept
    downs = [f"model.layers.{i}.mlp.down_proj" for i in range(4)]
    assert len(quantized) == 21 and not set(downs) & set(quantized)
    tensors, source = load_file(str(out / "model.safetensors")), load_file(str(BUNDLED / "model.safetensors"))
    for name in downs:
        assert [t for t in tensors if t.startswith(f"{name}.")] == [f"{name}.weight"]
        # no scales folded into it (it is in no searched group) and not clipped: the source weight, bit for bit
        assert torch.equal(tensors[f"{name}.weight"], source[f"{name}.weight"])
        assert f"{name.replace('down_proj', 'up_proj')}.qweight" in tensors
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == ["in_proj_a", "in_proj_b", "lm_head", "mtp", "down_proj"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"
            and not n.endswith(("in_proj_a", "in_proj_b"))] == downs
    torch.testing.assert_close(model.get_submodule(downs[0]).weight.float(), source[f"{downs[0]}.weight"].float())
    ids = AutoTokenizer.from_pretrained(out)("def fibonacci(n):", return_tensors="pt").input_ids
    assert _kl(AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.bfloat16), model, ids) < 0.05
    recipe = _recipe(tmp_path, "pre", None, model={"source": "local", "path": str(out), "device": "cpu"})
    plan = make_plan(load_recipe(recipe), for_this_machine=False)
    assert plan.method_label == "AWQ W4A16 g128 (pre-quantized)" and plan.method_params == qc


@pytest.mark.slow
def test_attention_kept_whole_gets_no_scales(tmp_path):
    job = _quick_job(tmp_path, clip=False, skip_classes=["attention.q", "attention.k", "attention.v"])
    with _one_thread():
        outcome = ENGINES["quantlab"].quantize(job)
    attention = "model.layers.3.self_attn"
    assert len(outcome.quantized) == 22 and f"{attention}.o_proj" in outcome.quantized
    tensors, source = load_file(str(tmp_path / "model.safetensors")), load_file(str(BUNDLED / "model.safetensors"))
    for name in (f"{attention}.{p}_proj" for p in "qkv"):
        assert torch.equal(tensors[f"{name}.weight"], source[f"{name}.weight"]) and f"{name}.qweight" not in tensors
    # none of the group input_layernorm feeds is quantized: no scales searched, none folded into the norm (a fold
    # there without q/k/v would change the model); other norms are folded as usual
    norm = "model.layers.3.input_layernorm.weight"
    assert torch.equal(tensors[norm], source[norm])
    folded = [n for n in source if n.endswith("layernorm.weight") and not torch.equal(tensors[n], source[n])]
    assert folded and norm not in folded


def test_synthetic_weights_pack_without_calibration(tmp_path):
    """The full-model (VL) layout, random weights: round-to-nearest in the AWQ format, vision tower kept."""
    config = tiny_qwen3_5_config()
    outcome = ENGINES["quantlab"].quantize(_job(None, tmp_path, config, calibration=False))
    assert "no calibration" in outcome.notes[0]
    _finish(tmp_path, config)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert "model.language_model.layers.3.self_attn.q_proj.qweight" in names
    assert any(n.startswith("model.visual.") and n.endswith(".weight") for n in names)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_gptqmodel_engine_behind_the_same_interface(tmp_path):
    config = AutoConfig.from_pretrained(BUNDLED)
    outcome = ENGINES["gptqmodel"].quantize(_job(BUNDLED, tmp_path, config, engine="gptqmodel"))
    assert outcome.engine == "gptqmodel" and len(outcome.quantized) == 25
    _finish(tmp_path, config, BUNDLED)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert _kl(AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.bfloat16), model, ids) < 0.05


# ---- the build, through `quantlab build` -----------------------------------------------------------------------

def _recipe(folder: Path, name: str, quantization: dict | None, model: dict | None = None, **extra) -> Path:
    data = {"name": name, "model": model or {"source": "bundled", "device": "cpu"},
            "quantization": {"method": "awq", "calibration": SMALL_CALIBRATION, **quantization} if quantization is not None
            else {"method": "none"},
            "measure": {"contexts": [16], "new_tokens": 2, "warmup": 0, "repeats": 1},
            "output": {"dir": str(folder / "measurements")}, "build": {"check_tokens": 4}, **extra}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.slow
def test_build_folder_records_the_cost_and_the_card(tmp_path):
    path = _recipe(tmp_path, "awq-build", {})
    result = build_recipe(load_recipe(path), tmp_path / "builds" / "awq-build", progress=False, echo=quiet)
    manifest = read_manifest(result.folder)
    assert manifest.method.name == "awq" and manifest.engine["name"] == "quantlab"
    assert manifest.unquantized.skip_modules == ["in_proj_a", "in_proj_b", "lm_head", "mtp"]
    cost = manifest.cost
    assert cost.seconds > 0 and cost.rss_peak_bytes > cost.rss_start_bytes > 0
    assert cost.gpu_allocated_peak_bytes is None  # no GPU here: None, never 0
    card = (result.folder / "README.md").read_text()
    assert "Cost of quantizing" in card and "vllm serve" in card and "modules_to_not_convert" in card
    assert "calibration split" in card
    assert "25 Linear weights are quantized" in card and "| other |" not in card  # qweight/qzeros/scales are not "kept"
    meta = yaml.safe_load(card.split("---\n")[1])
    assert "awq" in meta["tags"]
    assert (result.folder / "SHA256SUMS").is_file() and (result.folder / "tokenizer.json").is_file()
    # compared with the BF16 source, not with nothing: the agreement is recorded and shown
    ref = manifest.greedy.reference
    assert ref is not None and len(ref.tokens) == 4 and ref.agreement >= ref.threshold == 0.5
    assert "Against the unquantized source" in card
    [record] = result.records
    assert record.method.name == "awq" and record.method.label == "AWQ W4A16 g128"
    assert record.produced_by.startswith("CPU") and "real weights" in record.produced_by
    # the estimator's awq-g128 scheme predicts the tensor bytes, and the card says so
    from quantlab.estimate.estimator import weights_for
    from quantlab.estimate.model import read_estimation_model
    from quantlab.estimate.schemes import get_scheme

    estimated = weights_for(read_estimation_model(str(result.folder)), get_scheme("awq-g128")).bytes(include_mtp=False)
    assert abs(estimated / sum(t.nbytes for t in folder_tensors(result.folder).values()) - 1) < 0.005
    assert "quantlab's estimate for this method is" in card


@pytest.mark.slow
def test_quantlab_run_measures_through_a_temporary_checkpoint(tmp_path, capsys):
    from quantlab.run import run_recipe

    result = run_recipe(load_recipe(_recipe(tmp_path, "awq-run", {})), tmp_path / "m", progress=False, echo=print)
    [record] = result.records
    assert record.model.name == "quantlab-bundled" and record.model.source == "bundled"
    assert record.method.label == "AWQ W4A16 g128"
    assert any("checkpoint written by engine quantlab" in n for n in record.notes)
    assert any(n.startswith("calibration: 8 × 128 tokens") for n in record.notes)
    assert "writing the AWQ W4A16 g128 checkpoint to a temporary folder" in capsys.readouterr().out


# ---- bad input, before any weights load -----------------------------------------------------------------------

@pytest.fixture
def no_weight_loading(no_weights_load):
    """conftest's one seam."""


def test_missing_calibration_file(tmp_path, no_weight_loading):
    path = _recipe(tmp_path, "bad", {"calibration": {"source": "file", "path": str(tmp_path / "nope.txt")}})
    with pytest.raises(QuantlabError, match=r"quantization\.calibration\.path: .*nope.txt: file not found"):
        make_plan(load_recipe(path))


def test_calibration_shorter_than_one_sample(tmp_path, no_weight_loading):
    short = tmp_path / "short.py"
    short.write_text("def f(x):\n    return x\n")
    path = _recipe(tmp_path, "short", {"calibration": {"source": "file", "path": str(short), "seq_len": 128}})
    with pytest.raises(QuantlabError, match=r"tokens long, shorter than one sample \(quantization\.calibration\.seq_len 128\)"):
        make_plan(load_recipe(path))
    with pytest.raises(QuantlabError, match="shorter than one sample"):
        build_recipe(load_recipe(path), tmp_path / "b", progress=False, echo=quiet)
    assert not (tmp_path / "b").exists()


def test_group_size_that_does_not_divide_in_features(tmp_path, no_weight_loading):
    config = tiny_qwen3_5_config()
    config.text_config.update({"hidden_size": 96, "intermediate_size": 192})
    folder = tmp_path / "odd"
    config.save_pretrained(folder)
    path = _recipe(tmp_path, "odd", {"group_size": 64}, model={"source": "local", "path": str(folder), "device": "cpu"})
    with pytest.raises(QuantlabError, match=r"group_size 64 does not divide in_features of .* layer\(s\)"):
        make_plan(load_recipe(path))


def test_model_family_the_engine_does_not_know(tmp_path, no_weight_loading):
    folder = tmp_path / "llama"
    folder.mkdir()
    AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=256).save_pretrained(folder)
    path = _recipe(tmp_path, "llama", {}, model={"source": "local", "path": str(folder), "device": "cpu"})
    with pytest.raises(QuantlabError, match=r"engine quantlab: no AWQ mappings for LlamaForCausalLM .*it knows Qwen3_5"):
        make_plan(load_recipe(path))
    path = _recipe(tmp_path, "llama-g", {"engine": "gptqmodel"}, model={"source": "local", "path": str(folder), "device": "cpu"})
    with pytest.raises(QuantlabError, match="quantlab has no tensor-role rules for LlamaForCausalLM"):
        make_plan(load_recipe(path))


@pytest.mark.parametrize("quantization, message", [
    ({"method": "awq", "engine": "autoawq"}, r"quantization\.engine: Input should be .quantlab. or .gptqmodel."),
    ({"method": "awq", "group_size": 48}, r"quantization\.group_size"),
    ({"method": "awq", "bits": 3}, r"quantization\.bits"),
    ({"method": "awq", "calibration": {"seq_len": 4}}, "seq_len"),
    ({"method": "awq", "calibration": {"source": "file"}}, "needs quantization.calibration.path"),
    ({"method": "awq", "calibration": {"samples": 8, "sequence": 4}}, "sequence"),
    ({"method": "awq", "skip_classes": ["attention.k", "mlp.dwn"]},
     r"quantization\.skip_classes: unknown tensor class\(es\) \['mlp\.dwn'\]; classes: mtp, deltanet\.in_proj_qkv, "),
    ({"method": "awq", "skip_classes": ["mlp.down", "mlp.down"]},
     r"quantization\.skip_classes: tensor class\(es\) named more than once: \['mlp\.down'\]"),
])
def test_bad_awq_recipes_are_rejected(tmp_path, quantization, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "model": {"source": "bundled"}, "quantization": quantization}))
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


@pytest.mark.parametrize("quantization, message", [
    ({"skip_classes": ["attention.k"]}, "quantization.skip_classes: vLLM fuses attention.q, attention.k and attention.v "
                                        "into one layer (qkv_proj) and refuses a checkpoint that skips only some of "
                                        "them; skip them together"),
    ({"skip_classes": ["mlp.up", "mlp.down"]}, "vLLM fuses mlp.gate and mlp.up into one layer (gate_up_proj)"),
    ({"skip_classes": ["deltanet.in_proj_z"]},
     "vLLM fuses deltanet.in_proj_qkv and deltanet.in_proj_z into one layer (in_proj_qkvz)"),
    ({"skip_classes": ["lm_head"]}, "quantization.skip_classes: 'lm_head' matches none of the Linear modules awq would "
                                    "quantize: the rules for awq already keep it unquantized (e.g. lm_head); remove it"),
    ({"skip_classes": ["deltanet.in_proj_ab"]}, "the rules for awq already keep it unquantized"),
    ({"skip_classes": ["mlp.down"], "engine": "gptqmodel"},
     "quantization.skip_classes: engine gptqmodel cannot keep tensor classes unquantized without changing the model; "
     "use engine: quantlab"),
], ids=["k-alone", "up-alone", "z-alone", "lm_head", "in_proj_ab", "gptqmodel"])
def test_skip_classes_are_checked_before_any_load(tmp_path, no_weight_loading, quantization, message):
    with pytest.raises(QuantlabError, match=re.escape(message)):
        make_plan(load_recipe(_recipe(tmp_path, "kept", quantization)))


def test_skip_classes_in_the_plan_label_card_and_skip_list(tmp_path, no_weight_loading):
    from quantlab.quantize.vllm_layout import VLLM_NAMING, vllm_skips_layer

    qkv = ["attention.q", "attention.k", "attention.v"]
    loaded = load_recipe(_recipe(tmp_path, "qkv", {"skip_classes": qkv}))
    plan = make_plan(loaded, for_this_machine=False)
    assert plan.method_label == "AWQ W4A16 g128, attention.q+attention.k+attention.v kept"
    assert plan.method_params["skip_classes"] == qkv
    method, qconfig = AwqMethod(), loaded.recipe.quantization
    assert ("kept tensor classes (skip_classes)", qkv) in method.card_rows(plan.method_params)
    assert method.estimator_scheme(plan.method_params, "bfloat16") is None  # the scheme table prices the rules only
    skip = method.skip_rules(qconfig, resolve(ModelSpec(source="bundled")))
    assert skip.patterns == ("in_proj_a", "in_proj_b", "lm_head", "mtp", "k_proj", "q_proj", "v_proj")
    assert skip.extra_patterns == ("k_proj", "q_proj", "v_proj") and len(skip.quantized) == 22
    naming = VLLM_NAMING["Qwen3_5ForCausalLM"]
    assert vllm_skips_layer("model.layers.3.self_attn.qkv_proj", skip.patterns, naming)
    assert not vllm_skips_layer("model.layers.3.self_attn.o_proj", skip.patterns, naming)


@pytest.mark.gpu
def test_synthetic_awq_on_the_gpu(tmp_path):
    from quantlab.run import run_recipe

    # gemm_triton: gptqmodel's default on CUDA first tries kernels that download CUTLASS (the GPU box is offline)
    path = _recipe(tmp_path, "gpu-awq", {}, model={"source": "synthetic", "config": str(BUNDLED), "device": "cuda",
                                                   "awq_kernel": "gemm_triton"})
    [record] = run_recipe(load_recipe(path), tmp_path / "m", progress=False, echo=quiet).records
    assert record.hardware.kind == "gpu" and record.load_memory.allocated_end_bytes > 0
    assert record.model.weights == "synthetic" and any("no calibration" in n for n in record.notes)
    # transformers runs AWQ on CUDA in float16 whatever the recipe asked: the record says so
    assert record.model.dtype == "float16" and record.model.requested_dtype == "bfloat16"
    assert record.kernels.linear and all("Triton" in c for c in record.kernels.linear)


def test_records_name_no_hub_split_for_a_calibration_text_that_is_not_from_the_hub(tmp_path):
    """The stdlib calibration split is not the Hub's "train": method params must not say it is."""
    plan = make_plan(load_recipe(_recipe(tmp_path, "split", {})), for_this_machine=False)
    assert plan.method_params["calibration"]["source"] == "default"
    assert plan.method_params["calibration"]["split"] is None
    hub = AwqConfig(method="awq", calibration={"source": "hub", "dataset": "org/text"})
    assert hub.calibration.split is None and hub.calibration.effective_split == "train"


@pytest.mark.slow
def test_a_broken_awq_build_is_refused_by_the_reference_check(tmp_path, monkeypatch):
    """Scales scrambled after writing: the build still loads and generates, but no longer predicts its source."""
    from safetensors.torch import save_file

    real = AwqMethod.write_checkpoint

    def scrambled(self, qconfig, source, folder, *args, **kwargs):
        written = real(self, qconfig, source, folder, *args, **kwargs)
        for shard in Path(folder).glob("*.safetensors"):
            tensors = load_file(str(shard))
            generator = torch.Generator().manual_seed(0)
            for name, t in tensors.items():
                if name.endswith(".scales"):
                    tensors[name] = (torch.randn(t.shape, generator=generator) * t.float().abs().mean() * 20).to(t.dtype)
            save_file(tensors, str(shard), metadata={"format": "pt"})
        return written

    monkeypatch.setattr(AwqMethod, "write_checkpoint", scrambled)
    path = _recipe(tmp_path, "awq-broken", {})
    with pytest.raises(QuantlabError, match="greedy tokens .below 50%.*broken, not keeping it"):
        build_recipe(load_recipe(path), tmp_path / "builds" / "awq-broken", progress=False, echo=quiet)
    assert not (tmp_path / "builds" / "awq-broken").exists()
