"""Quantized checkpoints quantlab did not write (GPTQ, AutoRound, compressed-tensors), measured as published: the
format read from the checkpoint's quantization_config, refused before any load where the runtime cannot run it.
The GPTQ build is made here by gptqmodel (scripts/make_published_builds.py), in pytest's temporary folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.util import find_spec

import pytest

from quantlab.checkpoint_formats import FORMATS
from quantlab.cli import main
from quantlab.recipe import load_recipe
from quantlab.run import run_recipe

from conftest import REPO, forbid_weight_loads

BUNDLED = REPO / "quantlab" / "bundled" / "model"
MEASURE = {"contexts": [16], "new_tokens": 4, "warmup": 0, "repeats": 1}
QUALITY = {"tokens": 2048, "context": 256, "reference": {"model": {"source": "bundled"}}}


def with_quantization_config(tmp_path, qc: dict):
    folder = tmp_path / "ckpt"
    shutil.copytree(BUNDLED, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    return folder


@pytest.mark.parametrize("qc, label", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "GPTQ W4A16 g128 (pre-quantized)"),
    ({"quant_method": "auto-round", "bits": 4, "group_size": 128, "packing_format": "auto_round:auto_gptq"},
     "AutoRound W4A16 g128, auto_round:auto_gptq (pre-quantized)"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"group_0": {"weights": {"num_bits": 4, "group_size": 128}, "input_activations": None}}},
     "compressed-tensors W4A16 g128, pack-quantized (pre-quantized)"),
])
def test_each_format_is_named_from_its_quantization_config(qc, label):
    assert FORMATS[qc["quant_method"]].label(qc) == label


def test_a_format_no_runtime_runs_is_one_line_before_any_load(tmp_path, write_recipe, capsys, monkeypatch):
    forbid_weight_loads(monkeypatch)
    folder = with_quantization_config(tmp_path, {"quant_method": "fancyq", "bits": 3})
    path = write_recipe({"name": "x", "model": {"source": "local", "path": str(folder)}, "measure": MEASURE})
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "quant_method 'fancyq', a format no runtime here runs (known: auto-round, awq, bitsandbytes" in err


@pytest.mark.parametrize("qc, expected", [
    ({"quant_method": "gptq", "bits": 99, "group_size": 128}, "its GPTQ quantization_config does not load: bits is '99'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size is '0'"),
    ({"quant_method": "compressed-tensors", "config_groups": [1, 2]}, "config_groups is not a mapping of groups"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128},
     "its config says GPTQ, but its shards hold no .qweight tensor"),  # BF16 shards under a GPTQ config
])
def test_a_quantization_config_that_cannot_load_is_one_line(qc, expected, tmp_path, write_recipe, capsys, monkeypatch):
    forbid_weight_loads(monkeypatch)
    folder = with_quantization_config(tmp_path, qc)
    path = write_recipe({"name": "x", "model": {"source": "local", "path": str(folder)},
                         "measure": {**MEASURE, "runtime": "vllm"}})
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.skipif(find_spec("compressed_tensors") is not None, reason="compressed-tensors is installed here")
def test_a_format_whose_package_is_missing_says_how(tmp_path, write_recipe, capsys, monkeypatch):
    forbid_weight_loads(monkeypatch)
    folder = with_quantization_config(tmp_path, {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                                 "config_groups": {"g": {"weights": {"num_bits": 4}}}})
    path = write_recipe({"name": "x", "model": {"source": "local", "path": str(folder)}, "measure": MEASURE})
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "a compressed-tensors checkpoint; transformers loads it only with compressed-tensors installed" in err
    assert "pip install compressed-tensors" in err and "another runtime: vllm" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def gptq(tmp_path_factory):
    out = tmp_path_factory.mktemp("published") / "builds"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "make_published_builds.py"), str(out), "--only",
                           "gptq"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out / "gptq-w4g128"


def test_a_gptq_build_by_gptqmodel_measures_in_transformers_with_kl(gptq, write_recipe, tmp_path):
    config = json.loads((gptq / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and "modules_in_block_to_quantize" not in config  # as gptqmodel wrote it
    path = write_recipe({"name": "gptq", "model": {"source": "local", "path": str(gptq)}, "measure": MEASURE,
                         "quality": QUALITY})
    (record,) = run_recipe(load_recipe(path), tmp_path / "m", progress=False, echo=lambda _: None).records
    assert record.method.name == "gptq" and record.method.label == "GPTQ W4A16 g128 (pre-quantized)"
    assert record.kernels.linear == ("TorchAtenLinear",)  # gptqmodel's kernel, as transformers picked it
    assert 0 < record.quality.kl_mean < 0.05 and record.quality.top1_agreement > 0.85
    assert any("quantlab gives it the 10 its shards hold" in n for n in record.notes)
    assert record.result.status == "ok"


@pytest.mark.parametrize("name", ["gptq-transformers.yaml", "gptq-vllm.yaml"])
def test_the_shipped_gptq_recipes_plan_on_a_build_made_here(name, gptq, tmp_path, monkeypatch):
    from quantlab.plan import make_plan

    forbid_weight_loads(monkeypatch)
    text = (REPO / "recipes" / "published" / name).read_text()
    assert "path: builds/published/gptq-w4g128" in text
    recipe = tmp_path / name
    recipe.write_text(text.replace("builds/published/gptq-w4g128", str(gptq)))
    plan = make_plan(load_recipe(recipe), for_this_machine=False)
    assert plan.method_label == "GPTQ W4A16 g128 (pre-quantized)" and plan.quality is not None


def test_a_config_transformers_refuses_is_one_line_before_any_load(tmp_path, write_recipe, capsys, monkeypatch):
    """A GPTQ checkpoint relabelled AWQ: quantlab's own AWQ method claims it, and transformers' parser refuses it."""
    forbid_weight_loads(monkeypatch)
    folder = with_quantization_config(tmp_path, {"quant_method": "awq", "bits": 4, "group_size": 128, "format": "gptq"})
    path = write_recipe({"name": "x", "model": {"source": "local", "path": str(folder)}, "measure": MEASURE})
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "transformers cannot read its quantization_config (Invalid format 'gptq'" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
