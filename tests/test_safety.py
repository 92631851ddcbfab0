"""quantlab against careless and hostile input: nothing lost, nothing silently wrong, no tracebacks.

Each test names the issue item it covers. Everything happens in temporary folders; the bundled model is
copied (and edited) there when a test needs a broken checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from quantlab.checksums import sha256_file, write_checksums
from quantlab.schema.build import BaseModelRef, BuildManifest, GreedyCheck, Unquantized, write_manifest
from quantlab.placement import move_into_place, recover_interrupted_replace
from quantlab.cli import main
from quantlab.errors import QuantlabError, RecipeError
from quantlab.outputs import REPORT_MARKER, is_quantlab_report
from quantlab.recipe import MAX_PROBLEMS, MAX_RECIPE_BYTES, load_recipe
from quantlab.store import load_records

from conftest import forbid_weight_loads, REPO

BUNDLED = REPO / "quantlab" / "bundled" / "model"
ROOT = os.geteuid() == 0  # root writes through chmod: the permission cases need another user
TINY_RUN = {"contexts": [8], "new_tokens": 2, "warmup": 0, "repeats": 1}


# ---- helpers ------------------------------------------------------------------------------------------------

def local_model(tmp_path: Path, edit=None, name: str = "model") -> Path:
    """A copy of the bundled model (7 MB), its tensors edited by `edit(dict)` when given."""
    folder = tmp_path / name
    shutil.copytree(BUNDLED, folder)
    if edit is not None:
        tensors = load_file(folder / "model.safetensors")
        edit(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def recipe(tmp_path: Path, model: dict, name: str = "r", **extra) -> Path:
    data = {"name": name, "model": {"device": "cpu", **model}, "measure": TINY_RUN,
            "output": {"dir": str(tmp_path / "measurements")}, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def fake_build(folder: Path) -> Path:
    """A folder as `quantlab build` leaves it, as far as placement and checksums look: a manifest, files, SHA256SUMS."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_5_text"}))
    save_file({"w": torch.zeros(4, dtype=torch.bfloat16)}, folder / "model.safetensors", metadata={"format": "pt"})
    manifest = BuildManifest(
        name=folder.name, created_at="2026-01-01T00:00:00+00:00", quantlab="0.1.0", recipe={"name": "x", "path": "x.yaml", "sha256": "0", "content": ""},
        base=BaseModelRef(name="m", source="bundled", location="x", variant="text", dtype="bfloat16", model_class="C"),
        method={"name": "bnb_int8", "label": "bnb int8", "params": {}},
        unquantized=Unquantized(skip_modules=[], rule_patterns=[], extra_patterns=[], kept_linears=[], quantized_linears=1),
        greedy=GreedyCheck(prompt="", prompt_ids=[1], new_tokens=1, tokens=[1], device="cpu", auto_class="AutoModelForCausalLM"),
        built_on="CPU test",
    )
    write_manifest(folder, manifest)
    write_checksums(folder)
    return folder


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def measurements_folder(root: Path) -> Path:
    """A measurements folder as `make run` leaves it: a real record, a report, estimates.json and the plot."""
    (root / "records").mkdir(parents=True)
    record = sorted((REPO / "measurements" / "records").glob("*.json"))[0]
    shutil.copy(record, root / "records" / record.name)
    (root / "README.md").write_text(f"{REPORT_MARKER}\n# quantlab measurements\n")
    (root / "estimates.json").write_text("{}")
    (root / "memory.png").write_bytes(b"\x89PNG")
    return root


no_load = forbid_weight_loads  # conftest's one seam: the refusals below must come from the plan


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


# ---- data loss: build --force ---------------------------------------------------------------------------------

@pytest.fixture
def force_case(tmp_path):
    src = local_model(tmp_path, name="source")
    meas = measurements_folder(tmp_path / "measurements")
    path = recipe(tmp_path, {"source": "local", "path": str(src)}, quantization={"method": "bnb_int8"})
    return tmp_path, src, meas, path


@pytest.mark.parametrize("case, expected", [
    ("measurements", "the measurements folder"),
    ("inside measurements", "inside the measurements folder"),
    ("source", "inside the source model's folder"),
    ("inside source", "inside the source model's folder"),
    ("plain folder", "not a quantlab build"),
    ("build with a user's file", "holds 1 file(s) the build did not write (notes.txt)"),
    ("link to a build", "a symbolic link"),
    ("inside a build", "inside the quantlab build"),
])
def test_build_force_replaces_only_a_folder_quantlab_built(force_case, case, expected, capsys, monkeypatch):
    tmp_path, src, meas, path = force_case
    no_load(monkeypatch)
    out = {"measurements": meas, "inside measurements": meas / "builds" / "x", "source": src,
           "inside source": src / "int8", "plain folder": tmp_path / "plain", "build with a user's file": tmp_path / "b",
           "link to a build": tmp_path / "link", "inside a build": tmp_path / "b2" / "sub"}[case]
    if case == "plain folder":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    if case == "build with a user's file":
        fake_build(out)
        (out / "notes.txt").write_text("mine")
    if case == "link to a build":
        out.symlink_to(fake_build(tmp_path / "real-build"))
    if case == "inside a build":
        fake_build(tmp_path / "b2")
    before = snapshot(tmp_path)
    assert main(["build", str(path), "--out", str(out), "--force"]) == 2
    error = one_error(capsys)
    assert expected in error and error.count("not a quantlab build") <= 1
    assert snapshot(tmp_path) == before  # nothing deleted, replaced or added


def test_force_replaces_a_quantlab_build_in_one_rename(tmp_path):
    old, new = fake_build(tmp_path / "b4"), fake_build(tmp_path / ".b4.partial-1-x")
    (new / "README.md").write_text("new")
    with pytest.raises(QuantlabError, match="appeared while building"):
        move_into_place(new, old, force=False)
    move_into_place(new, old, force=True)
    assert (old / "README.md").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["b4"]


# ---- data loss: report and run write only into a measurements folder ---------------------------------------

def test_report_and_run_never_overwrite_a_readme_quantlab_did_not_write(tmp_path, write_recipe, capsys, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("# my project\n")
    (project / "pyproject.toml").write_text("[project]\n")
    before = snapshot(project)
    assert main(["report", "--output", str(project)]) == 2
    assert "README.md: not a report quantlab wrote" in one_error(capsys)
    no_load(monkeypatch)
    path = write_recipe({"name": "r", "model": {"source": "bundled", "device": "cpu"}, "measure": TINY_RUN})
    assert main(["run", str(path), "--output", str(project)]) == 2
    assert "not a report quantlab wrote" in one_error(capsys)
    other = tmp_path / "other"  # no README, but not a measurements folder either
    other.mkdir()
    (other / "data.csv").write_text("1,2\n")
    assert main(["run", str(path), "--output", str(other)]) == 2
    assert "it holds data.csv, but no records/ folder and no quantlab report" in one_error(capsys)
    link = tmp_path / "linked"
    link.mkdir()
    (link / "README.md").symlink_to(project / "README.md")
    assert main(["report", "--output", str(link)]) == 2
    one_error(capsys)
    assert main(["estimate", "--output", str(project), "--contexts", "4096"]) == 2
    captured = capsys.readouterr()  # refused before the estimate, not after printing its table
    assert captured.out == "" and captured.err.startswith("error: ") and "not a report quantlab wrote" in captured.err
    assert snapshot(project) == before and not (project / "records").exists() and not (other / "records").exists()


def test_reports_quantlab_wrote_are_replaced_old_and_new(tmp_path, capsys):
    assert is_quantlab_report(REPO / "measurements" / "README.md")  # the committed report: `make run` keeps working
    legacy = tmp_path / "legacy"
    (legacy / "records").mkdir(parents=True)
    (legacy / "README.md").write_text("# quantlab measurements\n\nold report\n")
    assert main(["report", "--output", str(legacy)]) == 0
    assert (legacy / "README.md").read_text().startswith(REPORT_MARKER + "\n# quantlab measurements")
    fresh = tmp_path / "fresh"
    assert main(["report", "--output", str(fresh)]) == 0 and main(["report", "--output", str(fresh)]) == 0
    assert is_quantlab_report(fresh / "README.md")
    heading_only = tmp_path / "heading-only"  # quantlab's heading, but no records/ beside it: not proof enough
    heading_only.mkdir()
    (heading_only / "README.md").write_text("# quantlab measurements\n")
    assert main(["report", "--output", str(heading_only)]) == 2


# ---- data loss: a build killed between its two renames --------------------------------------------------------

_KILL_AT = """
import os, shutil, signal, sys
from pathlib import Path
from quantlab import placement
real_rename, calls = Path.rename, []
def rename(self, target):
    calls.append(self)
    if sys.argv[3] == "between-renames" and len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rename(self, target)
def rmtree(path, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
Path.rename = rename
if sys.argv[3] == "while-deleting":
    shutil.rmtree = rmtree
placement.move_into_place(Path(sys.argv[1]), Path(sys.argv[2]), force=True)
"""


def _killed_replace(tmp_path: Path, when: str) -> Path:
    target = fake_build(tmp_path / "b")
    new = fake_build(tmp_path / ".b.partial-1-new")
    (new / "README.md").write_text("new")
    write_checksums(new)
    run = subprocess.run([sys.executable, "-c", _KILL_AT, str(new), str(target), when], capture_output=True, timeout=120)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()
    assert len(list(tmp_path.glob(".b.old-*"))) == 1
    return target


def test_build_killed_between_renames_is_restored_and_said(tmp_path, capsys):
    target = _killed_replace(tmp_path, "between-renames")
    assert not target.exists()  # what the kill left: the build is hidden aside
    assert main(["verify", str(target), "--checksums-only"]) == 0
    assert "restored the previous build from .b.old-" in capsys.readouterr().out
    assert not list(tmp_path.glob(".b.old-*")) and not (target / "README.md").exists()  # the old build, whole


def test_build_killed_while_deleting_the_old_one_is_cleaned_and_said(tmp_path, write_recipe):
    target = _killed_replace(tmp_path, "while-deleting")
    assert (target / "README.md").read_text() == "new"
    lines: list[str] = []
    assert recover_interrupted_replace(target, lines.append) == lines and "removed .b.old-" in lines[0]
    assert not list(tmp_path.glob(".b.old-*"))
    assert recover_interrupted_replace(target, lines.append) == []  # nothing left to do


# ---- data loss: the measurements store is checked before any weights load --------------------------------------

@pytest.mark.parametrize("breakage", ["records is a file", "folder is a file", "below a file", "read-only"])
def test_broken_or_read_only_store_is_refused_in_the_plan(tmp_path, write_recipe, breakage, capsys, monkeypatch):
    if breakage == "read-only" and ROOT:
        pytest.skip("root writes into read-only folders")
    meas = tmp_path / "measurements"
    if breakage == "records is a file":
        meas.mkdir()
        (meas / "records").write_text("")
    elif breakage in ("folder is a file", "below a file"):
        meas.write_text("")
    else:
        (meas / "records").mkdir(parents=True)
        meas.chmod(0o555), (meas / "records").chmod(0o555)
    output = str(meas / "sub" if breakage == "below a file" else meas)
    no_load(monkeypatch)
    run = write_recipe({"name": "r", "model": {"source": "bundled", "device": "cpu"}, "measure": TINY_RUN})
    build = write_recipe({"name": "b", "model": {"source": "bundled", "device": "cpu"},
                          "quantization": {"method": "bnb_int8"}, "measure": TINY_RUN}, "b.yaml")
    try:
        assert main(["run", str(run), "--output", output]) == 2
        assert "cannot be the measurements folder" in one_error(capsys)
        assert main(["build", str(build), "--out", str(tmp_path / "builds" / "b"), "--output", output]) == 2
        assert "cannot be the measurements folder" in one_error(capsys)
    finally:
        if breakage == "read-only":
            meas.chmod(0o755), (meas / "records").chmod(0o755)
    assert not (tmp_path / "builds").exists()


def test_unreadable_records_are_listed_and_skipped_by_every_command(tmp_path, capsys):
    meas = measurements_folder(tmp_path / "measurements")
    records = meas / "records"
    (records / "a-folder.json").mkdir()
    (records / "broken-link.json").symlink_to(tmp_path / "nowhere.json")
    (records / "nested.json").write_text("[" * 100_000 + "]" * 100_000)
    (records / "huge.json").write_bytes(b" " * (17 << 20))
    os.mkfifo(records / "pipe.json")  # reading it would block
    found, problems = load_records(meas)
    assert len(found) == 1 and len(problems) == 5
    assert all("skipped, not a valid record" in p for p in problems)
    reasons = {Path(p.split(": skipped")[0]).name: p for p in problems}  # each says why, not only the class
    assert "not a regular file" in reasons["a-folder.json"] and "nested too deeply" in reasons["nested.json"]
    assert "larger than" in reasons["huge.json"]
    assert main(["report", "--output", str(meas)]) == 0
    report = (meas / "README.md").read_text()
    assert "## Unreadable files" in report and "nested.json: skipped" in report and "1 record(s)" in report
    assert main(["estimate", "--output", str(meas), "--no-write", "--contexts", "4096"]) == 0


# ---- silently wrong: the checkpoint against its config -----------------------------------------------------------

def _drop(*names):
    def edit(tensors):
        for n in names:
            del tensors[n]
    return edit


def _set(name, value):
    def edit(tensors):
        tensors[name] = value(tensors.get(name))
    return edit


CHECKPOINT_CASES = [
    ("missing tensors", _drop("model.norm.weight", "model.layers.0.linear_attn.A_log"),
     "2 tensor(s) the model needs are missing from the checkpoint: model.layers.0.linear_attn.A_log, model.norm.weight"),
    ("unexpected tensor", _set("model.layers.0.mlp.gate_proj.bias", lambda _: torch.zeros(512, dtype=torch.bfloat16)),
     "1 tensor(s) of the checkpoint are not part of Qwen3_5ForCausalLM: model.layers.0.mlp.gate_proj.bias"),
    ("wrong shape", _set("model.layers.1.mlp.up_proj.weight", lambda t: t[:, :255].contiguous()),
     "model.layers.1.mlp.up_proj.weight: expected [512, 256] (from config.json), found [512, 255] in model.safetensors"),
    ("integer weights", _set("model.norm.weight", lambda t: t.to(torch.int32)),
     "a dtype that an unquantized checkpoint of this model does not use (BF16/F16/F32 for weights): model.norm.weight is I32"),
    ("float64 weights", _set("model.norm.weight", lambda t: t.to(torch.float64)), "model.norm.weight is F64"),
]


@pytest.mark.parametrize("case, edit, expected", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_checkpoint_that_does_not_match_its_config_is_refused_before_loading(tmp_path, case, edit, expected, capsys,
                                                                             monkeypatch):
    folder = local_model(tmp_path, edit)
    no_load(monkeypatch)
    assert main(["run", str(recipe(tmp_path, {"source": "local", "path": str(folder)})), "--dry-run"]) == 2
    err = one_error(capsys)
    assert expected in err and "the checkpoint does not match its config" in err
    build = recipe(tmp_path, {"source": "local", "path": str(folder)}, "b", quantization={"method": "bnb_4bit"})
    assert main(["build", str(build), "--out", str(tmp_path / "builds" / "b")]) == 2
    assert expected in one_error(capsys)
    assert not (tmp_path / "builds").exists() and not (tmp_path / "measurements").exists()


def test_tensors_the_architecture_drops_are_accepted(tmp_path, capsys):
    """mtp.* (transformers drops it; builds copy it) and a checkpoint saved from the VL class are fine."""
    folder = local_model(tmp_path, _set("mtp.fc.weight", lambda _: torch.zeros(256, 512, dtype=torch.bfloat16)))
    assert main(["validate", str(recipe(tmp_path, {"source": "local", "path": str(folder)}))]) == 0


def test_load_time_check_names_tensors_transformers_would_fill_at_random(tmp_path):
    """The backstop behind the plan, for checkpoints the plan cannot compare (already quantized, not yet downloaded)."""
    from transformers import AutoModelForCausalLM

    from quantlab.runtimes.transformers import load_pretrained

    folder = local_model(tmp_path, _drop("model.norm.weight"))
    with pytest.raises(QuantlabError, match=r"1 tensor\(s\) missing from the checkpoint \(filled in at random\): model.norm.weight"):
        load_pretrained(AutoModelForCausalLM, folder)


# ---- silently wrong: non-finite weights --------------------------------------------------------------------------

def _nan_norm(t):
    t = t.clone()
    t[3] = float("nan")
    t[5] = float("inf")
    return t


def test_build_refuses_non_finite_weights(tmp_path, capsys):
    folder = local_model(tmp_path, _set("model.norm.weight", _nan_norm))
    path = recipe(tmp_path, {"source": "local", "path": str(folder)}, quantization={"method": "bnb_int8"})
    assert main(["build", str(path), "--out", str(tmp_path / "builds" / "b"), "--no-progress"]) == 2
    assert "holds non-finite weights, 1 tensor(s) hold NaN or inf values: model.norm.weight (2 entries)" in one_error(capsys)
    assert not (tmp_path / "builds" / "b").exists()


def test_run_says_so_in_its_record_when_weights_are_not_finite(tmp_path, capsys):
    folder = local_model(tmp_path, _set("model.norm.weight", _nan_norm))
    path = recipe(tmp_path, {"source": "local", "path": str(folder)}, output={"dir": str(tmp_path / "m"), "report": False})
    assert main(["run", str(path), "--no-progress"]) == 0
    assert "warning: non-finite weights" in capsys.readouterr().out
    (record,) = load_records(tmp_path / "m")[0]
    note = next(n for n in record.notes if n.startswith("non-finite weights"))
    assert "model.norm.weight (2 entries)" in note and "the figures measure a broken model" in note


# ---- silently wrong: paths read through a build's manifest stay inside it -----------------------------------------

@pytest.mark.parametrize("entry", ["../outside.txt", "ABS", "sub/../../outside.txt", "link"])
def test_checksum_lines_cannot_reach_outside_the_build(tmp_path, entry, capsys):
    build = fake_build(tmp_path / "b")
    outside = tmp_path / "outside.txt"
    outside.write_text("not part of the build")
    name = {"ABS": str(outside)}.get(entry, entry)
    if entry == "link":
        (build / "link").symlink_to(outside)
    sums = build / "SHA256SUMS"
    sums.write_text(sums.read_text() + f"{sha256_file(outside)}  {name}\n")
    assert main(["verify", str(build), "--checksums-only"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and ("points outside" in out or "a symbolic link" in out)
    assert "checksums: 0 file(s) match" in out or "link: a symbolic link" in out


def test_shard_index_cannot_name_a_file_outside_the_checkpoint(tmp_path, capsys):
    folder = local_model(tmp_path)
    shutil.move(folder / "model.safetensors", tmp_path / "elsewhere.safetensors")
    names = load_file(tmp_path / "elsewhere.safetensors").keys()
    index = {"metadata": {}, "weight_map": {n: "../elsewhere.safetensors" for n in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["run", str(recipe(tmp_path, {"source": "local", "path": str(folder)})), "--dry-run"]) == 2
    assert "'../elsewhere.safetensors' points outside" in one_error(capsys)


# ---- silently wrong: strict recipes ---------------------------------------------------------------------------------

STRICT_CASES = [
    ("boolean context", "measure: {contexts: [true]}", "measure.contexts[0]: Input should be a valid integer (got True)"),
    ("boolean new_tokens", "measure: {new_tokens: yes}", "measure.new_tokens: Input should be a valid integer (got True)"),
    ("string number", "measure: {new_tokens: '16'}", "measure.new_tokens: Input should be a valid integer (got '16')"),
    ("float for an integer", "measure: {repeats: 2.0}", "measure.repeats: Input should be a valid integer (got 2.0)"),
    ("string boolean", "output: {report: 'no'}", "output.report: Input should be a valid boolean (got 'no')"),
    ("number as a string field", "name: 5", "name: Input should be a valid string (got 5)"),
    ("NaN", "measure: {memory_sample_ms: .nan}", "measure.memory_sample_ms: Input should be a finite number"),
    ("duplicate key", "measure: {new_tokens: 4}\nmeasure: {new_tokens: 8}", "duplicate key 'measure' (first on line"),
    ("duplicate nested key", "measure: {new_tokens: 4, new_tokens: 8}", "duplicate key 'new_tokens'"),
    ("non-string key", "7: x", "keys must be plain strings, got '7'"),
    ("empty path", "output: {dir: ''}", "output.dir: String should have at least 1 character"),
    ("seed too large for torch", "measure: {seed: 99999999999999999999999}", "measure.seed: Input should be less than or equal to 4294967295"),
    ("negative seed", "measure: {seed: -1}", "measure.seed: Input should be greater than or equal to 0"),
]


@pytest.mark.parametrize("case, text, expected", STRICT_CASES, ids=[c[0] for c in STRICT_CASES])
def test_recipes_are_strict_and_name_the_field(tmp_path, case, text, expected):
    path = tmp_path / "r.yaml"
    head = "" if text.startswith("name:") else "name: x\n"
    path.write_text(f"{head}model: {{source: bundled}}\n{text}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert expected in str(err.value) and str(path) in str(err.value)


# ---- tracebacks that become one clear message (exit 2, nothing written) ------------------------------------------

def _config_folder(tmp_path: Path, **changes) -> Path:
    folder = tmp_path / "config"
    folder.mkdir(exist_ok=True)
    config = json.loads((BUNDLED / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _shard_case(tmp_path: Path, kind: str) -> Path:
    folder = local_model(tmp_path)
    shard = folder / "model.safetensors"
    shard.unlink()
    if kind == "shard is a folder":
        shard.mkdir()
    elif kind == "shard is a link loop":
        shard.symlink_to(shard)
    else:
        shard.write_bytes(b"")
        shard.chmod(0)
    return folder


def _bad_inputs(tmp_path: Path, case: str) -> list[str]:
    """The command line of one bad-input case (its files prepared in tmp_path)."""
    def write(text: str | bytes, name: str = "r.yaml") -> str:
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(path)

    synthetic = lambda folder: recipe(tmp_path, {"source": "synthetic", "config": str(folder)})  # noqa: E731
    if case == "recipe not UTF-8":
        return ["run", write(b"name: caf\xe9\nmodel: {source: bundled}\n")]
    if case == "recipe is binary":
        return ["run", write(bytes(range(256)))]
    if case == "recipe is a folder":
        (tmp_path / "dir.yaml").mkdir()
        return ["run", str(tmp_path / "dir.yaml")]
    if case == "recipe is a pipe":  # reading it would wait for a writer forever
        os.mkfifo(tmp_path / "pipe.yaml")
        return ["run", str(tmp_path / "pipe.yaml")]
    if case == "recipe is a link loop":
        (tmp_path / "loop.yaml").symlink_to(tmp_path / "loop.yaml")
        return ["run", str(tmp_path / "loop.yaml")]
    if case == "revision climbs out":
        return ["run", write("name: x\nmodel: {source: hub, id: Qwen/Qwen3.6-27B, revision: 'a/../../etc'}\n")]
    if case == "quality text is a pipe":
        os.mkfifo(tmp_path / "held-out.txt")
        return ["quality", str(recipe(tmp_path, {"source": "bundled"}, quality={
            "source": "file", "path": str(tmp_path / "held-out.txt"), "tokens": 64, "context": 32}))]
    if case == "estimate --model is a file that is not a config":
        write("root:x:0:0\n", "passwd")
        return ["estimate", "--model", str(tmp_path / "passwd"), "--no-write"]
    if case == "empty hub id":
        return ["run", write("name: x\nmodel: {source: hub, id: ''}\n")]
    if case == "invalid hub id":
        return ["run", write("name: x\nmodel: {source: hub, id: 'Qwen/Qwen3.6 27B'}\n")]
    if case == "invalid dataset id":
        return ["run", write("name: x\nmodel: {source: bundled}\nquality: {source: hub, dataset: '../x'}\n")]
    if case in ("negative size", "zero size", "boolean size", "string size"):
        value = {"negative size": -128, "zero size": 0, "boolean size": True, "string size": "256"}[case]
        return ["run", str(synthetic(_config_folder(tmp_path, hidden_size=value)))]
    if case == "100,000 layers":
        return ["run", str(synthetic(_config_folder(tmp_path, num_hidden_layers=100_000,
                                                    layer_types=["full_attention"] * 100_000)))]
    if case == "config is nested too deeply":
        folder = tmp_path / "deep"
        folder.mkdir()
        (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
        return ["run", str(synthetic(folder))]
    if case == "config.json is a folder":
        (tmp_path / "cfg" / "config.json").mkdir(parents=True)
        return ["run", str(recipe(tmp_path, {"source": "local", "path": str(tmp_path / "cfg")}))]
    if case in ("shard is a folder", "shard is a link loop", "shard is unreadable"):
        return ["run", str(recipe(tmp_path, {"source": "local", "path": str(_shard_case(tmp_path, case))}))]
    if case == "model folder is a link loop":
        (tmp_path / "loop").symlink_to(tmp_path / "loop")
        return ["run", str(recipe(tmp_path, {"source": "local", "path": str(tmp_path / "loop")}))]
    if case == "fake .parquet text":
        write("just text, not parquet\n", "held-out.parquet")
        return ["quality", str(recipe(tmp_path, {"source": "bundled"}, quality={
            "source": "file", "path": str(tmp_path / "held-out.parquet"), "tokens": 64, "context": 32}))]
    if case == "stored-mode cache path is a file":
        write("", "cache")
        return ["quality", str(recipe(tmp_path, {"source": "bundled"}, quality={
            "tokens": 64, "context": 32, "mode": "stored", "reference": {"cache_dir": str(tmp_path / "cache")}}))]
    if case == "quality --json over a file quantlab did not write":
        write("# my notes\n", "notes.md")
        return ["quality", str(recipe(tmp_path, {"source": "bundled"}, quality={"tokens": 64, "context": 32})),
                "--json", str(tmp_path / "notes.md")]
    if case in ("verify on a device that is not there", "verify on a device that does not exist"):
        build = fake_build(tmp_path / "b")
        return ["verify", str(build), "--device", "cuda:7" if case.endswith("not there") else "tpu"]
    if case == "truncated shard behind regenerated checksums":
        build = fake_build(tmp_path / "b")
        shard = build / "model.safetensors"
        shard.write_bytes(shard.read_bytes()[:-4])
        write_checksums(build)
        return ["verify", str(build)]
    raise AssertionError(case)


TRACEBACK_CASES = [
    ("recipe not UTF-8", "not UTF-8 text (invalid continuation byte at byte 9); save it as UTF-8"),
    ("recipe is binary", "a binary file (it holds NUL bytes), not a recipe file"),
    ("recipe is a folder", "is a folder, not a recipe file"),
    ("recipe is a pipe", "not a regular file (a device, a pipe or a socket), not a recipe file"),
    ("recipe is a link loop", "a symbolic link that leads nowhere (broken, or a loop)"),
    ("revision climbs out", "model.revision: a branch, tag or commit name has no '..'"),
    ("quality text is a pipe", "held-out.txt: not a regular file (a device, a pipe or a socket)"),
    ("estimate --model is a file that is not a config", "--model "),
    ("empty hub id", "model.id: not a valid Hugging Face repo id"),
    ("invalid hub id", "model.id: not a valid Hugging Face repo id"),
    ("invalid dataset id", "quality.dataset: not a valid Hugging Face repo id"),
    ("negative size", "hidden_size must be a positive integer, got '-128'"),
    ("zero size", "hidden_size must be a positive integer, got '0'"),
    ("boolean size", "hidden_size must be a positive integer, got 'True'"),
    ("string size", "hidden_size must be a positive integer, got '256'"),
    ("100,000 layers", "num_hidden_layers is 100,000; quantlab handles at most 512"),
    ("config is nested too deeply", "not valid JSON (nested too deeply)"),
    ("config.json is a folder", "no config.json"),
    ("shard is a folder", "not a file (a safetensors shard must be a regular file)"),
    ("shard is a link loop", "model.safetensors"),
    ("shard is unreadable", "cannot read the shard: Permission denied"),
    ("model folder is a link loop", "model folder not found (a symbolic link to nothing, or a loop of links)"),
    ("fake .parquet text", "held-out.parquet: not a readable Parquet file"),
    ("stored-mode cache path is a file", "is a file; the cache is a folder"),
    ("quality --json over a file quantlab did not write", "notes.md: exists and is not a quality result quantlab wrote"),
    ("verify on a device that is not there", "--device is 'cuda:7'"),
    ("verify on a device that does not exist", "--device 'tpu': expected cpu, cuda or cuda:N"),
    ("truncated shard behind regenerated checksums", "truncated shard"),
]


@pytest.mark.parametrize("case, expected", TRACEBACK_CASES, ids=[c[0] for c in TRACEBACK_CASES])
def test_bad_input_is_one_clear_message_and_writes_nothing(tmp_path, case, expected, capsys, monkeypatch):
    if case == "shard is unreadable" and ROOT:
        pytest.skip("root reads unreadable files")
    if case == "verify on a device that is not there" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    argv = _bad_inputs(tmp_path, case)
    no_load(monkeypatch)
    before = snapshot(tmp_path)
    start = time.perf_counter()
    assert main(argv) == 2
    assert expected in one_error(capsys)
    assert time.perf_counter() - start < 20
    assert snapshot(tmp_path) == before and not (tmp_path / "measurements").exists()


def test_validate_checks_every_file_whatever_fails(tmp_path, capsys):
    good = recipe(tmp_path, {"source": "bundled"}, "good")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)))
    hub = tmp_path / "hub.yaml"
    hub.write_text("name: x\nmodel: {source: hub, id: ''}\n")
    config = recipe(tmp_path, {"source": "synthetic", "config": str(_config_folder(tmp_path, vocab_size=-1))}, "cfg")
    assert main(["validate", str(binary), str(hub), str(config), str(good)]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(f"ok: {good}")
    err = captured.err
    assert f"invalid: {binary}: a binary file" in err and f"invalid: {hub}: model.id: not a valid Hugging Face repo id" in err
    assert "vocab_size must be a positive integer" in err and "Traceback" not in err


# ---- limits -------------------------------------------------------------------------------------------------------

def test_recipe_size_is_limited_and_the_limit_is_said(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("name: x\nmodel: {source: bundled}\n#" + "x" * MAX_RECIPE_BYTES + "\n")
    with pytest.raises(RecipeError, match=r"larger than 65,536 bytes, the limit for a recipe file"):
        load_recipe(path)
    path.write_text("name: x\nmodel: {source: bundled}\n#" + "x" * (MAX_RECIPE_BYTES - 100) + "\n")
    loaded = load_recipe(path)  # just under the limit: accepted, and records keep all of it
    assert len(loaded.text.encode()) <= MAX_RECIPE_BYTES


def test_alias_bomb_is_refused_at_once(tmp_path):
    """Six levels of ten aliases: a million contexts once expanded (twelve levels would be a trillion)."""
    lines = ["name: x", "model: {source: bundled}", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 6)]
    lines += ["measure: {contexts: *a5}"]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert time.perf_counter() - start < 2 and len(str(err.value)) < 1000
    assert "(line 3, column 5): anchors (&a0) are not allowed in a recipe" in str(err.value)


def test_errors_show_a_bounded_excerpt_of_a_bad_value(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("name: '" + "y" * 30_000 + "'\nmodel: {source: bundled, dtype: '" + "z" * 1000 + "'}\n"
                    + "measure: {contexts: [" + ", ".join(["-1"] * 3000) + "]}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert len(message) < 3000 and "30,002 chars" in message and "(got 'zzzzz" in message
    path.write_text("name: x\nmodel: {source: bundled}\nmeasure: {batch_sizes: [" + ", ".join(["true"] * 50) + "]}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    lines = str(err.value).splitlines()
    assert lines[0].endswith("50 problem(s) in the recipe:") and len(lines) == MAX_PROBLEMS + 2
    assert lines[-1] == f"  - ... and {50 - MAX_PROBLEMS} more"
