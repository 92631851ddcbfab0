"""`quantlab estimate` against careless or hostile input: more GPUs never fit less in silence, configs with absurd
or inconsistent sizes and out-of-range numeric options are one line (exit 2), records whose figures contradict
each other are skipped with a reason, and an estimates.json that is a folder is said, not dropped."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from quantlab.cli import main
from quantlab.errors import QuantlabError
from quantlab.estimate.estimator import weights_for
from quantlab.estimate.model import read_estimation_model
from quantlab.estimate.multi_gpu import (
    accelerate_estimate, multi_gpu_estimates, note_fewer_gpus_fit_more, parse_gpu_sets,
)
from quantlab.estimate.runtime import runtime_profile
from quantlab.estimate.schemes import get_scheme
from quantlab.schema.estimate import MultiGpuEstimate

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "quantlab" / "data"


@pytest.fixture(scope="module")
def qwen27b():
    return read_estimation_model("qwen3.6-27b")


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


def _rows(model, key: str, sets: str) -> dict[str, tuple[MultiGpuEstimate, MultiGpuEstimate]]:
    """GPU set -> (the row the estimate gives, the row of the map a run computes)."""
    scheme, rt = get_scheme(key), runtime_profile("transformers")
    weights = weights_for(model, scheme)
    loaded = weights.bytes(False, False)
    rows = {}
    for gpus in parse_gpu_sets(sets):
        chosen = multi_gpu_estimates(model, scheme, weights, loaded, gpus, 1, rt)[0]
        rows[gpus.label] = (chosen, accelerate_estimate(model, scheme, weights, loaded, gpus, 1, rt))
    return rows


# ---- more GPUs never fit less: the map is chosen, and the choice is said ------------------------------------

def test_more_gpus_never_fit_less_context_and_the_map_chosen_is_said(qwen27b):
    """The probe's figures: accelerate's balanced map puts all 64 nf4 layers on the last of 8 or 16 GPUs (12,226
    tokens, less than 2 GPUs fit), and BF16 on 48 or 64 GPUs falls back to a sequential map that fills cuda:0-1
    to the brim (0 tokens, where 32 GPUs fit 64,071). The estimate takes the even map there and says why."""
    pytest.importorskip("bitsandbytes")
    nf4 = _rows(qwen27b, "nf4", "2x24,4x24,8x24,16x24")
    assert [run.max_context for _, run in nf4.values()] == [27_840, 36_941, 12_226, 12_226]  # the run's map
    fits = [chosen.max_context for chosen, _ in nf4.values()]
    assert fits == sorted(fits) and all(c.max_context >= r.max_context for c, r in nf4.values())
    eight = nf4["8x24"][0]
    assert eight.split == "accelerate-even" and eight.max_context > 36_941
    assert "leaves cuda:0-6 (7 GPUs) empty and fits 12,226 tokens" in eight.limit
    assert "device_map=\"sequential\"" in eight.limit and "GiB" in eight.limit

    bf16 = _rows(qwen27b, "bf16", "32x24,48x24,64x24")
    assert [run.max_context for _, run in bf16.values()] == [64_071, 0, 0]
    assert all(chosen.max_context >= 64_071 for chosen, _ in bf16.values())
    assert "leaves no room for one token" in bf16["64x24"][0].limit


def test_a_row_that_fits_less_than_fewer_gpus_says_so():
    def row(count: int, tokens: int, split: str = "accelerate") -> MultiGpuEstimate:
        return MultiGpuEstimate(method="nf4", gpus=f"{count}x24", count=count, gpu_gib=24, split=split,
                                max_context=tokens, limit="memory (cuda:0)")

    noted = note_fewer_gpus_fit_more([row(2, 30_000), row(8, 12_000, "accelerate-even"), row(4, 40_000, "vllm-tp"),
                                      row(8, 50_000, "vllm-tp")])
    assert noted[1].limit.endswith("fewer GPUs fit more: 2x24 fits 30,000 tokens")
    assert [r.limit for r in (noted[0], noted[2], noted[3])] == ["memory (cuda:0)"] * 3


# ---- configs: every size in range, the MoE fields consistent, one line ----------------------------------------

def _config(tmp_path: Path, base: str, edit: dict, part: str | None = None) -> str:
    config = json.loads((DATA / base / "config.json").read_text())
    target = config[part] if part else config
    target.update(copy.deepcopy(edit))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


MOE, DENSE = "qwen3.5-397b-a17b", "qwen3.6-27b"


@pytest.mark.parametrize("base, part, edit, message", [
    (DENSE, "text_config", {"intermediate_size": 2**62},
     r"text_config\.intermediate_size is 4,611,686,018,427,387,904; it must be an integer from 1 to 1,048,576"),
    (DENSE, "text_config", {"intermediate_size": 10**400}, r"intermediate_size is an integer of 401 digits"),
    (MOE, None, {"num_experts": -8}, r"num_experts is -8; it must be an integer from 1 to"),
    (MOE, None, {"num_experts": 0}, r"num_experts is 0; it must be an integer from 1 to"),
    (MOE, None, {"num_experts_per_tok": 600}, r"num_experts_per_tok is 600, more than the 512 experts"),
    (MOE, None, {"num_experts_per_tok": 0}, r"num_experts_per_tok is 0"),
    (MOE, None, {"moe_intermediate_size": 2**40}, r"moe_intermediate_size is 1,099,511,627,776"),
    (MOE, None, {"vocab_size": 10**12}, r"vocab_size is 1,000,000,000,000"),
    (MOE, None, {"num_key_value_heads": 3},
     r"num_attention_heads \(32\) is not a multiple of num_key_value_heads \(3\)"),
    (MOE, None, {"linear_num_value_heads": 24}, r"linear_num_value_heads \(24\) is not a multiple"),
    (MOE, None, {"mtp_num_hidden_layers": 1000}, r"mtp_num_hidden_layers is 1,000; it must be an integer from 0 to 16"),
    (MOE, None, {"num_experts": -8, "vocab_size": 10**12}, r"vocab_size is 1,000,000,000,000; .*; num_experts is -8; "),
    (DENSE, "vision_config", {"hidden_size": 10**9}, r"vision_config\.hidden_size is 1,000,000,000"),
])
def test_configs_with_absurd_or_inconsistent_sizes_are_refused(tmp_path, capsys, base, part, edit, message):
    path = _config(tmp_path, base, edit, part)
    with pytest.raises(QuantlabError, match=message):
        read_estimation_model(path)
    assert main(["estimate", "--model", path, "--methods", "bf16", "--contexts", "4096", "--no-write"]) == 2
    assert "the config cannot be estimated" in one_error(capsys)


def test_a_config_of_more_than_100_trillion_parameters_is_refused(tmp_path):
    layer_types = (["linear_attention"] * 3 + ["full_attention"]) * 64
    path = _config(tmp_path, MOE, {"num_hidden_layers": 256, "layer_types": layer_types, "num_experts": 16384,
                                   "moe_intermediate_size": 65536, "hidden_size": 16384})
    with pytest.raises(QuantlabError, match=r"describes .* parameters; quantlab estimates models of at most"):
        read_estimation_model(path)


# ---- numeric options: finite, in range, one line ---------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--gpu-gb", "1e308"], "--gpu-gb: '1e+308': a GPU size is 0.1 to 4,096 GiB"),
    (["--gpu-gb", "1e30"], "--gpu-gb: '1e+30': a GPU size is"),
    (["--gpu-gb", "4097"], "--gpu-gb: '4097': a GPU size is"),
    (["--gpu-gb", "0.0001"], "--gpu-gb: '0.0001': a GPU size is"),
    (["--gpu-gb", "nan"], "--gpu-gb: sizes must be positive finite numbers"),
    (["--gpu-gb", "inf"], "--gpu-gb: sizes must be positive finite numbers"),
    (["--gpu-gb=-24"], "--gpu-gb: sizes must be positive finite numbers"),
    (["--gpu-gb", ",".join(["24"] * 33)], "--gpu-gb: 33 values; give at most 32"),
    (["--gpus", "2x0.01"], "--gpus: '2x0.01': a GPU size is"),
    (["--gpus", "2x9999"], "--gpus: '2x9999': a GPU size is"),
    (["--contexts", "9" * 400],
     "--contexts: context must be between 1 and 1,048,576 tokens, got an integer of 400 digits"),
    (["--contexts", "0"], "--contexts: context must be between 1"),
    (["--batch", "0"], "--batch: batch must be between 1 and 4,096, got 0"),
    (["--batch", "100000000000"], "--batch: batch must be between 1 and 4,096, got 100,000,000,000"),
    (["--prefill-chunk", "0"], "--prefill-chunk: prefill chunk must be between 1"),
    (["--batch", "1e3"], "--batch: '1e3' is not a whole number"),
    (["--batch", "9" * 5000], "--batch: a number of 5,000 digits is out of range"),
    (["--prefill-chunk", "1.5"], "--prefill-chunk: '1.5' is not a whole number"),
])
def test_numeric_options_out_of_range_are_one_line(capsys, monkeypatch, argv, message):
    import quantlab.estimate.command as command

    monkeypatch.setattr(command, "read_estimation_model", lambda *_: pytest.fail("refused before the model is read"))
    assert main(["estimate", "--no-write", "--methods", "bf16", *argv]) == 2
    assert message in one_error(capsys)


# ---- records and output files -----------------------------------------------------------------------------

def _gpu_record(folder: Path, allocated: int, reserved: int, nvml: int) -> str:
    source = sorted((REPO / "measurements" / "records").glob("*.json"))[0]
    record = json.loads(source.read_text())
    record["hardware"].update(kind="gpu", device="cuda:0", name="NVIDIA H100", gpu_memory_bytes=80 * 2**30)
    record["load_memory"].update(device="cuda:0", allocated_end_bytes=7_000_000)
    record["result"]["prefill_memory"].update(device="cuda:0", allocated_peak_bytes=allocated,
                                              reserved_peak_bytes=reserved, nvml_process_used_peak_bytes=nvml)
    record["result"]["decode_tokens_per_s"] = None
    (folder / "records").mkdir(parents=True)
    (folder / "records" / source.name).write_text(json.dumps(record))
    return record["record_id"]


@pytest.mark.parametrize("allocated, reserved, nvml, why", [
    (20_000_000, 10_000_000, 530_000_000, "its reserved peak is below its allocated peak"),
    (20_000_000, 22_000_000, 5_000_000, "its process memory (NVML) is below torch's reserved peak"),
    (1_000, 2_000, 530_000_000, "its prefill peak is below the weights allocated at load"),
])
def test_a_gpu_record_whose_figures_contradict_each_other_is_skipped_with_its_reason(tmp_path, allocated, reserved,
                                                                                      nvml, why):
    from quantlab.estimate.command import EstimateOptions, run_estimate

    record_id = _gpu_record(tmp_path / "m", allocated, reserved, nvml)
    result = run_estimate(EstimateOptions(model="bundled", methods="bf16", contexts="128", output=str(tmp_path / "m")))
    assert f"GPU record {record_id}: skipped, {why}" in result.model.notes
    assert result.assumptions.overheads_source == "assumed" and result.checks == []


def test_an_estimates_json_that_is_a_folder_is_said_not_dropped(tmp_path, capsys):
    from quantlab.estimate.report_section import estimate_section

    out = tmp_path / "m"
    (out / "records").mkdir(parents=True)
    (out / "estimates.json").mkdir()
    section = "\n".join(estimate_section(out))
    assert "estimates.json: skipped" in section and "not a regular file" in section
    assert main(["estimate", "--methods", "bf16", "--contexts", "4096", "--output", str(out)]) == 2
    assert "estimates.json: not a file" in one_error(capsys)
    assert not capsys.readouterr().out  # refused before the estimate's table
    shutil.rmtree(out / "estimates.json")
