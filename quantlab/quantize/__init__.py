"""Quantization methods: small config objects (configs.py) and a handler registry keyed by method."""
