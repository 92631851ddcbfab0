"""vLLM's venv (.vllm/, `make vllm`): the torchvision shim does what scripts/vllm/quantlab_torchvision_shim.py says,
there only; vLLM's qwen3_5 module imports; and nothing of the shim reaches quantlab's own venv or code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_vllm

REPO = Path(__file__).resolve().parent.parent
SHIM = "quantlab_torchvision_shim"


def _run(python: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=600, cwd="/")


def test_the_shim_is_in_vllms_venv_only_and_quantlab_never_names_it():
    require_vllm()
    site = next((REPO / ".vllm" / "lib").glob("python*/site-packages"))
    assert (site / f"{SHIM}.pth").is_file() and (site / f"{SHIM}.py").is_file()
    ours = [Path(p) for p in sys.path if p.endswith("site-packages")]
    assert ours and not any((p / f"{SHIM}.pth").exists() or (p / f"{SHIM}.py").exists() for p in ours)
    named = [p for p in (REPO / "quantlab").rglob("*.py") if SHIM in p.read_text(encoding="utf-8")]
    assert named == []
    with pytest.raises(ImportError):
        __import__(SHIM)


def test_torchvision_imports_with_its_cpp_operators_refusing():
    python = require_vllm()
    out = _run(python, (
        "import torch, torchvision, torchvision.extension as e\n"
        "from torchvision.transforms import v2\n"
        "print('has_ops', e._has_ops())\n"
        "try:\n"
        "    torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)\n"
        "except RuntimeError as x:\n"
        "    print('nms refused')\n"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "has_ops False" in out.stdout and "nms refused" in out.stdout


def test_without_the_shim_pypis_torchvision_does_not_import_there():
    """What the shim answers: the same import, the finder removed first, fails as PyPI's wheel fails."""
    python = require_vllm()
    out = _run(python, (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != '_BeforeMetaRegistrations']\n"
        "import torchvision\n"))
    assert out.returncode != 0 and "torchvision::nms does not exist" in out.stderr


@pytest.mark.slow
def test_vllms_qwen3_5_module_imports():
    python = require_vllm()
    out = _run(python, "import vllm.model_executor.models.qwen3_5, vllm.entrypoints.openai.api_server")
    assert out.returncode == 0, out.stderr[-2000:]
