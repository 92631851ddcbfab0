"""quantlab: what a quantized Qwen3.6-27B really costs, measured."""

__version__ = "0.1.0"
