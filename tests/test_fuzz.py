"""Fuzzing `quantlab validate`: a few hundred generated recipes, seeded, each ending in exit 0 or one clear message.

Recipes are made three ways: a valid recipe with one to three values, keys or sections replaced by random
ones (random types, values, keys, nesting); the YAML text of a valid recipe cut, spliced or salted with
YAML features a recipe refuses (anchors, aliases, tags, duplicate keys); and random bytes. The models
they name are cheap to plan (the bundled model, a tiny config), so the whole test takes seconds.
"""

from __future__ import annotations

import random
import time

import pytest
import yaml

from quantlab.cli import main

SEED = 20261130
RECIPES = 300
SLOWEST = 5.0  # CPU seconds one validate may use (a cheap plan is ~0.1 s; the first calibration text ~2 s)

KEYS = ["name", "description", "model", "source", "id", "path", "config", "variant", "dtype", "device", "seed",
        "quantization", "method", "bits", "group_size", "skip_modules", "measure", "contexts", "new_tokens",
        "batch_sizes", "warmup", "repeats", "output", "dir", "report", "quality", "tokens", "context", "stride",
        "mode", "top_k", "reference", "cache_dir", "build", "out", "prompt", "max_shard_size", "calibration",
        "samples", "seq_len", "threshold", "quant_type", "engine", "", "名前", "x" * 300]
STRINGS = ["", " ", "bundled", "synthetic", "local", "hub", "none", "rtn", "bnb_int8", "bnb_4bit", "awq", "nf4",
           "cpu", "cuda", "cuda:99", "auto", "text", "full", "bfloat16", "int3", "5GB", "0GB", "../../etc", "/",
           "a\x00b", "tab\there", "Qwen/Qwen3.6-27B", "a/b/c", "-x", "x" * 5000, "ü" * 100, "\u202e", "~", "."]
TAGS = ["!!binary aGVsbG8=", "!!python/object:os.system {}", "!!set {a, b}", "!!timestamp 2026-01-01", "!foo bar",
        "!!float .inf", "!!int 0x7fffffffffffffffffff", "&anchor x", "*alias", "<<: {a: 1}"]


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(12 if depth < 3 else 8)
    if kind == 0:
        return rng.choice([0, 1, -1, 2, 7, 64, 128, 4096, 2**31, 2**63, 2**64 + 1, -(2**70), 10**30])
    if kind == 1:
        return rng.choice([0.0, -0.5, 1.5, 1e308, -1e-308, float("inf"), float("-inf"), float("nan")])
    if kind == 2:
        return rng.choice([True, False, None])
    if kind in (3, 4, 5):
        return rng.choice(STRINGS)
    if kind == 6:
        return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(1, 40)))
    if kind == 7:
        return rng.randrange(-10, 10**6)
    if kind in (8, 9):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(0, 6))]
    return {rng.choice(KEYS): random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))}


def paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from paths(value, prefix + (i,))


def mutate(rng: random.Random, recipe: dict) -> dict:
    for _ in range(rng.randrange(1, 4)):
        where = rng.choice([p for p in paths(recipe) if p])
        parent = recipe
        for part in where[:-1]:
            parent = parent[part]
        action = rng.randrange(4)
        if action == 0 and isinstance(parent, dict):
            del parent[where[-1]]
        elif action == 1 and isinstance(parent, dict):
            parent[rng.choice(KEYS)] = random_value(rng)
        elif action == 2:
            parent[where[-1]] = {rng.choice(KEYS): random_value(rng)} if rng.random() < 0.3 else [parent[where[-1]]]
        else:
            parent[where[-1]] = random_value(rng)
    return recipe


def text_mutation(rng: random.Random, text: str) -> str:
    lines = text.splitlines()
    action = rng.randrange(6)
    if action == 0:  # truncate anywhere
        return text[: rng.randrange(len(text))]
    if action == 1:  # a YAML feature a recipe refuses, or a tag
        lines.insert(rng.randrange(len(lines) + 1), f"{rng.choice(KEYS) or 'k'}: {rng.choice(TAGS)}")
        return "\n".join(lines)
    if action == 2:  # a line repeated: duplicate keys
        return "\n".join(lines + [rng.choice(lines)])
    if action == 3:  # random bytes spliced in (decoded leniently: the file is written as bytes below)
        at = rng.randrange(len(text))
        return text[:at] + "".join(chr(rng.randrange(0, 0x110000) % 0xD7FF) for _ in range(rng.randrange(1, 8))) + text[at:]
    if action == 4:  # deep flow nesting
        depth = rng.randrange(10, 3000)
        return text + f"\nextra: {'[' * depth}{']' * depth}\n"
    return text.replace(":", rng.choice([":", "::", ": &a", ": *a", ":\t", " :"]), 1)


@pytest.fixture(scope="module")
def base_recipes(tmp_path_factory, tiny_config_dir):
    out = str(tmp_path_factory.mktemp("fuzz-out") / "measurements")
    return [
        {"name": "b", "model": {"source": "bundled", "device": "cpu"}, "measure": {"contexts": [16, 32], "new_tokens": 4},
         "output": {"dir": out}},
        {"name": "s", "model": {"source": "synthetic", "config": str(tiny_config_dir), "variant": "full", "dtype": "float32"},
         "quantization": {"method": "rtn", "bits": 4, "group_size": 64}, "measure": {"batch_sizes": [1, 2], "seed": 3}},
        {"name": "q", "model": {"source": "bundled"}, "quantization": {"method": "bnb_4bit", "quant_type": "fp4"},
         "quality": {"tokens": 256, "context": 64, "mode": "stored", "top_k": 8}, "build": {"check_tokens": 2}},
        {"name": "a", "model": {"source": "bundled"},
         "quantization": {"method": "awq", "group_size": 64, "calibration": {"samples": 2, "seq_len": 32}}},
    ]


def generated(rng: random.Random, bases: list[dict]) -> bytes:
    strategy = rng.randrange(10)
    base = yaml.safe_dump(rng.choice(bases), sort_keys=False, allow_unicode=True)
    if strategy < 6:
        import copy

        data = mutate(rng, copy.deepcopy(rng.choice(bases)))
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=10**6).encode("utf-8")
    if strategy < 9:
        return text_mutation(rng, base).encode("utf-8", errors="surrogatepass")
    return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 400)))


@pytest.mark.slow
def test_fuzzed_recipes_validate_or_fail_with_one_clear_message(base_recipes, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a random hub id must never wait on a network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    rng = random.Random(SEED)
    outcomes = {0: 0, 1: 0}
    slowest = (0.0, b"")
    for i in range(RECIPES):
        data = generated(rng, base_recipes)
        path = tmp_path / f"fuzz-{i:03d}.yaml"
        path.write_bytes(data)
        start = time.process_time()  # CPU time: a busy machine slows the wall clock, not the work done
        code = main(["validate", str(path)])
        took = time.process_time() - start
        slowest = max(slowest, (took, data))
        out, err = capsys.readouterr()
        assert code in outcomes, (code, data[:500], err[-2000:])
        outcomes[code] += 1
        if code == 0:
            assert out.startswith(f"ok: {path}: ") and not err, (data[:500], out, err)
            continue
        lines = err.rstrip("\n").splitlines()
        assert lines and lines[0].startswith(f"invalid: {path}"), (data[:500], err[-2000:])
        assert all(line.startswith("  - ") for line in lines[1:]), (data[:500], err[-2000:])
        assert "Traceback" not in err and len(err) < 5000, (data[:500], err[-2000:])
    assert slowest[0] < SLOWEST, slowest
    assert outcomes[0] >= 10 and outcomes[1] >= RECIPES // 2, outcomes  # the fuzz reaches the plan, not only the parser
