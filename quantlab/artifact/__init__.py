"""Build folders: a quantized model as a community artifact (`quantlab build`, `verify`, `publish`).

- `writer.py`: the build itself: quantize, save, copy MTP and tokenizer, reload, record greedy
  tokens, measure, write the card and checksums, all in a hidden folder renamed at the end;
- `manifest.py`: quantlab_build.json, what a build records about itself (light: no torch);
- `tensors.py`: safetensors headers, the MTP copy and the list of unquantized tensors;
- `card.py`: the model card (README.md with Hub metadata);
- `checksums.py`: SHA256SUMS;
- `verify.py`: checksums, reload, and the recorded greedy tokens;
- `publish.py`: the upload to the Hugging Face Hub, only when asked.
"""
