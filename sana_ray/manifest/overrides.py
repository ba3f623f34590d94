"""Command-line overrides: ``training.steps=50``, ``datasets.0.resolution=128``, ...

A key whose first segment is ``apiVersion``, ``kind``, ``metadata`` or ``spec`` is absolute;
any other key is relative to ``spec``. Values are YAML (``50`` is an int, ``1e-4`` a float,
``true`` a bool, ``null`` None, ``[a, b]`` a list). Integer segments index lists.
"""

from __future__ import annotations

from typing import Any, Sequence

import yaml

from ._yaml import MAX_DEPTH, MAX_FILE_BYTES, LimitError, load_value
from .errors import ManifestError, Problem, format_path, shorten

TOP_LEVEL_KEYS = ("apiVersion", "kind", "metadata", "spec")
OVERRIDES_SOURCE = "<overrides>"
MAX_INDEX_DIGITS = 6  # a list index in a key (datasets.0.path); no manifest list is longer than MAX_ITEMS

def _problem(override: str, message: str, hint: str | None = None, file: str = OVERRIDES_SOURCE) -> Problem:
    return Problem(file=file, line=None, column=None, path="", message=f"override '{shorten(override)}': {message}", hint=hint)


def _parse_value(text: str) -> Any:
    return load_value(text)  # the manifest's SafeLoader, with its budgets


def parse_overrides(overrides: Sequence[str], *, file: str = OVERRIDES_SOURCE) -> list[tuple[list[str | int], Any]]:
    """Parse ``KEY=VALUE`` strings into (absolute path, value) pairs.

    The returned paths are absolute (``training.steps`` -> ``["spec", "training", "steps"]``).
    Raises :class:`ManifestError` naming every malformed override (``file`` names the manifest
    they were given with, for the message).
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    parsed: list[tuple[list[str | int], Any]] = []
    problems: list[Problem] = []
    for override in overrides:
        key, sep, raw = str(override).partition("=")
        key = key.strip()
        if not sep:
            problems.append(_problem(override, "has no '='", "write KEY=VALUE, e.g. training.steps=50", file=file))
            continue
        if not key:
            problems.append(_problem(override, "has an empty key", "write KEY=VALUE, e.g. training.steps=50", file=file))
            continue
        parts = key.split(".")
        if any(not p.strip() for p in parts):
            problems.append(_problem(override, f"key '{key}' has an empty segment", "separate keys with single dots, e.g. training.optimizer.lr", file=file))
            continue
        if len(parts) > MAX_DEPTH:
            problems.append(_problem(override, f"the key has {len(parts)} segments; no manifest field is deeper than {MAX_DEPTH}",
                                     "name a field, e.g. training.optimizer.lr", file=file))
            continue
        if len(raw) > MAX_FILE_BYTES:
            problems.append(_problem(override, f"the value is longer than {MAX_FILE_BYTES // 1024:,} KiB", None, file=file))
            continue
        numbers = [p.strip() for p in parts if p.strip().isascii() and p.strip().isdigit()]
        if any(len(n) > MAX_INDEX_DIGITS for n in numbers):
            problems.append(_problem(override, f"the list index {max(numbers, key=len)[:20]}... is far out of range",
                                     "list items are numbered from 0, e.g. datasets.0.path", file=file))
            continue
        segments: list[str | int] = [int(p) if p.strip().isascii() and p.strip().isdigit() else p.strip() for p in parts]
        if not (isinstance(segments[0], str) and segments[0] in TOP_LEVEL_KEYS):
            segments = ["spec", *segments]
        try:
            value = _parse_value(raw.strip())
        except LimitError as exc:
            problems.append(_problem(override, exc.problem, exc.hint, file=file))
            continue
        except yaml.YAMLError as exc:
            reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            problems.append(_problem(override, f"the value is not valid YAML ({reason})", "put quotes around it", file=file))
            continue
        parsed.append((segments, value))
    if problems:
        raise ManifestError(problems, source=file)
    return parsed


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    return f"a {type(value).__name__}"


def apply_override(data: dict, segments: Sequence[str | int], value: Any, override: str, file: str = OVERRIDES_SOURCE) -> None:
    """Set ``value`` at ``segments`` inside ``data`` (in place), creating missing mappings."""
    node: Any = data
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        where = format_path(segments[:i]) or "the top level"
        if isinstance(node, list):
            if not isinstance(seg, int):
                raise ManifestError([_problem(override, f"{where} is a list; use an item number, not '{seg}'",
                                              "list items are numbered from 0, e.g. datasets.0.path", file=file)])
            if seg >= len(node):
                count = f"{len(node)} item" + ("" if len(node) == 1 else "s")
                raise ManifestError([_problem(override, f"index {seg} is out of range: {where} has {count}",
                                              "list items are numbered from 0", file=file)])
        elif isinstance(node, dict):
            if isinstance(seg, int):
                seg = str(seg)
        else:
            raise ManifestError([_problem(override, f"cannot set '{seg}' inside {where}: it is {_kind(node)}, not a mapping",
                                          f"set {where} itself, or check the key's spelling", file=file)])

        if last:
            node[seg] = value
            return
        nxt = node[seg] if isinstance(node, list) else node.get(seg)
        if nxt is None:
            if isinstance(segments[i + 1], int):
                here = format_path(segments[: i + 1])
                raise ManifestError([_problem(override, f"index {segments[i + 1]} is out of range: {here} is not set",
                                              f"set {here} in the manifest first", file=file)])
            nxt = {}
            node[seg] = nxt
        node = nxt
