"""AWQ with the MTP head quantized too (`quantization.mtp: quantize`): what the build writes, that the packed head
is the source's head, that the main model is untouched by it, the skip list vLLM reads, and bad input caught
before any weights load. The source is the bundled model joined to a random-weight MTP head in Qwen3.5's layout
(quantlab/bundled/mtp.py), made in the test's folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from quantlab.artifact.writer import build_recipe
from quantlab.bundled import BUNDLED_MODEL_DIR
from quantlab.bundled.mtp import MTP_FILE, MtpHead, head_state, mtp_logits, write_joined
from quantlab.checkpoint import INDEX_NAME, folder_tensors
from quantlab.errors import QuantlabError
from quantlab.methods.awq import AwqConfig, AwqMethod, engine_params
from quantlab.plan import make_plan
from quantlab.quantize.awq import ENGINES
from quantlab.quantize.awq.engine import MTP_STAGED, AwqJob
from quantlab.quantize.awq.mtp import MTP_LINEAR_NAMES
from quantlab.quantize.groupwise import fake_quantize
from quantlab.recipe import load_recipe
from quantlab.schema.build import read_manifest
from quantlab.text.calibration import calibration_samples

from test_awq import _one_thread, unpack_gemm

SMALL_CALIBRATION = {"samples": 8, "seq_len": 128}
NORMS = ("mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight",
         "mtp.layers.0.input_layernorm.weight", "mtp.layers.0.post_attention_layernorm.weight",
         "mtp.layers.0.self_attn.q_norm.weight", "mtp.layers.0.self_attn.k_norm.weight")


def quiet(_: str) -> None:
    return None


def _random_head(config) -> MtpHead:
    torch.manual_seed(0)
    head = MtpHead(config)
    with torch.no_grad():  # norms away from their zero init, with a few salient channels (as trained models have)
        for name, p in head.named_parameters():  # for the search to protect, and a fold into the wrong norm to show
            if p.dim() == 1:
                p.normal_(0, 0.2)
                p[torch.randperm(p.numel())[:4]] = 7.0  # (1 + weight): 8× the activation of those channels
    return head


def make_mtp_source(folder: Path) -> Path:
    """The bundled model with a random-weight MTP head, as `model: {source: bundled, mtp: true}` joins the trained
    one: the bundled shard byte for byte, the head in mtp.safetensors, an index, mtp_num_hidden_layers 1."""
    heads = folder / "head"
    heads.mkdir(parents=True)
    save_file(head_state(_random_head(AutoConfig.from_pretrained(BUNDLED_MODEL_DIR))), str(heads / MTP_FILE))
    source = folder / "source"
    source.mkdir()
    write_joined(source, BUNDLED_MODEL_DIR, heads)
    return source


@pytest.fixture(scope="module")
def mtp_source(tmp_path_factory) -> Path:
    return make_mtp_source(tmp_path_factory.mktemp("awq-mtp"))


def _recipe(folder: Path, name: str, source: Path | None, **quantization) -> Path:
    model = {"source": "local", "path": str(source), "device": "cpu"} if source else {"source": "bundled",
                                                                                     "device": "cpu"}
    data = {"name": name, "model": model,
            "quantization": {"method": "awq", "calibration": SMALL_CALIBRATION, **quantization},
            "measure": {"contexts": [16], "new_tokens": 2, "warmup": 0, "repeats": 1},
            "output": {"dir": str(folder / "measurements")}, "build": {"check_tokens": 4}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _job(source: Path, out: Path, mtp: bool, **qc) -> AwqJob:
    """The quick engine job (coarse grid) of test_awq, on the MTP source."""
    config = AutoConfig.from_pretrained(source)
    qconfig = AwqConfig(method="awq", calibration=SMALL_CALIBRATION, mtp="quantize" if mtp else "bf16", **qc)
    from transformers import AutoTokenizer

    ids = calibration_samples(qconfig.calibration, AutoTokenizer.from_pretrained(source)).input_ids
    params = engine_params(qconfig, config.architectures[0])
    return AwqJob(source, config, out, params, ids, torch.device("cpu"), torch.bfloat16, 5 * 10**9, progress=False,
                  search_grid=4)


def _packed_head(tensors: dict[str, torch.Tensor], group_size: int = 128) -> dict[str, torch.Tensor]:
    """The MTP head's state (names relative to mtp.), its packed Linears dequantized to float32."""
    state = {}
    for name, tensor in tensors.items():
        if not name.startswith("mtp."):
            continue
        module, _, leaf = name.removeprefix("mtp.").rpartition(".")
        if leaf == "qweight":
            state[f"{module}.weight"] = unpack_gemm({s: tensors[f"mtp.{module}.{s}"] for s in
                                                     ("qweight", "qzeros", "scales")}, group_size)
        elif leaf not in ("qzeros", "scales"):
            state[f"{module}.{leaf}"] = tensor.float()
    return state


def _draft_kl(model, reference: MtpHead, candidate: MtpHead, ids: torch.Tensor) -> tuple[float, float]:
    """(KL of the candidate's draft distribution from the reference head's, top-1 agreement of the two)."""
    with torch.no_grad():
        _, ref = mtp_logits(model, reference, ids)
        _, out = mtp_logits(model, candidate, ids)
    p, q = torch.log_softmax(ref.float(), -1), torch.log_softmax(out.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean()), float((ref.argmax(-1) == out.argmax(-1)).float().mean())


def _head(config, state) -> MtpHead:
    head = MtpHead(config)
    head.load_state_dict(state, strict=True)
    return head.eval()


# ---- the engine: the head quantized, the main model untouched ------------------------------------------------

@pytest.fixture(scope="module")
def engine_outputs(mtp_source, tmp_path_factory) -> dict[bool, tuple[Path, tuple[str, ...], tuple[str, ...]]]:
    outputs = {}
    for mtp in (False, True):
        out = tmp_path_factory.mktemp(f"engine-mtp-{mtp}")
        with _one_thread():
            outcome = ENGINES["quantlab"].quantize(_job(mtp_source, out, mtp))
        outputs[mtp] = (out, outcome.quantized, outcome.notes)
    return outputs


@pytest.mark.slow
def test_the_engine_stages_the_packed_head_and_leaves_the_main_model_as_it_was(engine_outputs):
    (plain, plain_names, _), (quantized, names, notes) = engine_outputs[False], engine_outputs[True]
    # the main model's shard is the same bytes with or without the MTP head: it runs after the last layer
    assert (plain / "model.safetensors").read_bytes() == (quantized / "model.safetensors").read_bytes()
    assert not (plain / MTP_STAGED).exists()
    assert names == plain_names + MTP_LINEAR_NAMES and len(plain_names) == 25
    note = next(n for n in notes if n.startswith("MTP head:"))
    assert "8 of its 8 Linears quantized to AWQ W4 g128" in note and "searched on the MTP block's own inputs" in note
    staged = load_file(str(quantized / MTP_STAGED / "model.safetensors"))
    assert not any(n.startswith("mtp.") for n in load_file(str(quantized / "model.safetensors")))
    assert set(staged) == {f"{m}.{s}" for m in MTP_LINEAR_NAMES for s in ("qweight", "qzeros", "scales")} | set(NORMS)


@pytest.mark.slow
def test_the_packed_head_drafts_as_the_source_head_does(engine_outputs, mtp_source):
    """Dequantized, the packed head (with the scales folded into its norms) is the source head up to 4-bit
    rounding: its drafts are close to the BF16 head's, and no further than plain rounding-to-nearest's."""
    quantized = engine_outputs[True][0]
    config = AutoConfig.from_pretrained(mtp_source)
    source_state = {n.removeprefix("mtp."): t.float() for n, t in load_file(str(mtp_source / MTP_FILE)).items()}
    packed_state = _packed_head(load_file(str(quantized / MTP_STAGED / "model.safetensors")))
    folded = [n for n in ("pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight",
                          "layers.0.input_layernorm.weight", "layers.0.post_attention_layernorm.weight")
              if not torch.equal(packed_state[n], source_state[n])]
    assert len(folded) == 4  # every searched group's scales went into its norm
    assert torch.equal(packed_state["norm.weight"], source_state["norm.weight"])  # feeds no Linear of the head
    rtn_state = {n: fake_quantize(t, 4, 128, True) if t.dim() == 2 else t for n, t in source_state.items()}
    model = AutoModelForCausalLM.from_pretrained(mtp_source, dtype=torch.float32).eval()
    from quantlab.text.corpus import stdlib_text
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(mtp_source)(stdlib_text("heldout", 40_000), return_tensors="pt").input_ids
    ids = ids[0, :8 * 128].view(8, 128)
    reference = _head(config, source_state)
    kl, agreement = _draft_kl(model, reference, _head(config, packed_state), ids)
    rtn_kl, _ = _draft_kl(model, reference, _head(config, rtn_state), ids)
    assert kl < 0.05 and agreement > 0.8, (kl, agreement)
    assert kl < 1.1 * rtn_kl, (kl, rtn_kl)


# ---- the build, through `quantlab build` ---------------------------------------------------------------------

@pytest.mark.slow
def test_build_writes_the_quantized_head_in_its_own_shard_and_says_so(mtp_source, tmp_path):
    recipe = _recipe(tmp_path, "awq-mtp-w4", mtp_source, mtp="quantize")
    result = build_recipe(load_recipe(recipe), tmp_path / "builds" / "awq-mtp-w4", measure=False, progress=False,
                          echo=quiet)
    folder, manifest = result.folder, read_manifest(result.folder)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == ["in_proj_a", "in_proj_b", "lm_head"]  # no `mtp`: vLLM quantizes its draft
    assert manifest.method.label == "AWQ W4A16 g128, MTP W4" and manifest.method.params["mtp"] == "quantize"
    assert manifest.unquantized.skip_modules == ["in_proj_a", "in_proj_b", "lm_head"]
    assert manifest.engine["quantized_linears"] == 33
    # one MTP shard, the last, as a BF16 build's copied head: packed Linears, norms at the model dtype
    index = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    last = "model-00002-of-00002.safetensors"
    assert {f for n, f in index.items() if n.startswith("mtp.")} == {last}
    assert all(not n.startswith("mtp.") for n, f in index.items() if f != last)
    with safe_open(str(folder / last), "pt") as shard:
        entries = {n: (shard.get_slice(n).get_dtype(), tuple(shard.get_slice(n).get_shape())) for n in shard.keys()}
    source = {n: tuple(t.shape) for n, t in folder_tensors(mtp_source).items() if n.startswith("mtp.")}
    for module in MTP_LINEAR_NAMES:
        out_features, in_features = source[f"{module}.weight"]
        assert entries.pop(f"{module}.qweight") == ("I32", (in_features, out_features // 8))
        assert entries.pop(f"{module}.qzeros") == ("I32", (in_features // 128, out_features // 8))
        assert entries.pop(f"{module}.scales") == ("BF16", (in_features // 128, out_features))
    assert entries == {n: ("BF16", source[n]) for n in NORMS}
    assert manifest.mtp == {"tensors": 31, "bytes": manifest.mtp["bytes"], "file": last, "quantized_linears": 8,
                            "how": manifest.engine["notes"][0]}
    assert manifest.mtp["bytes"] == sum(t.nbytes for t in folder_tensors(folder).values() if t.name.startswith("mtp."))
    card = (folder / "README.md").read_text()
    assert "AWQ W4A16 g128, MTP W4" in card and "| MTP head (mtp) | `quantize` |" in card
    assert (f"MTP: 31 `mtp.*` tensors ({manifest.mtp['bytes'] / 1e6:,.2f} MB) in `{last}`: 8 of its 8 Linears "
            "quantized to AWQ W4 g128 with zero points in the main model's GEMM layout (qweight/qzeros/scales); scales "
            "and clipping searched on the MTP block's own inputs") in card
    assert "`mtp` is not in the skip list, so vLLM builds its MTP draft with the same AWQ config" in card
    assert "from the AWQ-packed mtp.* tensors" in card and "copied byte for byte" not in card
    assert "33 Linear weights are quantized" in card
    assert manifest.greedy.reference is not None and manifest.greedy.reference.agreement >= 0.5
    # plain transformers loads it (it ignores mtp.*, whatever their format)
    AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.slow
def test_the_method_places_the_head_in_every_checkpoint_it_writes(mtp_source, tmp_path):
    """`quantlab run` writes its temporary checkpoint through the same step as a build (run.write_checkpoint): the
    head the engine staged is placed there too, and a copy of the source's head over it is refused."""
    from quantlab.run import write_checkpoint

    plan = make_plan(load_recipe(_recipe(tmp_path, "awq-mtp-run", mtp_source, mtp="quantize")))
    out = tmp_path / "checkpoint"
    out.mkdir()
    with _one_thread():
        written, _ = write_checkpoint(plan, AwqMethod(), out, False, quiet)
    assert not (out / MTP_STAGED).exists() and len(written.quantized) == 33
    index = json.loads((out / INDEX_NAME).read_text())["weight_map"]
    assert index["mtp.fc.qweight"] == "model-00002-of-00002.safetensors" and "mtp.fc.weight" not in index
    from quantlab.artifact.tensors import add_mtp_shard, mtp_tensors

    with pytest.raises(QuantlabError, match="already holds 31 mtp.* tensor"):
        add_mtp_shard(out, mtp_tensors(mtp_source))


# ---- the default, and bad input before any weights load ---------------------------------------------------------

def test_the_default_keeps_the_head_bf16_and_in_the_skip_list(mtp_source, tmp_path, no_weights_load):
    qconfig = AwqConfig(method="awq")
    assert qconfig.mtp == "bf16" and engine_params(qconfig, "Qwen3_5ForCausalLM").mtp is False
    plan = make_plan(load_recipe(_recipe(tmp_path, "awq-mtp-bf16", mtp_source)))
    assert plan.method_label == "AWQ W4A16 g128"
    skip = AwqMethod().skip_rules(plan.recipe.quantization, plan.source)
    assert skip.patterns == ("in_proj_a", "in_proj_b", "lm_head", "mtp")
    assert AwqMethod().estimator_scheme(plan.method_params, "bfloat16") == "awq-g128"
    quantized = make_plan(load_recipe(_recipe(tmp_path, "awq-mtp-q", mtp_source, mtp="quantize")))
    assert quantized.method_label == "AWQ W4A16 g128, MTP W4"
    assert AwqMethod().skip_rules(quantized.recipe.quantization, quantized.source).patterns == (
        "in_proj_a", "in_proj_b", "lm_head")
    assert AwqMethod().estimator_scheme(quantized.method_params, "bfloat16") is None  # the table prices MTP at BF16


def test_a_kept_class_is_kept_in_the_head_too(mtp_source, tmp_path, no_weights_load):
    """skip_classes' patterns are substrings to vLLM: `down_proj` skips the draft's down_proj as well, so the build
    keeps it at the model dtype too, and the two readings agree."""
    plan = make_plan(load_recipe(_recipe(tmp_path, "awq-mtp-down", mtp_source, mtp="quantize",
                                         skip_classes=["mlp.down"])))
    assert AwqMethod().skip_rules(plan.recipe.quantization, plan.source).patterns == (
        "in_proj_a", "in_proj_b", "lm_head", "down_proj")
    from quantlab.quantize.awq.mtp import kept_class

    assert [n for n in MTP_LINEAR_NAMES if kept_class(n, ["mlp.down"])] == ["mtp.layers.0.mlp.down_proj"]


@pytest.mark.slow
def test_a_kept_class_is_written_unquantized_in_the_head(mtp_source, tmp_path):
    with _one_thread():
        outcome = ENGINES["quantlab"].quantize(_job(mtp_source, tmp_path, True, skip_classes=["mlp.down"]))
    staged = load_file(str(tmp_path / MTP_STAGED / "model.safetensors"))
    down = "mtp.layers.0.mlp.down_proj"
    assert [n for n in staged if n.startswith(down)] == [f"{down}.weight"]
    assert staged[f"{down}.weight"].dtype == torch.bfloat16
    assert down not in outcome.quantized and "mtp.layers.0.mlp.up_proj" in outcome.quantized
    assert outcome.notes[-1].startswith(
        "MTP head: 7 of its 8 Linears (the other 1 kept at the model dtype by skip_classes) quantized")


def _no_mtp_tensors(folder: Path) -> Path:
    """The bundled model with a config that names an MTP head, and no mtp.* tensor (what save_pretrained leaves)."""
    source = folder / "no-mtp-tensors"
    shutil.copytree(BUNDLED_MODEL_DIR, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "mtp_num_hidden_layers": 1}))
    return source


@pytest.mark.parametrize("case, message", [
    ("bundled", r"^quantization\.mtp quantize: quantlab-bundled has no MTP head \(its config has no "
                r"mtp_num_hidden_layers\); use mtp: bf16, or a source with an MTP head$"),
    ("no-tensors", r"^quantization\.mtp quantize: .*: its config names an MTP head but its files have no mtp\.\* "
                   r"tensor"),
    ("gptqmodel", r"^quantization\.mtp quantize: engine gptqmodel drops the MTP head \(mtp\.\*\) and cannot quantize "
                  r"it; use engine: quantlab$"),
])
def test_a_source_without_a_head_is_refused_before_any_load(mtp_source, tmp_path, no_weights_load, case, message):
    source = {"bundled": None, "no-tensors": _no_mtp_tensors(tmp_path), "gptqmodel": mtp_source}[case]
    extra = {"engine": "gptqmodel"} if case == "gptqmodel" else {}
    with pytest.raises(QuantlabError, match=message) as caught:
        make_plan(load_recipe(_recipe(tmp_path, f"bad-{case}", source, mtp="quantize", **extra)))
    assert "\n" not in str(caught.value)


def test_synthetic_weights_have_no_head_to_quantize(tmp_path, no_weights_load):
    path = tmp_path / "synthetic.yaml"
    path.write_text(yaml.safe_dump({
        "name": "synthetic-mtp", "model": {"source": "synthetic", "config": "qwen3.6-27b", "device": "cpu"},
        "quantization": {"method": "awq", "mtp": "quantize"}, "measure": {"contexts": [16], "new_tokens": 2},
    }))
    with pytest.raises(QuantlabError, match=r"synthetic weights have no MTP head"):
        make_plan(load_recipe(path), for_this_machine=False)


def test_an_mtp_value_the_schema_does_not_know(tmp_path):
    from quantlab.errors import RecipeError

    with pytest.raises(RecipeError, match=r"quantization\.mtp"):
        load_recipe(_recipe(tmp_path, "bad-value", None, mtp="int4"))


def test_the_head_is_checked_again_by_the_engine_before_its_first_layer(tmp_path, monkeypatch):
    """A Hub source not downloaded at planning time: the engine refuses a checkpoint without the head's tensors
    before it quantizes anything."""
    import quantlab.quantize.awq.native as native

    def refuse(*args, **kwargs):
        raise AssertionError("a layer was quantized before the check")

    monkeypatch.setattr(native, "_quantize_layer", refuse)
    (tmp_path / "out").mkdir()
    job = _job(_no_mtp_tensors(tmp_path), tmp_path / "out", True)
    with pytest.raises(QuantlabError, match=r"its config names an MTP head but its files have no mtp"):
        ENGINES["quantlab"].quantize(job)


@pytest.mark.slow
def test_the_full_model_layout_quantizes_its_head_too(tmp_path):
    """Qwen3.6-27B's own checkpoint class (the VL one, decoder layers under model.language_model), shrunk: the head
    takes the language model's final norm, embeddings and rotary embeddings."""
    from conftest import save_vl_checkpoint, tiny_qwen3_5_config

    config = tiny_qwen3_5_config()
    assert config.text_config.mtp_num_hidden_layers == 1  # as the real config says
    source = tmp_path / "vl"
    source.mkdir()
    save_vl_checkpoint(config, source)
    out = tmp_path / "out"
    out.mkdir()
    params = engine_params(AwqConfig(method="awq", mtp="quantize"), "Qwen3_5ForConditionalGeneration")
    ids = torch.randint(0, config.text_config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    job = AwqJob(source, config, out, params, ids, torch.device("cpu"), torch.bfloat16, 5 * 10**9, progress=False,
                 search_grid=4)
    with _one_thread():
        outcome = ENGINES["quantlab"].quantize(job)
    assert outcome.quantized[-8:] == MTP_LINEAR_NAMES
    staged = load_file(str(out / MTP_STAGED / "model.safetensors"))
    assert set(staged) == {f"{m}.{s}" for m in MTP_LINEAR_NAMES for s in ("qweight", "qzeros", "scales")} | set(NORMS)
    assert staged["mtp.fc.qweight"].shape == (2 * 128, 128 // 8)
    assert not any(n.startswith("mtp.") for n in load_file(str(out / "model.safetensors")))
