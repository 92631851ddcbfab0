"""A strict YAML reader for files a user hands quantlab (recipes): bounded, unambiguous, no surprises.

YAML's conveniences are a risk in a file that drives a 56 GB load: an alias can expand to gigabytes
(an "alias bomb"), a duplicate key silently wins over the first, a deeply nested document exhausts
Python's stack. Recipes need none of them, so this loader refuses them, with the line and column:

- anchors and aliases (`&a`, `*a`) and merge keys (`<<`);
- duplicate keys in a mapping, and keys that are not plain strings (`1:`, `true:`, `[a]:`);
- nesting deeper than MAX_DEPTH levels, and integers of more than MAX_NUMBER_CHARS characters.

The size and encoding of the file are checked before it is parsed (`read_text_file`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, ScalarNode

from quantlab.errors import QuantlabError

MAX_DEPTH = 32  # a recipe is four levels deep
MAX_NUMBER_CHARS = 40  # the largest meaningful number (a seed, a context) has 10 digits
_STR_TAG = "tag:yaml.org,2002:str"


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader without anchors, aliases, merge keys, duplicate or non-string keys, or deep nesting."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(AliasEvent):
            event = self.get_event()
            raise ComposerError(None, None, f"aliases (*{event.anchor}) are not allowed in a recipe; write the value out",
                                event.start_mark)
        event = self.peek_event()
        if event.anchor is not None:
            raise ComposerError(None, None, f"anchors (&{event.anchor}) are not allowed in a recipe; write the value out",
                                event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            seen: dict[str, Any] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, ScalarNode) or key_node.tag != _STR_TAG:
                    shown = key_node.value if isinstance(key_node, ScalarNode) else f"a {key_node.id}"
                    raise ConstructorError(None, None, f"keys must be plain strings, got {excerpt(shown)}"
                                           + (" (a merge key, which needs an alias)" if shown == "<<" else ""),
                                           key_node.start_mark)
                if key_node.value in seen:
                    first = seen[key_node.value]
                    raise ConstructorError(None, None, f"duplicate key {excerpt(key_node.value)} (first on line "
                                           f"{first.line + 1}); each key may appear once", key_node.start_mark)
                seen[key_node.value] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


    def construct_yaml_int(self, node):
        if len(node.value) > MAX_NUMBER_CHARS:  # Python refuses to convert ints of more than 4,300 digits
            raise ConstructorError(None, None, f"a number written with {len(node.value):,} characters; "
                                   f"numbers in a recipe have at most {MAX_NUMBER_CHARS}", node.start_mark)
        return super().construct_yaml_int(node)


StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)


def excerpt(value: Any, limit: int = 80) -> str:
    """repr(value), cut to about `limit` characters: an error message never carries a megabyte of input."""
    return shorten(repr(value), limit)


def shorten(text: str, limit: int = 200) -> str:
    """`text`, or its start and end with the length between them when it is longer than `limit`."""
    return text if len(text) <= limit else f"{text[: limit - 20]}...{text[-12:]} ({len(text):,} chars)"


def read_text_file(path: Path, what: str, max_bytes: int) -> str:
    """The file's text: at most `max_bytes`, UTF-8, not binary. QuantlabError otherwise, naming the file."""
    try:
        if path.is_dir():
            raise QuantlabError(f"{path}: is a folder, not a {what} file")
        if not path.is_file():  # a FIFO or a device would block or never end
            raise QuantlabError(f"{path}: not a regular file (a device, a pipe or a socket), not a {what} file")
        with path.open("rb") as f:
            raw = f.read(max_bytes + 1)
    except QuantlabError:
        raise
    except OSError as exc:
        raise QuantlabError(f"{path}: cannot read the {what} file: {exc.strerror or type(exc).__name__}") from None
    if len(raw) > max_bytes:
        raise QuantlabError(f"{path}: larger than {max_bytes:,} bytes, the limit for a {what} file")
    if b"\0" in raw:
        raise QuantlabError(f"{path}: a binary file (it holds NUL bytes), not a {what} file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise QuantlabError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start:,}); save it as UTF-8") from None


def load_strict(text: str) -> Any:
    """Parse YAML text with StrictLoader; yaml.YAMLError on any problem."""
    loader = StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
