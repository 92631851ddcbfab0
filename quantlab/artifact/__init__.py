"""Build folders: a quantized model as a community artifact (`quantlab build`, `verify`, `publish`). What a build
records about itself (quantlab_build.json) is quantlab/schema/build.py; SHA256SUMS is quantlab/checksums.py.

- `writer.py`: the build itself: quantize, save, copy MTP and tokenizer, reload, record greedy
  tokens, measure, write the card and checksums, all in a hidden folder renamed at the end;
- `gguf_build.py`: a GGUF build, made and verified with llama.cpp's own tools;
- `results.py`: what build and verify return;
- `cli.py`: the `build`, `verify` and `publish` commands;
- `tensors.py`: safetensors headers, the MTP copy and the list of unquantized tensors;
- `card.py`: the model card (README.md with Hub metadata);
- `verify.py`: checksums, reload, and the recorded greedy tokens;
- `publish.py`: the upload to the Hugging Face Hub, only when asked.
"""
