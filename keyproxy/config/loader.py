"""Read YAML text strictly: the plain values keyproxy.config.compile works on, or ConfigError.

    read(text) -> Any                          the one document, as dicts, lists and scalars
    key_path(path, key), item_path(path, index, name)
                                               YAML paths as errors show them
    close_match(word, choices) -> str | None   the valid word a typo most likely meant

PyYAML's safe loader does the parsing (standard tags only, no Python objects). On top of it:

- A key given twice in one mapping is an error naming both lines, however the two are spelt:
  `1` and `0x1`, `on` and `true`, `a` and `"a"` load as the same key, so they are the same key
  here too. PyYAML would keep the last one silently, and a second `routes.openai` would move a
  key to another host without a word.
- Merge keys (`<<: *defaults`) are refused: they exist to let a later key override an earlier
  one silently, which is the ambiguity refused above (and YAML 1.2 dropped them). An alias
  (`*defaults`) still repeats a whole value.
- A syntax error keeps the parser's own reason and position (line and column, from 1), and
  where the parser says what it was inside, that too.
- A file with no document (empty, only comments) says so, and an alias inside the value it
  names (`&a [*a]`, a loop no setting needs) is refused instead of recursing forever; so is
  a value nested more than MAX_DEPTH levels deep, which the composer would recurse into
  until a RecursionError, and a document whose aliases expand it past MAX_VALUES values
  (a "billion laughs": PyYAML shares what an alias repeats, but compiling walks and keeps
  every repetition).

Items of the lists in LABELLED carry their `name` in paths (`policies[0] (summarizer).allow`),
so an error inside a long list says which item it is in; `compile._Node` uses the same form.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from keyproxy import capped
from keyproxy.errors import ConfigError

# Lists whose items are named in error paths by their `name` key.
LABELLED = frozenset({"policies"})
_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"
_MAX_LABEL = 64
# Levels of nesting (the top value is one): a setting needs a handful. Deeper, PyYAML's
# composer, which recurses once per level, would end in a RecursionError, not a ConfigError.
MAX_DEPTH = 64
# Values the document holds once every alias is expanded (a thousand routes with their
# policies hold about 50,000). Compiling walks, and the compiled configuration keeps, every
# repetition: past this, a small file of aliases could take most of an hour and gigabytes.
MAX_VALUES = 1_000_000
# Far above any real configuration (1,000 routes with their policies: about 300 KiB): a file
# this large is a mistake, and reading it would hold the process for seconds.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
_TOO_LARGE = f"the configuration is larger than {MAX_CONFIG_BYTES // 2**20} MiB"


def read_file(path: str | Path, *, regular: bool = True) -> bytes:
    """The configuration file's bytes, read no further than MAX_CONFIG_BYTES; ConfigError if
    it cannot be read or is larger, or (`regular`) is not a regular file (`capped`)."""
    try:
        data = capped.read_file(path, MAX_CONFIG_BYTES, regular=regular)
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror}") from None
    if data is None:
        raise ConfigError("", _TOO_LARGE)
    return data


def read(text: str) -> Any:
    """The single YAML document in `text`, or ConfigError saying what is wrong and where."""
    if len(text) > MAX_CONFIG_BYTES:  # a text handed over whole (a file: `read_file`)
        raise ConfigError("", _TOO_LARGE)
    try:
        loader = _StrictLoader(text)  # the reader checks every character here
    except yaml.reader.ReaderError as exc:
        raise ConfigError("", _character_message(text, exc)) from None
    try:
        node = loader.get_single_node()
        data = None if node is None else loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError("", _syntax_message(exc)) from None
    finally:
        loader.dispose()
    if data is None:
        raise ConfigError(
            "",
            "the configuration is empty: it needs at least identity and routes "
            "(docs/configuration.md)",
        )
    return data


def item_path(path: str, index: int, name: object) -> str:
    """`path[index]`, followed by ` (name)` for a named item of a LABELLED list."""
    label = ""
    if path in LABELLED and isinstance(name, str) and name.isprintable():
        label = f" ({name})" if len(name) <= _MAX_LABEL else f" ({name[:_MAX_LABEL]}...)"
    return f"{path}[{index}]{label}"


def key_path(path: str, key: object) -> str:
    """The YAML path of `key` inside the mapping at `path`."""
    return f"{path}.{key}" if path else str(key)


def close_match(word: str, choices: Iterable[str]) -> str | None:
    """The choice closest to `word` when one is close enough to be the likely meaning."""
    by_lower = {choice.lower(): choice for choice in choices}
    found = difflib.get_close_matches(word.lower(), by_lower, n=1, cutoff=0.6)
    return by_lower[found[0]] if found else None


def _syntax_message(exc: yaml.MarkedYAMLError) -> str:
    """PyYAML's own reason, in its own order (what it was inside, then what it found)."""
    mark = exc.problem_mark or exc.context_mark
    reason = ", ".join(
        text + (f" ({_position(at)})" if at is not None and at is not mark else "")
        for text, at in ((exc.context, exc.context_mark), (exc.problem, exc.problem_mark))
        if text
    )
    message = (
        f"not valid YAML at {_position(mark)}: {reason}" if mark else f"not valid YAML: {reason}"
    )
    if "'\\t'" in reason:
        message += "; indent with spaces, YAML does not allow tabs there"
    return message


def _character_message(text: str, exc: yaml.reader.ReaderError) -> str:
    line = text.count("\n", 0, exc.position) + 1
    column = exc.position - text.rfind("\n", 0, exc.position)
    return (
        f"not valid YAML at line {line}, column {column}: "
        f"character U+{exc.character:04X}: {exc.reason}"
    )


def _position(mark: yaml.Mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate and merge keys, naming their YAML path.

    Construction runs top-down (a mapping's own pairs are seen before its children are
    built), so each collection records its children's paths before they are constructed.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._paths: dict[int, str] = {}
        self._depth = 0
        self._values: dict[int, int] = {}  # per composed node: values in it, aliases expanded

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in the stubs
            target = self.anchors.get(event.anchor)
            if target is not None and target.end_mark is None:  # still being composed
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"alias *{event.anchor} is inside the value it names (a loop)",
                    event.start_mark,
                )
            return super().compose_node(parent, index)  # the node it names, counted already
        if self._depth == MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"nested more than {MAX_DEPTH} levels deep",
                self.peek_event().start_mark,  # type: ignore[no-untyped-call]  # untyped in the stubs
            )
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if node is not None:
            self._count(node)
        return node

    def _count(self, node: Node) -> None:
        """Record how many values `node` holds with its aliases expanded; refuse past
        MAX_VALUES. Its children are counted already: an alias's node before the alias."""
        children: list[Node] = []
        if isinstance(node, SequenceNode):
            children = node.value
        elif isinstance(node, MappingNode):
            children = [child for pair in node.value for child in pair]
        values = 1 + sum(self._values[id(child)] for child in children)
        if values > MAX_VALUES:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"aliases expand it to more than {MAX_VALUES:,} values",
                node.start_mark,
            )
        self._values[id(node)] = values

    def construct_document(self, node: Node) -> Any:
        self._paths[id(node)] = ""
        return super().construct_document(node)

    def construct_scalar(self, node: ScalarNode | MappingNode) -> Any:
        value = super().construct_scalar(node)
        if isinstance(value, str) and _SURROGATE.search(value):
            # Only an escape makes one (the file is UTF-8); no header, URL or log line can
            # carry it, so it is refused here rather than at the first request.
            raise yaml.constructor.ConstructorError(
                None,
                None,
                "an escape of a lone UTF-16 surrogate (\\ud800-\\udfff)",
                node.start_mark,
            )
        return value

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except _UNREADABLE:
            # PyYAML's constructors raise these for a value their type cannot read (a date
            # that does not exist, an integer past Python's 4,300 digits, `!!int abc`), with
            # the value in the message: only its position and type are told.
            kind = str(node.tag).rpartition(":")[2]
            raise yaml.constructor.ConstructorError(
                None, None, f"not a valid {kind}", node.start_mark
            ) from None

    def construct_sequence(self, node: SequenceNode, deep: bool = False) -> list[Any]:
        path = self._paths.get(id(node), "")
        for index, child in enumerate(node.value):
            self._paths.setdefault(id(child), item_path(path, index, _name_of(child)))
        return super().construct_sequence(node, deep)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        if not isinstance(node, MappingNode):  # `!!map x`: PyYAML's own refusal, with its place
            return super().construct_mapping(node, deep)
        path = self._paths.get(id(node), "")
        # By value (what the dict would merge: 1 and 0x1, on and true) and by text (what
        # compile names keys by: 1 and "1").
        first: dict[Hashable, Node] = {}
        first_text: dict[str, Node] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                raise ConfigError(
                    key_path(path, "<<"),
                    f"merge keys are not supported (line {key_node.start_mark.line + 1}): "
                    "write the keys out; an alias such as *name can still repeat a whole value",
                )
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # PyYAML's own construct_mapping refuses it, with its position
            here = key_path(path, key)
            before = first.get(key) or first_text.get(str(key))
            if before is not None:
                raise ConfigError(here, _duplicate(before, key_node))
            first[key] = first_text[str(key)] = key_node
            self._paths.setdefault(id(value_node), here)
        return super().construct_mapping(node, deep)


_UNREADABLE = (ValueError, TypeError, KeyError, AttributeError, OverflowError)
_SURROGATE = re.compile("[\ud800-\udfff]")


def _duplicate(before: Node, again: Node) -> str:
    one, two = before.start_mark, again.start_mark
    if one.line == two.line:  # a flow mapping: {a: 1, a: 2}
        where = f"line {one.line + 1}: first at column {one.column + 1}"
        where += f", again at column {two.column + 1}"
    else:
        where = f"first at line {one.line + 1}, again at line {two.line + 1}"
    if before.value != again.value:  # keys that load alike are scalars: compare spellings
        where += f"; {again.value!r} is the same key as {before.value!r}"
    return f"duplicate key ({where})"


def _name_of(node: Node) -> str | None:
    """The plain-string `name` of a mapping node, if it has one."""
    if not isinstance(node, MappingNode):
        return None
    names = [v for k, v in node.value if k.tag == _STR_TAG and k.value == "name"]
    if len(names) == 1 and isinstance(names[0], ScalarNode) and names[0].tag == _STR_TAG:
        return str(names[0].value)
    return None
