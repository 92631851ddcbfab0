"""Damaged or hostile records and data files against `quantlab report`: impossible values are refused where a record
is read (listed as unreadable, with the file and the field), text from a record or a data file is escaped wherever
it enters Markdown, a side file of another shape costs its section only, and a quality.png that is a folder costs
the figure only. Then a seeded fuzz: 300 mutated records, each ending in a report, never a traceback."""

from __future__ import annotations

import copy
import json
import random
import re
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from quantlab.cli import main
from quantlab.outputs import md_text
from quantlab.store import load_records

REPO = Path(__file__).resolve().parent.parent
MEASUREMENTS = REPO / "measurements"
NAN, INF = float("nan"), float("inf")


def _quality_pair() -> tuple[dict, dict]:
    """Two committed llama.cpp records (runtime settings and buffers: the most text a record holds) of different
    builds scored under one protocol, which the report compares."""
    groups = defaultdict(dict)
    for path in sorted((MEASUREMENTS / "records").glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        q = record.get("quality")
        if q and q.get("window_sums") and q.get("kl_mean_ci") and record["result"].get("runtime_buffers"):
            protocol = (q["reference"], q["tokens"], q["context"], q["stride"], q["text_label"])
            groups[protocol].setdefault(record["method"]["label"], record)
    pair = next(list(builds.values())[:2] for builds in groups.values() if len(builds) >= 2)
    return pair[0], pair[1]


BASE, OTHER = _quality_pair()


def folder_with(tmp_path: Path, record: dict, name: str = "damaged.json") -> Path:
    """A measurements folder: `record` as `name`, beside an untouched record of another build."""
    meas = tmp_path / "measurements"
    (meas / "records").mkdir(parents=True)
    (meas / "records" / "other.json").write_text(json.dumps(OTHER), encoding="utf-8")
    (meas / "records" / name).write_text(json.dumps(record), encoding="utf-8")
    return meas


def run_report(meas: Path, capsys) -> str:
    assert main(["report", "--output", str(meas)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.err == "", captured.err
    return (meas / "README.md").read_text(encoding="utf-8")


def edited(record: dict, changes: dict) -> dict:
    """A deep copy with dotted paths ("result.decode_tokens_per_s.min") set; a value of DELETE removes the key."""
    record = copy.deepcopy(record)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = record
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        key = int(last) if isinstance(node, list) else last
        if value is DELETE:
            del node[key]
        else:
            node[key] = value
    return record


DELETE = object()


def pipes(line: str) -> int:
    """Cell separators in a Markdown table line: `|` not escaped by a backslash."""
    count, i = 0, 0
    while i < len(line):
        if line[i] == "\\":
            i += 2
            continue
        count += line[i] == "|"
        i += 1
    return count


def broken_tables(text: str) -> list[str]:
    """Table lines with another number of cells than their table's header line."""
    broken, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
        elif header is None:
            header = pipes(line)
        elif pipes(line) != header:
            broken.append(line)
    return broken


# ---- impossible values: listed as unreadable, with the file and the field ----------------------------------------

def _tok_s(value: float) -> dict:
    return {f"result.decode_tokens_per_s.{k}": value for k in ("median", "min", "max", "mean")}


IMPOSSIBLE = {
    "negative weights": ({"weight_bytes": -7_000_000}, "weight_bytes"),
    "weights of 400 digits": ({"weight_bytes": 10**400}, "weight_bytes"),
    "weights beyond a petabyte": ({"weight_bytes": 10**15}, "weight_bytes"),
    "weights as text": ({"weight_bytes": "7370288"}, "weight_bytes"),
    "weights NaN": ({"weight_bytes": NAN}, "weight_bytes"),
    "KL of -1": ({"quality.kl_mean": -1.0}, "quality.kl_mean"),
    "KL NaN": ({"quality.kl_mean": NAN}, "quality.kl_mean"),
    "KL infinite": ({"quality.kl_max": INF}, "quality.kl_max"),
    "-5 tok/s": (_tok_s(-5.0), "result.decode_tokens_per_s"),
    "0 tok/s": (_tok_s(0.0), "result.decode_tokens_per_s"),
    "tok/s infinite": (_tok_s(INF), "result.decode_tokens_per_s"),
    "median outside min-max": ({"result.prefill_tokens_per_s.median": 10**9}, "result.prefill_tokens_per_s"),
    "context -128": ({"point.context": -128}, "point.context"),
    "context 0": ({"point.context": 0}, "point.context"),
    "batch true": ({"point.batch": True}, "point.batch"),
    "interval low above high": ({"quality.kl_mean_ci": [0.01, 0.001]}, "quality.kl_mean_ci"),
    "interval without its point": ({"quality.kl_mean_ci": [0.5, 0.6]}, "quality.kl_mean_ci"),
    "PPL ratio interval reversed": ({"quality.ppl_ratio_ci": [1.2, 1.1]}, "quality.ppl_ratio_ci"),
    "perplexity below 1": ({"quality.ppl_candidate": 0.5}, "quality.ppl_candidate"),
    "agreement above 1": ({"quality.top1_agreement": 1.5}, "quality.top1_agreement"),
    "negative RSS": ({"load_memory.rss_peak_bytes": -1}, "load_memory.rss_peak_bytes"),
    "negative cache": ({"result.cache_bytes": -4096}, "result.cache_bytes"),
    "negative buffer": ({"result.runtime_buffers.CPU KV": -1}, "result.runtime_buffers.CPU KV"),
    "negative token id": ({"result.first_tokens": [-1]}, "result.first_tokens.0"),
    "zero CPU cores": ({"hardware.cpu_cores": 0}, "hardware.cpu_cores"),
    "unknown status": ({"result.status": "exploded"}, "result.status"),
    "unknown hardware kind": ({"hardware.kind": "tpu|x"}, "hardware.kind"),
    "negative load time": ({"load_seconds": -0.1}, "load_seconds"),
    "a window of no tokens": ({"quality.window_sums.0.3": 0.0}, "quality.window_sums"),
    "a newer schema": ({"schema_version": 99}, "schema_version"),
    "not an object": (None, "(top level)"),
}


@pytest.mark.parametrize("case", IMPOSSIBLE)
def test_impossible_values_are_listed_unreadable_with_file_and_field(case, tmp_path, capsys):
    changes, field = IMPOSSIBLE[case]
    record = [1, 2] if changes is None else edited(BASE, changes)
    meas = folder_with(tmp_path, record)
    records, problems = load_records(meas)
    assert [r.method.label for r in records] == [OTHER["method"]["label"]]
    assert len(problems) == 1 and "damaged.json: skipped, not a valid record (" in problems[0]
    assert f"({field}" in problems[0], problems[0]
    assert "\n" not in problems[0]
    text = run_report(meas, capsys)
    assert "1 record(s)" in text and "## Unreadable files" in text
    unreadable = text.split("## Unreadable files")[1].strip().splitlines()
    assert len(unreadable) == 1 and "damaged.json" in unreadable[0] and md_text(field) in unreadable[0]
    assert broken_tables(text) == []


def test_a_null_where_the_schema_allows_one_renders_as_n_a(tmp_path, capsys):
    """decode not measured: null stays allowed, and the row says n/a (it was a traceback)."""
    record = edited(BASE, {"result.decode_tokens_per_s": None, "result.decode_ms_per_token": None,
                           "result.time_to_first_token_s": None, "result.decode_memory": None})
    text = run_report(folder_with(tmp_path, record), capsys)
    assert "2 record(s)" in text and "## Unreadable files" not in text
    label = md_text(BASE["method"]["label"])
    row = next(line for line in text.splitlines() if line.startswith(f"| {label} | "))
    assert row.count("n/a") >= 4 and broken_tables(text) == []


def test_every_committed_record_still_reads():
    records, problems = load_records(MEASUREMENTS)
    assert problems == [] and records


# ---- escaping: text from a record never becomes Markdown -----------------------------------------------------------

INJECTIONS = {
    "pipe": "A | B | C",
    "newline and heading": "name\n# Injected heading\n\n| x | y |",
    "HTML": "<script>alert(1)</script><img src=x onerror=alert(1)>",
    "image link": "![pwned](https://example.invalid/x.png)",
    "link and emphasis": "[click](https://example.invalid) **bold** _it_ `code` ~~gone~~",
    "backslash before a pipe": "a\\| b \\",
    "heading at the start": "# top",
    "unicode line separator": "one\u2028# two\u2029three",
    "mathtext in the figure": "a$\\frac{$x $^$",  # quality.png's labels: matplotlib must not parse them
}
# Text that keeps the damaged record in the quality comparison (and quality.png) with the other, and text that
# takes it out (the model's name and the protocol group builds).
COMPARED = ["method.label", "model.variant", "hardware.name", "notes.0", "software.quantlab", "runtime.version",
            "kernels.compute_dtype"]
FIELDS = {"compared": COMPARED, "all": COMPARED + ["model.name", "quality.text_label", "quality.reference"]}


def _unescaped(text: str) -> list[str]:
    """Signs that an injected text reached the Markdown as syntax."""
    found = [line for line in text.splitlines() if line.startswith(("# Injected", "# top", "# two", "| x |"))
             or re.match(r"#+ +#", line)]  # a heading whose text starts a heading of its own
    found += [m for m in ("<script", "<img", "**bold**", "`code`") if m in text]
    found += re.findall(r"(?<!\\)\]\(https://example", text)  # a link's `](` whose bracket is not escaped
    return found + [f"table: {line}" for line in broken_tables(text)]


@pytest.mark.parametrize("fields", FIELDS)
@pytest.mark.parametrize("payload", INJECTIONS)
def test_text_from_records_is_escaped_everywhere(payload, fields, tmp_path, capsys):
    changes = {field: INJECTIONS[payload] for field in FIELDS[fields]}
    changes["runtime.settings.evil|key"] = INJECTIONS[payload]
    text = run_report(folder_with(tmp_path, edited(BASE, changes)), capsys)
    assert "2 record(s)" in text and "## Unreadable files" not in text
    assert ("## Quality against size" in text) == (fields == "compared")
    assert _unescaped(text) == []
    assert md_text(INJECTIONS[payload]) in text  # shown, as text


def test_the_escaping_helper_on_its_own():
    assert md_text("a|b") == "a\\|b" and md_text("x\n# h") == "x \\# h"
    assert md_text("<b>") == "&lt;b&gt;" and md_text("![i](u)") == "\\!\\[i\\](u)"
    assert md_text("a\\|b") == "a\\\\\\|b"  # the text's own backslash cannot undo the escape of its pipe
    assert md_text("- item") == "\\- item" and md_text("BF16 (bundled)") == "BF16 (bundled)"


def test_file_names_and_reasons_of_unreadable_records_are_escaped(tmp_path, capsys):
    meas = folder_with(tmp_path, {"weight_bytes": "<b>|x"}, name="x|![i](u)#.json")
    text = run_report(meas, capsys)
    line = text.split("## Unreadable files")[1].strip().splitlines()
    assert len(line) == 1 and "<b>" not in text and "![i]" not in text and broken_tables(text) == []


# ---- side files of another shape: their section is left out, saying so ---------------------------------------------

def _real(name: str) -> dict:
    return json.loads((MEASUREMENTS / name).read_text(encoding="utf-8"))


SIDE_FILES = {
    "full size: a list": ("gguf-full-size.json", lambda d: [], "(top level)"),
    "full size: sizes of numbers": ("gguf-full-size.json", lambda d: {**d, "sizes": [1, 2]}, "sizes.0"),
    "full size: no size without MTP": ("gguf-full-size.json",
                                       lambda d: {**d, "sizes": [s for s in d["sizes"] if s["mtp"]]}, "sizes"),
    "full size: a size as text": ("gguf-full-size.json", lambda d: edited(d, {"sizes.0.tensor_bytes": "29 GB"}),
                                  "sizes.0.tensor_bytes"),
    "full size: a negative size": ("gguf-full-size.json", lambda d: edited(d, {"sizes.0.tensor_bytes": -1}),
                                   "sizes.0.tensor_bytes"),
    "full size: NaN published": ("gguf-full-size.json", lambda d: edited(d, {"published_gb.Q8_0": NAN}),
                                 "published_gb.Q8_0"),
    "full size: one fit of two": ("gguf-full-size.json", lambda d: {**d, "fits_24gib": {"f16_without_token_embd": 1}},
                                  "fits_24gib"),
    "full size: no label": ("gguf-full-size.json", lambda d: edited(d, {"label": DELETE}), "label"),
    "full size: not JSON": ("gguf-full-size.json", "{", "JSONDecodeError"),
    "full size: a folder": ("gguf-full-size.json", None, "not a regular file"),
    "CPU decode: negative tok/s": ("gguf-cpu-decode.json", lambda d: {**d, "decode_tokens_per_s": -1},
                                   "decode_tokens_per_s"),
    "CPU decode: checks as text": ("gguf-cpu-decode.json", lambda d: {**d, "checks": "x"}, "checks"),
    "CPU decode: NaN bandwidth": ("gguf-cpu-decode.json", lambda d: {**d, "bandwidth_before_gb_s": [NAN]},
                                  "bandwidth_before_gb_s.0"),
    "CPU decode: zero bytes a token": ("gguf-cpu-decode.json", lambda d: {**d, "bytes_read_per_token": 0},
                                       "bytes_read_per_token"),
    "CPU decode: no label": ("gguf-cpu-decode.json", lambda d: edited(d, {"label": DELETE}), "label"),
    "estimate: a claim of another shape": ("estimates.json", lambda d: {**d, "claims": [{"x": 1}]}, "claims.0.id"),
    "estimate: a check dividing by 0": ("estimates.json", lambda d: {**d, "checks": [{
        "model": "m", "variant": "text", "method": "none", "hardware": "H", "weights": "real", "context": 1,
        "batch": 1, "estimated_weights": 1, "measured_weights": 1, "estimated_allocated": 1, "measured_allocated": 0,
        "estimated_total": 1}]}, "checks.0.measured_allocated"),
    "estimate: weights of 400 digits": ("estimates.json", lambda d: edited(d, {"methods.0.weights_bytes": 10**400}),
                                        "methods.0.weights_bytes"),
    "estimate: a name that is a number": ("estimates.json", lambda d: edited(d, {"model.name": 5}), "model.name"),
}


def folder_with_side_files(tmp_path: Path) -> Path:
    meas = folder_with(tmp_path, BASE, name="base.json")
    for name in ("gguf-full-size.json", "gguf-cpu-decode.json", "estimates.json"):
        shutil.copy(MEASUREMENTS / name, meas / name)
    return meas


@pytest.mark.parametrize("case", SIDE_FILES)
def test_a_side_file_of_another_shape_costs_its_section_only(case, tmp_path, capsys):
    name, change, field = SIDE_FILES[case]
    meas = folder_with_side_files(tmp_path)
    (meas / name).unlink()
    if change is None:
        (meas / name).mkdir()
    else:
        (meas / name).write_text(change if isinstance(change, str) else json.dumps(change(_real(name))))
    text = run_report(meas, capsys)
    said = [line for line in text.splitlines() if md_text(name) in line and "skipped" in line]
    assert len(said) == 1 and md_text(field) in said[0] and "section is left out" in said[0], said
    assert "2 record(s)" in text and broken_tables(text) == []
    others = {"gguf-full-size.json": "| Type | Tensor data", "gguf-cpu-decode.json": "- Decode: ",
              "estimates.json": "| Claim | Estimate |"}
    for other, marker in others.items():  # the other sections are still there; this one is not
        assert (marker in text) == (other != name), (other, marker)


def test_text_from_data_files_is_escaped(tmp_path, capsys):
    payload = INJECTIONS["newline and heading"] + INJECTIONS["HTML"] + INJECTIONS["image link"]
    meas = folder_with_side_files(tmp_path)
    for name, changes in {"gguf-full-size.json": {"label": payload, "llama_cpp": payload},
                          "gguf-cpu-decode.json": {"label": payload, "cpu": payload, "bandwidth_method": payload},
                          "estimates.json": {"model.name": payload, "claims.0.claim": payload,
                                             "claims.0.detail": payload, "methods.0.label": payload}}.items():
        (meas / name).write_text(json.dumps(edited(_real(name), changes)))
    text = run_report(meas, capsys)
    assert "skipped" not in text and _unescaped(text) == []
    assert text.count(md_text(payload)) >= 7


# ---- quality.png that cannot be replaced: the figure is left out, the report is written ----------------------------

def test_a_quality_png_that_is_a_folder_costs_the_figure_only(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    meas = folder_with(tmp_path, BASE, name="base.json")
    (meas / "quality.png").mkdir()
    (meas / "quality.png" / "keep.txt").write_text("mine")
    text = run_report(meas, capsys)
    assert "## Quality against size: every build" in text and "![weight bytes against KL mean]" not in text
    notes = [line for line in text.splitlines() if line.startswith("- quality.png: not drawn")]
    assert len(notes) == 1
    assert (meas / "quality.png" / "keep.txt").read_text() == "mine"
    shutil.rmtree(meas / "quality.png")
    text = run_report(meas, capsys)
    assert "![weight bytes against KL mean](quality.png)" in text and (meas / "quality.png").is_file()


# ---- fuzz: 300 mutated records, each rendered escaped or listed unreadable, never a traceback ---------------------

SEED = 20261207
CASES = 300
FUZZ_TEXT = "x|y\n# FUZZ-HEADING <b>FUZZ</b> ![FUZZ](fuzz.png) [l](u) *e* _u_ `c` \\| $\\frac{$ " * 20
MUTANTS = [-1, -128, 0, 1, 10**400, 10**15, 2**63, -(2**70), NAN, INF, -INF, -5.0, 0.0, 1e308, 1e-320, None, True,
           False, "", "12", "-1", "gpu", FUZZ_TEXT, [], {}, [1, "x"], [[NAN]], {"a": FUZZ_TEXT}, DELETE]


def _paths(node, prefix=()):
    """Every key and list item, but only the first two items of a list (window sums and tokens are long)."""
    if prefix:
        yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node[:2]) if isinstance(node, list) else ()
    for key, value in items:
        yield from _paths(value, prefix + (str(key),))


def _mutated(rng: random.Random) -> tuple[dict, list[str]]:
    record, done = copy.deepcopy(BASE), []
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(list(_paths(record)))
        pick = rng.random()  # text and nulls more often: they are what a renderer mishandles
        value = FUZZ_TEXT if pick < 0.25 else None if pick < 0.45 else rng.choice(MUTANTS)
        if value is DELETE and path[-1].isdigit():
            value = None
        record = edited(record, {".".join(path): value})
        done.append(f"{'.'.join(path)}={'DELETE' if value is DELETE else repr(value)[:30]}")
    return record, done


def test_fuzzed_records_are_rendered_escaped_or_listed_unreadable(tmp_path, capsys, monkeypatch):
    from quantlab import extras

    plain_installed = extras.installed
    rng = random.Random(SEED)
    outcomes = defaultdict(int)
    for case in range(CASES):
        record, done = _mutated(rng)
        # quality.png is drawn for one case in ten: matplotlib is the slow part, and the rest reads the same values
        draw = case % 10 == 0
        monkeypatch.setattr(extras, "installed", lambda name, draw=draw: plain_installed(name)
                            and (draw or name != "matplotlib"))
        meas = folder_with(tmp_path / str(case), record)
        try:
            text = run_report(meas, capsys)
        except Exception as exc:  # a traceback: say which mutation made it
            raise AssertionError(f"case {case}: {done}") from exc
        unreadable = text.split("## Unreadable files")[1].strip().splitlines() if "## Unreadable" in text else []
        listed = len(unreadable) == 1 and "damaged.json: skipped" in unreadable[0]
        rendered = "2 record(s)" in text and not unreadable
        assert listed != rendered, (case, done)
        assert _unescaped(text) == [] and "<b>FUZZ" not in text, (case, done)
        assert not re.search(r"^#+ FUZZ|(?<!\\)!\[FUZZ", text, re.M), (case, done)
        assert not re.search(r"^\|.*\b(nan|inf)\b", text, re.M | re.I), (case, done)  # a NaN shown as a number
        outcomes["unreadable" if listed else "rendered"] += 1
        shutil.rmtree(tmp_path / str(case))
    print(f"fuzz: {dict(outcomes)}")
    assert outcomes["unreadable"] > 50 and outcomes["rendered"] > 20, dict(outcomes)
