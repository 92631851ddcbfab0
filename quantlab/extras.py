"""Optional packages: quantlab imports, plans and estimates without them, and says how to install one when a
command needs it (`make setup` installs them all)."""

from __future__ import annotations

import importlib.util
import sys

# package -> the quantlab extra that installs it
EXTRAS = {"bitsandbytes": "quant", "gptqmodel": "quant", "matplotlib": "plot", "gguf": "gguf"}


def installed(package: str) -> bool:
    if package in sys.modules:
        return sys.modules[package] is not None  # None: an import of it is known to fail
    return importlib.util.find_spec(package) is not None


def install_hint(package: str) -> str:
    return f"pip install 'quantlab[{EXTRAS[package]}]' (or `make setup`, which installs every extra)"
