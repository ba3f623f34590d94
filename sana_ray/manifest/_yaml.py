"""Safe YAML loader/dumper for manifests and override values.

Both are subclasses of PyYAML's Safe classes: no arbitrary objects, ever. On top of that the
loader

* reads ``1e-4`` as a float (as YAML 1.2 does; PyYAML's 1.1 rules read it as a string);
* reads only ``true``/``false`` as booleans (YAML 1.2): ``on``, ``off``, ``yes``, ``no`` stay
  strings, so a key ``on:`` is the key ``'on'`` (an unknown key with a suggestion), not ``True``,
  and ``crop: yes`` is a type error instead of a silent ``True``;
* enforces budgets while it composes, so hostile input fails fast with its own message instead
  of hanging or exhausting memory: nesting depth, items per list/mapping, values in the document
  with every alias expanded (an "alias bomb" of a few KB expands to billions), no recursive
  aliases, and integers that fit in 64 bits (Python refuses to even parse integers of 4,300+
  digits). The file-size budget is the reader's (``loader.read_manifest_text``). Each budget is
  checked as the document is composed, so the cost of refusing is bounded by the file size.

Every budget failure is a :class:`LimitError` (a ``yaml.MarkedYAMLError``, with a mark and a hint).
"""

from __future__ import annotations

import re

import yaml
from yaml.events import AliasEvent, CollectionStartEvent
from yaml.nodes import MappingNode, Node, SequenceNode

MAX_FILE_BYTES = 1 << 20  # 1 MiB: a manifest is a few KB
MAX_DEPTH = 32  # the deepest manifest field (deepspeed overrides) is under 10 levels
MAX_ITEMS = 10_000  # items in one list or mapping
MAX_VALUES = 50_000  # values in the document with every alias expanded (10,000 prompts are 10,001)
INT_MAX = 2**63 - 1  # what torch / numpy take; a larger integer is a mistake in a manifest

_FLOAT_WITHOUT_DOT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_BOOL_1_2 = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_INT_TEXT_MAX = 24  # characters of an integer's text (after '_' and the sign): 2^63 has 19 digits


class LimitError(yaml.MarkedYAMLError):
    """Input over one of the budgets above (or a recursive alias / an integer too large)."""

    def __init__(self, problem: str, mark, hint: str | None = None):
        super().__init__(problem=problem, problem_mark=mark)
        self.hint = hint


class SafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader with YAML 1.2 floats and booleans and the budgets above."""

    def __init__(self, stream):
        super().__init__(stream)
        self._open: list[int] = []  # ids of the collections being composed: the current path
        self._values: dict[int, int] = {}  # id(node) -> values in it, aliases expanded
        self._total = 0  # values composed so far, aliases expanded

    def compose_node(self, parent: Node | None, index):
        if parent is not None:
            if len(parent.value) >= MAX_ITEMS:
                kind = "list" if isinstance(parent, SequenceNode) else "mapping"
                raise LimitError(
                    f"the {kind} starting on line {parent.start_mark.line + 1} has more than {MAX_ITEMS:,} items",
                    self.peek_event().start_mark,
                    "no manifest field takes that many; keep large data in files the manifest points at",
                )
            self._open.append(id(parent))
        try:
            if self.check_event(AliasEvent):
                event = self.peek_event()
                target = self.anchors.get(event.anchor)
                if target is not None and id(target) in self._open:
                    raise LimitError(
                        f"the alias *{event.anchor} is used inside the value it names (a recursive alias)",
                        event.start_mark,
                        f"an alias repeats a value defined before and outside it; copy what &{event.anchor} should hold",
                    )
                node = super().compose_node(parent, index)
                self._total += self._values.get(id(node), 1)
                if self._total > MAX_VALUES:
                    raise LimitError(
                        f"the alias *{event.anchor} repeats {self._values.get(id(node), 1):,} values, taking the document "
                        f"past {MAX_VALUES:,} values with its aliases expanded",
                        event.start_mark,
                        "an alias repeats its whole value each time it is used, and nested aliases multiply (an alias "
                        "bomb?); repeat less",
                    )
                return node
            if self.check_event(CollectionStartEvent) and len(self._open) >= MAX_DEPTH:
                raise LimitError(
                    f"values nest more than {MAX_DEPTH} levels deep",
                    self.peek_event().start_mark,
                    "no manifest field nests this deep; check the brackets and the indentation",
                )
            node = super().compose_node(parent, index)
            self._count(node)
            return node
        finally:
            if parent is not None:
                self._open.pop()

    def _count(self, node: Node) -> None:
        """Record how many values ``node`` holds with its aliases expanded (what an alias of it adds);
        refuse a document past MAX_VALUES as soon as it gets there."""
        if isinstance(node, SequenceNode):
            total = 1 + sum(self._values.get(id(item), 1) for item in node.value)
        elif isinstance(node, MappingNode):
            total = 1 + sum(self._values.get(id(k), 1) + self._values.get(id(v), 1) for k, v in node.value)
        else:
            total = 1
        self._values[id(node)] = total
        self._total += 1
        if self._total > MAX_VALUES:
            raise LimitError(
                f"the document holds more than {MAX_VALUES:,} values", node.start_mark,
                "no manifest needs that many; keep large data in files the manifest points at",
            )

    def construct_yaml_int(self, node):
        text = node.value.replace("_", "").lstrip("+-")
        if len(text) > _INT_TEXT_MAX:
            raise LimitError(
                f"the integer {_abbreviate(node.value)} is too large ({len(text):,} {'digits' if text.isdigit() else 'characters'})",
                node.start_mark,
                f"integers in a manifest are at most {INT_MAX} (2^63-1)",
            )
        value = super().construct_yaml_int(node)
        if not -INT_MAX - 1 <= value <= INT_MAX:
            raise LimitError(f"the integer {_abbreviate(node.value)} is too large", node.start_mark,
                             f"integers in a manifest are at most {INT_MAX} (2^63-1)")
        return value


def _abbreviate(text: str, keep: int = 12) -> str:
    return text if len(text) <= 2 * keep + 3 else f"{text[:keep]}...{text[-keep:]}"


SafeLoader.add_constructor(_INT_TAG, SafeLoader.construct_yaml_int)

# YAML 1.2 booleans: replace the 1.1 resolver (yes/no/on/off/y/n) in the loader only; the dumper
# keeps quoting 'yes' and 'on' so that files it writes read the same in any YAML 1.1 tool.
SafeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
SafeLoader.add_implicit_resolver(_BOOL_TAG, _BOOL_1_2, list("tTfF"))


class SafeDumper(yaml.SafeDumper):
    """yaml.SafeDumper that quotes strings SafeLoader above would read as floats."""


for _cls in (SafeLoader, SafeDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_WITHOUT_DOT, list("-+0123456789"))


def load_value(text: str):
    """One YAML value (an override's ``VALUE``) under the same rules and budgets as a manifest."""
    loader = SafeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
