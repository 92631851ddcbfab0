"""The GGUF surfaces as a careless or hostile user meets them: build manifests that lie, llama.cpp's own rules asked
before any work, settings recorded as llama.cpp ran them, path options, and a seeded fuzz over GGUF manifests.

Tests that need the built llama.cpp are skipped where it is not built; everything is written under tmp_path.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil

import pytest

from quantlab import llamacpp
from quantlab.checksums import write_checksums
from quantlab.cli import main
from quantlab.errors import QuantlabError
from quantlab.recipe import load_recipe
from quantlab.schema.build import GGUF_MANIFEST_NAME, read_gguf_manifest

from conftest import REPO
from test_gguf import LLAMA, THREADS, needs_llama, one_line, recipe_data, settings

VALID_MANIFEST = {
    "format": "gguf", "base_model": "quantlab-bundled", "recipe": "g",
    "method": {"name": "gguf", "label": "GGUF Q8_0", "params": {"type": "Q8_0"}},
    "llama_cpp": "llama.cpp 0.5.0-dev", "notes": ["made by llama.cpp"], "calibration": None, "quantize_seconds": 1.5,
    "file": "model.gguf", "file_bytes": 4_000_000, "block_count": 4, "mtp": False,
    "parameters_by_type": {"Q8_0": 3_000_000, "F32": 10_000},
    "greedy": {"prompt": "def f():", "prompt_ids": [1, 2, 3], "new_tokens": 4, "tokens": [5, 6, 7, 8]},
    "record_ids": [],
}


def manifest_folder(tmp_path, data) -> "os.PathLike":
    folder = tmp_path / "build"
    folder.mkdir(exist_ok=True)
    (folder / GGUF_MANIFEST_NAME).write_text(data if isinstance(data, str) else json.dumps(data))
    return folder


# ---- manifests: schema-checked, every path inside the build folder ----------------------------------------------

def test_the_valid_manifest_is_accepted(tmp_path):
    manifest = read_gguf_manifest(manifest_folder(tmp_path, VALID_MANIFEST))
    assert manifest.file == "model.gguf" and manifest.greedy.new_tokens == 4


@pytest.mark.parametrize("change, expected", [
    ({"file": "/etc/passwd"}, "file"),
    ({"file": "../other/model.gguf"}, "file"),
    ({"file": "sub/model.gguf"}, "file"),
    ({"file": None}, "file"),
    ({"file": 5}, "file"),
    ({"file": "model.txt"}, "file"),
    ({"greedy": None}, "greedy"),
    ({"greedy": {**VALID_MANIFEST["greedy"], "new_tokens": "16"}}, "greedy.new_tokens"),
    ({"greedy": {**VALID_MANIFEST["greedy"], "new_tokens": 1_000_000_000}}, "greedy.new_tokens"),
    ({"greedy": {**VALID_MANIFEST["greedy"], "prompt_ids": []}}, "greedy.prompt_ids"),
    ({"greedy": {**VALID_MANIFEST["greedy"], "prompt_ids": [-1]}}, "greedy.prompt_ids"),
    ({"greedy": {**VALID_MANIFEST["greedy"], "new_tokens": 3}}, "greedy: Value error, 4 tokens recorded for new_tokens 3"),
    ({"file_bytes": -1}, "file_bytes"),
    ({"quantize_seconds": float("nan")}, "quantize_seconds"),
    ({"format": "safetensors"}, "format"),
    ({"surprise": 1}, "surprise"),
])
def test_a_manifest_that_lies_is_one_line_naming_the_field(tmp_path, change, expected):
    data = {**VALID_MANIFEST, **change}
    if change == {"greedy": None}:
        del data["greedy"]
    with pytest.raises(QuantlabError) as caught:
        read_gguf_manifest(manifest_folder(tmp_path, data))
    text = str(caught.value)
    assert "not a valid GGUF build manifest" in text and f"({expected}" in text and "\n" not in text
    assert "root:" not in text  # nothing of another file is ever quoted


@pytest.mark.parametrize("content", ["{", "", "[]", "null", "\x00" * 10])
def test_a_damaged_manifest_is_named_not_mistaken_for_another_kind_of_build(tmp_path, content, capsys):
    folder = manifest_folder(tmp_path, content)
    write_checksums(folder)
    assert main(["verify", str(folder)]) == 2
    err = one_line(capsys.readouterr().err, "error: ")
    assert GGUF_MANIFEST_NAME in err and "not a valid GGUF build manifest" in err and "quantlab_build.json" not in err


def test_manifest_fuzz_never_escapes_the_schema(tmp_path):
    """Seeded: 300 mutated manifests (wrong types, negatives, huge numbers, paths, deleted keys, NaN). Each is either
    refused in one line or holds only a plain file name and bounded counts."""
    rng = random.Random(23)
    values = [None, -1, 0, 2**70, 1e308, float("nan"), "", "16", "../x.gguf", "/etc/passwd", "a\nb.gguf", [], {}, [-3],
              ["x"], True, "model.gguf", "x" * 5000]
    accepted = refused = 0
    for case in range(300):
        data = copy.deepcopy(VALID_MANIFEST)
        for _ in range(rng.randint(1, 3)):
            greedy = data.get("greedy")
            target = greedy if isinstance(greedy, dict) and rng.random() < 0.35 else data
            if not target:
                continue
            key = rng.choice(sorted(target))
            if rng.random() < 0.15:
                del target[key]
            else:
                target[key] = rng.choice(values)
        folder = manifest_folder(tmp_path, data)
        try:
            manifest = read_gguf_manifest(folder)
        except QuantlabError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 600, (case, data)
            refused += 1
            continue
        accepted += 1
        assert "/" not in manifest.file and manifest.file.endswith(".gguf") and ".." not in manifest.file.split(".")[0]
        assert 1 <= manifest.greedy.new_tokens <= 512 and manifest.greedy.prompt_ids
    assert refused > 200 and accepted > 0, (accepted, refused)


def test_a_pipe_where_a_file_was_is_named_as_such(tmp_path):
    from quantlab.checksums import check_checksums

    folder = manifest_folder(tmp_path, VALID_MANIFEST)
    (folder / "model.gguf").write_bytes(b"GGUF")
    write_checksums(folder)
    (folder / "model.gguf").unlink()
    os.mkfifo(folder / "model.gguf")
    problems, _ = check_checksums(folder)
    assert problems == ["model.gguf: not a regular file (a folder, a pipe or a device); a build holds regular files"]


# ---- a real GGUF build, lied about ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_build(tmp_path_factory):
    if not llamacpp.available():
        pytest.skip("llama.cpp is not built here")
    from quantlab.artifact.writer import build_recipe

    folder = tmp_path_factory.mktemp("gguf-build")
    recipe = folder / "recipe.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump({**recipe_data(quantization={"method": "gguf", "type": "Q8_0", "imatrix": False},
                                                    measure={**LLAMA, "llama_cpp": {"threads": THREADS}}),
                                      "output": {"dir": str(folder / "measurements")}}))
    target = folder / "q8"
    build_recipe(load_recipe(recipe), target, measure=False, progress=False, echo=lambda line: None)
    return target


def tampered(gguf_build, tmp_path, name: str = "b"):
    copy_ = tmp_path / name
    shutil.copytree(gguf_build, copy_)
    return copy_


def rewrite_manifest(folder, **change) -> None:
    path = folder / GGUF_MANIFEST_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    write_checksums(folder)


@needs_llama
@pytest.mark.slow
def test_verify_reads_nothing_outside_the_build_folder(gguf_build, tmp_path, capsys):
    other = tampered(gguf_build, tmp_path, "other")
    folder = tampered(gguf_build, tmp_path)
    (folder / "model.gguf").write_text("a text file, not a GGUF\n")
    cases = {str(other / "model.gguf"): "file", "/etc/passwd": "file", "../other/model.gguf": "file"}
    for file, field in cases.items():
        rewrite_manifest(folder, file=file)
        assert main(["verify", str(folder)]) == 2
        captured = capsys.readouterr()
        err = one_line(captured.err, "error: ")
        assert f"({field}" in err and "root:" not in captured.out + captured.err
    rewrite_manifest(folder, file="model.gguf")  # the manifest's own file, now a text file: the header says so
    assert main(["verify", str(folder)]) == 2
    assert "not a GGUF file" in one_line(capsys.readouterr().err, "error: ")


@needs_llama
@pytest.mark.slow
def test_verify_checks_the_manifest_describes_the_gguf_it_holds(gguf_build, tmp_path):
    from quantlab.artifact.verify import verify_build

    said: list[str] = []
    assert verify_build(gguf_build, echo=said.append).ok
    assert any("greedy tokens through llama.cpp: the same" in line for line in said)
    folder = tampered(gguf_build, tmp_path)
    manifest = json.loads((folder / GGUF_MANIFEST_NAME).read_text())
    rewrite_manifest(folder, file_bytes=manifest["file_bytes"] + 1)
    result = verify_build(folder, echo=lambda line: None)
    assert not result.ok and "not the" in result.problems[0] and "bytes and types" in result.problems[0]
    for change in ({"block_count": 3}, {"mtp": True}, {"method": {**manifest["method"], "params": {"type": "Q4_0"}}}):
        rewrite_manifest(folder, **{**manifest, **change})
        result = verify_build(folder, echo=lambda line: None)
        assert not result.ok and "header contradicts" in result.problems[0] and next(iter(change)) in result.problems[0]
    rewrite_manifest(folder, file_bytes=manifest["file_bytes"], file="spare.gguf")  # a GGUF the sums do not list
    for load in (True, False):  # --checksums-only too
        result = verify_build(folder, load=load, echo=lambda line: None)
        assert not result.ok and "not a file of this build listed" in result.problems[0]
    rewrite_manifest(folder, file="model.gguf")
    (folder / "SHA256SUMS").rename(folder / "sums")
    (folder / "SHA256SUMS").symlink_to(folder / "sums")  # the same lines, through a link
    result = verify_build(folder, load=False, echo=lambda line: None)
    assert not result.ok and "SHA256SUMS: a symbolic link" in result.problems[0]


@needs_llama
def test_verify_of_a_gguf_build_on_a_gpu_is_refused_not_ignored(gguf_build, capsys):
    assert main(["verify", str(gguf_build), "--device", "cuda"]) == 2
    assert "verified through llama.cpp on the CPU" in one_line(capsys.readouterr().err, "error: ")


@needs_llama
def test_verify_with_prompt_ids_outside_the_vocabulary_is_one_line(gguf_build, tmp_path, capsys):
    folder = tampered(gguf_build, tmp_path)
    greedy = json.loads((folder / GGUF_MANIFEST_NAME).read_text())["greedy"]
    rewrite_manifest(folder, greedy={**greedy, "prompt_ids": [10**9]})
    assert main(["verify", str(folder)]) == 2
    assert "not all in its vocabulary" in one_line(capsys.readouterr().err, "error: ")


# ---- llama.cpp's own rules, asked before any work ----------------------------------------------------------------

@needs_llama
def test_llama_cpps_rules_are_read_from_its_own_source():
    tools = llamacpp.locate()
    assert llamacpp.imatrix_tensor_types(tools) == {"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"}
    assert llamacpp.imatrix_data_types(tools) == {"IQ2_XXS", "IQ2_XS", "IQ1_S"}  # IQ1_M is commented out in ggml.c
    assert llamacpp.imatrix_min_chunks(tools) == 2
    assert llamacpp.moe_only("MXFP4_MOE") and not llamacpp.moe_only("Q8_0")


@needs_llama
@pytest.mark.parametrize("quantization, expected", [
    ({"type": "Q4_K_M", "imatrix": False, "overrides": {"mlp.down": "IQ3_XXS"}},
     "quantization.overrides.mlp.down: tensor type IQ3_XXS needs an importance matrix"),
    ({"type": "Q8_0", "imatrix": False, "overrides": {"embeddings": "IQ2_XXS"}},
     "ggml writes IQ2_XXS only with importance-matrix data for the tensor, and llama-imatrix records no data"),
    ({"type": "Q4_K_M", "overrides": {"lm_head": "IQ1_S"}}, "llama-imatrix records no data for it"),
    ({"type": "Q4_K_M", "imatrix": False, "overrides": {"mlp.up": "IQ2_XS"}}, "and quantization.imatrix is false"),
    ({"type": "Q4_K_M", "calibration": {"samples": 1, "seq_len": 16}},
     "llama-imatrix needs at least 2 chunks"),
    ({"type": "MXFP4_MOE"}, "quantizes the experts of MoE models only; this model is dense"),
    ({"type": "Q4_K_M", "calibration": {"samples": 100000, "seq_len": 32768}}, "samples × seq_len is 3,276,800,000"),
])
def test_what_llama_cpp_would_refuse_later_is_refused_by_validate(quantization, expected, write_recipe, tmp_path,
                                                                   capsys):
    path = write_recipe(recipe_data(quantization={"method": "gguf", **quantization}, measure=LLAMA))
    assert main(["validate", str(path)]) == 1
    assert expected in one_line(capsys.readouterr().err, "invalid: ")
    assert not (tmp_path / "measurements").exists()


@needs_llama
def test_sensitivity_levels_llama_cpp_cannot_write_are_refused_before_any_work(write_recipe, tmp_path, capsys):
    data = recipe_data(quantization={"method": "gguf", "type": "IQ2_XXS"}, measure=LLAMA,
                       quality={"tokens": 256, "context": 64})
    path = write_recipe(data)
    assert main(["sensitivity", str(path), "--high-types", "IQ2_XS", "--no-progress"]) == 2
    err = one_line(capsys.readouterr().err, "error: ")
    assert "--high-types IQ2_XS" in err and "token embeddings never have any" in err


# ---- settings recorded as llama.cpp ran them ---------------------------------------------------------------------

def test_records_state_the_settings_that_ran():
    from quantlab.llamacpp.binding import settings_that_run

    ran = settings_that_run(settings(gpu_layers=999, ubatch=65536, batch=16), layers=4, offload=True)
    assert (ran.gpu_layers, ran.ubatch, ran.batch) == (5, 16, 16)
    assert settings_that_run(settings(gpu_layers=999), layers=4, offload=False).gpu_layers == 0
    assert settings_that_run(settings(gpu_layers=2), layers=4, offload=True).gpu_layers == 2


@pytest.mark.parametrize("llama_cpp, model, expected", [
    ({"gpu_layers": 999}, {"source": "bundled", "device": "cpu"}, "offloads layers to a GPU, but model.device is cpu"),
    ({"gpu_layers": "all"}, {"source": "bundled", "device": "cpu"}, "offloads layers to a GPU"),
    ({"gpu_layers": -1}, {"source": "bundled", "device": "cuda"}, "gpu_layers"),
    ({"gpu_layers": 10**12}, {"source": "bundled", "device": "cuda"}, "gpu_layers"),
])
def test_gpu_layers_are_bounded_and_never_asked_of_a_cpu_run(llama_cpp, model, expected, write_recipe, capsys,
                                                             monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTLAB_LLAMA_CPP", str(tmp_path / "no-llama-cpp"))  # refused before llama.cpp is looked for
    path = write_recipe(recipe_data(model=model, quantization={"method": "gguf", "type": "Q8_0"},
                                    measure={**LLAMA, "llama_cpp": llama_cpp}))
    assert main(["validate", str(path)]) == 1
    assert expected in capsys.readouterr().err


@needs_llama
def test_a_run_records_the_layers_and_micro_batch_llama_cpp_used(write_recipe, tmp_path):
    """ubatch 65536 with batch 16: llama.cpp runs micro-batches of 16, and the record says 16."""
    from quantlab.store import load_records

    path = write_recipe(recipe_data(model={"source": "bundled", "device": "auto"},
                                    quantization={"method": "gguf", "type": "Q8_0", "imatrix": False},
                                    measure={**LLAMA, "llama_cpp": {"threads": THREADS, "ubatch": 65536,
                                                                    "batch": 16}}))
    assert main(["measure", str(path), "--no-progress"]) == 0
    [record], problems = load_records(tmp_path / "measurements")
    assert problems == []
    assert record.runtime.settings["ubatch"] == 16 and record.runtime.settings["gpu_layers"] == 0


# ---- paths and commands refused before any work ------------------------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["build", "RECIPE", "--out", ""], "--out '': an empty path"),
    (["build", "RECIPE", "--out", "a\nb"], "--out 'a\\nb': must not contain control characters"),
    (["run", "RECIPE", "--output", " "], "--output ' ': an empty path"),
    (["quality", "RECIPE", "--json", "x\ty.json"], "--json"),
    (["sensitivity", "RECIPE", "--out", "same.yaml", "--plot", "same.yaml"], "the same file as the suggested recipe"),
    (["sensitivity", "RECIPE", "--budget-gb", "inf"], "--budget-gb inf: a size in GB, above 0 and at most"),
    (["sensitivity", "RECIPE", "--budget-gb", "nan"], "--budget-gb nan: a size in GB"),
    (["sensitivity", "RECIPE", "--budget-gb", "1e308"], "--budget-gb 1e+308: a size in GB"),
])
def test_bad_options_are_refused_before_any_work(argv, expected, write_recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(recipe_data(quantization={"method": "rtn", "bits": 4}, quality={"tokens": 256, "context": 64}))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([str(recipe) if a == "RECIPE" else a for a in argv]) == 2
    assert expected in one_line(capsys.readouterr().err, "error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_quality_on_a_gguf_recipe_is_refused_before_any_work(write_recipe, capsys, monkeypatch):
    import quantlab.plan

    monkeypatch.setattr(quantlab.plan, "make_plan", lambda *a, **k: pytest.fail("planned: work had started"))
    path = write_recipe(recipe_data(quantization={"method": "gguf", "type": "Q8_0"}, measure=LLAMA))
    assert main(["quality", str(path)]) == 2
    assert "`quantlab quality` scores a model quantized in memory" in one_line(capsys.readouterr().err, "error: ")


@pytest.mark.parametrize("where", ["quality", "calibration"])
def test_a_text_path_that_is_a_device_is_named_as_such(where, write_recipe, capsys):
    text = {"source": "file", "path": "/dev/zero"}
    if where == "quality":
        data, command = recipe_data(quality={"tokens": 256, "context": 64, **text}), "quality"
    else:
        data, command = recipe_data(quantization={"method": "awq", "calibration": text}), "validate"
    assert main([command, str(write_recipe(data))]) in (1, 2)
    err = capsys.readouterr().err
    assert "/dev/zero: not a regular file (a device, a pipe or a socket)" in err and "Traceback" not in err, err


@pytest.mark.parametrize("size, expected", [
    ("100000000000000000000000GiB", "is not a memory size like 20GiB"),
    ("999999TiB", "more memory than any one device has"),
    ("0GiB", "must be more than zero"),
])
def test_an_absurd_max_memory_size_says_what_is_wrong_with_the_size(size, expected, write_recipe, capsys):
    path = write_recipe(recipe_data(model={"source": "bundled", "device": "auto", "max_memory": {"cuda:0": size}}))
    assert main(["validate", str(path), "--schema-only"]) == 1
    err = capsys.readouterr().err
    assert expected in err and "items" not in err, err


@pytest.mark.parametrize("make", ["file", "folder", "link", "dangling"])
def test_force_is_suggested_only_where_it_would_be_taken(make, tmp_path):
    from quantlab.placement import check_target

    target = tmp_path / "target"
    if make == "file":
        target.write_text("mine")
    elif make == "folder":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    else:
        (tmp_path / "real").mkdir()
        target.symlink_to(tmp_path / ("real" if make == "link" else "nowhere"))
    with pytest.raises(QuantlabError) as caught:
        check_target(target, force=False, protected={})
    assert "pass --force" not in str(caught.value) and "--force replaces only a folder that quantlab built" in str(
        caught.value)
