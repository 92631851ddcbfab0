"""Field types shared by the recipe's sections: strict, bounded, and named in their error messages.

Every recipe model is strict (a boolean is not a number, "5" is not an integer) and finite (no NaN
or infinity); these types add what a plain `str` or `int` lets through.
"""

from __future__ import annotations

import re
from typing import Annotated

from pathlib import Path

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field

from quantlab.architecture import TENSOR_CLASS_NAMES
from quantlab.errors import QuantlabError
from quantlab.strict_yaml import excerpt

# What every recipe model shares: unknown keys are errors, values keep their YAML type, floats are finite.
STRICT = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

SEED_MAX = 2**32 - 1  # torch accepts more; numpy and most tools stop here
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _no_control_characters(value: str) -> str:
    match = _CONTROL.search(value)
    if match:
        raise ValueError(f"must not contain control characters, found {match.group()!r} at position {match.start()}")
    return value


def _home_known(value: str) -> str:
    if value.startswith("~"):
        try:
            Path(value).expanduser()
        except RuntimeError:
            user = value.split("/", 1)[0]
            raise ValueError(f"{excerpt(value)}: the home folder of {excerpt(user)} is not known here") from None
    return value


def _int_only(value: object) -> object:
    """Literal[2, 4] accepts 4.0 and True == 1 even in strict mode; a choice of integers takes integers."""
    if type(value) is not int:
        raise ValueError(f"must be an integer, got {excerpt(value)}")
    return value


def _git_ref(value: str) -> str:
    """A branch, tag or commit as git allows it: no '..', no empty or dot-led path part (git check-ref-format)."""
    if ".." in value or any(part in ("", ".") or part.startswith(".") for part in value.split("/")):
        raise ValueError("a branch, tag or commit name has no '..', no empty part and no part starting with '.'; got "
                         + excerpt(value))
    return value


def _repo_id(value: str) -> str:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        raise ValueError(
            "not a valid Hugging Face repo id: expected NAME or OWNER/NAME, 1 to 96 characters of letters, digits, "
            "'-', '_' and '.', not starting or ending with '-' or '.', without '--' or '..'; got " + excerpt(value)
        ) from None
    return value


# A file or folder: not empty (an empty path would mean the working directory), one line, of sane length.
PathText = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_no_control_characters),
                     AfterValidator(_home_known)]
# A Hugging Face repo id (a model or a dataset), checked with huggingface_hub's own rules.
RepoId = Annotated[str, AfterValidator(_repo_id)]
# A Hub revision: a branch, tag or commit (refs/pr/1 included).
Revision = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$"), AfterValidator(_git_ref)]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
# For a Literal of integers: Annotated[Literal[32, 64, 128], IntOnly].
IntOnly = BeforeValidator(_int_only)


def _known_classes_once(value: list[str]) -> list[str]:
    unknown = sorted(set(value) - set(TENSOR_CLASS_NAMES))
    if unknown:
        raise ValueError(f"unknown tensor class(es) {unknown}; classes: {', '.join(TENSOR_CLASS_NAMES)}")
    repeated = sorted({c for c in value if value.count(c) > 1})
    if repeated:
        raise ValueError(f"tensor class(es) named more than once: {repeated}")
    return value


# Tensor classes (quantlab.architecture.TENSOR_CLASSES) a method keeps unquantized on top of its own rules.
SkipClasses = Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=64),
                        AfterValidator(_known_classes_once)]


_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_MEMORY_SIZE = re.compile(r"\s*(\d{1,6}(?:\.\d{1,3})?)\s*([MGT]i?B)\s*", re.I)

# Device memory as accelerate's max_memory takes it: '20GiB', '24GB', '512 MiB'.
MemorySize = Annotated[str, BeforeValidator(lambda v: _unit_needed(v)), AfterValidator(lambda v: _memory_size_text(v))]
MAX_DEVICE_BYTES = 64 << 40  # 64 TiB: more than any one device (or host) quantlab can place weights on


def _unit_needed(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise ValueError(f"{excerpt(value)}: a memory size needs a unit, e.g. 20GiB, 24GB or 512MiB")
    return value


def _memory_size_text(text: str) -> str:
    if len(text) > 24 or not _MEMORY_SIZE.fullmatch(text):
        raise ValueError(f"{excerpt(text)} is not a memory size like 20GiB, 24GB or 512MiB (at most 6 digits, 3 "
                         "decimals and a unit)")
    size = memory_bytes(text)
    if size <= 0:
        raise ValueError(f"{excerpt(text)}: a memory size must be more than zero")
    if size > MAX_DEVICE_BYTES:
        raise ValueError(f"{excerpt(text)}: more memory than any one device has (at most 64TiB)")
    return text


def memory_bytes(text: str) -> int:
    """'20GiB' -> 21474836480 (a MemorySize, already checked)."""
    number, unit = _MEMORY_SIZE.fullmatch(text).groups()
    return int(float(number) * _UNITS[unit.upper()])


def parse_size(text: str) -> int:
    """'5GB', '500 MiB' -> bytes (the build spec's max_shard_size)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", text, re.I)
    if not match:
        raise QuantlabError(f"build.max_shard_size: {text!r} is not a size like 5GB or 500MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def path_option(value: str | None, option: str) -> str | None:
    """A path given on the command line, held to a recipe path's rules (not empty, one line, of sane length), or a
    QuantlabError naming the option; None stays None (the option was not given)."""
    from pydantic import TypeAdapter, ValidationError

    from quantlab.errors import QuantlabError

    if value is None:
        return None
    if not value.strip():
        raise QuantlabError(f"{option} {excerpt(value)}: an empty path; give a file or folder name")
    try:
        return TypeAdapter(PathText).validate_python(value)
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise QuantlabError(f"{option} {excerpt(value)}: {reason}") from None
