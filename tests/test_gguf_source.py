"""`model.source: gguf`: a GGUF file someone else made, measured as it is. The fixtures are written by llama.cpp's own
tools from the bundled model (its converter, which knows the bundled tokenizer's pre-tokenizer only through
quantlab.llamacpp.convert's one naming addition, then llama-quantize called directly), with no quantlab manifest
beside them; everything is written under pytest's temporary folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from quantlab import llamacpp
from quantlab.cli import main
from quantlab.errors import QuantlabError
from quantlab.llamacpp.gguf_file import read_header
from quantlab.llamacpp.header_config import header_config
from quantlab.llamacpp.steps import convert
from quantlab.recipe import load_recipe
from quantlab.report import write_report
from quantlab.run import run_recipe
from quantlab.store import load_records

from conftest import REPO, forbid_weight_loads

BUNDLED = REPO / "quantlab" / "bundled" / "model"
pytestmark = pytest.mark.skipif(not llamacpp.available(), reason="llama.cpp is not built here (`make llama-cpp`)")
LLAMA = {"runtime": "llama.cpp", "contexts": [16, 64], "new_tokens": 4, "warmup": 0, "repeats": 2,
         "llama_cpp": {"threads": 1}}
QUALITY = {"tokens": 2048, "context": 256}


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> dict[str, Path]:
    """BF16 and Q4_K_M GGUFs of the bundled model, made by llama.cpp's tools alone, in a folder of their own."""
    tools = llamacpp.locate()
    folder = tmp_path_factory.mktemp("published")
    bf16, q4 = folder / "bundled-BF16.gguf", folder / "bundled-Q4_K_M.gguf"
    convert(tools, BUNDLED, bf16, "bf16", mtp=False)  # llama.cpp's converter (quantlab names the bundled tokenizer)
    llamacpp.run_tool(tools, ["llama-quantize", str(bf16), str(q4), "Q4_K_M"], "llama-quantize")
    assert sorted(p.name for p in folder.iterdir()) == [bf16.name, q4.name]  # no manifest, no card
    return {"BF16": bf16, "Q4_K_M": q4}


def gguf_recipe(write_recipe, path: Path, name: str = "published", claimed: str | None = None, **changes) -> Path:
    model = {"source": "gguf", "path": str(path), **({"claimed_size": claimed} if claimed else {})}
    data = {"name": name, "model": model, "measure": dict(LLAMA),
            "quality": {**QUALITY, "reference": {"model": {"source": "bundled"}}}}
    data.update(changes)
    return write_recipe(data, f"{name}.yaml")


def one_error(capsys, argv: list[str]) -> str:
    assert main(argv) == (1 if argv[0] == "validate" else 2)
    err = capsys.readouterr().err
    assert err.startswith(("error: ", "invalid: ")) and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_the_header_stands_for_the_checkpoints_config(foreign):
    from transformers import AutoConfig

    made, original = header_config(read_header(foreign["Q4_K_M"])).to_dict(), AutoConfig.from_pretrained(BUNDLED).to_dict()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "layer_types", "linear_conv_kernel_dim", "linear_key_head_dim",
                "linear_num_key_heads", "linear_num_value_heads", "linear_value_head_dim", "max_position_embeddings",
                "rms_norm_eps", "tie_word_embeddings", "rope_parameters", "model_type"):
        assert made[key] == original[key], key


def test_the_plan_reads_the_file_and_no_weights_load(foreign, write_recipe, monkeypatch):
    from quantlab.plan import make_plan

    forbid_weight_loads(monkeypatch)
    plan = make_plan(load_recipe(gguf_recipe(write_recipe, foreign["Q4_K_M"])))
    header = read_header(foreign["Q4_K_M"])
    assert plan.method_label == "GGUF Q4_K_M (no imatrix)" and plan.method_name == "gguf"
    assert plan.method_params["type"] == "Q4_K_M" and plan.method_params["imatrix"] is False
    assert plan.weight_bytes == header.tensor_bytes and plan.parameters == header.parameters
    assert plan.model_class == "Qwen3_5ForCausalLM"


def test_a_published_gguf_measures_as_quantlabs_own_build_of_it(foreign, write_recipe, tmp_path):
    """The acceptance in small: the same Q4_K_M, once read as someone's file and once built by quantlab from the
    bundled model with the same type and no imatrix: one sha256, and identical sizes and KL."""
    out = tmp_path / "m"
    theirs = run_recipe(load_recipe(gguf_recipe(write_recipe, foreign["Q4_K_M"], claimed="3MB")), out,
                        progress=False, echo=lambda _: None).records
    ours_recipe = write_recipe({"name": "ours", "model": {"source": "bundled"}, "measure": dict(LLAMA),
                                "quantization": {"method": "gguf", "type": "Q4_K_M", "imatrix": False},
                                "quality": QUALITY}, "ours.yaml")
    ours = run_recipe(load_recipe(ours_recipe), out, progress=False, echo=lambda _: None).records
    assert [r.point.context for r in theirs] == [r.point.context for r in ours] == [16, 64]
    for a, b in zip(theirs, ours):
        assert a.file.sha256 == b.file.sha256 and a.file.bytes == b.file.bytes == foreign["Q4_K_M"].stat().st_size
        assert a.file.tensor_types == b.file.tensor_types and a.file.plan == b.file.plan
        assert a.weight_bytes == b.weight_bytes and a.parameters == b.parameters
        assert a.quality.kl_mean == b.quality.kl_mean and a.quality.tokens == b.quality.tokens
        assert a.method.label == b.method.label == "GGUF Q4_K_M (no imatrix)"
        assert a.model.source == "gguf" and b.model.source == "bundled"
        assert a.file.made_by.startswith("not quantlab") and b.file.made_by.startswith("quantlab")
        assert a.file.claimed_bytes == 3_000_000 and b.file.claimed_bytes is None
        assert a.file.plan.total > 0 and a.file.plan.context == a.point.context
    assert len(load_records(out)[0]) == 4
    report = write_report(out).read_text()
    section = report[report.index("## Published builds"):]
    assert section.count(f"`{theirs[0].file.sha256[:12]}`") == 4 and "| 3.0 MB |" in section


def test_a_gguf_of_another_architecture_is_one_line(tmp_path, write_recipe, capsys):
    import gguf
    import numpy as np

    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    err = one_error(capsys, ["validate", str(gguf_recipe(write_recipe, path))])
    assert "a GGUF of architecture 'llama'; quantlab measures qwen35" in err


def test_a_truncated_gguf_is_one_line(foreign, tmp_path, write_recipe, capsys):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(foreign["Q4_K_M"].read_bytes()[: foreign["Q4_K_M"].stat().st_size // 2])
    err = one_error(capsys, ["run", str(gguf_recipe(write_recipe, cut)), "--no-progress"])
    assert "cut.gguf: truncated: its header places" in err and "the file has 1,2" in err


def test_a_reference_with_another_vocabulary_is_refused_before_any_load(foreign, tmp_path, write_recipe, capsys,
                                                                       monkeypatch):
    forbid_weight_loads(monkeypatch)
    other = tmp_path / "other-tokenizer"
    shutil.copytree(BUNDLED, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[300], list(vocab)[301]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    recipe = gguf_recipe(write_recipe, foreign["Q4_K_M"],
                         quality={**QUALITY, "reference": {"model": {"source": "local", "path": str(other)}}})
    err = one_error(capsys, ["run", str(recipe), "--no-progress"])
    assert "does not tokenize as the GGUF" in err and "vocabulary: token id 300 is" in err


@pytest.mark.parametrize("changes, expected", [
    ({"quantization": {"method": "gguf", "type": "Q8_0"}}, "model.source gguf is a file already quantized"),
    ({"measure": {"runtime": "transformers"}}, "the transformers runtime does not load GGUF files; set measure.runtime: llama.cpp"),
    ({"quality": QUALITY}, "cannot be its own reference"),
    ({"quality": {**QUALITY, "reference": {"model": {"source": "gguf", "path": "x.gguf"}}}},
     "source gguf cannot be the reference"),
])
def test_recipes_that_cannot_measure_a_gguf_are_one_line(changes, expected, foreign, write_recipe, capsys):
    err = one_error(capsys, ["validate", str(gguf_recipe(write_recipe, foreign["Q4_K_M"], **changes))])
    assert expected in err


def test_a_folder_or_a_missing_file_is_one_line(tmp_path, write_recipe, capsys):
    assert "is a folder; source: gguf takes the .gguf file itself" in one_error(
        capsys, ["validate", str(gguf_recipe(write_recipe, tmp_path))])
    assert "no such GGUF file" in one_error(capsys, ["validate", str(gguf_recipe(write_recipe, tmp_path / "no.gguf"))])


def test_model_fields_that_a_gguf_does_not_take(write_recipe, capsys):
    for model, expected in [({"source": "gguf"}, "needs model.path (a GGUF file) or model.id and model.file"),
                            ({"source": "gguf", "id": "a/b"}, "needs both model.id (the repo) and model.file"),
                            ({"source": "gguf", "path": "a.gguf", "dtype": "bfloat16"}, "model.dtype is not used with source 'gguf'"),
                            ({"source": "bundled", "claimed_size": "3GB"}, "source 'bundled' is quantlab's own")]:
        path = write_recipe({"name": "x", "model": model, "measure": {"runtime": "llama.cpp"}})
        assert expected in one_error(capsys, ["validate", str(path)])


def test_the_gguf_tokenizer_is_the_checkpoints(foreign):
    from transformers import AutoTokenizer

    from quantlab.tokenizer_match import first_difference, tokenizer_identity

    ggufs = AutoTokenizer.from_pretrained(str(foreign["Q4_K_M"].parent), gguf_file=foreign["Q4_K_M"].name)
    checkpoint = AutoTokenizer.from_pretrained(BUNDLED)
    assert first_difference(ggufs, checkpoint, "a", "b") is None
    assert tokenizer_identity(ggufs) == tokenizer_identity(checkpoint)


def test_the_estimator_reads_a_gguf_header(foreign, capsys):
    assert main(["estimate", "--model", str(foreign["Q4_K_M"]), "--runtime", "llama.cpp", "--methods", "q4_k_m",
                 "--contexts", "256", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"bundled-Q4_K_M (Qwen3_5ForCausalLM, from {foreign['Q4_K_M']})")
    assert "GGUF Q4_K_M read from its header (qwen35" in out


def test_a_hub_gguf_that_cannot_be_fetched_says_how(write_recipe, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    path = write_recipe({"name": "x", "model": {"source": "gguf", "id": "someone/Qwen3.6-27B-GGUF",
                                                "file": "Qwen3.6-27B-Q4_K_M.gguf"}, "measure": {"runtime": "llama.cpp"}})
    err = one_error(capsys, ["validate", str(path)])
    assert "Qwen3.6-27B-Q4_K_M.gguf is not in the Hugging Face cache" in err and "hf download" in err


def test_not_a_quantlab_error_path(foreign):
    with pytest.raises(QuantlabError, match="transformers does not"):
        from quantlab.model_spec import ModelSpec
        from quantlab.sources import resolve

        resolve(ModelSpec(source="gguf", path=str(foreign["BF16"]))).load_location()


def rewritten(src: Path, dst: Path, values: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    """`src` written again by gguf-py with some metadata changed (key -> (value, GGUFValueType)) or dropped."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    values, reader = values or {}, GGUFReader(src)
    writer = GGUFWriter(str(dst), "qwen35")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop or name in values:
            continue
        kind = field.types[0]
        extra = {"sub_type": field.types[1]} if kind == GGUFValueType.ARRAY else {}
        writer.add_key_value(name, field.contents(), kind, **extra)
    for name, (value, kind) in values.items():
        writer.add_key_value(name, value, kind)
    for t in reader.tensors:
        data = np.array(t.data)
        writer.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.mark.parametrize("values, drop, expected", [
    ({"qwen35.block_count": 10**9}, (), "qwen35.block_count is '1000000000'; a whole number from 1 to"),
    ({"qwen35.ssm.time_step_rank": 0}, (), "qwen35.ssm.time_step_rank is '0'"),
    ({"qwen35.attention.key_length": 0}, (), "qwen35.attention.key_length is '0'"),
    ({"qwen35.full_attention_interval": 0}, ("qwen35.attention.recurrent_layers",), "full_attention_interval is '0'"),
    ({"qwen35.nextn_predict_layers": 10}, (), "block_count 4 with nextn_predict_layers 10 leaves -6 decoder layers"),
    ({"qwen35.context_length": "abc"}, (), "qwen35.context_length is 'abc'"),
    ({"qwen35.embedding_length": 512}, (), "embedding_length 512, its token_embd tensor is 256 wide"),
    ({"qwen35.feed_forward_length": 4_000_000_000}, (), "feed_forward_length is '4000000000'"),
    ({}, ("qwen35.ssm.conv_kernel",), "its header has no qwen35.ssm.conv_kernel"),
])
def test_a_damaged_header_is_one_line_before_any_work(values, drop, expected, foreign, tmp_path, write_recipe, capsys):
    from gguf import GGUFValueType

    typed = {k: (v, GGUFValueType.STRING if isinstance(v, str) else GGUFValueType.UINT32) for k, v in values.items()}
    damaged = rewritten(foreign["Q4_K_M"], tmp_path / "damaged.gguf", typed, drop)
    assert expected in one_error(capsys, ["validate", str(gguf_recipe(write_recipe, damaged))])
    assert expected in one_error(capsys, ["estimate", "--model", str(damaged), "--no-write"])


def test_a_gguf_written_again_unchanged_still_plans(foreign, tmp_path, write_recipe):
    """The rewriter above changes nothing by itself: the damaged-header cases fail for their one change."""
    from quantlab.plan import make_plan

    same = rewritten(foreign["Q4_K_M"], tmp_path / "same.gguf")
    assert make_plan(load_recipe(gguf_recipe(write_recipe, same)), for_this_machine=False).method_label == \
        "GGUF Q4_K_M (no imatrix)"


def test_the_model_a_header_names_goes_in_the_records_file_section(foreign, tmp_path):
    from gguf import GGUFValueType

    from quantlab.llamacpp.gguf_file import header_model_name
    from quantlab.model_file import describe_gguf

    assert header_model_name(read_header(foreign["Q4_K_M"])) is None  # converted from a folder named "model"
    named = rewritten(foreign["Q4_K_M"], tmp_path / "named.gguf", {
        "general.basename": ("Qwen3.6", GGUFValueType.STRING), "general.size_label": ("27B", GGUFValueType.STRING)})
    files, notes = describe_gguf(named, "not quantlab", None, [64], "f16", 1, echo=lambda _: None)
    assert files[64].model == "Qwen3.6-27B" and files[64].plan.context == 64 and notes == ()


def test_speculative_decoding_needs_the_files_mtp_block(foreign, write_recipe, capsys):
    measure = {**LLAMA, "new_tokens": 8, "speculative": {"method": "mtp", "tokens": [2]}}
    err = one_error(capsys, ["validate", str(gguf_recipe(write_recipe, foreign["Q4_K_M"], measure=measure,
                                                          quality=None))])
    assert "has no MTP head (its header has no MTP block: no nextn_predict_layers)" in err


def test_the_shipped_published_recipe_plans_on_a_file_made_here(foreign, tmp_path, monkeypatch):
    """recipes/published/gguf-q4_k_m.yaml, its path pointed at this module's file (`make published-builds` writes the
    same bytes to builds/published/gguf/): plans with its reference's tokenizer checked, no weights loaded."""
    from quantlab.plan import make_plan

    forbid_weight_loads(monkeypatch)
    text = (REPO / "recipes" / "published" / "gguf-q4_k_m.yaml").read_text()
    assert "path: builds/published/gguf/bundled-Q4_K_M.gguf" in text
    recipe = tmp_path / "gguf-q4_k_m.yaml"
    recipe.write_text(text.replace("builds/published/gguf/bundled-Q4_K_M.gguf", str(foreign["Q4_K_M"])))
    plan = make_plan(load_recipe(recipe), for_this_machine=False)
    assert plan.method_label == "GGUF Q4_K_M (no imatrix)" and plan.quality is not None
