"""bitsandbytes methods: recipe options and their errors, the skip list derived from the skip rules,
in-place quantization of synthetic weights, pre-quantized checkpoints, and the log noise. CPU only."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.quantizers.quantizers_utils import should_convert_module

from quantlab.console import quiet_bnb_logs
from quantlab.bundled import bundled_model_dir
from quantlab.errors import QuantlabError, RecipeError
from quantlab.estimate.against_records import scheme_for
from quantlab.methods import METHODS, bnb
from quantlab.methods.bnb import Bnb4bitConfig, BnbInt8Config
from quantlab.plan import make_plan
from quantlab.quantize.skips import skip_pattern_matches, skip_plan
from quantlab.sources import meta_model, resolve
from quantlab.recipe import ModelSpec, load_recipe

from conftest import QWEN_CONFIG_DIR, save_bnb_copy

BUNDLED = {"source": "bundled", "dtype": "bfloat16", "device": "cpu"}
SMALL = {"contexts": [16], "new_tokens": 2, "warmup": 0, "repeats": 1}


# ---- recipe options ---------------------------------------------------------------------------------

def test_recipe_accepts_both_methods(write_recipe):
    int8 = load_recipe(write_recipe({"name": "a", "model": BUNDLED, "quantization": {"method": "bnb_int8", "threshold": 0}}))
    assert int8.recipe.quantization == BnbInt8Config(method="bnb_int8", threshold=0.0)
    nf4 = load_recipe(write_recipe({"name": "b", "model": BUNDLED, "quantization": {
        "method": "bnb_4bit", "quant_type": "fp4", "double_quant": True, "compute_dtype": "float16", "quant_storage": "bfloat16"}}))
    q = nf4.recipe.quantization
    assert (q.quant_type, q.double_quant, q.compute_dtype, q.quant_storage) == ("fp4", True, "float16", "bfloat16")


@pytest.mark.parametrize("quantization, message", [
    ({"method": "bnb_4bit", "quant_type": "int4"}, "quantization.quant_type: Input should be 'nf4' or 'fp4' (got 'int4')"),
    ({"method": "bnb_4bit", "quant_storage": "int8"},
     "quantization.quant_storage: Input should be 'uint8', 'bfloat16', 'float16' or 'float32' (got 'int8')"),
    ({"method": "bnb_4bit", "compute_dtype": "float8"}, "quantization.compute_dtype: Input should be 'bfloat16', 'float16' or 'float32'"),
    ({"method": "bnb_4bit", "threshold": 6.0},
     "quantization.threshold: unknown key 'threshold'; allowed keys here: method, quant_type, double_quant, compute_dtype, quant_storage, skip_modules, skip_classes"),
    ({"method": "bnb_int8", "double_quant": True},
     "quantization.double_quant: unknown key 'double_quant'; allowed keys here: method, threshold, skip_modules, skip_classes"),
    ({"method": "bnb_int8", "skip_classes": ["mlp.dwn"]},
     "quantization.skip_classes: unknown tensor class(es) ['mlp.dwn']; classes: mtp, deltanet.in_proj_qkv, "),
    ({"method": "bnb_4bit", "skip_classes": ["mlp.down", "attention.o", "mlp.down"]},
     "quantization.skip_classes: tensor class(es) named more than once: ['mlp.down']"),
    ({"method": "bnb_4bit", "skip_classes": "mlp.down"}, "quantization.skip_classes: Input should be a valid list"),
    ({"method": "bnb_int8", "threshold": -1}, "quantization.threshold: Input should be greater than or equal to 0"),
    ({"method": "bnb_8bit"}, "quantization: unknown method 'bnb_8bit'; allowed methods: 'none', 'rtn', 'bnb_int8', 'bnb_4bit'"),
])
def test_unsupported_options_are_recipe_errors(write_recipe, quantization, message):
    with pytest.raises(RecipeError) as exc:
        load_recipe(write_recipe({"name": "x", "model": BUNDLED, "quantization": quantization}))
    assert message in str(exc.value)


# ---- the skip list ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant, expected", [
    ("text", ("in_proj_a", "in_proj_b", "lm_head")),
    ("full", ("in_proj_a", "in_proj_b", "lm_head", "model.visual")),
])
def test_qwen3_6_27b_skip_list_matches_the_rules_with_transformers_matching(variant, expected):
    config = AutoConfig.from_pretrained(QWEN_CONFIG_DIR)
    model = meta_model(config.text_config if variant == "text" else config)
    plan = skip_plan(model, "bnb_4bit")
    assert plan.patterns == expected
    # transformers' own rule converts exactly the Linears the rules quantize: 400 in 64 layers
    linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    converted = [n for n in linears if should_convert_module(n, list(plan.patterns))]
    assert converted == list(plan.quantized)
    assert len(plan.quantized) == 400  # 64 MLPs × 3 + 16 attention × 4 + 48 DeltaNet × 3
    assert all(n.endswith(("in_proj_a", "in_proj_b", "lm_head")) or ".visual." in n for n in plan.kept)


def test_our_matching_is_transformers_matching():
    names = ["model.layers.1.mlp.gate_proj", "model.layers.11.mlp.gate_proj", "lm_head", "model.visual.blocks.0.attn.qkv",
             "model.language_model.layers.0.linear_attn.in_proj_a", "model.mlp.gate"]
    for pattern in ["model.layers.1", "layers.*.mlp", "in_proj_a", "lm_head", "model.visual", "mlp.gate", "gate_proj"]:
        for name in names:
            assert skip_pattern_matches(pattern, name) == (not should_convert_module(name, [pattern])), (pattern, name)


def test_skip_list_that_leaves_nothing_to_quantize_fails_in_the_plan(write_recipe, no_weights_load):
    path = write_recipe({"name": "x", "model": BUNDLED, "quantization": {"method": "bnb_int8", "skip_modules": ["model.layers"]}})
    with pytest.raises(QuantlabError, match=r"nothing left to quantize: the skip list \['in_proj_a', 'in_proj_b', "
                                            r"'lm_head', 'model.layers'\] covers all 32 Linear modules"):
        make_plan(load_recipe(path))


def test_skip_pattern_that_matches_nothing_is_named(write_recipe):
    path = write_recipe({"name": "x", "model": BUNDLED, "quantization": {"method": "bnb_4bit", "skip_modules": ["mlp.down_prj"]}})
    with pytest.raises(QuantlabError, match="quantization.skip_modules: 'mlp.down_prj' matches none of the 25 Linear modules"):
        make_plan(load_recipe(path))


def test_rules_themselves_leaving_nothing_is_an_error(monkeypatch):
    import quantlab.architecture as arch

    everything = frozenset(arch.ROLES)
    monkeypatch.setitem(arch.UNQUANTIZED_ROLES, "bnb_4bit", everything)
    model = meta_model(AutoConfig.from_pretrained(bundled_model_dir()))
    with pytest.raises(QuantlabError, match="nothing left to quantize"):
        skip_plan(model, "bnb_4bit")


def test_plan_labels_and_extra_skips(write_recipe):
    path = write_recipe({"name": "x", "model": BUNDLED, "measure": SMALL,
                         "quantization": {"method": "bnb_4bit", "double_quant": True, "skip_modules": ["mlp.down_proj"]}})
    plan = make_plan(load_recipe(path))
    assert plan.method_label == "bnb nf4 + double quant (+1 skip pattern(s))"
    assert plan.method_name == "bnb_4bit" and plan.method_params["skip_modules"] == ["mlp.down_proj"]
    assert METHODS["bnb_int8"].label(BnbInt8Config(method="bnb_int8"), "bfloat16") == "bnb int8"
    assert METHODS["bnb_4bit"].label(Bnb4bitConfig(method="bnb_4bit", quant_type="fp4", compute_dtype="float32"),
                                     "bfloat16") == "bnb fp4 (compute float32)"
    kept = BnbInt8Config(method="bnb_int8", skip_classes=["mlp.down", "attention.o"], skip_modules=["model.layers.0.mlp"])
    assert METHODS["bnb_int8"].label(kept, "bfloat16") == "bnb int8 (attention.o+mlp.down kept, +1 skip pattern(s))"
    assert ("kept tensor classes (skip_classes)", ["mlp.down", "attention.o"]) in METHODS["bnb_int8"].card_rows(
        kept.model_dump())


def _down_projs(names) -> list[str]:
    return [n for n in names if n.endswith(".mlp.down_proj")]


def test_skip_classes_are_written_as_patterns_that_match_exactly_them():
    model = meta_model(AutoConfig.from_pretrained(QWEN_CONFIG_DIR).text_config)
    plan = skip_plan(model, "bnb_4bit", classes=["mlp.down"])
    assert plan.patterns == ("in_proj_a", "in_proj_b", "lm_head", "down_proj") and plan.extra_patterns == ("down_proj",)
    linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    converted = [n for n in linears if should_convert_module(n, list(plan.patterns))]
    assert converted == list(plan.quantized) and len(converted) == 400 - 64
    assert set(_down_projs(linears)) == {n for n in linears if not should_convert_module(n, ["down_proj"])}
    both = skip_plan(model, "bnb_4bit", ["model.layers.0.mlp"], ["mlp.down", "attention.q", "attention.k", "attention.v"])
    assert both.extra_patterns == ("down_proj", "k_proj", "q_proj", "v_proj", "model.layers.0.mlp")
    assert len(both.quantized) == 400 - 64 - 16 * 3 - 2  # model.layers.0.mlp: its gate and up; its down is a class member


@pytest.mark.parametrize("classes, message", [
    (["lm_head"], re.escape("quantization.skip_classes: 'lm_head' matches none of the Linear modules bnb_int8 would "
                            "quantize: the rules for bnb_int8 already keep it unquantized (e.g. lm_head); remove it")),
    (["deltanet.in_proj_ab"], re.escape("the rules for bnb_int8 already keep it unquantized "
                                        "(e.g. model.layers.0.linear_attn.in_proj_b)")),
    (["moe.shared_expert"], "'moe.shared_expert' matches none of .*: Qwen3_5ForCausalLM has no module of that class"),
    (["deltanet.in_proj_qkv", "deltanet.in_proj_z", "deltanet.out_proj", "attention.q", "attention.k", "attention.v",
      "attention.o", "mlp.gate", "mlp.up", "mlp.down"],
     r"nothing left to quantize: .* Remove entries from quantization\.skip_modules or quantization\.skip_classes"),
], ids=["lm_head", "in_proj_ab", "absent", "everything"])
def test_skip_classes_that_keep_nothing_more_fail_in_the_plan(write_recipe, no_weights_load, classes, message):
    path = write_recipe({"name": "x", "model": BUNDLED, "quantization": {"method": "bnb_int8", "skip_classes": classes}})
    with pytest.raises(QuantlabError, match=message):
        make_plan(load_recipe(path))


@pytest.mark.parametrize("qconfig", [BnbInt8Config(method="bnb_int8", skip_classes=["mlp.down"]),
                                     Bnb4bitConfig(method="bnb_4bit", skip_classes=["mlp.down"])], ids=["int8", "nf4"])
def test_skipped_classes_stay_plain_linears_in_place_and_at_load(qconfig):
    folder = bundled_model_dir()
    method = METHODS[qconfig.method]
    ours = method.apply(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16), qconfig)
    source = resolve(ModelSpec(source="bundled"))
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu",
                                                  **method.load_kwargs(qconfig, source))
    for model in (ours, theirs):
        kinds = {name: type(m).__name__ for name, m in model.named_modules() if name.endswith("_proj")}
        assert {kinds[n] for n in _down_projs(kinds)} == {"Linear"} and len(_down_projs(kinds)) == 4
        assert {k for n, k in kinds.items() if n.endswith(("up_proj", "q_proj", "out_proj"))} == {
            "Linear8bitLt" if qconfig.method == "bnb_int8" else "Linear4bit"}
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert all(torch.equal(ours.get_submodule(n).weight, reference.get_submodule(n).weight) for n in _down_projs(kinds))
    assert "down_proj" in ours.config.quantization_config.llm_int8_skip_modules
    ids = torch.randint(0, 2048, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


# ---- estimator alignment -----------------------------------------------------------------------------------

@pytest.mark.parametrize("qconfig, scheme", [
    (BnbInt8Config(method="bnb_int8"), "int8"),
    (Bnb4bitConfig(method="bnb_4bit"), "nf4"),
    (Bnb4bitConfig(method="bnb_4bit", double_quant=True), "nf4-dq"),
    (Bnb4bitConfig(method="bnb_4bit", quant_type="fp4"), "fp4"),
    (Bnb4bitConfig(method="bnb_4bit", skip_modules=["mlp.down_proj"]), None),
    (Bnb4bitConfig(method="bnb_4bit", skip_classes=["mlp.down"]), None),
    (BnbInt8Config(method="bnb_int8", skip_classes=["mlp.down"]), None),
])
def test_record_params_name_the_estimator_scheme(qconfig, scheme):
    record = SimpleNamespace(method=SimpleNamespace(name=qconfig.method, params=qconfig.model_dump()),
                             model=SimpleNamespace(dtype="bfloat16"))
    found = scheme_for(record)
    assert (found.key if found else None) == scheme


# ---- in-place quantization (synthetic weights) ------------------------------------------------------------

@pytest.mark.parametrize("qconfig", [BnbInt8Config(method="bnb_int8"), Bnb4bitConfig(method="bnb_4bit")], ids=["int8", "nf4"])
def test_in_place_quantization_equals_transformers_at_load(qconfig):
    folder = bundled_model_dir()
    ids = torch.randint(0, 2048, (1, 12), generator=torch.Generator().manual_seed(0))
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    method = METHODS[qconfig.method]
    plan = skip_plan(ours, qconfig.method)
    ours = method.apply(ours, qconfig)
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu",
                                                  quantization_config=method.transformers_config(qconfig, plan.patterns))
    assert bnb.is_bnb_quantized(ours) and not ours.training
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
    from quantlab.runtimes.transformers import model_bytes

    assert model_bytes(ours) == model_bytes(theirs) > sum(p.numel() * p.element_size() for p in ours.parameters())


def test_synthetic_run_quantizes_in_place(write_recipe, tmp_path):
    from quantlab.run import run_recipe

    path = write_recipe({"name": "syn", "model": {"source": "synthetic", "config": "bundled", "device": "cpu"},
                         "quantization": {"method": "bnb_4bit"}, "measure": SMALL})
    result = run_recipe(load_recipe(path), progress=False, echo=lambda s: None)
    (record,) = result.records
    assert record.method.name == "bnb_4bit" and record.method.label == "bnb nf4"
    assert record.model.weights == "synthetic" and record.result.status == "ok"
    assert record.weight_bytes < 3_000_000 * 2  # well under the BF16 7.4 MB


# ---- pre-quantized checkpoints ------------------------------------------------------------------------------

def test_a_foreign_bnb_checkpoint_is_labelled_from_its_quantization_config(tmp_path, write_recipe):
    model = AutoModelForCausalLM.from_pretrained(bundled_model_dir(), dtype=torch.bfloat16)
    save_bnb_copy(model, tmp_path / "ckpt", "bnb_4bit", quant_type="fp4")
    path = write_recipe({"name": "x", "model": {"source": "local", "path": str(tmp_path / "ckpt")}, "measure": SMALL})
    plan = make_plan(load_recipe(path))
    assert (plan.method_name, plan.method_label) == ("bnb_4bit", "bnb fp4")
    assert plan.method_params["checkpoint_skip_modules"] == ["in_proj_a", "in_proj_b", "lm_head"]
    again = write_recipe({"name": "y", "model": {"source": "local", "path": str(tmp_path / "ckpt")},
                          "quantization": {"method": "bnb_int8"}}, name="again.yaml")
    with pytest.raises(QuantlabError, match=r"is already quantized \(bnb fp4, quant_method bitsandbytes\); use quantization"):
        make_plan(load_recipe(again))


# ---- log noise ------------------------------------------------------------------------------------------------

def test_cast_warning_is_logged_once_and_kernel_message_never():
    quiet_bnb_logs()
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Collect()
    cast, ops = logging.getLogger("bitsandbytes.autograd._functions"), logging.getLogger("bitsandbytes.backends.cpu.ops")
    for logger in (cast, ops):
        logger.addHandler(handler)
    try:
        for f in cast.filters:  # a fresh count for this test
            getattr(f, "seen", set()).clear()
        for _ in range(50):
            cast.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.bfloat16)
        ops.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", "No module named 'kernels'")
        cast.warning("something else")
    finally:
        for logger in (cast, ops):
            logger.removeHandler(handler)
    assert seen == ["MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16 during quantization", "something else"]


@pytest.mark.parametrize("name, label", [("qwen3.6-27b-int8", "bnb int8"), ("qwen3.6-27b-nf4", "bnb nf4"),
                                         ("qwen3.6-27b-synthetic-int8", "bnb int8"), ("qwen3.6-27b-synthetic-nf4", "bnb nf4")])
def test_gpu_recipes_plan_without_a_gpu(name, label):
    from pathlib import Path

    from quantlab.artifact.writer import default_target

    loaded = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / f"{name}.yaml")
    plan = make_plan(loaded, for_this_machine=False)
    assert plan.method_label == label and plan.device.type == "cuda" and plan.points == ((1024, 1), (32768, 1))
    assert default_target(loaded) == Path("builds") / name
