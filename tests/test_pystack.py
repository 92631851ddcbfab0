"""The locked Python stack (scripts/pystack.py): make setup installs exactly the lock for this Python, and refuses,
with one line and the command that fixes it, a lock that does not fit the Python or pyproject.toml in use."""

from __future__ import annotations

import importlib.util
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("pystack", REPO / "scripts" / "pystack.py")
pystack = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pystack)


def locked(lock: Path) -> dict[str, str]:
    return {line.split("==")[0]: line.split("==")[1].split()[0]
            for line in lock.read_text().splitlines() if "==" in line and not line.startswith("#")}


needs_lock = pytest.mark.skipif(bool(__import__("os").environ.get(pystack.LOCKING_ENV)),
                                reason="make lock is running the suite: the lock is written after it passes")


@needs_lock
def test_the_lock_for_this_python_fits_pyproject():
    fields = pystack.check_lock(pystack.lock_path())
    assert fields["python"] == f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert fields["tested"].startswith("suite: ") and " passed" in fields["tested"] and "failed" not in fields["tested"]


@needs_lock
def test_every_locked_line_is_one_file_by_its_hash():
    text = pystack.lock_path().read_text()
    requirements = [line for line in text.splitlines() if "==" in line and not line.startswith("#")]
    hashes = [line for line in text.splitlines() if line.strip().startswith("--hash=sha256:")]
    assert requirements and len(hashes) == len(requirements)
    assert "torch" not in locked(pystack.lock_path())  # installed first, by version: a CPU or a CUDA build


def test_this_venv_holds_exactly_the_locked_versions():
    """What make setup installed is what the lock says (skipped outside a venv made from it)."""
    stamp = Path(sys.prefix) / pystack.STAMP
    if not stamp.is_file() or json.loads(stamp.read_text() or "{}").get("lock") != pystack.lock_path().name:
        pytest.skip("this Python is not a venv made by make setup from the lock")
    wrong = {}
    for name, version in locked(pystack.lock_path()).items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have != version:
            wrong[name] = (version, have)
    assert not wrong


def run_check(monkeypatch, tmp_path, lock_text: str | None, version=None):
    monkeypatch.setattr(pystack, "LOCKS", tmp_path)
    if lock_text is not None:
        pystack.lock_path(version).write_text(lock_text)
    with pytest.raises(pystack.StackError) as err:
        pystack.check_lock(pystack.lock_path(version))
    text = str(err.value)
    assert "\n" not in text
    return text


def test_no_lock_for_this_python_names_the_locks_and_the_fix(monkeypatch, tmp_path):
    (tmp_path / "lock-cp311-linux-x86_64.txt").write_text("")
    text = run_check(monkeypatch, tmp_path, None, version=(3, 14))
    assert f"no lock for Python {platform.python_version()}" in text and "lock-cp311-linux-x86_64.txt" in text
    assert "make setup PYTHON=python3.11" in text and "make lock PYTHON=" in text


def test_a_python_outside_requires_python_is_refused_before_any_lock_is_read(monkeypatch, tmp_path):
    (tmp_path / "lock-cp311-linux-x86_64.txt").write_text("")
    monkeypatch.setattr(pystack.platform, "python_version", lambda: "3.13.0")
    text = run_check(monkeypatch, tmp_path, None)
    assert text.startswith("quantlab supports Python >=3.11,<3.13 (pyproject.toml), not 3.13.0")
    assert "make setup PYTHON=python3.11" in text
    with pytest.raises(pystack.StackError, match="supports Python"):
        pystack.lock(tmp_path / "venv", "torch==2.13.0", run_tests=False)
    assert not (tmp_path / "venv").exists()


def test_a_lock_for_other_ranges_says_refresh_it(monkeypatch, tmp_path):
    header = pystack.lock_text({}, "26.3", "torch==2.13.0", "suite: 1 passed").replace(
        f"# ranges: {pystack.ranges_hash()}", "# ranges: 0000000000000000")
    text = run_check(monkeypatch, tmp_path, header)
    assert "other dependency ranges than pyproject.toml's" in text and "make lock PYTHON=" in text


def test_a_lock_made_for_another_python_says_remake_it(monkeypatch, tmp_path):
    header = pystack.lock_text({}, "26.3", "torch==2.13.0", "suite: 1 passed").replace(
        f"# python: {pystack.python_tag()}", "# python: cp39")
    assert "says it is for cp39" in run_check(monkeypatch, tmp_path, header)


def test_a_fitting_lock_passes(monkeypatch, tmp_path):
    monkeypatch.setattr(pystack, "LOCKS", tmp_path)
    pystack.lock_path().write_text(pystack.lock_text({"six": ("1.16.0", "ab" * 32)}, "26.3", "torch==2.13.0", "x"))
    assert pystack.check_lock(pystack.lock_path())["pip"] == "26.3"


def test_the_ranges_hash_follows_the_dependencies_only(tmp_path):
    pyproject = (REPO / "pyproject.toml").read_text()
    (tmp_path / "a.toml").write_text(pyproject.replace('addopts = "-ra"', 'addopts = "-rA"'))
    (tmp_path / "b.toml").write_text(pyproject.replace('"tqdm>=4.60"', '"tqdm>=4.61"'))
    assert pystack.ranges_hash(tmp_path / "a.toml") == pystack.ranges_hash()
    assert pystack.ranges_hash(tmp_path / "b.toml") != pystack.ranges_hash()


def test_setup_never_replaces_a_folder_it_did_not_make(tmp_path):
    venv = tmp_path / ".venv"
    venv.mkdir()
    (venv / "precious").write_text("mine")
    with pytest.raises(pystack.StackError, match="did not make it"):
        pystack._replace_own_venv(venv)
    assert (venv / "precious").read_text() == "mine"
    (venv / pystack.STAMP).write_text("{}")
    pystack._replace_own_venv(venv)
    assert not venv.exists()


def test_locked_pins_come_from_pip_reports_with_their_hashes(tmp_path):
    report = tmp_path / "r.json"
    item = {"metadata": {"name": "Typing_Extensions", "version": "4.15.0"},
            "download_info": {"url": "https://x/y.whl", "archive_info": {"hashes": {"sha256": "cd" * 32}}}}
    torch = {"metadata": {"name": "torch", "version": "2.13.0+cpu"}, "download_info": {"url": "file:///t.whl"}}
    cuda = [{"metadata": {"name": name, "version": "1"},
             "download_info": {"url": "https://x/c.whl", "archive_info": {"hashes": {"sha256": "ef" * 32}}}}
            for name in ("nvidia-cublas", "cuda-toolkit", "triton")]  # a CUDA build of torch brings these
    report.write_text(json.dumps({"install": [item, torch, *cuda]}))
    ours = tmp_path / "ours.json"  # quantlab's own dependencies are locked whatever their names
    nvml = {"metadata": {"name": "nvidia-ml-py", "version": "13.1"},
            "download_info": {"url": "https://x/n.whl", "archive_info": {"hashes": {"sha256": "ab" * 32}}}}
    ours.write_text(json.dumps({"install": [nvml]}))
    assert pystack.locked_pins([ours], torch_report=report) == {"typing-extensions": ("4.15.0", "cd" * 32),
                                                                "nvidia-ml-py": ("13.1", "ab" * 32)}
    del item["download_info"]["archive_info"]["hashes"]
    report.write_text(json.dumps({"install": [item]}))
    with pytest.raises(pystack.StackError, match="no sha256 for typing-extensions"):
        pystack.locked_pins([], torch_report=report)


def test_make_setup_with_a_python_that_has_no_lock_says_one_line(tmp_path):
    """The script as make runs it: a Python 3.x without a lock gets one line and exit 2, and nothing is made."""
    locks = tmp_path / "requirements"
    locks.mkdir()
    code = (f"import runpy, sys; sys.argv = ['pystack.py', 'setup', '--venv', {str(tmp_path / 'venv')!r}]; "
            f"g = runpy.run_path({str(REPO / 'scripts' / 'pystack.py')!r}, run_name='not_main'); "
            f"g['main'].__globals__['LOCKS'] = __import__('pathlib').Path({str(locks)!r}); sys.exit(g['main']())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("setup: no lock for Python"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "venv").exists()
