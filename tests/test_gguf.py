"""GGUF files made by llama.cpp's own tools and measured through llama.cpp: bad input, conversion, the sparse
converter, llama-quantize, the llama.cpp runtime and its buffer accounting.

Tests that need the built llama.cpp (`make llama-cpp`, part of `make setup`) are skipped where it is not built.
The bundled model (7 MB) is converted once per module; everything is written under pytest's temporary folders.

"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from quantlab import llamacpp
from quantlab.cli import main
from quantlab.errors import QuantlabError, RecipeError
from quantlab.llamacpp.gguf_file import read_header
from quantlab.recipe import load_recipe
from quantlab.llamacpp.binding import LlamaCppSettings, model_buffers, parse_buffers
from quantlab.runtimes.base import LoadRequest

from conftest import REPO

BUNDLED = REPO / "quantlab" / "bundled" / "model"
BUNDLED_PARAMETERS = 3_685_080  # the bundled checkpoint's 56 tensors, no MTP head
needs_llama = pytest.mark.skipif(not llamacpp.available(),
                                 reason="llama.cpp is not built here (`make llama-cpp` builds it; `make setup` does too)")
GGUF = {"method": "gguf", "type": "Q4_K_M"}
LLAMA = {"runtime": "llama.cpp", "contexts": [16], "new_tokens": 2, "warmup": 0, "repeats": 1}
SOURCE = SimpleNamespace(name="bundled", spec=SimpleNamespace(source="bundled", variant="text"), weights="real",
                         config=None)
# llama.cpp's worker threads spin: more of them than idle cores slows a tiny model a hundredfold on a busy CI box
THREADS = 1


def settings(**changes) -> LlamaCppSettings:
    values = dict(threads=THREADS, gpu_layers=0, flash_attn="auto", kv_type="f16", slots=1, ubatch=512, batch=2048)
    return LlamaCppSettings(**{**values, **changes})


def recipe_data(name: str = "g", model: dict | None = None, **extra) -> dict:
    return {"name": name, "model": model or {"source": "bundled", "device": "cpu"}, **extra}


def one_line(text: str, prefix: str) -> str:
    """One clear line, starting with `prefix`, no traceback."""
    assert text.startswith(prefix) and "Traceback" not in text, text
    assert len(text.strip().splitlines()) == 1, text
    return text


def no_llama_cpp(monkeypatch, tmp_path: Path) -> None:
    """quantlab looks for llama.cpp in a folder where it was never built."""
    monkeypatch.setenv("QUANTLAB_LLAMA_CPP", str(tmp_path / "no-llama-cpp"))


def run_python(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A script in a fresh interpreter: for what may crash the process (a C abort, a freed ctypes callback)."""
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}  # an abort in ggml would start gdb for a backtrace
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


# ---- fixtures --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tools():
    return llamacpp.locate()


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory, tools) -> dict[str, Path]:
    """The bundled model converted to BF16 by llama.cpp's converter, then quantized to Q8_0 and Q4_K_M."""
    from quantlab.llamacpp.steps import convert, quantize

    folder = tmp_path_factory.mktemp("gguf")
    files = {"BF16": folder / "bf16.gguf", "Q8_0": folder / "q8_0.gguf", "Q4_K_M": folder / "q4_k_m.gguf"}
    convert(tools, BUNDLED, files["BF16"], "bf16", mtp=False)
    for kind in ("Q8_0", "Q4_K_M"):
        quantize(tools, files["BF16"], files[kind], kind, None)
    return files


_RUNTIMES: list = []  # llama.cpp keeps the log callback of the last runtime made: that one must outlive the process


@pytest.fixture(scope="module")
def runtime(tools):
    from quantlab.runtimes.libllama import LlamaCppRuntime

    if not _RUNTIMES:
        _RUNTIMES.append(LlamaCppRuntime())
    return _RUNTIMES[0]


@pytest.fixture
def load_gguf(runtime):
    """load_gguf(path, **settings) -> LlamaCppModel, closed after the test."""
    loaded = []

    def load(path: Path, **changes):
        model = runtime.load(LoadRequest(SOURCE, torch.device("cpu"), gguf=Path(path), settings=settings(**changes))).model
        loaded.append(model)
        return model

    yield load
    for model in loaded:
        model.close()


def truncated_copy(src: Path, dst: Path, keep: int) -> Path:
    dst.write_bytes(src.read_bytes()[:keep])
    return dst


# ---- 1. bad input: one clear line, before any work -------------------------------------------------------------

@needs_llama
def test_unknown_gguf_type_names_llama_cpps_list(write_recipe, tmp_path, capsys):
    path = write_recipe(recipe_data(quantization={"method": "gguf", "type": "Q4_K_X"}, measure=LLAMA))
    assert main(["validate", str(path)]) == 1
    err = one_line(capsys.readouterr().err, "invalid: ")
    assert "GGUF type 'Q4_K_X' is not one llama.cpp knows" in err
    listed = err.split("its types: ")[1].strip().split(", ")
    assert set(listed) == set(llamacpp.quant_types(llamacpp.locate()))
    assert {"Q4_K_M", "Q6_K", "Q8_0", "IQ2_XXS", "BF16"} <= set(listed) and "COPY" not in listed
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "Q4_K_X" in one_line(capsys.readouterr().err, "error: ")
    assert not (tmp_path / "measurements").exists()


@needs_llama
def test_gguf_type_is_case_insensitive_as_llama_quantize_takes_it(tools, write_recipe, capsys):
    assert llamacpp.check_type(tools, "q4_k_m") == "Q4_K_M"
    path = write_recipe(recipe_data(quantization={"method": "gguf", "type": "q8_0"}, measure=LLAMA))
    assert main(["validate", str(path)]) == 0
    assert "GGUF Q8_0" in capsys.readouterr().out


@needs_llama
@pytest.mark.parametrize("kind", ["IQ2_XXS", "Q2_K_S"])
def test_type_that_needs_an_imatrix_without_one_is_refused(kind, write_recipe, tmp_path, capsys):
    path = write_recipe(recipe_data(quantization={"method": "gguf", "type": kind, "imatrix": False}, measure=LLAMA))
    assert main(["validate", str(path)]) == 1
    err = one_line(capsys.readouterr().err, "invalid: ")
    assert f"GGUF type {kind} needs an importance matrix" in err and "set quantization.imatrix: true" in err
    assert main(["run", str(path), "--dry-run"]) == 2
    one_line(capsys.readouterr().err, "error: ")
    assert not (tmp_path / "measurements").exists()


@needs_llama
def test_iq3_xs_without_imatrix_is_refused_before_any_work(write_recipe, capsys):
    path = write_recipe(recipe_data(quantization={"method": "gguf", "type": "IQ3_XS", "imatrix": False}, measure=LLAMA))
    assert main(["validate", str(path)]) == 1
    assert "needs an importance matrix" in one_line(capsys.readouterr().err, "invalid: ")


@pytest.mark.parametrize("case, data, expected", [
    ("gguf measured by transformers", recipe_data(quantization=GGUF),
     "quantization.method gguf is measured through llama.cpp: set measure.runtime: llama.cpp"),
    ("llama.cpp runs method none", recipe_data(measure={"runtime": "llama.cpp"}),
     "measure.runtime llama.cpp runs GGUF files: set quantization.method: gguf"),
    ("llama_cpp settings for transformers", recipe_data(measure={"llama_cpp": {"threads": 2}}),
     "llama_cpp sets the llama.cpp runtime, but runtime is 'transformers'"),
    ("batch sizes", recipe_data(quantization=GGUF, measure={"runtime": "llama.cpp", "batch_sizes": [1, 4]}),
     "the llama.cpp runtime measures one sequence (batch_sizes: [1])"),
    ("synthetic weights", recipe_data(model={"source": "synthetic", "config": "bundled", "device": "cpu"},
                                      quantization=GGUF, measure={"runtime": "llama.cpp"}),
     "synthetic weights have none"),
    ("split across GPUs", recipe_data(model={"source": "bundled", "device": "auto", "gpus": 2},
                                      quantization=GGUF, measure={"runtime": "llama.cpp"}),
     "a GGUF is split across GPUs by llama.cpp"),
])
def test_recipe_level_mismatches_are_recipe_errors(case, data, expected, write_recipe, tmp_path, capsys, monkeypatch):
    no_llama_cpp(monkeypatch, tmp_path)  # the recipe is refused before llama.cpp is looked for
    path = write_recipe(data)
    with pytest.raises(RecipeError, match=re.escape(expected)) as caught:
        load_recipe(path)
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)
    assert main(["validate", str(path)]) == 1
    assert expected in one_line(capsys.readouterr().err, "invalid: ")
    assert main(["run", str(path), "--dry-run"]) == 2
    assert expected in one_line(capsys.readouterr().err, "error: ")
    assert not (tmp_path / "measurements").exists()


@needs_llama
def test_model_the_converter_does_not_know_is_refused(tools):
    from quantlab.llamacpp.steps import check_convertible

    with pytest.raises(QuantlabError, match=r"does not know this model \(NoSuchModelForCausalLM\)") as caught:
        check_convertible(tools, SimpleNamespace(architectures=["NoSuchModelForCausalLM"]))
    assert "\n" not in str(caught.value)
    count = int(re.search(r"it converts (\d+) architectures", str(caught.value)).group(1))
    assert count > 50  # llama.cpp's converter knows many
    with pytest.raises(QuantlabError, match="config.json names no architectures"):
        check_convertible(tools, SimpleNamespace(architectures=None))
    for known in ("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration"):  # the ones the message names
        check_convertible(tools, SimpleNamespace(architectures=[known]))
    check_convertible(tools, SimpleNamespace(architectures=["NoSuchModel", "Qwen3_5ForCausalLM"]))  # one is enough


def test_llama_cpp_not_built_says_how_to_build_it(tmp_path, write_recipe, capsys, monkeypatch):
    with pytest.raises(QuantlabError, match="make llama-cpp") as caught:
        llamacpp.locate(tmp_path / "nothing")
    assert "llama.cpp is not built" in str(caught.value) and str(tmp_path / "nothing") in str(caught.value)
    assert llamacpp.available(tmp_path / "nothing") is False
    no_llama_cpp(monkeypatch, tmp_path)
    path = write_recipe(recipe_data(quantization=GGUF, measure=LLAMA))
    assert main(["validate", str(path)]) == 1
    assert "make llama-cpp" in one_line(capsys.readouterr().err, "invalid: ")
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "make llama-cpp" in one_line(capsys.readouterr().err, "error: ")


def test_a_tool_that_cannot_start_is_a_clear_error(tmp_path):
    empty = llamacpp.LlamaCpp(tmp_path, tmp_path, tmp_path)
    with pytest.raises(QuantlabError, match=r"llama-quantize: could not start .*make llama-cpp"):
        llamacpp.run_tool(empty, ["llama-quantize", "--help"], "llama-quantize")


@pytest.mark.parametrize("case, content, expected", [
    ("empty file", b"", "not a GGUF file (it starts with b'', not b'GGUF')"),
    ("not a GGUF", b"PK\x03\x04 a zip, say" * 20, "not a GGUF file (it starts with b'PK\\x03\\x04'"),
    ("magic then junk", b"GGUF" + bytes(range(7, 250)) * 4, "a damaged GGUF header"),
    ("magic then 0xff", b"GGUF" + b"\xff" * 300, "a damaged GGUF header"),
    ("magic only", b"GGUF", "truncated"),
])
def test_read_header_refuses_what_is_not_a_gguf(case, content, expected, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(QuantlabError) as caught:
        read_header(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def test_read_header_of_a_missing_file(tmp_path):
    with pytest.raises(QuantlabError, match="no such GGUF file"):
        read_header(tmp_path / "absent.gguf")
    with pytest.raises(QuantlabError, match="no such GGUF file"):
        read_header(tmp_path)  # a folder


@needs_llama
@pytest.mark.slow
@pytest.mark.parametrize("cut", ["half", "last byte", "last tensor"])
def test_read_header_refuses_a_gguf_cut_short_in_its_data(cut, ggufs, tmp_path):
    src = ggufs["BF16"]
    size = src.stat().st_size
    keep = {"half": size // 2, "last byte": size - 1, "last tensor": size - 10_000}[cut]
    path = truncated_copy(src, tmp_path / "cut.gguf", keep)
    with pytest.raises(QuantlabError) as caught:
        read_header(path)
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)


@needs_llama
@pytest.mark.slow
def test_read_header_says_truncated_for_a_gguf_cut_short_in_its_data(ggufs, tmp_path):
    size = ggufs["BF16"].stat().st_size
    path = truncated_copy(ggufs["BF16"], tmp_path / "cut.gguf", size // 2)
    with pytest.raises(QuantlabError, match=f"truncated: .* the file has {size // 2:,} bytes"):
        read_header(path)


# ---- 2. conversion of the bundled model ------------------------------------------------------------------------

@needs_llama
@pytest.mark.slow
def test_bf16_conversion_header(ggufs):
    from safetensors import safe_open

    header = read_header(ggufs["BF16"])
    assert header.architecture == "qwen35" and header.block_count == 4 and not header.has_mtp()
    assert header.file_type == 32  # LLAMA_FTYPE_MOSTLY_BF16
    assert header.file_bytes == ggufs["BF16"].stat().st_size
    with safe_open(BUNDLED / "model.safetensors", "pt") as f:
        shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
    assert len(header.tensors) == len(shapes) == 56
    assert header.parameters == sum(math.prod(s) for s in shapes.values()) == BUNDLED_PARAMETERS
    assert not [t.name for t in header.tensors if "nextn" in t.name or "mtp" in t.name]
    assert {t.name.split(".")[1] for t in header.tensors if t.name.startswith("blk.")} == {"0", "1", "2", "3"}
    types = {t.name: t.type_name for t in header.tensors}
    assert types["token_embd.weight"] == types["output.weight"] == types["blk.0.ffn_down.weight"] == "BF16"
    assert all(types[n] == "F32" for n in types if n.endswith("norm.weight"))
    by_name = {t.name: t for t in header.tensors}
    assert by_name["token_embd.weight"].shape == (256, 2048)  # GGUF order: hidden first, then the vocabulary
    assert by_name["blk.3.attn_q.weight"].nbytes == 256 * 512 * 2
    assert header.tensor_bytes == sum(t.nbytes for t in header.tensors) < header.file_bytes


@needs_llama
@pytest.mark.slow
def test_gguf_tokenizer_gives_the_reference_ids(ggufs, runtime):
    import gguf
    from transformers import AutoTokenizer

    from quantlab.text.heldout import default_text
    from quantlab.llamacpp.binding import library

    assert gguf.GGUFReader(ggufs["BF16"]).fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # gguf_convert's name
    lib = library()
    params = lib.llama_model_default_params()
    params.vocab_only = True
    model = lib.llama_model_load_from_file(str(ggufs["BF16"]).encode(), params)
    assert model
    try:
        vocab = lib.llama_model_get_vocab(model)

        def llama_ids(text: str, parse_special: bool = False) -> list[int]:
            data = text.encode("utf-8")
            room = len(data) + 16
            out = (lib.llama_token * room)()
            n = lib.llama_tokenize(vocab, data, len(data), out, room, False, parse_special)
            assert n >= 0
            return list(out[:n])

        reference = AutoTokenizer.from_pretrained(BUNDLED)
        heldout = default_text("heldout").text
        texts = [heldout[start:start + 3000] for start in (0, len(heldout) // 3, 2 * len(heldout) // 3)]
        texts.append(Path(json.__file__).read_text()[:3000])  # Python source, indentation and all
        texts.append("  café\tnaïve — ünïcödé 日本語 🎉\r\n\n   x = 1;\u00a0end  ")
        for text in texts:
            ids = reference(text, add_special_tokens=False)["input_ids"]
            assert len(ids) > 10
            assert llama_ids(text) == ids, text[:80]
        # the tokenizer's special token, written in the text: transformers reads it as the token, as llama.cpp
        # does when asked to parse special tokens (and not otherwise)
        special = "a<|endoftext|>b"
        ids = reference(special, add_special_tokens=False)["input_ids"]
        assert ids == [llama_ids("a")[0], reference.eos_token_id, llama_ids("b")[0]]
        assert llama_ids(special, parse_special=True) == ids and llama_ids(special) != ids
    finally:
        lib.llama_model_free(model)


@needs_llama
@pytest.mark.slow
def test_gguf_logits_agree_with_transformers_and_quantization_costs_some(ggufs, load_gguf):
    """The BF16 GGUF computes the bundled model as transformers does; Q4_K_M drifts further from it than BF16."""
    from transformers import AutoTokenizer

    from quantlab.text.heldout import default_text
    from quantlab.recipe import ModelSpec

    from conftest import load_source

    tokenizer = AutoTokenizer.from_pretrained(BUNDLED)
    ids = torch.tensor([tokenizer(default_text("heldout").text[5000:7000], add_special_tokens=False)["input_ids"][:200]])
    hf = load_source(ModelSpec(source="bundled", device="cpu")).model
    with torch.no_grad():
        reference = torch.log_softmax(hf(input_ids=ids).logits[0].double(), -1)

    def compare(kind: str) -> tuple[float, float]:
        logits = load_gguf(ggufs[kind])(ids).logits
        assert logits.shape == (1, ids.shape[1], 2048) and torch.isfinite(logits).all()
        candidate = torch.log_softmax(logits[0].double(), -1)
        kl = (reference.exp() * (reference - candidate)).sum(-1).mean().item()
        agree = (candidate.argmax(-1) == reference.argmax(-1)).double().mean().item()
        return kl, agree

    (kl_bf16, agree_bf16), (kl_q8, _), (kl_q4, _) = compare("BF16"), compare("Q8_0"), compare("Q4_K_M")
    assert agree_bf16 >= 0.95 and kl_bf16 < 1e-3, (agree_bf16, kl_bf16)
    assert kl_q4 > kl_bf16 and kl_q4 > kl_q8, (kl_bf16, kl_q8, kl_q4)


def test_gpt2_byte_level_detection(tmp_path):
    from quantlab.llamacpp.convert import _is_gpt2_byte_level

    assert _is_gpt2_byte_level(BUNDLED)
    data = json.loads((BUNDLED / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {**data["pre_tokenizer"], "add_prefix_space": True}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    assert not _is_gpt2_byte_level(tmp_path)
    assert not _is_gpt2_byte_level(tmp_path / "absent")


# ---- 3. the sparse converter -----------------------------------------------------------------------------------

def _holes_supported(folder: Path) -> bool:
    probe = folder / "hole-probe"
    with probe.open("wb") as f:
        f.seek(4 * 2**20)
        f.write(b"x")
    supported = probe.stat().st_blocks * 512 < 2**20
    probe.unlink()
    return supported


@needs_llama
@pytest.mark.slow
def test_sparse_conversion_has_the_same_header_and_size_but_no_data(ggufs, tools, tmp_path):
    import gguf

    from quantlab.llamacpp.steps import convert, quantize

    if not _holes_supported(tmp_path):
        pytest.skip("this file system does not keep holes in sparse files")
    dense, sparse = ggufs["BF16"], tmp_path / "sparse.gguf"
    convert(tools, BUNDLED, sparse, "bf16", mtp=False, sparse=True)
    a, b = read_header(dense), read_header(sparse)
    assert [(t.name, t.type_name, t.shape, t.nbytes) for t in a.tensors] == \
           [(t.name, t.type_name, t.shape, t.nbytes) for t in b.tensors]
    assert a.metadata == b.metadata
    ra, rb = gguf.GGUFReader(dense), gguf.GGUFReader(sparse)
    assert [t.data_offset for t in ra.tensors] == [t.data_offset for t in rb.tensors]
    assert ra.data_offset == rb.data_offset
    head = ra.data_offset  # everything before the tensor data is byte for byte the converter's own
    assert sparse.read_bytes()[:head] == dense.read_bytes()[:head]
    assert sparse.stat().st_size == dense.stat().st_size
    allocated = sparse.stat().st_blocks * 512
    assert allocated < sparse.stat().st_size / 20, (allocated, sparse.stat().st_size)
    assert dense.stat().st_blocks * 512 > dense.stat().st_size / 2  # the dense one is really written
    assert not any(rb.tensors[i].data.any() for i in range(len(rb.tensors)))  # holes read as zeros
    # llama-quantize plans a sparse file as it plans the real one: sizes depend on shapes and types
    plan = [re.search(r"quant size\s*=\s*([\d.]+ MiB)", quantize(tools, f, tmp_path / "x.gguf", "Q4_K_M", None,
                                                                   dry_run=True)).group(1) for f in (dense, sparse)]
    assert plan[0] == plan[1]
    assert not (tmp_path / "x.gguf").exists()


# ---- 4. llama-quantize -----------------------------------------------------------------------------------------

@needs_llama
@pytest.mark.slow
def test_quantized_files_have_llama_cpps_types_and_sizes(ggufs):
    from quantlab.llamacpp.steps import tensor_types

    headers = {kind: read_header(path) for kind, path in ggufs.items()}
    assert headers["Q8_0"].file_type == 7 and headers["Q4_K_M"].file_type == 15  # LLAMA_FTYPE_MOSTLY_*
    for header in headers.values():
        assert header.architecture == "qwen35" and header.parameters == BUNDLED_PARAMETERS
    names = [t.name for t in headers["BF16"].tensors]
    assert sorted(t.name for t in headers["Q4_K_M"].tensors) == sorted(names)
    q4 = tensor_types(ggufs["Q4_K_M"])
    assert set(q4.values()) == {"Q4_K", "Q6_K", "F32"}
    assert all(q4[n] == "F32" for n in names if n.endswith("norm.weight"))
    assert q4["output.weight"] == "Q6_K" and q4["blk.0.ffn_gate.weight"] == "Q4_K"
    q8 = tensor_types(ggufs["Q8_0"])
    assert set(q8.values()) == {"Q8_0", "F32"} and all(q8[n] == "F32" for n in names if n.endswith("norm.weight"))
    assert all(q8[n] == q4[n] == "F32" for n, t in tensor_types(ggufs["BF16"]).items() if t == "F32")
    sizes = {kind: path.stat().st_size for kind, path in ggufs.items()}
    assert sizes["BF16"] > sizes["Q8_0"] > sizes["Q4_K_M"], sizes
    assert headers["Q4_K_M"].parameters_by_type()["Q4_K"] > headers["Q4_K_M"].parameters_by_type()["Q6_K"]


@needs_llama
@pytest.mark.slow
def test_quantize_dry_run_reports_the_size_and_writes_nothing(ggufs, tools, tmp_path):
    from quantlab.llamacpp.steps import quantize

    out = quantize(tools, ggufs["BF16"], tmp_path / "never.gguf", "Q4_K_M", None, dry_run=True)
    size = re.search(r"quant size\s*=\s*([\d.]+) MiB", out)
    assert size and 0.5 < float(size.group(1)) < 4  # 2.2 MiB, against 7 MiB in BF16
    assert "model size" in out
    assert list(tmp_path.iterdir()) == []


@needs_llama
@pytest.mark.slow
def test_needs_imatrix_list_agrees_with_llama_quantize(ggufs, tools, tmp_path):
    """What llama-quantize --dry-run says needs an imatrix is what quantlab refuses without one (IQ3_XS included)."""
    from quantlab.llamacpp.steps import quantize

    assert llamacpp.NEEDS_IMATRIX <= set(llamacpp.quant_types(tools))
    disagree = []
    for kind in llamacpp.quant_types(tools):
        out = quantize(tools, ggufs["BF16"], tmp_path / "x.gguf", kind, None, dry_run=True)
        if ("will require an imatrix" in out) != (kind in llamacpp.NEEDS_IMATRIX):
            disagree.append(kind)
    assert disagree == []
    assert list(tmp_path.iterdir()) == []


@needs_llama
@pytest.mark.slow
def test_quantize_failure_quotes_llama_quantize_and_leaves_no_file(ggufs, tools, tmp_path):
    from quantlab.llamacpp.steps import quantize

    with pytest.raises(QuantlabError, match=r"llama-quantize IQ2_XXS failed \(exit \d+\); its last lines:") as caught:
        quantize(tools, ggufs["BF16"], tmp_path / "iq2.gguf", "IQ2_XXS", None)
    assert "requires an imatrix" in str(caught.value)
    assert len(str(caught.value).splitlines()) <= llamacpp.TAIL_LINES + 1
    assert not (tmp_path / "iq2.gguf").exists()


# ---- 5. the llama.cpp runtime ----------------------------------------------------------------------------------

@needs_llama
@pytest.mark.slow
def test_runtime_loads_a_gguf_and_describes_it(ggufs, runtime):
    loaded = runtime.load(LoadRequest(SOURCE, torch.device("cpu"), gguf=Path(ggufs["Q4_K_M"]), settings=settings()))
    model = loaded.model
    try:
        info = loaded.info
        assert info.model_class == "GGUF qwen35" and info.location == str(ggufs["Q4_K_M"])
        assert info.dtype.startswith("Q4_K ") and "Q6_K" in info.dtype
        assert runtime.vocab_size(model) == 2048
        assert runtime.parameter_count(model) == BUNDLED_PARAMETERS
        header = read_header(ggufs["Q4_K_M"])
        assert runtime.weight_bytes(model) == header.tensor_bytes
        assert runtime.lookup_table_bytes(model) == next(t.nbytes for t in header.tensors if t.name == "token_embd.weight")
        kernels = runtime.kernels(model)
        assert "ggml Q4_K" in kernels.linear and "ggml Q6_K" in kernels.linear
        assert runtime.settings(model) == settings().as_dict()
        assert model.context is None and all(k.endswith(" model") for k in model.buffers)  # no context yet
        assert sum(model.buffers.values()) > 0
    finally:
        model.close()
    assert model.model is None


@needs_llama
@pytest.mark.slow
def test_greedy_prefill_and_decode_are_deterministic_and_match_a_full_forward(ggufs, runtime, load_gguf):
    model = load_gguf(ggufs["Q4_K_M"])
    runtime.prepare_point(model, 64, 1, 12)
    prompt = torch.tensor([[(7 * i + 3) % 2000 + 10 for i in range(64)]])

    def greedy() -> torch.Tensor:
        first, cache = runtime.prefill(model, prompt)
        assert first.shape == (1, 1) and cache == 64
        return runtime.decode(model, first, cache, 12)

    tokens = greedy()
    assert tokens.shape == (1, 13) and ((0 <= tokens) & (tokens < 2048)).all()
    assert torch.equal(greedy(), tokens)  # the memory (KV and recurrent state) is cleared between prefills
    assert len(set(tokens[0].tolist())) > 1
    # teacher forcing: the full forward over prompt + generated picks (up to a tie) each generated token
    logits = model(torch.cat([prompt, tokens[:, :-1]], 1), logits_to_keep=13).logits[0]
    picked = logits.gather(1, tokens[0][:, None])[:, 0]
    assert (logits.max(-1).values - picked).max() < 1e-3


@needs_llama
@pytest.mark.slow
def test_buffers_are_llama_cpps_accounting_and_kv_grows_with_the_context(ggufs, runtime, load_gguf):
    model = load_gguf(ggufs["Q4_K_M"])
    runtime.prepare_point(model, 256, 1, 8)
    small = runtime.point_buffers(model)
    for key in ("CPU KV", "CPU RS", "CPU compute"):
        assert small.get(key, 0) > 0, small
    assert any(k.endswith(" model") for k in small)
    runtime.prepare_point(model, 2048, 1, 8)
    large = runtime.point_buffers(model)
    assert 3 * small["CPU KV"] < large["CPU KV"] < 20 * small["CPU KV"], (small, large)
    assert large["CPU RS"] == small["CPU RS"]  # the DeltaNet layers' recurrent state does not grow with the context
    assert model_buffers(large) == model_buffers(small)
    runtime.prepare_point(model, 256, 1, 8)  # each point gets a context of its own size: its buffers are its own
    assert runtime.point_buffers(model) == small
    model.ensure_context(100)  # the quality harness's windows reuse a larger context
    assert runtime.point_buffers(model) == small
    model.free_context()
    assert model.context is None and runtime.point_buffers(model) == model_buffers(large)
    with pytest.raises(QuantlabError, match="measures batch 1"):
        runtime.prepare_point(model, 256, 4, 8)


@needs_llama
@pytest.mark.slow
def test_callable_model_gives_the_last_logits_of_a_window(ggufs, load_gguf):
    model = load_gguf(ggufs["Q4_K_M"])
    ids = torch.tensor([[(11 * i + 5) % 2000 + 10 for i in range(40)]])
    every = model(ids).logits
    assert every.shape == (1, 40, 2048) and every.dtype == torch.float32 and torch.isfinite(every).all()
    last = model(input_ids=ids, use_cache=False, logits_to_keep=7).logits
    assert last.shape == (1, 7, 2048)
    torch.testing.assert_close(last, every[:, -7:], atol=1e-4, rtol=1e-4)
    assert not torch.equal(every[0, 0], every[0, -1])


@needs_llama
@pytest.mark.slow
def test_window_longer_than_the_batch_gives_all_its_logits(ggufs, load_gguf):
    ids = torch.tensor([[(13 * i + 1) % 2000 + 10 for i in range(40)]])
    whole = load_gguf(ggufs["BF16"])(ids).logits
    chunked = load_gguf(ggufs["BF16"], batch=16)(ids).logits
    torch.testing.assert_close(chunked, whole, atol=0.05, rtol=0.01)


@needs_llama
@pytest.mark.slow
def test_loading_a_broken_gguf_is_a_clear_error(ggufs, runtime, tmp_path):
    size = ggufs["Q4_K_M"].stat().st_size
    cut = truncated_copy(ggufs["Q4_K_M"], tmp_path / "cut.gguf", size // 2)
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"\x00" * 4096)
    for path in (cut, not_gguf, tmp_path / "absent.gguf"):
        with pytest.raises(QuantlabError) as caught:
            runtime.load(LoadRequest(SOURCE, torch.device("cpu"), gguf=Path(path), settings=settings()))
        assert str(caught.value).startswith(str(path)), caught.value


@needs_llama
def test_load_options_follow_measure_llama_cpp(runtime):
    from quantlab.recipe import MeasureSpec

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    default = runtime.options(MeasureSpec(runtime="llama.cpp"), cpu)
    assert default.gpu_layers == 0 and default.threads == torch.get_num_threads()
    assert (default.flash_attn, default.kv_type, default.slots, default.ubatch, default.batch) == ("auto", "f16", 1, 512, 2048)
    assert runtime.options(MeasureSpec(runtime="llama.cpp"), cuda).gpu_layers == 999
    spec = MeasureSpec(runtime="llama.cpp", llama_cpp={"threads": 3, "gpu_layers": 7, "kv_type": "q8_0", "slots": 2,
                                                       "ubatch": 128, "batch": 256, "flash_attn": "on"})
    chosen = runtime.options(spec, cuda)
    assert chosen.as_dict() == dict(threads=3, gpu_layers=7, flash_attn="on", kv_type="q8_0", slots=2, ubatch=128,
                                    batch=256)
    every = MeasureSpec(runtime="llama.cpp", llama_cpp={"gpu_layers": "all"})
    assert runtime.options(every, cuda).gpu_layers == 999
    assert runtime.options(every, cpu).gpu_layers == 0  # on the CPU nothing is offloaded
    none = MeasureSpec(runtime="llama.cpp", llama_cpp={"gpu_layers": 0})
    assert runtime.options(none, cuda).gpu_layers == 0


RUNTIME_SCRIPT = """
    import gc, sys
    from pathlib import Path
    from types import SimpleNamespace
    import torch
    from quantlab.errors import QuantlabError
    from quantlab.llamacpp.binding import LlamaCppSettings
    from quantlab.runtimes.base import LoadRequest
    from quantlab.runtimes.libllama import LlamaCppRuntime
    source = SimpleNamespace(name="b", spec=SimpleNamespace(source="bundled", variant="text"), weights="real", config=None)
    settings = LlamaCppSettings(threads=1, gpu_layers=0, flash_attn="auto", kv_type="f16", slots=1, ubatch=512, batch=2048)
    first = LlamaCppRuntime()
    model = first.load(LoadRequest(source, torch.device("cpu"), gguf=Path(sys.argv[1]), settings=settings)).model
"""


@needs_llama
@pytest.mark.slow
def test_a_second_runtime_leaves_the_first_ones_accounting_alone(ggufs):
    script = RUNTIME_SCRIPT + """
    second = LlamaCppRuntime()
    first.prepare_point(model, 64, 1, 4)
    print("with two:", sorted(model.buffers), flush=True)
    del second
    gc.collect()
    model.free_context()
    first.prepare_point(model, 128, 1, 4)
    print("after:", sorted(model.buffers), flush=True)
    """
    out = run_python(script, str(ggufs["Q4_K_M"]))
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all("'CPU KV'" in line for line in lines), out.stdout


@needs_llama
@pytest.mark.slow
def test_decoding_past_the_context_is_an_error_not_an_abort(ggufs):
    script = RUNTIME_SCRIPT + """
    model.ensure_context(16)
    model.clear()
    cells = model.lib.llama_n_ctx(model.context)  # llama.cpp rounds the context up (to 256 cells)
    try:
        model.decode(list(range(5, 15 + cells)), 0, 1)
        print("decoded")
    except QuantlabError as exc:
        print("QuantlabError:", exc)
    """
    out = run_python(script, str(ggufs["Q4_K_M"]))
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.startswith("QuantlabError:"), out.stdout


# ---- 6. llama.cpp's buffer lines -------------------------------------------------------------------------------

def test_parse_buffers_reads_llama_cpps_log_lines():
    lines = [
        "print_info: file size   = 2.24 MiB (5.10 BPW) ",
        "load_tensors:   CPU_Mapped model buffer size =     7.12 MiB",
        "load_tensors:   CPU_REPACK model buffer size =     1.18 MiB",
        "llama_context:        CPU  output buffer size =     0.01 MiB",
        "llama_kv_cache:        CPU KV buffer size =     0.38 MiB",
        "llama_kv_cache: size =    0.38 MiB (   512 cells,   1 layers,  1/1 seqs), K (f16):    0.19 MiB, V (f16):    0.19 MiB",
        "llama_memory_recurrent:        CPU RS buffer size =     0.21 MiB",
        "llama_memory_recurrent: size =    0.21 MiB (     1 cells,   4 layers,  1 seqs  0 rs_seq), R (f32):    0.02 MiB",
        "sched_reserve:        CPU compute buffer size =     3.23 MiB",
        "load_tensors:        CUDA0 model buffer size =  1024.50 MiB",
        "load_tensors:        CUDA1 model buffer size =   512.00 MiB",
        "llama_kv_cache:      CUDA0 KV buffer size =   256.00 MiB",
        "llama_kv_cache:      CUDA0 KV buffer size =   128.00 MiB",  # a second KV cache on the same device: summed
        "sched_reserve:  CUDA_Host compute buffer size =    12.02 MiB",
        "some other line = 3.00 MiB",
    ]
    mib = 2**20
    assert parse_buffers(lines) == {
        "CPU_Mapped model": round(7.12 * mib), "CPU_REPACK model": round(1.18 * mib), "CPU output": round(0.01 * mib),
        "CPU KV": round(0.38 * mib), "CPU RS": round(0.21 * mib), "CPU compute": round(3.23 * mib),
        "CUDA0 model": round(1024.5 * mib), "CUDA1 model": 512 * mib, "CUDA0 KV": 384 * mib,
        "CUDA_Host compute": round(12.02 * mib),
    }
    assert parse_buffers([]) == {} and parse_buffers(["llama_kv_cache: size = 0.38 MiB"]) == {}
    assert model_buffers(parse_buffers(lines)) == {"CPU_Mapped model": round(7.12 * mib),
                                                   "CPU_REPACK model": round(1.18 * mib),
                                                   "CUDA0 model": round(1024.5 * mib), "CUDA1 model": 512 * mib}


def test_fit_print_rows_reads_llama_fit_params_memory_lines():
    """One reader of `llama-fit-params --fit-print` for quantlab/llamacpp/full_size.py and scripts/gpu_check_gguf.py."""
    from quantlab.llamacpp.full_size import fit_print_rows

    out = "\n".join([
        "0.00.018.688 I llama_fit_params: printing estimated memory in MiB to stdout (device, model, context, compute) ...",
        "CUDA0 15234 1234 567",
        "Host 7 0 5",
        "Host 7 0",  # three columns: not a memory line
        "CUDA1 1 2 x",
    ])
    assert fit_print_rows(out) == {"CUDA0": [15234, 1234, 567], "Host": [7, 0, 5]}
    assert fit_print_rows("no memory lines here") == {}


@needs_llama
def test_fit_print_gives_llama_cpps_planned_buffers_in_bytes(ggufs, tools):
    from quantlab.llamacpp.full_size import FIT_PRINT_BUFFERS, fit_print, planned_allocation

    plan = fit_print(tools, ggufs["BF16"], 512, "f16", 1)
    assert set(plan["Host"]) == set(FIT_PRINT_BUFFERS) and all(v % 2**20 == 0 for v in plan["Host"].values())
    assert plan["Host"]["model_bytes"] > 0
    a = planned_allocation(tools, ggufs["BF16"], "BF16", 512, "f16", 1)
    assert a.total == sum(plan["Host"].values()) and a.model_bytes == plan["Host"]["model_bytes"]


# ---- the whole path: quantlab run on a gguf recipe ---------------------------------------------------------------

@needs_llama
def test_bundled_gguf_recipes_validate(capsys):
    paths = sorted((REPO / "recipes").glob("bundled-gguf-*.yaml"))
    assert {p.name for p in paths} >= {f"bundled-gguf-{t}.yaml" for t in ("q4_k_m", "q6_k", "q8_0", "bf16")}
    assert main(["validate", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    for label in ("GGUF Q4_K_M", "GGUF Q6_K", "GGUF Q8_0", "GGUF BF16"):
        assert label in out


@needs_llama
@pytest.mark.slow
def test_quantlab_run_converts_computes_an_imatrix_quantizes_and_measures(write_recipe, tmp_path, capsys, monkeypatch):
    from quantlab.store import load_records

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the run's temporary folder, under tmp_path too
    path = write_recipe(recipe_data(
        "gguf-e2e", quantization={**GGUF, "calibration": {"samples": 2, "seq_len": 64}},
        measure={**LLAMA, "llama_cpp": {"threads": THREADS}}, output={"dir": str(tmp_path / "measurements"),
                                                                      "report": False}))
    assert main(["run", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "llama-imatrix on 2 × 64 tokens" in out and "llama-quantize Q4_K_M" in out and "wrote 1 record(s)" in out
    records, problems = load_records(tmp_path / "measurements")
    assert len(records) == 1 and not problems
    record = records[0]
    assert record.method.name == "gguf" and record.method.label == "GGUF Q4_K_M"
    assert record.runtime.name == "llama.cpp" and record.runtime.settings["threads"] == THREADS
    assert record.model.model_class == "GGUF qwen35" and record.model.name == "quantlab-bundled"
    assert record.parameters == BUNDLED_PARAMETERS and 1e6 < record.weight_bytes < 3e6
    assert record.result.status == "ok" and len(record.result.first_tokens) == 3
    assert {"CPU KV", "CPU RS", "CPU compute"} <= set(record.result.runtime_buffers)
    assert any(n.startswith("calibration: 2 × 64 tokens") for n in record.notes)
    assert any("loaded from disk by llama.cpp" in n for n in record.notes)
    assert not list(tmp_path.glob("quantlab-gguf-*"))  # the temporary GGUF folder is gone


# ---- quantlab build / verify for GGUF ----------------------------------------------------------------------------

@needs_llama
@pytest.mark.slow
def test_gguf_build_is_verified_replaced_with_force_and_tampering_is_caught(write_recipe, tmp_path):
    from quantlab.artifact.verify import verify_build
    from quantlab.artifact.writer import build_recipe

    recipe = write_recipe(recipe_data(quantization={"method": "gguf", "type": "Q8_0"},
                                      measure={**LLAMA, "llama_cpp": {"threads": THREADS}}))
    target = tmp_path / "builds" / "q8"
    quiet = lambda line: None  # noqa: E731
    for _ in range(2):  # the second time replaces the first: a quantlab GGUF build, --force
        result = build_recipe(load_recipe(recipe), target, force=True, measure=False, progress=False, echo=quiet)
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "SHA256SUMS", "imatrix.gguf", "model.gguf",
                                                         "quantlab_gguf_build.json"]
    assert result.disk_bytes == (target / "model.gguf").stat().st_size
    card = (target / "README.md").read_text()
    assert "llama-server -m model.gguf" in card and "ollama create" in card and "| Q8_0 |" in card
    assert [p.name for p in tmp_path.glob("builds/.*")] == []  # no partial folder left
    assert verify_build(target, echo=quiet).ok
    manifest = json.loads((target / "quantlab_gguf_build.json").read_text())
    manifest["greedy"]["tokens"] = [t + 1 for t in manifest["greedy"]["tokens"]]
    (target / "quantlab_gguf_build.json").write_text(json.dumps(manifest))
    assert not verify_build(target, echo=quiet).ok  # the checksum of the manifest no longer matches
    data = bytearray((target / "model.gguf").read_bytes())
    data[-100] ^= 0xFF
    (target / "model.gguf").write_bytes(bytes(data))
    problems = verify_build(target, echo=quiet).problems
    assert any("model.gguf: SHA256 mismatch" in p for p in problems)


@needs_llama
@pytest.mark.slow
def test_gguf_build_refuses_to_replace_a_folder_it_did_not_make(write_recipe, tmp_path):
    from quantlab.artifact.writer import build_recipe

    recipe = write_recipe(recipe_data(quantization={"method": "gguf", "type": "Q8_0"},
                                      measure={**LLAMA, "llama_cpp": {"threads": THREADS}}))
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(QuantlabError, match="replaces only a folder that quantlab built"):
        build_recipe(load_recipe(recipe), target, force=True, measure=False, progress=False, echo=lambda line: None)
    assert (target / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["mine", "recipe.yaml"]


@needs_llama
@pytest.mark.slow
def test_per_class_types_reach_llama_quantize(ggufs, tools, tmp_path):
    from quantlab.llamacpp.names import tensor_type_args
    from quantlab.llamacpp.steps import quantize

    out = tmp_path / "mixed.gguf"
    quantize(tools, ggufs["BF16"], out, "Q4_K_M", None,
             tensor_types=tensor_type_args({"mlp.down": "Q8_0", "deltanet.in_proj_ab": "q8_0", "attention.q": "Q5_K",
                                            "lm_head": "Q8_0"}))
    types = {t.name: t.type_name for t in read_header(out).tensors}
    assert {types[f"blk.{i}.ffn_down.weight"] for i in range(4)} == {"Q8_0"}
    assert types["blk.0.ssm_alpha.weight"] == types["blk.0.ssm_beta.weight"] == "Q8_0"
    assert types["blk.0.ffn_up.weight"] == "Q4_K"
    assert types["blk.3.attn_q.weight"] == "Q5_K" and types["output.weight"] == "Q8_0"
    # llama-quantize searches each pattern in the name: attn_q must not take attn_qkv, nor output attn_output
    assert types["blk.0.attn_qkv.weight"] == "Q4_K" and types["blk.3.attn_output.weight"] == "Q4_K"


def test_per_class_types_name_known_classes():
    from quantlab.methods.gguf import GgufConfig

    with pytest.raises(ValueError, match="have no GGUF name"):
        GgufConfig(method="gguf", overrides={"mlp.sideways": "Q8_0"})
    with pytest.raises(ValueError, match="not a llama.cpp type"):
        GgufConfig(method="gguf", overrides={"mlp.down": "Q8 0"})


@needs_llama
def test_a_cpu_only_build_refuses_a_gpu_device(ggufs, runtime):
    """Records must not say GPU for a model llama.cpp ran on the CPU."""
    if runtime.lib.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp build has a GPU backend")
    with pytest.raises(QuantlabError, match="no GPU backend"):
        runtime.load(LoadRequest(SOURCE, torch.device("cuda"), gguf=Path(ggufs["Q4_K_M"]), settings=settings()))
