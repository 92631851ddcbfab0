"""User-facing errors: the CLI prints these as one clear message, never a traceback."""


class QuantlabError(Exception):
    """A problem the user can fix: bad recipe, missing weights, corrupt shard, ..."""


class RecipeError(QuantlabError):
    """A recipe file that does not validate."""
