"""The `quantlab` command as a user meets it: clear messages, no tracebacks, records and report."""

from __future__ import annotations

import subprocess
import sys

import pytest

from quantlab.cli import main
from quantlab.store import load_records

from conftest import REPO


def test_validate_good_and_bad(write_recipe, capsys):
    good = write_recipe({"name": "ok", "model": {"source": "bundled"}}, "good.yaml")
    bad = write_recipe({"name": "bad", "model": {"source": "bundled", "dtype": "int3"}}, "bad.yaml")
    assert main(["validate", str(good)]) == 0
    assert "ok: " in capsys.readouterr().out
    assert main(["validate", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert "invalid: " in err and "model.dtype" in err and "'int3'" in err


@pytest.mark.parametrize("free_gb, fits", [(128, True), (24, False)])
def test_run_dry_run_loads_nothing(write_recipe, tmp_path, capsys, monkeypatch, no_weights_load, free_gb, fits):
    """The 27B at BF16 on a host with 128 GB free is planned; with 24 GB free the plan refuses it, before anything
    is allocated. The host RAM is the test's, not the machine's."""
    monkeypatch.setattr("quantlab.fingerprint.available_host_ram", lambda: free_gb * 10**9)
    path = write_recipe({"name": "dry", "model": {"source": "synthetic", "config": "qwen3.6-27b", "device": "cpu"}})
    code = main(["run", str(path), "--dry-run"])
    captured = capsys.readouterr()
    if fits:
        assert code == 0 and "26,895,998,464 parameters" in captured.out and "dry run: nothing loaded" in captured.out
    else:
        assert code == 2 and f"of host RAM but only {free_gb:.1f} GB is available" in captured.err
    assert not (tmp_path / "measurements").exists()


@pytest.mark.slow
def test_bad_recipe_exits_2_without_traceback(write_recipe):
    path = write_recipe({"name": "x", "model": {"source": "local", "path": "/no/such/folder"}})
    out = subprocess.run([sys.executable, "-m", "quantlab", "run", str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.startswith("error: /no/such/folder: model folder not found")
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_run_on_bundled_model_writes_records_and_report(write_recipe, tmp_path, capsys):
    path = write_recipe({"name": "bundled-smoke", "model": {"source": "bundled", "device": "cpu"},
                         "measure": {"contexts": [16, 32], "new_tokens": 4, "warmup": 0, "repeats": 2}})
    assert main(["run", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "context      16 × batch 1: prefill" in out and "wrote 2 record(s)" in out
    records, problems = load_records(tmp_path / "measurements")
    assert len(records) == 2 and not problems
    assert {r.model.name for r in records} == {"quantlab-bundled"}
    assert all(r.model.weights == "real" and r.hardware.kind == "cpu" for r in records)
    report = (tmp_path / "measurements" / "README.md").read_text()
    assert "## quantlab-bundled · real weights · CPU:" in report


def test_measure_leaves_report_alone(write_recipe, tmp_path):
    path = write_recipe({"name": "m", "model": {"source": "bundled", "device": "cpu"},
                         "measure": {"contexts": [8], "new_tokens": 2, "warmup": 0, "repeats": 1}})
    assert main(["measure", str(path), "--no-progress"]) == 0
    assert not (tmp_path / "measurements" / "README.md").exists()
    assert main(["report", "--output", str(tmp_path / "measurements")]) == 0
    assert (tmp_path / "measurements" / "README.md").exists()


def test_ci_calls_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    first_block = readme.split("```")[1].splitlines()[1:]  # after the language tag
    commands = [line.split("#")[0].strip() for line in first_block if line.split("#")[0].strip()]
    assert commands[:2] == ["make run", "make test"]
    assert commands[1] in [line.strip() for line in ci.splitlines()]
