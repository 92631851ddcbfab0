"""`quantlab build`, `verify` and `publish`: bundled-model builds at int8, nf4, nf4 + double quant and fp4,
a full-variant build from a local folder with mtp.* tensors, and the failure paths. CPU only, tmp_path only."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

import quantlab
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from quantlab.artifact import writer
from quantlab.schema.build import read_manifest
from quantlab.artifact.publish import publish_build
from quantlab.checkpoint import folder_tensors, payload_bytes
from quantlab.artifact.verify import verify_build
from quantlab.artifact.writer import build_recipe
from quantlab.cli import main
from quantlab.errors import QuantlabError
from quantlab.estimate.estimator import weights_for
from quantlab.estimate.model import read_estimation_model
from quantlab.estimate.schemes import get_scheme
from quantlab.plan import make_plan
from quantlab.recipe import load_recipe
from quantlab.report import write_report
from quantlab.store import load_records

from conftest import save_vl_checkpoint, tiny_qwen3_5_config

pytestmark = pytest.mark.slow  # builds and quantizes the bundled model

SMALL = {"contexts": [16], "new_tokens": 2, "warmup": 0, "repeats": 1}
CHECK = {"check_tokens": 4}
METHODS = {
    "int8": {"method": "bnb_int8"},
    "nf4": {"method": "bnb_4bit", "quant_type": "nf4"},
    "nf4-dq": {"method": "bnb_4bit", "quant_type": "nf4", "double_quant": True},
    "fp4": {"method": "bnb_4bit", "quant_type": "fp4"},
}
LABELS = {"int8": "bnb int8", "nf4": "bnb nf4", "nf4-dq": "bnb nf4 + double quant", "fp4": "bnb fp4"}


def recipe_file(folder: Path, name: str, model: dict, quantization: dict, measure: dict | None = SMALL, **extra) -> Path:
    data = {"name": name, "model": model, "quantization": quantization, "measure": measure or SMALL,
            "output": {"dir": str(folder / "measurements")}, "build": {**CHECK, **extra.pop("build", {})}, **extra}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def quiet(_: str) -> None:
    return None


def plain_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False)
    return out[0, len(prompt_ids):].tolist()


# ---- four bundled-model builds, built once each -----------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("builds")


_BUILDS: dict[str, object] = {}


def bundled_build(key: str, workdir: Path):
    """Each method is built (and measured) once per test session, whichever test asks first."""
    if key not in _BUILDS:
        path = recipe_file(workdir, f"bundled-{key}", {"source": "bundled", "device": "cpu"}, METHODS[key])
        _BUILDS[key] = build_recipe(load_recipe(path), workdir / "builds" / f"bundled-{key}", progress=False, echo=quiet)
    return _BUILDS[key]


@pytest.fixture(scope="module", params=list(METHODS))
def built(request, workdir):
    return request.param, bundled_build(request.param, workdir), workdir


def test_build_folder_is_complete(built):
    key, result, workdir = built
    folder = result.folder
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors",
            "README.md", "SHA256SUMS", "quantlab_build.json"} <= names
    assert not [p for p in folder.parent.iterdir() if ".partial-" in p.name]
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["llm_int8_skip_modules"] == ["in_proj_a", "in_proj_b", "lm_head"]
    assert qc["load_in_8bit" if key == "int8" else "load_in_4bit"] is True
    card = (folder / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert {"quantlab", "bitsandbytes", "8-bit" if key == "int8" else "4-bit"} <= set(meta["tags"])
    assert f"# bundled-{key}: quantlab-bundled, {LABELS[key]}" in card
    assert "`model.layers.{0-2}.linear_attn.in_proj_a.weight` | 3 |" in card  # the unquantized tensors, listed
    assert "| lm_head | `lm_head.weight` | 1 | 524,288 | BF16 |" in card
    assert "Quality not measured" in card and f"quantlab {quantlab.__version__}" in card and "CPU " in card
    assert "source checkpoint has no `mtp.*` tensors" in card
    manifest = read_manifest(folder)
    assert manifest.method.label == LABELS[key] and manifest.unquantized.quantized_linears == 25
    kept = [f"model.layers.{i}.linear_attn.in_proj_{x}" for i in range(3) for x in "ab"] + ["lm_head"]
    assert sorted(manifest.unquantized.kept_linears) == sorted(kept)


def test_plain_transformers_reload_reproduces_the_recorded_tokens(built):
    _, result, _ = built
    folder = result.folder
    g = read_manifest(folder).greedy
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer(g.prompt, add_special_tokens=False)["input_ids"] == g.prompt_ids
    model = AutoModelForCausalLM.from_pretrained(folder)  # no quantlab involved
    assert type(model.model.layers[0].mlp.gate_proj).__name__ in ("Linear8bitLt", "Linear4bit")
    assert plain_greedy(model, g.prompt_ids, g.new_tokens) == g.tokens and len(g.tokens) == CHECK["check_tokens"]


def test_weight_bytes_match_the_estimator(built):
    key, result, _ = built
    estimated = weights_for(read_estimation_model(str(result.folder)), get_scheme(key)).bytes()
    assert abs(estimated / payload_bytes(result.folder) - 1) < 0.005
    assert f"({estimated / result.disk_bytes - 1:+.2%} vs the files)" in (result.folder / "README.md").read_text()


def test_records_and_report(built):
    key, result, workdir = built
    (record,) = result.records
    assert record.method.name == METHODS[key]["method"] and record.method.label == LABELS[key]
    assert record.model.name == "quantlab-bundled" and record.model.location == str(result.folder)
    assert record.model.source == "local" and record.result.status == "ok"
    assert any("measured from the build folder" in n for n in record.notes)
    stored = {r.record_id for r in load_records(workdir / "measurements")[0]}
    assert record.record_id in stored and record.record_id in read_manifest(result.folder).record_ids
    report = write_report(workdir / "measurements").read_text()
    assert f"| {LABELS[key]} | text | 16 | 1 |" in report
    assert re.search(r"\| CPU .* \| 16 \| 1 \| ", (result.folder / "README.md").read_text())  # measured, with its hardware


def test_verify_and_a_flipped_byte(built, tmp_path, capsys):
    key, result, _ = built
    if key == "nf4":  # one full verify (reload + greedy); the others check their checksums only
        assert verify_build(result.folder, echo=quiet).ok
    assert main(["verify", str(result.folder), "--checksums-only"]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(result.folder, copy)
    shard = copy / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    outcome = verify_build(copy, echo=quiet)
    assert not outcome.ok and outcome.problems == ("model.safetensors: SHA256 mismatch (the file changed since the build)",)
    assert main(["verify", str(copy)]) == 1
    assert "FAIL model.safetensors: SHA256 mismatch" in capsys.readouterr().out


# ---- a local source with mtp.* tensors, full variant (vision tower) ----------------------------------------

@pytest.fixture(scope="module")
def vl_source(workdir) -> Path:
    """A tiny Qwen3.6-shaped VL checkpoint in two shards, the second holding mtp.* tensors, as Qwen ships them."""
    return save_vl_checkpoint(tiny_qwen3_5_config(), workdir / "vl-source")


def test_full_variant_keeps_vision_and_copies_mtp(workdir, vl_source):
    path = recipe_file(workdir, "vl-nf4", {"source": "local", "path": str(vl_source), "variant": "full", "device": "cpu"},
                       METHODS["nf4"], build={"base_model": "Qwen/Qwen3.6-27B", "license": "apache-2.0"})
    result = build_recipe(load_recipe(path), workdir / "builds" / "vl-nf4", measure=False, progress=False, echo=quiet)
    folder = result.folder
    source, built_ = folder_tensors(vl_source), folder_tensors(folder)
    mtp = [n for n in source if n.startswith("mtp.")]
    assert len(mtp) == 15 and set(mtp) <= set(built_)
    for name in mtp:  # byte for byte, unquantized
        s, b = source[name], built_[name]
        with s.file.open("rb") as f1, b.file.open("rb") as f2:
            f1.seek(s.start), f2.seek(b.start)
            assert (b.dtype, b.shape) == (s.dtype, s.shape) and f1.read(s.nbytes) == f2.read(b.nbytes)
    assert {b.file.name for n, b in built_.items() if n.startswith("mtp.")} == {"model-00002-of-00002.safetensors"}
    vision = [b for n, b in built_.items() if ".visual." in n]
    assert vision and all(b.dtype == "BF16" for b in vision)
    assert not any(n.startswith("model.visual.") and n.endswith(".absmax") for n in built_)
    manifest = read_manifest(folder)
    assert manifest.unquantized.skip_modules == ["in_proj_a", "in_proj_b", "lm_head", "model.visual"]
    assert manifest.mtp == {"tensors": 15, "bytes": sum(source[n].nbytes for n in mtp), "file": "model-00002-of-00002.safetensors"}
    card = (folder / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "Qwen/Qwen3.6-27B" and meta["base_model_relation"] == "quantized"
    assert meta["pipeline_tag"] == "image-text-to-text"
    assert "| vision | `model.visual.merger.linear_fc1.weight` | 1 | 65,536 | BF16 |" in card
    assert "15 `mtp.*` tensors" in card and "Not measured." in card
    # the estimator counts vision and MTP too
    est = read_estimation_model(str(folder))
    estimated = weights_for(est, get_scheme("nf4")).bytes(include_vision=True, include_mtp=True)
    assert abs(estimated / payload_bytes(folder) - 1) < 0.005
    # plain transformers, the VL class, ignores mtp.* and reproduces the tokens
    model = AutoModelForImageTextToText.from_pretrained(folder)
    g = manifest.greedy
    assert g.auto_class == "AutoModelForImageTextToText" and plain_greedy(model, g.prompt_ids, g.new_tokens) == g.tokens


def test_text_variant_from_a_vl_checkpoint_uses_the_same_skip_list(workdir, vl_source):
    """The suffix patterns ('in_proj_a') fit both key layouts: model.language_model.* and model.*."""
    path = recipe_file(workdir, "vl-text-int8", {"source": "local", "path": str(vl_source), "variant": "text",
                                                 "device": "cpu"}, METHODS["int8"])
    result = build_recipe(load_recipe(path), workdir / "builds" / "vl-text-int8", measure=False, progress=False, echo=quiet)
    tensors = folder_tensors(result.folder)
    # transformers 5 saves the text model under the checkpoint's own key layout (model.language_model.*)
    dtype = {n.removeprefix("model.language_model.").removeprefix("model."): t.dtype for n, t in tensors.items()}
    assert dtype["layers.0.linear_attn.in_proj_a.weight"] == "BF16" and dtype["layers.0.mlp.gate_proj.weight"] == "I8"
    assert json.loads((result.folder / "config.json").read_text())["architectures"] == ["Qwen3_5ForCausalLM"]
    assert sum(n.startswith("mtp.") for n in tensors) == 15 and not any(".visual." in n for n in tensors)
    g = read_manifest(result.folder).greedy
    assert g.auto_class == "AutoModelForCausalLM"
    assert plain_greedy(AutoModelForCausalLM.from_pretrained(result.folder), g.prompt_ids, g.new_tokens) == g.tokens


def test_quality_goes_to_the_card_and_is_measured_against_the_base(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import quantlab.quality
    from quantlab.artifact import card

    monkeypatch.setattr(quantlab.quality, "quality_card_lines", lambda q: ["## Quality against the reference", f"KL {q.kl}"])
    assert card._quality_lines([SimpleNamespace(quality=SimpleNamespace(kl=0.01))]) == ["## Quality against the reference", "KL 0.01"]
    assert "Quality not measured: the recipe has no `quality:` section." in card._quality_lines([SimpleNamespace(quality=None)])
    path = recipe_file(tmp_path, "q", {"source": "bundled", "device": "cpu"}, METHODS["nf4"], quality={"tokens": 64, "context": 32})
    plan = make_plan(load_recipe(path), for_this_machine=False)
    # the build is measured with the recipe's plan: its quality reference is the BF16 base, not the build itself
    assert plan.quality.reference == load_recipe(path).recipe.model and plan.quality.same_model


# ---- failures ------------------------------------------------------------------------------------------

def _quick_recipe(folder: Path, name: str = "b4") -> Path:
    return recipe_file(folder, name, {"source": "bundled", "device": "cpu"}, METHODS["nf4"], build={"check_tokens": 2})


@pytest.fixture(scope="module")
def quick_build(workdir) -> Path:
    """The nf4 build, for the tests that tamper with a copy of it."""
    return bundled_build("nf4", workdir).folder


def _copy(build: Path, tmp_path: Path) -> Path:
    target = tmp_path / build.name
    shutil.copytree(build, target)
    return target


def test_interrupted_build_leaves_no_complete_looking_folder_and_a_rerun_works(tmp_path, monkeypatch):
    builds, target = tmp_path / "builds", tmp_path / "builds" / "b4"
    stale = builds / ".b4.partial-999999999-deadbeef"  # a build killed earlier: no such process
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    seen = []

    def boom(folder):
        seen.append(sorted(p.name for p in folder.iterdir()))
        raise RuntimeError("disk full")

    monkeypatch.setattr(writer, "write_checksums", boom)  # the last step inside the hidden folder
    with pytest.raises(RuntimeError, match="disk full"):
        build_recipe(load_recipe(_quick_recipe(tmp_path)), target, progress=False, echo=quiet)
    assert {"model.safetensors", "README.md", "quantlab_build.json"} <= set(seen[0])  # it got far
    assert not target.exists() and list(builds.iterdir()) == []  # no folder, no hidden leftovers, stale one gone
    records = tmp_path / "measurements" / "records"
    assert not records.exists() or not list(records.glob("*.json"))  # measured, but nothing recorded
    monkeypatch.undo()

    result = build_recipe(load_recipe(_quick_recipe(tmp_path)), target, measure=False, progress=False, echo=quiet)
    assert verify_build(result.folder, load=False, echo=quiet).ok and sorted(p.name for p in builds.iterdir()) == ["b4"]
    with pytest.raises(QuantlabError, match="already exists; pass --force"):
        build_recipe(load_recipe(_quick_recipe(tmp_path)), target, echo=quiet)


def test_ctrl_c_mid_write_cleans_up(tmp_path, monkeypatch):
    def interrupt(source, dest):
        assert list(dest.glob("*.safetensors"))  # the shards are already written
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "copy_side_files", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_recipe(load_recipe(_quick_recipe(tmp_path)), tmp_path / "builds" / "b4", progress=False, echo=quiet)
    assert list((tmp_path / "builds").iterdir()) == []


def test_build_refuses_what_it_cannot_build(tmp_path):
    none = recipe_file(tmp_path, "none", {"source": "bundled"}, {"method": "none"})
    with pytest.raises(QuantlabError, match="quantlab builds bnb_int8, bnb_4bit, awq, gguf checkpoints"):
        build_recipe(load_recipe(none), tmp_path / "x", echo=quiet)
    synthetic = recipe_file(tmp_path, "syn", {"source": "synthetic", "config": "bundled"}, METHODS["int8"])
    with pytest.raises(QuantlabError, match="random weights are not one"):
        build_recipe(load_recipe(synthetic), tmp_path / "y", echo=quiet)
    nothing = recipe_file(tmp_path, "nothing", {"source": "bundled"}, {**METHODS["nf4"], "skip_modules": ["model"]})
    with pytest.raises(QuantlabError, match="nothing left to quantize"):
        build_recipe(load_recipe(nothing), tmp_path / "z", echo=quiet)
    assert not any((tmp_path / n).exists() for n in "xyz")


def test_tampering_beyond_a_flipped_byte(quick_build, tmp_path):
    target = _copy(quick_build, tmp_path)
    (target / "extra.bin").write_bytes(b"x")
    (target / "tokenizer.json").unlink()
    assert verify_build(target, echo=quiet).problems == ("tokenizer.json: missing", "extra.bin: not listed in SHA256SUMS")


def test_publish_only_when_asked_and_never_offline(quick_build, tmp_path, monkeypatch, capsys):
    target = _copy(quick_build, tmp_path)
    lines: list[str] = []
    assert publish_build(target, "me/bundled-nf4", dry_run=True, echo=lines.append) is None
    assert "  would upload model.safetensors" in lines and lines[-1] == "dry run: nothing uploaded to me/bundled-nf4"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QuantlabError, match="HF_HUB_OFFLINE is set, so the Hugging Face Hub is not reachable"):
        publish_build(target, "me/bundled-nf4", echo=quiet)
    assert main(["publish", str(target), "--repo-id", "me/bundled-nf4"]) == 2
    assert "error: cannot publish to me/bundled-nf4" in capsys.readouterr().err
    with pytest.raises(QuantlabError, match="expected OWNER/NAME"):
        publish_build(target, "no-slash", echo=quiet)
    (target / "README.md").write_text("edited")
    with pytest.raises(QuantlabError, match="not published, the checksums fail: README.md: SHA256 mismatch"):
        publish_build(target, "me/bundled-nf4", dry_run=True, echo=quiet)


# ---- on a GPU --------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_build_and_verify(tmp_path):
    path = recipe_file(tmp_path, "gpu-nf4", {"source": "bundled", "device": "cuda"}, METHODS["nf4"])
    result = build_recipe(load_recipe(path), tmp_path / "gpu-nf4", progress=False, echo=quiet)
    (record,) = result.records
    assert record.hardware.kind == "gpu" and record.load_memory.allocated_end_bytes
    assert verify_build(result.folder, device="cuda", echo=quiet).ok
    assert re.search(r"\| GPU .* \| 16 \| 1 \|", (result.folder / "README.md").read_text())
