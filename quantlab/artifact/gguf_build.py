"""`quantlab build` for the gguf method: a folder with the GGUF file that llama.cpp, Ollama and LM Studio load.

recipe → plan (every check before any work) → llama.cpp's converter, imatrix and quantizer → greedy tokens through
llama.cpp → measure (optional) → card → checksums → rename. As for every build, all of it happens in a hidden
folder beside the target, renamed at the very end; `quantlab verify` checks the checksums, the GGUF header, and
that llama.cpp reproduces the recorded greedy tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from quantlab.artifact.results import BuildResult, VerifyResult
from quantlab.checksums import check_checksums, write_checksums
from quantlab.errors import QuantlabError
from quantlab.llamacpp.gguf_file import read_header
from quantlab.outputs import check_measurements_folder
from quantlab.placement import building, check_target
from quantlab.recipe import BuildSpec
from quantlab.runtimes.base import LoadRequest
from quantlab.schema.build import CHECKSUMS_NAME, GGUF_MANIFEST_NAME, read_gguf_manifest

MANIFEST_NAME = GGUF_MANIFEST_NAME


def build_gguf(loaded, target: Path, force: bool, out_dir: Path, measure: bool, progress: bool,
               echo: Callable[[str], None]):
    from quantlab.methods import method_for
    from quantlab.plan import make_plan
    from quantlab.run import Candidate, measure_candidate, write_checkpoint
    from quantlab.store import append_record

    plan = make_plan(loaded, records_to=out_dir if measure else None)
    method = method_for(plan.recipe.quantization)
    check_target(target, force, {"the source model's folder": plan.source.files(), "the measurements folder": out_dir})
    with building(target, force) as tmp:
        written, cost = write_checkpoint(plan, method, tmp, progress, echo)
        _remove_side_files(tmp)
        gguf = tmp / method.artifact_file
        spec = plan.recipe.build or BuildSpec()
        greedy = greedy_check(plan, gguf, spec, echo)
        records = []
        if measure:
            note = f"measured from the build folder {target}"
            candidate = Candidate(plan.source, gguf=gguf, names={"name": plan.source.name, "location": str(target)},
                                  notes=(note,))
            records = list(measure_candidate(plan, candidate, out_dir, progress, echo, append=False).records)
        header = read_header(gguf)
        manifest = {
            "format": "gguf", "base_model": plan.source.name, "recipe": plan.loaded.recipe.name,
            "method": {"name": method.name, "label": plan.method_label, "params": plan.method_params},
            "llama_cpp": _llama_version(), "notes": list(written.notes),
            "calibration": written.calibration_label, "quantize_seconds": cost.seconds,
            "file": method.artifact_file, "file_bytes": header.file_bytes, "block_count": header.block_count,
            "mtp": header.has_mtp(), "parameters_by_type": header.parameters_by_type(),
            "greedy": greedy, "record_ids": [r.record_id for r in records],
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(card(manifest, header, records, target.name), encoding="utf-8")
        write_checksums(tmp)
        if records:
            check_measurements_folder(out_dir)  # again: the records must be written once the folder is in place
    paths = tuple(append_record(out_dir, r) for r in records)
    echo(f"built {target}: {header.file_bytes / 1e6:,.2f} MB GGUF ({plan.method_label}), {len(paths)} record(s)")
    return BuildResult(target, None, tuple(records), paths, header.file_bytes)


def _llama_version() -> str:
    from quantlab import llamacpp

    return llamacpp.locate().version


def _remove_side_files(folder: Path) -> None:
    """The run copies tokenizer and config files beside a checkpoint; a GGUF carries its own vocabulary."""
    for path in folder.iterdir():
        if path.suffix != ".gguf":
            path.unlink()


def greedy_check(plan, gguf: Path, spec: BuildSpec, echo) -> dict:
    """The prompt's greedy continuation through llama.cpp, recorded for `quantlab verify` to reproduce."""
    import torch

    from quantlab.runtimes.libllama import LlamaCppRuntime

    tokenizer = plan.source.tokenizer()
    ids = tokenizer(spec.prompt, add_special_tokens=False)["input_ids"] if tokenizer is not None else [0]
    tokens = run_greedy(LlamaCppRuntime(), plan.source, gguf, ids, spec.check_tokens, plan.recipe.measure,
                        torch.device("cpu"))
    echo(f"greedy check: {len(tokens)} tokens through llama.cpp")
    return {"prompt": spec.prompt, "prompt_ids": ids, "new_tokens": spec.check_tokens, "tokens": tokens}


def run_greedy(runtime, source, gguf: Path, ids: list[int], new_tokens: int, measure, device) -> list[int]:
    import torch

    loaded = runtime.load(LoadRequest(source, device, gguf=gguf, settings=runtime.options(measure, device)))
    try:
        vocab = runtime.vocab_size(loaded.model)
        if any(not 0 <= i < vocab for i in ids):
            raise QuantlabError(f"{gguf.name}: the greedy check's prompt ids are not all in its vocabulary "
                                f"({vocab:,} tokens)")
        runtime.prepare_point(loaded.model, len(ids), 1, new_tokens)
        first, position = runtime.prefill(loaded.model, torch.tensor([ids]))
        return runtime.decode(loaded.model, first, position, new_tokens - 1)[0].tolist()
    finally:
        loaded.model.close()


def verify_gguf(folder: Path, load: bool, device: str, echo):
    problems, good = check_checksums(folder)
    for p in problems:
        echo(f"  FAIL {p}")
    echo(f"checksums: {len(good)} file(s) match" + (f", {len(problems)} problem(s)" if problems else ""))
    manifest = read_gguf_manifest(folder)  # schema-checked: its file is a name in this folder, its counts bounded
    if not problems and manifest.file not in good:
        problems = [f"{manifest.file}: the manifest's GGUF is not a file of this build listed in {CHECKSUMS_NAME}"]
        echo(f"  FAIL {problems[0]}")
    if problems or not load:
        return VerifyResult(not problems, tuple(problems), len(good))
    if device != "cpu":
        raise QuantlabError(f"--device {device[:20]!r}: a GGUF build is verified through llama.cpp on the CPU, where "
                            "its greedy tokens were recorded; leave --device out")
    mismatch = _file_problem(folder, manifest, good)
    if mismatch:
        echo(f"  FAIL {mismatch}")
        return VerifyResult(False, (mismatch,), len(good))
    return _verify_greedy(folder, manifest, good, echo)


def _file_problem(folder: Path, manifest, good: list[str]) -> str | None:
    """Why the manifest's GGUF is not this build's checked file, or None: listed and matching in SHA256SUMS, a GGUF
    of the recorded size and tensor types."""
    if manifest.file not in good:
        return f"{manifest.file}: the manifest's GGUF is not a file of this build listed in {CHECKSUMS_NAME}"
    header = read_header(folder / manifest.file)
    if header.file_bytes != manifest.file_bytes or header.parameters_by_type() != manifest.parameters_by_type:
        return (f"{manifest.file}: {header.file_bytes:,} bytes and {len(header.parameters_by_type())} tensor type(s), "
                f"not the {manifest.file_bytes:,} bytes and types {MANIFEST_NAME} records")
    kind = manifest.method.params.get("type")
    said = {"block_count": (manifest.block_count, manifest.block_count, header.block_count),
            "mtp": (manifest.mtp, manifest.mtp, header.has_mtp()),
            "method.params.type": (kind, _file_type(kind), header.file_type)}
    wrong = [f"{key} {shown!r}" for key, (shown, mine, found) in said.items() if mine is not None and mine != found]
    if wrong:
        return f"{MANIFEST_NAME} says {', '.join(wrong)}, which {manifest.file}'s header contradicts"
    return None


def _file_type(name) -> int | None:
    """llama.cpp's general.file_type for a type name (gguf-py's LlamaFileType); None for a name it has no value for."""
    from gguf import LlamaFileType

    member = LlamaFileType.__members__.get(f"MOSTLY_{str(name).upper()}")
    return int(member) if member is not None else None


def _verify_greedy(folder: Path, manifest, good: list[str], echo) -> VerifyResult:
    from types import SimpleNamespace

    import torch

    from quantlab.recipe import MeasureSpec
    from quantlab.runtimes.libllama import LlamaCppRuntime
    from quantlab.threads import fit_threads

    header = read_header(folder / manifest.file)
    echo(f"GGUF header: {header.architecture}, {len(header.tensors)} tensors, {header.file_bytes:,} bytes")
    g = manifest.greedy
    source = SimpleNamespace(name=manifest.base_model, spec=SimpleNamespace(source="build", variant="text"),
                             weights="real", config=None)
    note = fit_threads()  # llama.cpp's threads spin like torch's: as many as there are idle cores
    if note:
        echo(f"note: {note}")
    tokens = run_greedy(LlamaCppRuntime(), source, folder / manifest.file, list(g.prompt_ids), g.new_tokens,
                        MeasureSpec(runtime="llama.cpp"), torch.device("cpu"))
    same = tokens == list(g.tokens)
    echo(f"greedy tokens through llama.cpp: {'the same' if same else 'DIFFERENT'} ({len(tokens)} tokens)")
    if not same:
        return VerifyResult(False, (f"greedy tokens differ: recorded {list(g.tokens[:8])}..., now {tokens[:8]}...",),
                            len(good))
    return VerifyResult(True, (), len(good))


def card(m: dict, header, records, name: str) -> str:
    params = m["method"]["params"]
    total = header.parameters or 1
    lines = [
        "---",
        f"base_model: {m['base_model']}",
        "tags: [gguf, llama.cpp, quantlab]",
        "---",
        "",
        f"# {name}: {m['method']['label']}",
        "",
        f"`{m['file']}` ({header.file_bytes / 1e9:.3f} GB, {header.file_bytes:,} bytes), made by llama.cpp's own "
        f"converter{', importance-matrix tool' if params.get('imatrix') else ''} and quantizer "
        f"({m['llama_cpp'] or 'llama.cpp'}), driven by quantlab recipe `{m['recipe']}`.",
        "",
        "| | |",
        "|---|---|",
        f"| type | `{params.get('type')}` |",
        f"| importance matrix | {m['calibration'] or 'none'} |",
        f"| MTP head | {'kept (blk.' + str((header.block_count or 1) - 1) + ')' if m['mtp'] else 'none'} |",
        f"| blocks | {header.block_count} |",
        "",
        "## Tensor types",
        "",
        "| GGML type | Parameters | Share |",
        "|---|---:|---:|",
        *[f"| {t} | {n:,} | {100 * n / total:.1f}% |" for t, n in m["parameters_by_type"].items()],
        "",
        "## Use",
        "",
        "```bash",
        f"llama-cli -m {m['file']} -p \"def fibonacci(n):\" -n 64",
        f"llama-server -m {m['file']} -c 32768      # an OpenAI-compatible server",
        f"printf 'FROM ./{m['file']}\\n' > Modelfile && ollama create {name.lower()} -f Modelfile && ollama run {name.lower()}",
        "```",
        "",
        "`quantlab verify` checks the SHA256SUMS, the GGUF header, and that llama.cpp reproduces the greedy tokens "
        f"recorded at build time ({m['greedy']['new_tokens']} tokens after `{m['greedy']['prompt']}`).",
        "",
    ]
    if records:
        from quantlab.run import describe_point

        lines += ["## Measured at build time", "", *[f"- {describe_point(r)}" for r in records], ""]
        q = records[0].quality
        if q is not None:
            from quantlab.quality.show import quality_card_lines

            lines += quality_card_lines(q)
    return "\n".join(lines) + "\n"


def check_gguf_buildable(recipe) -> None:
    if recipe.measure.runtime != "llama.cpp":
        raise QuantlabError("a GGUF build is measured through llama.cpp: set measure.runtime: llama.cpp")
