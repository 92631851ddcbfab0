"""Runs llama.cpp's own converter (convert_hf_to_gguf.py), as `python -m quantlab.llamacpp.convert [--sparse] ARGS...`,
in a subprocess whose PYTHONPATH holds llama.cpp's tree and its gguf-py (quantlab.llamacpp.tool_env).

Two narrow additions, neither of which changes what the converter writes for a model it already knows:
- A byte-level BPE tokenizer whose pre-tokenizer is exactly GPT-2's (the bundled model's, trained by quantlab) is
  named "gpt-2". The converter knows pre-tokenizers by a hash of their output on a test string, and an
  unlisted hash stops it; llama.cpp's "gpt-2" pre-tokenizer is that regex. Any other unknown tokenizer still
  stops it, with the converter's own error.
- `--sparse` writes the tensor data as a hole: the header (every tensor's name, type, shape and offset) is the
  converter's own, the file has its full size, and no weight is read. This is how the full-size GGUFs of synthetic
  weights are made without 55 GB of RAM or disk: llama.cpp's quantizer and memory planner then work on them
  (`llama-quantize --dry-run`, `llama-fit-params`), since sizes depend on shapes and types, not values.
"""

from __future__ import annotations

import json
import sys

GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def _is_gpt2_byte_level(folder) -> bool:
    try:
        data = json.loads((folder / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return False
    return data.get("pre_tokenizer") == GPT2_PRE_TOKENIZER and data.get("normalizer") is None \
        and data.get("model", {}).get("type") == "BPE"


def _patch_pre_tokenizer() -> None:
    from conversion.base import TextModel

    original = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if _is_gpt2_byte_level(self.dir_model):
                return "gpt-2"
            raise

    TextModel.get_vocab_base_pre = get_vocab_base_pre


def _patch_sparse_data() -> None:
    import gguf

    def write_tensors_as_holes(self, *, progress: bool = False) -> None:
        self.write_ti_data_to_file()
        for fout, tensors in zip(self.fout, self.tensors):
            self.write_padding(fout, fout.tell())
            for ti in tensors.values():
                fout.seek(ti.nbytes, 1)
                self.write_padding_hole(fout, ti.nbytes)
                ti.tensor = None
            fout.truncate()
        self.state = gguf.gguf_writer.WriterState.WEIGHTS

    def write_padding_hole(self, fp, n: int, align: int | None = None) -> None:
        pad = gguf.GGUFWriter.ggml_pad(n, align if align is not None else self.data_alignment) - n
        if pad:
            fp.seek(pad, 1)

    gguf.GGUFWriter.write_tensors_to_file = write_tensors_as_holes
    gguf.GGUFWriter.write_padding_hole = write_padding_hole


def main(argv: list[str]) -> None:
    sparse = "--sparse" in argv
    argv = [a for a in argv if a != "--sparse"]
    import convert_hf_to_gguf

    _patch_pre_tokenizer()
    if sparse:
        _patch_sparse_data()
    sys.argv = ["convert_hf_to_gguf.py", *argv]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main(sys.argv[1:])
