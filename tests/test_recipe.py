"""Recipe validation: every shipped recipe is valid; bad ones fail with a message that says why."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantlab.errors import QuantlabError, RecipeError
from quantlab.plan import make_plan
from quantlab.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
GOOD = {"name": "ok", "model": {"source": "bundled"}}
PUBLISHED = "builds/published/"  # where `make published-builds` writes the builds the published-* recipes measure


@pytest.mark.parametrize("path", sorted((REPO / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate_and_plan(path, monkeypatch, tmp_path):
    """As in a fresh clone: no model quantlab makes on first use (model.transform) is made to plan one. A recipe of a
    published build reads `make published-builds`' output: where it is not made, planning says so in one line
    (tests/test_gguf_source.py and test_published_checkpoints.py plan them on builds made in temporary folders)."""
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(REPO)
    loaded = load_recipe(path)
    published = str(loaded.recipe.model.path or "")
    if published.startswith(PUBLISHED) and not (REPO / published).exists():
        with pytest.raises(QuantlabError, match=r"^\S*builds/published/\S+: (no such GGUF file|model folder not found)$"):
            make_plan(loaded, for_this_machine=False)
        return
    plan = make_plan(loaded, for_this_machine=False)
    assert plan.parameters > 0
    assert plan.points
    assert not (tmp_path / "cache").exists()


def test_defaults_fill_the_measurement_plan(write_recipe):
    recipe = load_recipe(write_recipe(GOOD)).recipe
    assert recipe.quantization.method == "none"
    assert recipe.measure.repeats >= 1 and recipe.measure.contexts


BAD = [
    ("unknown top-level key", {**GOOD, "modle": {}}, "modle: unknown key 'modle'; allowed keys here: name, description, model"),
    ("unknown nested key", {**GOOD, "measure": {"contxts": [8]}}, "measure.contxts: unknown key 'contxts'; allowed keys here: contexts"),
    ("missing model", {"name": "x"}, "model: required, but missing"),
    ("unknown source", {"name": "x", "model": {"source": "s3"}}, "model.source: Input should be 'bundled', 'hub', 'local', 'synthetic' or 'gguf' (got 's3')"),
    ("hub without id", {"name": "x", "model": {"source": "hub"}}, "model: source 'hub' needs model.id"),
    ("local without path", {"name": "x", "model": {"source": "local"}}, "model: source 'local' needs model.path"),
    ("path with synthetic", {"name": "x", "model": {"source": "synthetic", "config": "qwen3.6-27b", "path": "/x"}},
     "model.path is not used with source 'synthetic'; remove it"),
    ("bad dtype", {"name": "x", "model": {"source": "bundled", "dtype": "int4"}},
     "model.dtype: Input should be 'bfloat16', 'float16' or 'float32' (got 'int4')"),
    ("bad device", {"name": "x", "model": {"source": "bundled", "device": "tpu"}}, "model.device: String should match pattern"),
    ("negative context", {**GOOD, "measure": {"contexts": [128, -5]}}, "each context must be between 1 and 1,048,576 tokens, got -5"),
    ("absurd context", {**GOOD, "measure": {"contexts": [10**9]}}, "got 1000000000"),
    ("repeated context", {**GOOD, "measure": {"contexts": [8, 8]}}, "contexts must not repeat"),
    ("zero repeats", {**GOOD, "measure": {"repeats": 0}}, "measure.repeats: Input should be greater than or equal to 1 (got 0)"),
    ("string new_tokens", {**GOOD, "measure": {"new_tokens": "many"}}, "measure.new_tokens: Input should be a valid integer"),
    ("unknown method", {**GOOD, "quantization": {"method": "gptq"}}, "quantization: unknown method 'gptq'; allowed methods: 'none', 'rtn'"),
    ("rtn bad bits", {**GOOD, "quantization": {"method": "rtn", "bits": 5}}, "quantization.bits: Input should be 2, 3, 4 or 8 (got 5)"),
    ("rtn unknown key", {**GOOD, "quantization": {"method": "rtn", "group": 64}},
     "quantization.group: unknown key 'group'; allowed keys here: method, bits, group_size, zero_point"),
    ("bad name", {**GOOD, "name": "has spaces"}, "name: String should match pattern"),
    ("batch zero", {**GOOD, "measure": {"batch_sizes": [0]}}, "each batch size must be between 1 and 4096, got 0"),
]


@pytest.mark.parametrize("case, data, expected", BAD, ids=[b[0] for b in BAD])
def test_bad_recipe_names_file_field_value_and_allowed(write_recipe, case, data, expected):
    path = write_recipe(data)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert str(path) in message
    assert expected in message


@pytest.mark.parametrize("quantization, label", [
    ({"method": "awq", "skip_classes": ["mlp.down"]}, "AWQ W4A16 g128, mlp.down kept"),
    ({"method": "bnb_int8", "skip_classes": ["mlp.down", "attention.o"]}, "bnb int8 (attention.o+mlp.down kept)"),
    ({"method": "bnb_4bit", "skip_classes": ["mlp.gate", "mlp.up"], "skip_modules": ["model.layers.0.mlp"]},
     "bnb nf4 (mlp.gate+mlp.up kept, +1 skip pattern(s))"),
], ids=["awq", "bnb_int8", "bnb_4bit"])
def test_skip_classes_reach_the_plan_and_its_records(write_recipe, quantization, label):
    loaded = load_recipe(write_recipe({**GOOD, "quantization": quantization}))
    qconfig = loaded.recipe.quantization
    assert qconfig.skip_classes == quantization["skip_classes"]
    plan = make_plan(loaded, for_this_machine=False)
    assert plan.method_params["skip_classes"] == quantization["skip_classes"] and plan.method_label == label
    assert plan.method_params == qconfig.model_dump()
    # None: unset (AWQ's calibration has fields that only apply to other sources, and refuses them set)
    assert type(qconfig).model_validate(qconfig.model_dump(exclude_none=True)) == qconfig


def test_yaml_syntax_error_gives_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodel: {source: bundled\n")
    with pytest.raises(RecipeError, match=r"not valid YAML \(line \d+, column \d+\)"):
        load_recipe(path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_recipe(path)


def test_plan_rejects_context_beyond_model_limit(write_recipe, tiny_config_dir):
    path = write_recipe({"name": "x", "model": {"source": "synthetic", "config": str(tiny_config_dir)},
                         "measure": {"contexts": [1000], "new_tokens": 100}})
    with pytest.raises(QuantlabError, match=r"measure.contexts: \[1000\] \+ new_tokens 100 exceed .*max_position_embeddings \(1,024\)"):
        make_plan(load_recipe(path))


def test_plan_rejects_full_variant_of_text_only_model(write_recipe):
    path = write_recipe({"name": "x", "model": {"source": "bundled", "variant": "full"}})
    with pytest.raises(QuantlabError, match="variant 'full' needs a checkpoint with a vision tower"):
        make_plan(load_recipe(path))


def test_plan_rejects_cuda_without_gpu(write_recipe):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    path = write_recipe({"name": "x", "model": {"source": "bundled", "device": "cuda"}})
    with pytest.raises(QuantlabError, match="sees no CUDA GPU"):
        make_plan(load_recipe(path))


def test_plan_refuses_weights_larger_than_host_ram(write_recipe):
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the weights go to the GPU")
    path = write_recipe({"name": "x", "model": {"source": "synthetic", "config": "qwen3.6-27b", "device": "cpu", "dtype": "float32"}})
    with pytest.raises(QuantlabError, match=r"the weights need 107\.6 GB"):
        make_plan(load_recipe(path))
