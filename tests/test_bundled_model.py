"""Checks of the committed bundled model and of the corpus splits (no retraining)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import transformers

from quantlab import bundled
from quantlab.text import corpus
from quantlab.bundled import train as build
from quantlab.bundled.evaluate import perplexity


@pytest.fixture(scope="module")
def model_dir():
    return bundled.bundled_model_dir()


@pytest.fixture(scope="module")
def build_info(model_dir):
    return json.loads((model_dir / "build_info.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def model(model_dir):
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()


def test_folder_exists_and_is_small(model_dir):
    files = [path for path in model_dir.rglob("*") if path.is_file()]
    names = {path.name for path in files}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "build_info.json"} <= names
    assert sum(path.stat().st_size for path in files) <= 10 * 1024 * 1024


def test_missing_folder_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setattr(bundled, "BUNDLED_MODEL_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="quantlab.bundled.train"):
        bundled.bundled_model_dir()


def test_layer_pattern_matches_qwen36(model):
    config = model.config
    assert config.model_type == "qwen3_5_text"
    assert config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    full_attention = model.model.layers[3].self_attn
    assert full_attention.q_proj.out_features == 2 * config.num_attention_heads * config.head_dim  # gated
    for layer in model.model.layers[:3]:
        assert layer.linear_attn.in_proj_a.out_features == config.linear_num_value_heads


def test_linear_dims_are_multiples_of_128(model):
    assert build.linear_dim_violations(model) == []


def test_vocab_size_matches_tokenizer(model, tokenizer):
    assert model.config.vocab_size % 128 == 0
    assert model.config.vocab_size == len(tokenizer)


def test_tokenizer_round_trip_is_lossless(tokenizer):
    source = corpus.stdlib_text("heldout", max_chars=20_000)
    assert tokenizer.decode(tokenizer.encode(source, add_special_tokens=False)) == source


def test_heldout_perplexity_matches_build_info(model, tokenizer, build_info):
    token_ids = build.heldout_token_ids(tokenizer)
    value = perplexity(model, token_ids, build.SEQ_LEN, build_info["heldout_test_slice_seqs"])
    recorded = build_info["heldout_perplexity_after_test_slice"]
    assert abs(value - recorded) <= 0.1 * recorded


def test_training_lowered_heldout_perplexity_far_below_vocab_size(build_info):
    assert build_info["stopped_by"] == "steps"
    assert build_info["heldout_perplexity_after"] < 50  # vocab is 2048; untrained is about 2000
    assert build_info["heldout_perplexity_after"] < build_info["heldout_perplexity_before"] / 20


def test_cached_greedy_decoding_equals_uncached(model, tokenizer):
    prompt = tokenizer("def main(", return_tensors="pt")
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    cached = model.generate(**prompt, use_cache=True, **settings)
    uncached = model.generate(**prompt, use_cache=False, **settings)
    assert torch.equal(cached, uncached)


def test_corpus_splits_are_disjoint():
    files = {split: set(corpus.stdlib_files(split)) for split in corpus.SPLITS}
    assert all(files.values())
    for first, second in itertools.combinations(corpus.SPLITS, 2):
        assert not files[first] & files[second]


def test_unknown_split_raises():
    with pytest.raises(ValueError, match="bogus"):
        corpus.stdlib_files("bogus")
