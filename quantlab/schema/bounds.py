"""The ranges a stored figure can physically take, as pydantic field types: a record, an estimate or a bench result
that holds a negative size, a NaN, a zero speed or a 400-digit integer is refused where it is read, with the field
named, instead of being shown (or crashing the code that formats it)."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, ValidationError

MAX_BYTES = 10**15  # a petabyte: beyond any GPU, host or model file quantlab measures
MAX_ESTIMATE_BYTES = 10**18  # an estimate may be asked about absurd contexts; it must still format as a float
MAX_COUNT = 10**15  # parameters, tokens, samples: any sane count
MAX_ID = 2**32  # seeds and token ids
INNER_FIELD = re.compile(r"^([A-Za-z_][\w.]*): (.*)$", re.S)


def _no_text_or_bool(value: Any) -> Any:
    """JSON `true` and `"16"` are not numbers here (pydantic's lax mode would take them as 1 and 16)."""
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"a number is required, not {type(value).__name__}")
    return value


_Number = BeforeValidator(_no_text_or_bool)

Bytes = Annotated[int, _Number, Field(ge=0, lt=MAX_BYTES)]
EstimateBytes = Annotated[int, _Number, Field(ge=0, lt=MAX_ESTIMATE_BYTES)]
Count = Annotated[int, _Number, Field(ge=0, lt=MAX_COUNT)]
AtLeastOne = Annotated[int, _Number, Field(ge=1, lt=MAX_COUNT)]  # contexts, batches, repeats, windows
SmallId = Annotated[int, _Number, Field(ge=0, lt=MAX_ID)]
Finite = Annotated[float, _Number, Field(allow_inf_nan=False)]
NonNegative = Annotated[float, _Number, Field(ge=0, allow_inf_nan=False)]
Positive = Annotated[float, _Number, Field(gt=0, allow_inf_nan=False)]
Share = Annotated[float, _Number, Field(ge=0, le=1, allow_inf_nan=False)]  # a probability or a fraction of a whole


def check_interval(low: float, high: float, point: float | None = None, what: str = "interval") -> None:
    """ValueError unless low <= point <= high (exactly: the report draws point - low as an error bar)."""
    if not low <= high:
        raise ValueError(f"{what}: its low end {low!r} is above its high end {high!r}")
    if point is not None and not low <= point <= high:
        raise ValueError(f"{what}: [{low!r}, {high!r}] does not contain its point {point!r}")


def shaped(model: type[BaseModel]):
    """An AfterValidator that checks a dict against `model` and keeps it a dict (the code that reads it indexes it),
    with the first problem as one line."""
    def check(value: dict) -> dict:
        try:
            return model.model_validate(value).model_dump()
        except ValidationError as exc:
            raise ValueError(first_error(exc)) from None
    return AfterValidator(check)


def first_error(exc: ValidationError) -> str:
    """One line: the field, what is wrong with it, an excerpt of the value, and how many more problems there are."""
    errors = exc.errors(include_url=False)
    if not errors:
        return str(exc).splitlines()[0]
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    inner = INNER_FIELD.match(message) if first["type"] == "value_error" else None
    if inner:  # a nested check (shaped, quality_in_range) that already named its field
        where, message = ".".join(filter(None, (where, inner.group(1)))), inner.group(2)
    shown = first["type"] not in ("missing", "value_error", "assertion_error")  # those name no single value
    got = f" (got {_excerpt(first.get('input'))})" if shown else ""
    more = f"; and {len(errors) - 1} more problem(s)" if len(errors) > 1 else ""
    return f"{where or '(top level)'}: {message}{got}{more}"


def _excerpt(value: Any, limit: int = 40) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"  # its repr says nothing
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
