"""Issue 15's analyses: salient channels (a function-preserving transform), KL by position, bootstrap intervals,
paired differences, the Pareto table; each test can fail."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from quantlab.errors import QuantlabError
from quantlab.methods.rtn import RtnConfig, RtnMethod
from quantlab.plan import make_plan
from quantlab.quality import compare, noise
from quantlab.quality.metrics import kl_by_position
from quantlab.assess.session import QualitySession
from quantlab.recipe import ModelSpec, load_recipe
from quantlab.salient import make_salient, write_salient_model

from conftest import load_source

BUNDLED_DIR = Path(__file__).resolve().parents[1] / "quantlab" / "bundled" / "model"
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _session(tmp_path: Path, quality: dict) -> QualitySession:
    data = {"name": "q", "model": {"source": "bundled", "device": "cpu"}, "quality": quality,
            "output": {"dir": str(tmp_path / "measurements")}}
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(data))
    return QualitySession(make_plan(load_recipe(path)), progress=False, echo=lambda _: None)


@pytest.fixture(scope="module")
def base():
    return load_source(ModelSpec(source="bundled", device="cpu"), CPU).model


# ---- 1. salient channels ------------------------------------------------------------------------------------------

def test_salient_transform_keeps_the_logits_and_makes_large_activations(tmp_path):
    from transformers import AutoModelForCausalLM

    done = write_salient_model(BUNDLED_DIR, tmp_path / "salient", channels=4, factor=32.0, seed=0)
    assert done.norms == 8 and done.linears == 23  # 4 layers × 2 norms; 3 DeltaNet × 7 + 1 attention × 3 + 4 × 2 MLP
    original = AutoModelForCausalLM.from_pretrained(BUNDLED_DIR, dtype=torch.float32)
    salient = AutoModelForCausalLM.from_pretrained(tmp_path / "salient", dtype=torch.float32)
    ids = torch.randint(0, 2048, (1, 96), generator=torch.Generator().manual_seed(1))
    seen = {}
    salient.model.layers[1].post_attention_layernorm.register_forward_hook(lambda m, i, o: seen.setdefault("o", o))
    with torch.no_grad():
        a, b = original(ids).logits, salient(ids).logits
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    act = seen["o"][0].abs().mean(0)
    chosen = list(done.channels)
    assert act[chosen].min() > 10 * act.median()  # the chosen channels now carry large activations


def test_salient_transform_changes_what_rtn_loses(tmp_path, base):
    """The same RTN on the transformed model loses more: its small weights in salient columns round away."""
    state = {k: v for k, v in base.state_dict().items()}
    transformed, _ = make_salient(state, 256, channels=4, factor=32.0)
    model = copy.deepcopy(base).float()
    model.load_state_dict(transformed)
    rtn = RtnConfig(method="rtn", bits=4, group_size=128)
    ids = torch.randint(0, 2048, (1, 128), generator=torch.Generator().manual_seed(2))

    def kl(reference, candidate):
        with torch.no_grad():
            p = torch.log_softmax(reference(ids).logits.float(), -1)
            q = torch.log_softmax(candidate(ids).logits.float(), -1)
        return (p.exp() * (p - q)).sum(-1).mean().item()

    plain = kl(base.float(), RtnMethod().apply(copy.deepcopy(base).float(), rtn))
    salient = kl(model, RtnMethod().apply(copy.deepcopy(model), rtn))
    assert salient > 1.2 * plain


def test_salient_transform_refuses_bad_arguments():
    with pytest.raises(QuantlabError, match="channels must be between 1"):
        make_salient({}, 256, channels=0, factor=32)
    with pytest.raises(QuantlabError, match="factor must be above 1"):
        make_salient({}, 256, channels=4, factor=1)
    with pytest.raises(QuantlabError, match="no decoder-layer RMSNorm"):
        make_salient({"x.weight": torch.ones(4)}, 256, channels=4, factor=32)


# ---- 3. KL by position; 4. intervals, paired differences, Pareto ------------------------------------------------

def test_kl_by_position_buckets():
    kl = torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64)
    position = torch.tensor([0, 255, 512, 3000])
    rows = kl_by_position(kl, position)
    assert [(r["from"], r["to"], r["tokens"]) for r in rows] == [(0, 256, 2), (512, 2048, 1), (2048, 8192, 1)]
    assert rows[0]["kl_mean"] == 1.5 and rows[2]["kl_mean"] == 10.0


def test_quality_result_has_intervals_depth_and_window_sums(tmp_path, base):
    s = _session(tmp_path, {"tokens": 1024, "context": 256, "stride": 128})
    rtn = RtnMethod().apply(copy.deepcopy(base), RtnConfig(method="rtn", bits=4, group_size=128))
    q = s.evaluate(rtn)
    assert q.kl_mean_ci[0] < q.kl_mean < q.kl_mean_ci[1]
    assert q.ppl_ratio_ci[0] < q.ppl_ratio < q.ppl_ratio_ci[1]
    assert len(q.window_sums) == q.windows and sum(w[3] for w in q.window_sums) == q.tokens
    assert abs(sum(w[0] for w in q.window_sums) / q.tokens - q.kl_mean) < 1e-9
    assert [b["from"] for b in q.kl_by_position] == [0] and q.kl_by_position[0]["tokens"] == q.tokens  # all < 256


def test_intervals_shrink_as_tokens_grow():
    rng = np.random.default_rng(0)

    def sums(windows: int) -> np.ndarray:
        kl = rng.gamma(2.0, 0.001, size=windows) * 256
        nll = rng.normal(3.0, 0.2, size=windows) * 256
        return np.stack([kl, nll, nll + kl, np.full(windows, 256.0)], axis=1)

    widths = []
    for n in (8, 64, 512):
        kl_ci, ratio_ci = noise.intervals(sums(n))
        widths.append((kl_ci[1] - kl_ci[0], ratio_ci[1] - ratio_ci[0]))
    assert widths[0][0] > widths[1][0] > widths[2][0] and widths[0][1] > widths[1][1] > widths[2][1]
    assert noise.intervals(sums(1)) == (None, None)


def test_paired_difference_tells_noise_from_a_real_difference():
    rng = np.random.default_rng(1)
    tokens = np.full(100, 256.0)
    a_kl = rng.gamma(2.0, 0.001, 100) * 256
    a = np.stack([a_kl, np.full(100, 700.0), np.full(100, 700.0) + a_kl, tokens], axis=1)
    same = a.copy()
    same[:, 0] *= 1 + rng.normal(0, 0.01, 100)
    worse = a.copy()
    worse[:, 0] *= 1.5
    assert noise.outside_noise(noise.paired_difference(a, same)) is False
    assert noise.outside_noise(noise.paired_difference(a, worse)) is True
    assert noise.paired_difference(a, worse[:50]) is None  # not the same windows


def _record(label: str, weight_bytes: int, kl: float, sums, created: str):
    q = SimpleNamespace(kl_mean=kl, kl_mean_ci=(kl * 0.9, kl * 1.1), ppl_ratio=1 + kl, window_sums=sums,
                        reference="ref", tokens=1024, context=256, stride=128, text_label="the held-out split (x)")
    return SimpleNamespace(quality=q, created_at=created, runtime=None, method=SimpleNamespace(label=label),
                           weight_bytes=weight_bytes, model=SimpleNamespace(name="m"))


def test_pareto_front_and_the_noise_column():
    base_sums = [[1.0, 700.0, 701.0, 256.0]] * 20
    records = [
        _record("big good", 8_000_000, 0.0001, [[0.0256, 700, 700.03, 256]] * 20, "1"),
        _record("small bad", 2_000_000, 0.01, [[2.56, 700, 702.6, 256]] * 20, "2"),
        _record("dominated", 9_000_000, 0.02, [[5.12, 700, 705.1, 256]] * 20, "3"),
        _record("mid", 4_000_000, 0.004, base_sums, "4"),
    ]
    (c,) = compare.comparisons(records)
    assert [b.label for b in c.builds] == ["big good", "mid", "small bad", "dominated"]
    assert [b.pareto for b in c.builds] == [True, True, True, False]
    lines = "\n".join(compare.section(records))
    assert "| dominated |" in lines and "beyond the noise" in lines


def test_a_shuffled_weights_candidate_has_a_large_kl(tmp_path, base):
    s = _session(tmp_path, {"tokens": 512, "context": 256, "stride": 256})
    shuffled = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in shuffled.parameters():
            if p.dim() == 2:
                p.copy_(p.flatten()[torch.randperm(p.numel(), generator=generator)].view_as(p))
    rtn = RtnMethod().apply(copy.deepcopy(base), RtnConfig(method="rtn", bits=4, group_size=128))
    results = s.evaluate_many({"shuffled": shuffled, "rtn4": rtn})
    assert results["shuffled"].kl_mean > 0.5 > 100 * results["rtn4"].kl_mean


# ---- 2. sensitivity by tensor class -----------------------------------------------------------------------------

def test_rtn_overrides_and_only_pick_the_classes(base):
    from quantlab.methods.rtn import plan_bits

    plain = {name for name, _, _ in plan_bits(base, RtnConfig(method="rtn"))}
    assert "lm_head" not in plain and "model.embed_tokens" not in plain and len(plain) == 25
    mixed = {name: bits for name, _, bits in plan_bits(base, RtnConfig(
        method="rtn", overrides={"lm_head": 8, "mlp.down": 16, "embeddings": 4}))}
    assert mixed["lm_head"] == 8 and mixed["model.embed_tokens"] == 4 and not any("down_proj" in n for n in mixed)
    only = {name for name, _, _ in plan_bits(base, RtnConfig(method="rtn", only=["attention.v"]))}
    assert only == {"model.layers.3.self_attn.v_proj"}
    with pytest.raises(ValueError, match="unknown tensor class"):
        RtnConfig(method="rtn", overrides={"mlp.sideways": 4})


def test_sensitivity_puts_a_destroyed_class_first(tmp_path, base):
    """A quantizer that shuffles mlp.down's weights at the recipe's bits (and rounds everything else as RTN does):
    that class must come first, with a large KL, and be the first raised to int8."""
    from quantlab.methods.rtn import RtnMethod
    from quantlab.assess.sensitivity_rtn import measure_effects, suggest

    def destructive(model, config):
        if config.only == ["mlp.down"] and not config.overrides:
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for name, module in model.named_modules():
                    if name.endswith("mlp.down_proj"):
                        w = module.weight
                        w.copy_(w.flatten()[torch.randperm(w.numel(), generator=generator)].view_as(w))
            return model
        return RtnMethod().apply(model, config)

    s = _session(tmp_path, {"tokens": 512, "context": 256, "stride": 256})
    effects = measure_effects(s, base, RtnConfig(method="rtn", bits=4, group_size=128), destructive)
    assert effects[0].name == "mlp.down" and effects[0].kl_added > 0.1 > 10 * effects[1].kl_added
    overrides, size = suggest(effects, 4, 8, 128, budget_bytes=sum(e.parameters for e in effects))
    assert next(iter(overrides)) == "mlp.down" and size <= sum(e.parameters for e in effects)
    with pytest.raises(QuantlabError, match="below the uniform int4 build"):
        suggest(effects, 4, 8, 128, budget_bytes=1)


@pytest.mark.parametrize("extra, message", [
    (["--budget-gb", "-1"], "a size in GB, above 0"),
    (["--budget-gb", "0.0001"], "below the uniform int4 build itself"),
    (["--plot", "/nonexistent/dir/x.png"], "does not exist"),
    (["--plot", "/proc/x.png"], "cannot write in /proc"),
])
def test_sensitivity_refuses_bad_options_before_any_work(tmp_path, capsys, extra, message):
    from quantlab.cli import main

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "bundled-rtn4-quality.yaml"
    assert main(["sensitivity", str(recipe), "--out", str(tmp_path / "mixed.yaml"), *extra]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "mixed.yaml").exists()


def test_sensitivity_sweeps_exactly_the_methods_that_declare_a_sensitivity_option():
    from quantlab.assess.sensitivity import SWEEPS
    from quantlab.methods.base import registered

    assert {m.name for m in registered() if m.sensitivity_option} == set(SWEEPS)


def test_choose_raises_classes_by_kl_removed_per_byte_within_the_budget():
    from quantlab.assess.sensitivity_select import ClassEffect, choose

    effects = [ClassEffect("a", 100, 0.010, None, 100, levels={"Q5_K": 0.004, "Q8_0": 0.001}),
               ClassEffect("b", 100, 0.002, None, 100, levels={"Q5_K": 0.001, "Q8_0": 0.0005}),
               ClassEffect("c", 100, 0.001, None, 100, levels={"Q5_K": 0.002})]  # worse at the higher level
    costs = {("a", "Q5_K"): 10, ("a", "Q8_0"): 40, ("b", "Q5_K"): 10, ("b", "Q8_0"): 40, ("c", "Q5_K"): 1}
    chosen, size = choose(effects, 1000, costs, 1050, "Q4_K_M")
    # a→Q5_K removes 0.0006/byte, then a Q5_K→Q8_0 0.0001/byte (30 bytes, fits), b→Q5_K 0.0001/byte: 10 left
    assert chosen["a"] == "Q8_0" and "c" not in chosen and size <= 1050
    assert choose(effects, 1000, costs, 1000, "Q4_K_M") == ({}, 1000)
    with pytest.raises(QuantlabError, match="below the uniform Q4_K_M build"):
        choose(effects, 1000, costs, 999, "Q4_K_M")


def test_gguf_tensor_names_map_to_the_tensor_classes():
    from quantlab.assess.sensitivity_gguf import class_file_args
    from quantlab.llamacpp.names import gguf_class

    assert gguf_class("blk.0.attn_qkv.weight") == "deltanet.in_proj_qkv"
    assert gguf_class("blk.3.attn_q.weight") == "attention.q" and gguf_class("blk.3.attn_output.weight") == "attention.o"
    assert gguf_class("output.weight") == "lm_head" and gguf_class("token_embd.weight") == "embeddings"
    assert gguf_class("blk.64.attn_q.weight", frozenset({64})) == "mtp"
    assert gguf_class("blk.0.attn_norm.weight") is None and gguf_class("blk.0.ssm_conv1d.weight") is None
    tensor = SimpleNamespace(name="blk.1.ffn_down.weight", type_name="Q6_K")
    assert class_file_args([tensor]) == ["--tensor-type", r"^blk\.1\.ffn_down\.weight$=q6_k", "--tensor-type", ".=bf16"]
    assert class_file_args([tensor], "Q8_0")[1].endswith("=q8_0")


def _gguf_recipe(tmp_path: Path) -> Path:
    data = {"name": "small-gguf", "model": {"source": "bundled", "device": "cpu"},
            "quantization": {"method": "gguf", "type": "Q4_K_M", "calibration": {"samples": 4, "seq_len": 128}},
            "measure": {"runtime": "llama.cpp", "contexts": [16], "new_tokens": 2, "llama_cpp": {"threads": 1}},
            "quality": {"tokens": 512, "context": 256, "stride": 256}, "output": {"dir": str(tmp_path / "measurements")}}
    path = tmp_path / "small-gguf.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


needs_llama = pytest.mark.skipif(not __import__("quantlab.llamacpp").llamacpp.available(),
                                 reason="llama.cpp is not built here (`make llama-cpp` builds it)")


@needs_llama
@pytest.mark.slow
def test_gguf_class_files_hold_one_class_at_the_uniform_builds_types(tmp_path):
    from quantlab.llamacpp.gguf_file import read_header
    from quantlab.assess.sensitivity_gguf import GgufSweep

    sweep = GgufSweep(make_plan(load_recipe(_gguf_recipe(tmp_path))), ["Q8_0"], tmp_path, echo=lambda _: None)
    sweep.prepare()
    uniform = {t.name: t.type_name for t in sweep.uniform.header.tensors}
    assert set(sweep.parameters()) == {"deltanet.in_proj_qkv", "deltanet.in_proj_z", "deltanet.in_proj_ab",
                                       "deltanet.out_proj", "attention.q", "attention.k", "attention.v", "attention.o",
                                       "mlp.gate", "mlp.up", "mlp.down", "lm_head", "embeddings"}
    model = sweep.build_class("mlp.down")
    types = {t.name: t.type_name for t in read_header(model.path).tensors}
    downs = [n for n in types if n.endswith("ffn_down.weight")]
    assert len(downs) == 4 and all(types[n] == uniform[n] for n in downs)
    assert {types[n] for n in types if n not in downs} <= {"BF16", "F32"}
    path = model.path
    sweep.release(model)
    assert not path.exists() and sweep.bf16.exists()  # its own class file goes; the BF16 GGUF stays to the end
    sweep.release(sweep.build_class("mlp.down", "Q8_0"))
    assert sweep.upgrade_cost("mlp.down", "Q8_0") > 0 and sweep.bytes_saved("mlp.down") > 0


@needs_llama
@pytest.mark.slow
def test_gguf_sensitivity_writes_a_mixed_recipe_and_checks_it(tmp_path, capsys, monkeypatch):
    import tempfile

    from quantlab.cli import main

    made, mkdtemp = [], tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(mkdtemp(*a, **k)) or made[-1])

    recipe = _gguf_recipe(tmp_path)
    out = tmp_path / "mixed.yaml"
    assert main(["sensitivity", str(recipe), "--out", str(out), "--high-types", "Q8_0", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "mlp.down" in printed and "baseline: every class BF16 (llama.cpp)" in printed
    assert "suggested mixed − uniform Q5_K_M" in printed
    mixed = load_recipe(out).recipe.quantization
    assert mixed.type == "Q4_K_M" and mixed.overrides and set(mixed.overrides.values()) == {"Q8_0"}
    sizes = {line.split()[1]: float(line.split()[2]) for line in printed.splitlines()
             if line.startswith(("uniform Q4_K_M", "uniform Q5_K_M"))}
    mixed_size = float(next(line for line in printed.splitlines() if line.startswith("suggested mixed ")).split()[2])
    assert sizes["Q4_K_M"] < mixed_size <= sizes["Q5_K_M"]  # within the default budget, the next type up
    work = [m for m in made if "quantlab-sensitivity-" in m]
    assert work and not any(Path(m).exists() for m in work)  # its work folder, and every file in it, is gone


@pytest.mark.slow
def test_rtn_sensitivity_writes_a_mixed_recipe_and_checks_it(tmp_path, capsys):
    from quantlab.cli import main

    data = {"name": "small-rtn", "model": {"source": "bundled", "device": "cpu"},
            "quantization": {"method": "rtn", "bits": 4, "group_size": 128},
            "quality": {"tokens": 512, "context": 256, "stride": 256}, "output": {"dir": str(tmp_path / "m")}}
    recipe = tmp_path / "small-rtn.yaml"
    recipe.write_text(yaml.safe_dump(data))
    plot = tmp_path / "plot.png"
    assert main(["sensitivity", str(recipe), "--no-progress", "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    mixed = load_recipe(tmp_path / "small-rtn-mixed.yaml").recipe.quantization
    assert set(mixed.overrides) == {"deltanet.in_proj_qkv", "deltanet.in_proj_z", "deltanet.in_proj_ab",
                                    "deltanet.out_proj", "attention.q", "attention.k", "attention.v", "attention.o",
                                    "mlp.gate", "mlp.up", "mlp.down", "lm_head", "embeddings"}
    assert set(mixed.overrides.values()) == {4, 8} and plot.read_bytes()[:4] == b"\x89PNG"
    rows = {" ".join(line.split()[1:3]): float(line.split()[3]) for line in printed.splitlines()
            if line.startswith("uniform ")}
    mixed_size = float(next(line for line in printed.splitlines() if line.startswith("suggested mixed ")).split()[2])
    assert rows["int4 g128"] < mixed_size <= rows["int4 g32"] and "suggested mixed − uniform int4 g32" in printed


@pytest.mark.parametrize("mode, candidate_bytes, most_alive", [("paired", None, 3), ("paired", 10**6, 2),
                                                                 ("stored", None, 1)])
def test_candidates_are_built_scored_and_released_as_memory_allows(mode, candidate_bytes, most_alive, monkeypatch):
    """A 27B's candidates do not fit together: with a stored reference each is released before the next is made;
    in paired mode as many as fit in half the free memory (4 MB here: two of 1 MB each) share a reference pass."""
    from quantlab import fingerprint
    from quantlab.assess.sensitivity_sweep import evaluate_built

    monkeypatch.setattr(fingerprint, "available_host_ram", lambda: 4 * 10**6 + 1)
    alive, peak, passes = set(), [], []

    def build(label):
        alive.add(label)
        peak.append(len(alive))
        return label

    def evaluate_many(built):
        passes.append(list(built))
        return {label: f"scored {label}" for label in built}

    session = SimpleNamespace(q=SimpleNamespace(spec=SimpleNamespace(mode=mode)), device=CPU,
                              evaluate_many=evaluate_many)
    results = evaluate_built(session, {k: (lambda k=k: build(k)) for k in "abc"}, alive.discard, candidate_bytes)
    assert results == {k: f"scored {k}" for k in "abc"} and max(peak) == most_alive and not alive
    assert [label for group in passes for label in group] == ["a", "b", "c"]


@needs_llama
@pytest.mark.parametrize("extra, message", [
    (["--high-types", "Q4_K_M"], "'Q4_K_M' is not a tensor type: Q4_K_M is a file type"),
    (["--high-types", "Q4_K,Q8_0"], "--high-types Q4_K: not above Q4_K_M's Q4_K (4.50 bits per weight)"),
    (["--high-types", ","], "give at least one tensor type"),
    (["--high-bits", "8"], "--high-bits: not for a gguf recipe; --high-types is its option"),
    (["--out", "{existing}"], "already exists, and quantlab replaces nothing it did not make"),
])
def test_gguf_sensitivity_refuses_bad_options_before_any_work(extra, message, tmp_path, capsys):
    from quantlab.cli import main

    existing = tmp_path / "existing.yaml"
    existing.write_text("mine")
    args = [a.replace("{existing}", str(existing)) for a in extra]
    assert main(["sensitivity", str(_gguf_recipe(tmp_path)), "--no-progress", *args]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "convert_hf_to_gguf" not in captured.out
    assert existing.read_text() == "mine" and not (tmp_path / "small-gguf-mixed.yaml").exists()


@needs_llama
def test_gguf_overrides_name_tensor_types_not_file_types(tmp_path, capsys):
    from quantlab.cli import main

    recipe = yaml.safe_load(_gguf_recipe(tmp_path).read_text())
    recipe["quantization"]["overrides"] = {"mlp.down": "Q6_K_M"}
    path = tmp_path / "o.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(path)]) != 0
    assert "quantization.overrides.mlp.down: 'Q6_K_M' is not a tensor type" in capsys.readouterr().err


def test_default_levels_are_above_the_recipes_type():
    pytest.importorskip("gguf")
    from quantlab.assess.sensitivity_gguf import default_levels

    assert default_levels("Q4_K_M") == ["Q5_K", "Q6_K", "Q8_0"] and default_levels("Q5_K_M") == ["Q6_K", "Q8_0"]
    assert default_levels("Q8_0") == ["BF16"]


def test_class_file_guard_catches_a_class_file_llama_cpp_did_not_write_as_asked():
    from quantlab.assess.sensitivity_gguf import check_class_file

    def header(**types):
        return SimpleNamespace(path="f.gguf", tensors=[SimpleNamespace(name=n, type_name=t) for n, t in types.items()])

    down = [SimpleNamespace(name="down", type_name="Q6_K")]
    check_class_file(header(down="Q6_K", up="BF16", norm="F32"), down)
    check_class_file(header(down="Q8_0", up="BF16"), down, "Q8_0")
    check_class_file(header(down="BF16", up="BF16"), down, "BF16")  # a class raised to BF16 is unquantized
    for bad, level in ((header(down="Q4_K", up="BF16"), None), (header(down="Q6_K", up="Q4_K"), None),
                       (header(down="BF16", up="BF16"), "Q8_0"), (header(down="Q8_0", up="BF16"), "BF16")):
        with pytest.raises(QuantlabError, match="did not follow the per-tensor types"):
            check_class_file(bad, down, level)
