"""Per-rank memory under vLLM tensor parallelism (quantlab/estimate/tensor_parallel.py), against hand counts
written from the configs in shared/reference/models.md. CPU only, no weights."""

from __future__ import annotations

from dataclasses import replace

import pytest

from quantlab.errors import QuantlabError
from quantlab.estimate.estimator import weights_for
from quantlab.estimate.inventory import ModelInventory
from quantlab.estimate.model import read_estimation_model
from quantlab.estimate.runtime import RuntimeAssumptions
from quantlab.estimate.schemes import get_scheme
from quantlab.estimate.tensor_parallel import (
    VLLM_RUNTIME,
    padded_vocab,
    sharding_rule,
    tensor_parallel_estimate,
)

TPS = (1, 2, 4, 8)
F32_STATE = RuntimeAssumptions(kv_dtype="bf16", state_dtype="float32")


@pytest.fixture(scope="module")
def dense():
    return read_estimation_model("qwen3.6-27b")


@pytest.fixture(scope="module")
def moe():
    return read_estimation_model("qwen3.5-397b-a17b")


# --- Qwen3.6-27B: hidden 5120, 64 layers (16 full attention, 48 DeltaNet), 24 Q / 4 KV heads of 256 with an
# output gate, DeltaNet 48 V / 16 QK heads of 128, kernel 4, FFN 17408, vocab 248320 untied.

def dense_kv_heads_per_rank(tp: int) -> int:
    return {1: 4, 2: 2, 4: 1, 8: 1}[tp]  # 4 KV heads: TP 8 gives each rank one head, held by 2 ranks


def dense_bf16_bytes_per_rank(tp: int) -> int:
    embed_and_head = 2 * 248320 * 5120
    attention = 16 * (2 * 24 * 256 * 5120 + 5120 * 24 * 256)  # q_proj (with its gate), o_proj
    deltanet = 48 * (
        (2 * 16 * 128 + 48 * 128) * 5120  # in_proj_qkv
        + 48 * 128 * 5120  # in_proj_z
        + 2 * 48 * 5120  # in_proj_a, in_proj_b
        + 5120 * 48 * 128  # out_proj
        + (2 * 16 * 128 + 48 * 128) * 4  # conv1d
        + 48 + 48  # A_log, dt_bias
    )
    mlp = 64 * 3 * 17408 * 5120
    kv_rows = 16 * 2 * dense_kv_heads_per_rank(tp) * 256 * 5120  # k_proj, v_proj: whole heads per rank
    norms = 16 * 2 * 256 + 48 * 128 + 64 * 2 * 5120 + 5120  # q/k norm, DeltaNet norm, layer norms, final
    return 2 * ((embed_and_head + attention + deltanet + mlp) // tp + kv_rows + norms)


# --- Qwen3.5-397B-A17B: hidden 4096, 60 layers (15 full attention, 45 DeltaNet), 32 Q / 2 KV heads of 256 with an
# output gate, DeltaNet 64 V / 16 QK heads of 128, 512 experts of FFN 1024, one shared expert of 1024, vocab 248320.

def moe_kv_heads_per_rank(tp: int) -> int:
    return {1: 2, 2: 1, 4: 1, 8: 1, 16: 1}[tp]


def moe_bf16_bytes_per_rank(tp: int) -> int:
    embed_and_head = 2 * 248320 * 4096
    attention = 15 * (2 * 32 * 256 * 4096 + 4096 * 32 * 256)
    deltanet = 45 * (
        (2 * 16 * 128 + 64 * 128) * 4096
        + 64 * 128 * 4096
        + 2 * 64 * 4096
        + 4096 * 64 * 128
        + (2 * 16 * 128 + 64 * 128) * 4
        + 64 + 64
    )
    experts = 60 * (512 * 2 * 1024 * 4096 + 512 * 4096 * 1024 + 3 * 1024 * 4096)  # routed + shared expert
    kv_rows = 15 * 2 * moe_kv_heads_per_rank(tp) * 256 * 4096
    routers = 60 * (512 * 4096 + 4096)  # router gate, shared_expert_gate: ReplicatedLinear
    norms = 15 * 2 * 256 + 45 * 128 + 60 * 2 * 4096 + 4096
    return 2 * ((embed_and_head + attention + deltanet + experts) // tp + kv_rows + routers + norms)


@pytest.mark.parametrize("tp", TPS)
def test_dense_kv_cache_per_rank_and_kv_head_replication(dense, tp):
    est = tensor_parallel_estimate(dense, get_scheme("bf16"), tp)
    assert est.kv_heads_per_rank == dense_kv_heads_per_rank(tp)
    assert est.kv_replicas == {1: 1, 2: 1, 4: 1, 8: 2}[tp]
    assert est.q_heads_per_rank == 24 // tp
    expected = {1: 2 * 16 * 4 * 256 * 2, 2: 2 * 16 * 2 * 256 * 2, 4: 2 * 16 * 1 * 256 * 2, 8: 2 * 16 * 1 * 256 * 2}
    assert est.kv_bytes_per_token == expected[tp]
    assert {1: 65536, 2: 32768, 4: 16384, 8: 16384}[tp] == expected[tp]


@pytest.mark.parametrize("tp", TPS)
def test_moe_kv_cache_per_rank_and_kv_head_replication(moe, tp):
    est = tensor_parallel_estimate(moe, get_scheme("bf16"), tp)
    assert est.kv_heads_per_rank == moe_kv_heads_per_rank(tp)
    assert est.kv_replicas == {1: 1, 2: 1, 4: 2, 8: 4}[tp]  # 2 KV heads: TP 4 and 8 copy them
    expected = {1: 2 * 15 * 2 * 256 * 2, 2: 2 * 15 * 1 * 256 * 2, 4: 2 * 15 * 1 * 256 * 2, 8: 2 * 15 * 1 * 256 * 2}
    assert est.kv_bytes_per_token == expected[tp] == {1: 30720, 2: 15360, 4: 15360, 8: 15360}[tp]


@pytest.mark.parametrize("tp", TPS)
def test_deltanet_state_per_rank(dense, moe, tp):
    # per layer: recurrent v_heads/tp × 128 × 128 plus conv (4 − 1) × conv_dim/tp
    dense_f32 = 48 * ((48 // tp) * 128 * 128 + 3 * (2 * 16 * 128 + 48 * 128) // tp) * 4
    assert dense_f32 == 156_893_184 // tp  # models.md: 149.6 MiB over 48 layers in f32, one GPU
    # vLLM keeps the conv state in the model dtype (bf16) and the recurrent state in the config's mamba_ssm_dtype
    # (float32 in both configs; models/config.py Qwen3_5ForConditionalGenerationConfig), whatever state_dtype says
    dense_vllm = 48 * ((48 // tp) * 128 * 128 * 4 + 3 * (2 * 16 * 128 + 48 * 128) // tp * 2)
    moe_vllm = 45 * ((64 // tp) * 128 * 128 * 4 + 3 * (2 * 16 * 128 + 64 * 128) // tp * 2)
    for runtime in (F32_STATE, VLLM_RUNTIME):
        assert tensor_parallel_estimate(dense, get_scheme("bf16"), tp, runtime).deltanet_state_bytes == dense_vllm
        assert tensor_parallel_estimate(moe, get_scheme("bf16"), tp, runtime).deltanet_state_bytes == moe_vllm
    # --mamba-ssm-cache-dtype bfloat16: all of it in bf16, half the float32 figure
    bf16_state = tensor_parallel_estimate(dense, get_scheme("bf16"), tp, ssm_cache_dtype="bfloat16")
    assert bf16_state.deltanet_state_bytes == dense_f32 // 2


@pytest.mark.parametrize("tp", TPS)
def test_dense_bf16_weights_per_rank(dense, tp):
    est = tensor_parallel_estimate(dense, get_scheme("bf16"), tp)
    assert est.weight_bytes == dense_bf16_bytes_per_rank(tp)
    assert est.replicated_bytes == 2 * 674_816  # only the norms (models.md) are whole on every rank
    assert est.padded_vocab == 248320  # already a multiple of 64


def test_dense_bf16_single_rank_is_the_text_model(dense):
    assert dense_bf16_bytes_per_rank(1) == 2 * 26_895_998_464  # models.md, text only
    assert tensor_parallel_estimate(dense, get_scheme("bf16"), 1).weight_bytes == 2 * 26_895_998_464


@pytest.mark.parametrize("tp", (*TPS, 16))
def test_moe_bf16_weights_per_rank(moe, tp):
    est = tensor_parallel_estimate(moe, get_scheme("bf16"), tp)
    assert est.weight_bytes == moe_bf16_bytes_per_rank(tp)
    assert abs(moe_bf16_bytes_per_rank(1) / 2 - 396.35e9) < 0.005e9  # models.md: 396.35 B parameters


@pytest.mark.parametrize("model_name", ["qwen3.6-27b", "qwen3.5-397b-a17b"])
@pytest.mark.parametrize("scheme", ["bf16", "awq-g128", "nf4"])
def test_one_rank_holds_the_single_gpu_model(dense, moe, model_name, scheme):
    model = dense if model_name == "qwen3.6-27b" else moe
    single = weights_for(model, get_scheme(scheme)).bytes()
    one = tensor_parallel_estimate(model, get_scheme(scheme), 1).weight_bytes
    if model is moe and scheme != "bf16":
        # vLLM keeps the router and the shared-expert gate in bf16 (ReplicatedLinear, quant_config=None)
        assert one > single
        assert one - single < 2 * 60 * (512 * 4096 + 4096)
    else:
        assert one == single


def test_awq_replicates_in_proj_a_b_and_keeps_routers_unquantized(dense, moe):
    norms_27b = 16 * 2 * 256 + 48 * 128 + 64 * 2 * 5120 + 5120
    ba_27b = 48 * 2 * 48 * 5120
    assert tensor_parallel_estimate(dense, get_scheme("awq-g128"), 4).replicated_bytes == 2 * (norms_27b + ba_27b)
    norms_397b = 15 * 2 * 256 + 45 * 128 + 60 * 2 * 4096 + 4096
    routers = 60 * (512 * 4096 + 4096)
    ba_397b = 45 * 2 * 64 * 4096
    expected = 2 * (norms_397b + routers + ba_397b)
    assert tensor_parallel_estimate(moe, get_scheme("awq-g128"), 8).replicated_bytes == expected
    # bf16 splits in_proj_a/b like any column-parallel layer
    assert tensor_parallel_estimate(moe, get_scheme("bf16"), 8).replicated_bytes == 2 * (norms_397b + routers)


def awq_g128_bytes(rows: int, row_length: int) -> int:
    """qweight 4 bits, scales 16 bits and qzeros 4 bits per 128-column group (quant_schemes.yaml)."""
    return rows * row_length // 2 + rows * (row_length // 128) * 2 + rows * (row_length // 128) // 2


@pytest.mark.parametrize("scheme", ["bf16", "awq-g128"])
@pytest.mark.parametrize("tp", TPS)
def test_ranks_add_up_to_the_single_gpu_model_plus_kv_replication(dense, moe, scheme, tp):
    for model, layers, hidden, kv_heads in ((dense, 16, 5120, 4), (moe, 15, 4096, 2)):
        one = tensor_parallel_estimate(model, get_scheme(scheme), 1)
        est = tensor_parallel_estimate(model, get_scheme(scheme), tp)
        extra_rows = tp * max(1, kv_heads // tp) * 256 - kv_heads * 256  # copied k/v rows over all ranks
        row = 2 * hidden if scheme == "bf16" else awq_g128_bytes(1, hidden)
        kv_extra = layers * 2 * extra_rows * row
        assert est.replicated_bytes == one.replicated_bytes
        assert tp * (est.weight_bytes - est.replicated_bytes) == one.weight_bytes - one.replicated_bytes + kv_extra


@pytest.mark.parametrize("tp", TPS)
def test_vocab_padding_is_counted_on_every_rank(dense, tp):
    vocab = 248_321  # one past a multiple of 64: vLLM pads it to 248,384
    groups = tuple(
        replace(g, shape=(vocab, 5120)) if g.role in ("embed_tokens", "lm_head") else g for g in dense.inventory.groups
    )
    odd = replace(dense, inventory=ModelInventory(dense.inventory.model_class, groups),
                  shape=replace(dense.shape, vocab=vocab))
    est = tensor_parallel_estimate(odd, get_scheme("bf16"), tp)
    assert est.padded_vocab == padded_vocab(vocab) == 248_384
    unpadded_split = weights_for(odd, get_scheme("bf16")).bytes() - 2 * 674_816
    padding = 2 * (248_384 - vocab) * 5120 * 2  # embed_tokens and lm_head
    kv_extra = 16 * 2 * (tp * max(1, 4 // tp) * 256 - 4 * 256) * 5120 * 2
    assert tp * (est.weight_bytes - est.replicated_bytes) == unpadded_split + padding + kv_extra


@pytest.mark.parametrize("tp, words", [
    (16, "24 attention heads"),
    (3, "4 KV heads"),
    (6, "4 KV heads"),
    (32, "24 attention heads"),
])
def test_dense_tp_that_vllm_refuses(dense, tp, words):
    with pytest.raises(QuantlabError, match=words) as error:
        tensor_parallel_estimate(dense, get_scheme("bf16"), tp)
    assert f"tensor parallel size {tp}" in str(error.value)


def test_moe_tp_that_vllm_refuses(moe):
    with pytest.raises(QuantlabError, match="32 attention heads"):
        tensor_parallel_estimate(moe, get_scheme("bf16"), 3)
    with pytest.raises(QuantlabError, match="larger than the 512 experts"):
        tensor_parallel_estimate(moe, get_scheme("bf16"), 1024)
    # bf16 at TP 16 is fine, but AWQ g128 leaves 64 expert FFN columns per rank: not one whole group
    tensor_parallel_estimate(moe, get_scheme("bf16"), 16)
    with pytest.raises(QuantlabError, match="experts.down_proj.*group size 128"):
        tensor_parallel_estimate(moe, get_scheme("awq-g128"), 16)


@pytest.mark.parametrize("tp", [0, -2, 2.0, True])
def test_tp_must_be_a_positive_integer(dense, tp):
    with pytest.raises(QuantlabError, match="positive integer"):
        tensor_parallel_estimate(dense, get_scheme("bf16"), tp)


def test_gguf_is_refused(dense):
    with pytest.raises(QuantlabError, match="GGUF"):
        tensor_parallel_estimate(dense, get_scheme("q4_k_m"), 2)


def test_every_text_tensor_has_a_rule(dense, moe):
    kinds = {g.name: sharding_rule(g.name)[0] for m in (dense, moe) for g in m.inventory.groups
             if g.role not in ("vision", "mtp")}
    assert kinds["model.layers.{i}.mlp.gate.weight"] == "unquantized"
    assert kinds["model.layers.{i}.mlp.shared_expert_gate.weight"] == "unquantized"
    assert kinds["model.language_model.layers.{i}.self_attn.k_proj.weight"] == "kv"
    assert kinds["model.language_model.layers.{i}.linear_attn.in_proj_b.weight"] == "ba"
    assert kinds["model.language_model.layers.{i}.linear_attn.norm.weight"] == "replicated"
    assert kinds["lm_head.weight"] == "vocab"
    with pytest.raises(QuantlabError, match="no tensor-parallel rule"):
        sharding_rule("model.layers.{i}.mystery.weight")


def test_memory_and_longest_context_per_rank(dense):
    """vLLM's accounting (quantlab/estimate/vllm_cache.py): whole blocks of 784 tokens (TP 2: 2 KV heads, 2,048 B a
    token and layer; the state 24 × 128 × 128 × 4 + 3 × 5120 × 2 B a layer, padded to 784 × 2,048 B), 16 layers a
    block, two state blocks per DeltaNet group and request (prefix caching), one null block."""
    awq = get_scheme("awq-g128")
    one, two = (tensor_parallel_estimate(dense, awq, tp) for tp in (1, 2))
    point = two.memory_at(32768)
    block_bytes = 16 * 784 * 2048
    assert point.kv_cache == (-(-32768 // 784) + 1) * block_bytes  # 42 blocks and the null block
    assert point.deltanet_state == 3 * 2 * block_bytes
    assert 24 * 128 * 128 * 4 + 3 * 5120 * 2 <= 784 * 2048  # the state page fits the attention page it is padded to
    assert point.weights == two.weight_bytes
    gpu = 18 << 30
    fit_two = two.max_context(gpu)
    assert fit_two.budget_bytes == round(0.9 * gpu) and one.max_context(gpu).tokens == 0  # TP 1: weights too large
    assert fit_two.limit == "memory" and fit_two.tokens % 784 == 0
    assert two.memory_at(fit_two.tokens).total <= fit_two.budget_bytes < two.memory_at(fit_two.tokens + 1).total
    fit_one, capped = one.max_context(24 << 30), two.max_context(24 << 30)
    assert 0 < fit_one.tokens < capped.tokens and fit_one.limit == "memory"
    # at TP 2 the pool holds more than vLLM lets --max-model-len be
    assert capped.tokens == 262144 and capped.limit.startswith("max_position_embeddings (262,144)")
    assert two.runtime == VLLM_RUNTIME
    with pytest.raises(QuantlabError, match="gpu_memory_utilization"):
        two.max_context(gpu, gpu_memory_utilization=1.5)


def test_per_rank_shape(moe):
    shape = tensor_parallel_estimate(moe, get_scheme("bf16"), 8).shape
    assert (shape.heads, shape.kv_heads, shape.v_heads, shape.k_heads) == (4, 1, 8, 2)
    assert (shape.expert_intermediate, shape.shared_expert_intermediate) == (128, 128)
    assert (shape.hidden, shape.vocab, shape.experts) == (4096, 248320, 512)
