"""User-facing errors: the CLI prints these as one clear message, never a traceback."""


class QuantlabError(Exception):
    """A problem the user can fix: bad recipe, missing weights, corrupt shard, ..."""


class RecipeError(QuantlabError):
    """A recipe file that does not validate."""


def summary(exc: BaseException, limit: int = 300) -> str:
    """'Type: first line' of an exception from a library, for a one-line message (a line ending in ':'
    takes the next one with it: transformers' config validation says what is wrong there)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"{type(exc).__name__}: {text[:limit]}"
