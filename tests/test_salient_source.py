"""The bundled model with salient channels as a model source (model.transform): validated without being made, made
on first use into a cache folder keyed by its inputs, reused, identical to scripts/make_salient_model.py's output,
never used when damaged, made once by concurrent makers. Every test uses a temporary QUANTLAB_CACHE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import quantlab.made_sources as made_sources
import quantlab.salient as salient
from quantlab.errors import QuantlabError, RecipeError
from quantlab.made_sources import MANIFEST, MadeModel
from quantlab.plan import make_plan
from quantlab.recipe import ModelSpec, load_recipe
from quantlab.sources import resolve

from conftest import forbid_weight_loads

REPO = Path(__file__).resolve().parent.parent
BUNDLED_DIR = REPO / "quantlab" / "bundled" / "model"
SALIENT = {"salient": {"channels": 4, "factor": 32, "seed": 0}}
SPEC = {"source": "bundled", "dtype": "float32", "device": "cpu", "transform": SALIENT}
SHIPPED = [REPO / "recipes" / "bundled-salient-awq.yaml", REPO / "recipes" / "bundled-salient-rtn4.yaml"]


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("QUANTLAB_CACHE", str(root))
    return root


@pytest.fixture
def makes(monkeypatch) -> list[Path]:
    """The folders the salient transform wrote into, in order: a counter of makes."""
    calls: list[Path] = []
    real = salient.write_salient_files

    def counted(source, folder, *args, **kwargs):
        calls.append(Path(folder))
        return real(source, folder, *args, **kwargs)

    monkeypatch.setattr(salient, "write_salient_files", counted)
    return calls


def made_folder(**transform) -> Path:
    return resolve(ModelSpec.model_validate({**SPEC, "transform": {"salient": transform or SALIENT["salient"]}})
                   ).files(download=True)


# ---- the schema --------------------------------------------------------------------------------------------------

def test_schema_accepts_the_transform_and_fills_defaults(write_recipe):
    spec = load_recipe(write_recipe({"name": "s", "model": SPEC})).recipe.model
    assert (spec.source, spec.transform.salient.channels, spec.transform.salient.factor, spec.transform.salient.seed) \
        == ("bundled", 4, 32.0, 0)
    defaults = load_recipe(write_recipe({"name": "s", "model": {"source": "bundled", "transform": {"salient": {}}}}))
    assert defaults.recipe.model.transform.salient.model_dump() == {"channels": 4, "factor": 32.0, "seed": 0}


BAD = [
    ("unknown parameter", {"salient": {"chanels": 4}},
     "model.transform.salient.chanels: unknown key 'chanels'; allowed keys here: channels, factor, seed"),
    ("unknown transform", {"smooth": {}}, "model.transform.smooth: unknown key 'smooth'; allowed keys here: salient"),
    ("no transform named", {}, "model.transform.salient: required, but missing"),
    ("factor not above 1", {"salient": {"factor": 1}}, "model.transform.salient.factor: Input should be greater than 1 (got 1)"),
    ("factor not a number", {"salient": {"factor": "big"}}, "model.transform.salient.factor: Input should be a valid number"),
    ("no channel", {"salient": {"channels": 0}},
     "model.transform.salient.channels: Input should be greater than or equal to 1 (got 0)"),
    ("negative seed", {"salient": {"seed": -1}}, "model.transform.salient.seed: Input should be greater than or equal to 0 (got -1)"),
]


@pytest.mark.parametrize("case, transform, expected", BAD, ids=[b[0] for b in BAD])
def test_schema_rejects_bad_transforms_naming_file_field_value_and_allowed(write_recipe, case, transform, expected):
    path = write_recipe({"name": "s", "model": {"source": "bundled", "transform": transform}})
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(path) in str(err.value) and expected in str(err.value)


@pytest.mark.parametrize("source", [{"source": "local", "path": "/x"}, {"source": "synthetic", "config": "bundled"}])
def test_a_transform_is_only_for_the_bundled_source(write_recipe, source):
    path = write_recipe({"name": "s", "model": {**source, "transform": SALIENT}})
    with pytest.raises(RecipeError, match=rf"model.transform is only used with source 'bundled' .*not '{source['source']}'"):
        load_recipe(path)


def test_more_channels_than_the_hidden_size_is_a_plan_error(write_recipe, cache):
    path = write_recipe({"name": "s", "model": {"source": "bundled", "transform": {"salient": {"channels": 257}}}})
    with pytest.raises(QuantlabError, match=r"model.transform.salient.channels: 257 exceeds the bundled model's hidden "
                                            r"size \(256\); pick between 1 and 256"):
        make_plan(load_recipe(path), for_this_machine=False)


def test_local_source_with_a_path_still_works(tmp_path, cache):
    out = tmp_path / "salient"
    salient.write_salient_model(BUNDLED_DIR, out, channels=4, factor=32.0)
    source = resolve(ModelSpec(source="local", path=str(out), dtype="float32", device="cpu"))
    assert (source.name, source.files(), source.load_location()) == ("salient", out, str(out))


# ---- validate: nothing made -----------------------------------------------------------------------------------------

def test_validate_passes_with_no_cache_and_makes_nothing(cache, monkeypatch, capsys, makes):
    from quantlab.cli import main

    forbid_weight_loads(monkeypatch)
    assert main(["validate", *map(str, SHIPPED)]) == 0
    out = capsys.readouterr().out
    assert out.count("ok: ") == 2 and "quantlab-bundled-salient-c4-x32-s0 (bundled, text)" in out
    assert makes == [] and not cache.exists()


def test_the_plan_says_what_the_model_is_real_transformed_weights(cache):
    plan = make_plan(load_recipe(SHIPPED[1]), for_this_machine=False)
    assert plan.source.name == "quantlab-bundled-salient-c4-x32-s0" and plan.source.weights == "real"
    assert plan.source.spec.transform.salient.model_dump() == {"channels": 4, "factor": 32.0, "seed": 0}
    assert any("the bundled model's real weights with 4 salient channel(s) × 32 (seed 0" in n for n in plan.notes)
    assert plan.source.files() is None and not cache.exists()


# ---- made on first use, then reused --------------------------------------------------------------------------------

def test_first_use_makes_it_and_the_second_reuses_it(cache, makes, capsys):
    folder = made_folder()
    assert len(makes) == 1 and folder.parent == cache / "models"
    assert folder.name.startswith("bundled-salient-c4-x32-s0-")
    assert capsys.readouterr().err.count("making the bundled model with 4 salient channel(s) × 32 (seed 0)") == 1
    stamp = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}

    again = made_folder()
    assert again == folder and len(makes) == 1
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()} == stamp
    assert "making" not in capsys.readouterr().err
    assert sorted(p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")) == [folder.name]


def test_other_parameters_make_another_folder(cache, makes):
    assert made_folder(channels=4, factor=32, seed=1) != made_folder(channels=4, factor=32, seed=0)
    assert len(makes) == 2


def test_the_key_covers_the_inputs_the_parameters_and_the_code_version(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "a.bin").write_bytes(b"\x00" * 8)

    def key(**changes):
        fields = dict(kind="k", label="k", inputs=inputs, params={"p": 1}, version=1, make=lambda f: None) | changes
        return MadeModel(**fields).key

    base = key()
    assert key(params={"p": 2}) != base and key(version=2) != base and key() == base
    (inputs / "a.bin").write_bytes(b"\x00" * 7 + b"\x01")
    assert key() != base


def test_the_made_weights_are_those_of_write_salient_model(cache, tmp_path):
    folder = made_folder()
    script = subprocess.run([sys.executable, str(REPO / "scripts" / "make_salient_model.py"), "--out",
                             str(tmp_path / "bundled-salient"), "--channels", "4", "--factor", "32", "--seed", "0"],
                            capture_output=True, text=True, timeout=300)
    assert script.returncode == 0, script.stderr
    expected, got = load_file(tmp_path / "bundled-salient" / "model.safetensors"), load_file(folder / "model.safetensors")
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype == torch.float32, name
        assert torch.equal(got[name], tensor), name
    assert not torch.equal(got["model.layers.0.input_layernorm.weight"],
                           load_file(BUNDLED_DIR / "model.safetensors")["model.layers.0.input_layernorm.weight"].float())
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (folder / name).read_bytes() == (tmp_path / "bundled-salient" / name).read_bytes(), name


def test_a_run_loads_the_made_model_and_labels_it(cache):
    from conftest import load_source

    loaded = load_source(ModelSpec.model_validate(SPEC))
    info = loaded.info
    assert (info.name, info.source, info.weights) == ("quantlab-bundled-salient-c4-x32-s0", "bundled", "real")
    assert Path(info.location).parent == cache / "models" and "bundled-salient-c4-x32-s0-" in info.location
    state = load_file(Path(info.location) / "model.safetensors")
    assert torch.equal(loaded.model.state_dict()["model.layers.1.post_attention_layernorm.weight"],
                       state["model.layers.1.post_attention_layernorm.weight"])


# ---- a damaged or foreign folder is never used ---------------------------------------------------------------------

def test_a_damaged_cache_is_not_used_but_made_again(cache, makes, capsys):
    folder = made_folder()
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, another last byte
    weights.write_bytes(bytes(data))
    spec = ModelSpec.model_validate(SPEC)
    assert resolve(spec).files() is None  # not handed out as it is
    capsys.readouterr()

    assert resolve(spec).files(download=True) == folder and len(makes) == 2
    err = capsys.readouterr().err
    assert "damaged (model.safetensors has another sha256 than when it was made); making it again" in err
    assert weights.read_bytes() != bytes(data)
    assert not [p for p in (cache / "models").iterdir() if ".damaged-" in p.name or ".partial-" in p.name]


@pytest.mark.parametrize("damage", ["missing file", "truncated", "manifest edited"])
def test_every_kind_of_damage_is_made_again(cache, makes, damage):
    folder = made_folder()
    if damage == "missing file":
        (folder / "tokenizer.json").unlink()
    elif damage == "truncated":
        with open(folder / "model.safetensors", "r+b") as f:
            f.truncate(1000)
    else:
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest["key"] = "0" * 64
        (folder / MANIFEST).write_text(json.dumps(manifest))
    assert made_folder() == folder and len(makes) == 2
    assert made_sources._problem(folder, salient.bundled_salient(4, 32.0, 0).key) is None


def test_a_folder_quantlab_did_not_make_is_refused_and_kept(cache, makes):
    folder = resolve(ModelSpec.model_validate(SPEC)).made.folder
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"someone else's")
    for call in (lambda: resolve(ModelSpec.model_validate(SPEC)).files(), made_folder):
        with pytest.raises(QuantlabError, match=rf"{folder}: no readable {MANIFEST}, so not a folder quantlab made; "
                                                "quantlab neither uses nor deletes it"):
            call()
    assert (folder / "model.safetensors").read_bytes() == b"someone else's" and makes == []


def test_a_made_folder_with_a_file_added_is_refused_and_kept(cache, makes):
    folder = made_folder()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(QuantlabError, match=r"holds 1 file\(s\) quantlab did not write \(notes.txt\); quantlab neither "
                                            "uses nor deletes it"):
        made_folder()
    assert (folder / "notes.txt").read_text() == "mine" and len(makes) == 1


# ---- concurrent makers -------------------------------------------------------------------------------------------

MAKER = """
import sys
from quantlab.salient import bundled_salient
print(bundled_salient(4, 32.0, 0).ensure())
"""


def test_two_processes_making_it_at_once_make_it_once(cache):
    env = {**os.environ, "QUANTLAB_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", MAKER], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    folders = {out.strip() for out, _ in results}
    assert len(folders) == 1
    assert sum(err.count("making the bundled model") for _, err in results) == 1
    folder = Path(folders.pop())
    assert made_sources._problem(folder, salient.bundled_salient(4, 32.0, 0).key) is None
    assert sorted(p.name for p in (cache / "models").iterdir()) == sorted([folder.name, f".{folder.name}.lock"])


def test_a_maker_that_loses_the_rename_uses_the_winners_folder(cache, monkeypatch, makes):
    """Without the lock (a file system where flock does nothing), the atomic rename alone decides: a second maker
    finishes first inside the first one's make, and the first discards its own copy."""
    from contextlib import nullcontext

    monkeypatch.setattr(made_sources, "_lock", lambda folder: nullcontext())
    real = salient.write_salient_files
    inner: list[Path] = []

    def racing(source, folder, *args, **kwargs):
        done = real(source, folder, *args, **kwargs)
        if len(makes) == 1:  # the first maker: the other one starts and finishes while it still writes
            inner.append(salient.bundled_salient(4, 32.0, 0).ensure())
        return done

    monkeypatch.setattr(salient, "write_salient_files", racing)
    outer = salient.bundled_salient(4, 32.0, 0).ensure()
    assert outer == inner[0] and len(makes) == 2
    assert made_sources._problem(outer, salient.bundled_salient(4, 32.0, 0).key) is None
    assert [p.name for p in (cache / "models").iterdir()] == [outer.name]  # the loser's hidden folder removed
