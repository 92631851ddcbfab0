"""vLLM's KV-cache accounting (quantlab/estimate/vllm_cache.py) against what vLLM 0.32.0's CPU build printed: the
bundled model and a model with Qwen3.6-27B's exact cache shapes (quantlab/cache_shapes.py). The unit tests run
anywhere; the slow one starts vLLM (skipped only where it is not installed; QUANTLAB_REQUIRE_VLLM=1 fails it)."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace

import pytest
from transformers import AutoConfig

from conftest import REPO, require_vllm
from quantlab import cache_shapes
from quantlab.cli import main
from quantlab.errors import QuantlabError
from quantlab.estimate.hybrid import hybrid_shape
from quantlab.estimate.inventory import text_config_of
from quantlab.estimate.tensor_parallel import rank_shape
from quantlab.estimate.vllm_cache import GIB, cache_groups, hybrid_block_size, state_dtypes, vllm_cache


@pytest.fixture(scope="module")
def bundled_shape():
    return hybrid_shape(AutoConfig.from_pretrained(REPO / "quantlab" / "bundled" / "model"))


@pytest.fixture(scope="module")
def shape_27b():
    return hybrid_shape(text_config_of(AutoConfig.from_pretrained(REPO / "quantlab" / "data" / "qwen3.6-27b")))


@pytest.fixture(scope="module")
def narrow_shape():
    return hybrid_shape(cache_shapes.config())


def cpu(shape, gib, seqs, length, prefix=True):
    conv, ssm = state_dtypes("bfloat16", "cpu", shape.ssm_dtype)
    return vllm_cache(shape, gib * GIB, length, seqs, prefix, "bfloat16", conv, ssm, device="cpu")


def test_the_bundled_model_at_one_gib(bundled_shape):
    # vLLM's log: block 256, "Padding mamba page size by 91.04%", groups (256, 256, 256, 256), num_gpu_blocks 8192,
    # "CPU KV cache size: 1,525,201 tokens, Maximum concurrency for 4,096 tokens per request: 372.36x"
    cache = cpu(bundled_shape, 1, 4, 4096)
    assert (cache.block_size, cache.mamba_page_padding_pct, cache.cache_groups) == (256, 91.04, (256,) * 4)
    assert (cache.num_blocks, cache.kv_cache_tokens, round(cache.max_concurrency, 2)) == (8192, 1_525_201, 372.36)
    assert (cache.ssm_dtype, cache.mamba_cache_mode) == ("float32", "align")
    # one attention layer of 1 KV head × 128 in bf16; three DeltaNet layers: conv 3 × 512 bf16 + 4 × 64 × 64 f32
    assert cache.attention_page_bytes == 256 * 512 and cache.mamba_state_bytes == 3 * 512 * 2 + 4 * 64 * 64 * 4
    assert cache.blocks_per_request == 4096 // 256 + 3 * 2  # 16 attention blocks, 2 per DeltaNet group ('align')


def test_the_27b_cache_shapes_at_four_gib(shape_27b, narrow_shape):
    # vLLM's log for the narrow model: block 896, padding 14.43%, 4 groups of 896, 55,629 tokens, 1.70x at 32,768
    for shape in (shape_27b, narrow_shape):
        cache = cpu(shape, 4, 4, 32768)
        assert (cache.block_size, cache.mamba_page_padding_pct, cache.cache_groups) == (896, 14.43, (896,) * 4)
        assert (cache.kv_cache_tokens, round(cache.max_concurrency, 2), cache.num_blocks) == (55_629, 1.70, 73)
        assert cache.layers_per_group == 16 and cache.bytes_per_block == 16 * 896 * 4096
        assert cache.blocks_per_request == 37 + 6 and cache.fits


def test_the_narrow_model_keeps_every_cache_shape(shape_27b, narrow_shape):
    cache_fields = ("layers", "full_attention_layers", "deltanet_layers", "kv_heads", "head_dim", "v_heads", "k_heads",
                    "k_dim", "v_dim", "conv_kernel", "ssm_dtype", "heads", "max_positions")
    assert {f: getattr(narrow_shape, f) for f in cache_fields} == {f: getattr(shape_27b, f) for f in cache_fields}
    assert (narrow_shape.hidden, narrow_shape.intermediate, narrow_shape.vocab) == (256, 512, 2048)
    assert cache_shapes.config_dict()["architectures"] == ["Qwen3_5ForCausalLM"]


def test_without_prefix_caching_one_state_block_and_the_mamba_groups_take_max_model_len(narrow_shape):
    # vLLM's log, 2 GiB, 16,384 tokens, prefix caching off: groups (16384, 16384, 16384, 896), 26,810 tokens, 1.64x
    cache = cpu(narrow_shape, 2, 1, 16384, prefix=False)
    assert cache.cache_groups == (16384, 16384, 16384, 896) and cache.mamba_cache_mode == "none"
    assert (cache.kv_cache_tokens, round(cache.max_concurrency, 2), cache.blocks_per_request) == (26_810, 1.64, 19 + 3)


def test_max_num_seqs_sizes_nothing(narrow_shape):
    one, many = cpu(narrow_shape, 4, 1, 32768), cpu(narrow_shape, 4, 16, 32768)
    assert replace(one, max_num_seqs=16) == many
    assert (one.concurrent_full_length, many.concurrent_full_length) == (1, 1)  # the blocks hold 1.70 requests


def test_vllm_refuses_a_max_model_len_the_pool_cannot_hold(narrow_shape):
    cache = cpu(narrow_shape, 2, 4, 32768)
    assert cache.num_blocks == 36 and cache.blocks_per_request == 43 and not cache.fits
    assert cache.longest_model_len == (36 - 1 - 6) * 896  # the null block and 6 state blocks set aside
    assert cpu(narrow_shape, 2, 4, cache.longest_model_len).fits
    assert not cpu(narrow_shape, 2, 4, cache.longest_model_len + 1).fits


def test_block_sizes_on_a_gpu_and_under_tensor_parallelism(shape_27b):
    # GPU: start at 16 tokens, kernel blocks of 16. TP 1: mamba page 3 × 10240 × 2 + 48 × 128 × 128 × 4 = 3,207,168
    # bytes, attention 4,096 per token: 16 × cdiv(3,207,168, 16 × 4,096) = 784 tokens, padded 0.13%
    gpu = vllm_cache(shape_27b, 8 * GIB, 32768)
    assert (gpu.block_size, gpu.mamba_page_padding_pct, gpu.ssm_dtype) == (784, 0.13, "float32")
    # TP 8: one KV head per rank (1,024 B per token), state / 8 = 400,896 B → 16 × cdiv(400,896, 16,384) = 400
    tp8 = vllm_cache(shape_27b, 8 * GIB, 32768, tp=8)
    assert tp8.block_size == 400 and tp8.attention_page_bytes == 400 * 1024
    assert tp8 == vllm_cache(rank_shape(shape_27b, 8), 8 * GIB, 32768)  # the per-rank shape gives the same
    assert hybrid_block_size(4096, 0, "cpu") == 128 and hybrid_block_size(4096, 0, "gpu") == 16


def test_groups_and_dtypes():
    assert cache_groups(16, 48) == (("mamba",) * 3 + ("attention",), 16)
    assert cache_groups(1, 3) == (("mamba",) * 3 + ("attention",), 1)
    assert cache_groups(13, 12) == (("mamba", "attention"), 13)  # under 1.5×: the larger count, padded
    assert cache_groups(4, 0) == (("attention",), 4)
    # --mamba-ssm-cache-dtype, else the config's mamba_ssm_dtype, else the model dtype (float32 on an AVX512-BF16 CPU)
    assert state_dtypes("bfloat16", "gpu", "float32") == ("bfloat16", "float32")
    assert state_dtypes("bfloat16", "gpu", None) == ("bfloat16", "bfloat16")
    assert state_dtypes("bfloat16", "cpu", None) == ("bfloat16", "float32")
    assert state_dtypes("bfloat16", "gpu", "float32", "bfloat16") == ("bfloat16", "bfloat16")


@pytest.mark.parametrize("kwargs, words", [
    ({"kv_cache_bytes": 0}, "KV cache bytes"), ({"max_model_len": -1}, "max_model_len"),
    ({"max_num_seqs": 0}, "max_num_seqs"), ({"tp": 3}, "not divisible"), ({"device": "tpu"}, "device"),
    ({"kv_dtype": "q8_0"}, "dtype"),
])
def test_bad_inputs_are_refused(shape_27b, kwargs, words):
    settings = {"kv_cache_bytes": GIB, "max_model_len": 4096, **kwargs}
    with pytest.raises(QuantlabError, match=words):
        vllm_cache(shape_27b, **settings)


def test_the_tensor_parallel_rows_rest_on_vllms_accounting():
    from quantlab.estimate.model import read_estimation_model
    from quantlab.estimate.schemes import get_scheme
    from quantlab.estimate.tensor_parallel import tensor_parallel_estimate

    tp = tensor_parallel_estimate(read_estimation_model("qwen3.6-27b"), get_scheme("awq-g128"), 1)
    gpu = 24 * GIB
    fit = tp.max_context(gpu)
    assert fit.limit == "memory" and fit.tokens % 784 == 0
    assert tp.memory_at(fit.tokens).total <= fit.budget_bytes < tp.memory_at(fit.tokens + 1).total
    pool = tp.cache(tp.kv_space(gpu), fit.tokens)
    assert pool.fits and not tp.cache(tp.kv_space(gpu), fit.tokens + 1).fits
    point = tp.memory_at(32768)
    assert point.deltanet_state == 6 * pool.bytes_per_block  # 3 DeltaNet groups × 2 padded blocks ('align')
    assert point.kv_cache == (-(-32768 // 784) + 1) * pool.bytes_per_block  # whole blocks and the null block


# ---- the command line ------------------------------------------------------------------------------------------

def test_the_cli_prints_vllms_figure_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "m"
    argv = ["estimate", "--model", cache_shapes.NAME, "--vllm-kv-gib", "4", "--max-num-seqs", "4", "--context", "32768",
            "--vllm-device", "cpu", "--output", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "KV cache size:    55,629 tokens" in text and "1.70x at 32,768" in text and "padded 14.43%" in text
    assert not out.exists()
    assert main([*argv[:-2], "--no-prefix-caching", "--context", "16384", "--vllm-kv-gib", "2"]) == 0
    assert "26,810 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--vllm-kv-gib", "0"], "--vllm-kv-gib"),
    (["--vllm-kv-gib", "-4"], "--vllm-kv-gib"),
    (["--vllm-kv-gib", "four"], "--vllm-kv-gib"),
    (["--vllm-kv-gib", "4,8"], "one KV space"),
    (["--vllm-kv-gib", "1.5", "--vllm-device", "cpu"], "whole GiB"),
    (["--vllm-kv-gib", "1e9"], "at most 4,096 GiB"),
    (["--vllm-kv-gib", "4", "--max-num-seqs", "0"], "--max-num-seqs"),
    (["--vllm-kv-gib", "4", "--max-num-seqs", "-1"], "--max-num-seqs"),
    (["--vllm-kv-gib", "4", "--context", "0"], "--context"),
    (["--vllm-kv-gib", "4", "--tensor-parallel-size", "0"], "--tensor-parallel-size"),
    (["--vllm-kv-gib", "4", "--kv-dtype", "q8_0"], "q8_0"),
    (["--max-num-seqs", "4"], "goes with --vllm-kv-gib"),
    (["--no-prefix-caching"], "goes with --vllm-kv-gib"),
])
def test_bad_cli_input_is_one_line_and_exit_2(tmp_path, capsys, argv, words):
    assert main(["estimate", *argv, "--output", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and words in err, err


# ---- vLLM itself -----------------------------------------------------------------------------------------------

def _script():
    spec = importlib.util.spec_from_file_location("check_vllm_accounting", REPO / "scripts" / "check_vllm_accounting.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("gib, seqs, prefix", [(2, 16, False), (8, 1, True)])
def test_vllm_agrees_with_the_estimate(gib, seqs, prefix):
    """vLLM's CPU server on the narrow model with dummy weights (about a minute each)."""
    require_vllm()
    script = _script()
    row = script.check(script.Setting(gib, seqs, prefix, script.DEFAULT_MAX_MODEL_LEN))
    assert "vllm_refused" not in row, row
    assert row["ok"], row
    assert abs(row["tokens_diff_pct"]) <= 1 and abs(row["concurrency_diff_pct"]) <= 1
