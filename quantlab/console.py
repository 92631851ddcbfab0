"""What the command line does to the libraries' own output and settings before a command runs."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import warnings


def silence_progress_bars() -> None:
    """--no-progress: transformers' own loading and saving bars too, not only quantlab's."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def keep_hf_cache_location() -> None:
    """gptqmodel (the AWQ kernels) imports tokenicer, which sets HF_HOME and HF_HUB_CACHE to
    /tmp/tokenicer_hf_home when they are unset: the Hugging Face cache, where the weights are, would
    move for whatever runs after it. Setting them to where they already point makes that a no-op."""
    from huggingface_hub import constants

    os.environ.setdefault("HF_HOME", constants.HF_HOME)
    os.environ.setdefault("HF_HUB_CACHE", constants.HF_HUB_CACHE)


def quiet_libraries() -> None:
    """One-time kernel-fallback warnings and per-call casts would drown quantlab's own output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|transformers|bitsandbytes)\b")
    warnings.filterwarnings("ignore", category=FutureWarning)
    quiet_bnb_logs()  # bitsandbytes logs (not warns) a cast per 8-bit matmul: keep the first only
    # gptqmodel (AWQ kernels) logs a banner and kernel choices through its "logbar" logger; torchao,
    # which it pulls in, warns about CUDA-only extensions it cannot load on a CPU machine.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if importlib.util.find_spec("logbar") is not None:
        with contextlib.redirect_stdout(io.StringIO()):  # importing and creating it prints a blank line
            from logbar import LogBar

            LogBar.shared().setLevel(logging.ERROR)  # shared() itself sets INFO when it first creates the logger


class _OnceFilter(logging.Filter):
    """Pass the first record whose message starts with one of `once`; drop those in `never`."""

    def __init__(self, once: tuple[str, ...] = (), never: tuple[str, ...] = ()):
        super().__init__()
        self.once, self.never, self.seen = once, never, set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith(self.never):
            return False
        for prefix in self.once:
            if msg.startswith(prefix):
                if prefix in self.seen:
                    return False
                self.seen.add(prefix)
        return True


def quiet_bnb_logs() -> None:
    """Filters on the two bitsandbytes loggers that would otherwise flood quantlab's output (once per process)."""
    cast = logging.getLogger("bitsandbytes.autograd._functions")
    if any(isinstance(f, _OnceFilter) for f in cast.filters):
        return
    cast.addFilter(_OnceFilter(once=("MatMul8bitLt: inputs will be cast",)))
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OnceFilter(never=("Failed to load CPU gemm_4bit_forward",)))
