"""The bundled model: a small, briefly trained qwen3_5 model shipped with quantlab.

It mirrors the layer pattern of Qwen3.6-27B (three Gated DeltaNet layers, then
one gated full-attention layer) at a size that runs in seconds on a CPU. Build
it with ``python -m quantlab.bundled.train``.
"""

from __future__ import annotations

import pathlib

BUNDLED_MODEL_DIR = pathlib.Path(__file__).parent / "model"

_REQUIRED_FILES = ("config.json", "model.safetensors")


def bundled_model_dir() -> pathlib.Path:
    """Return the bundled model folder, or raise ``FileNotFoundError`` if it was not built."""
    missing = [name for name in _REQUIRED_FILES if not (BUNDLED_MODEL_DIR / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"bundled model folder {BUNDLED_MODEL_DIR} lacks {', '.join(missing)}; "
            "build it with `python -m quantlab.bundled.train`"
        )
    return BUNDLED_MODEL_DIR
