"""The quantization machinery the methods use, below them: group-wise quantization (`groupwise.py`), the skip lists
transformers and vLLM read (`skips.py`, `vllm_layout.py`), and the AWQ engines (`awq/`). Engines take their own
parameters (awq/engine.py's AwqParams), never a recipe's config: nothing here imports a method or the recipe."""
