"""Manifest errors a person can act on: file, line, dotted path, a short message and a hint.

Pydantic's ``ValidationError`` is translated here into :class:`Problem` objects, using the
error's ``type`` and ``ctx`` (not its English text) and the manifest's own model classes
(to suggest the key you probably meant, or to list the allowed values).
"""

from __future__ import annotations

import difflib
import re
import shlex
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from pydantic import BaseModel, ValidationError

from sana_ray.manifest.names import NAME_PATTERN, NAME_RULE, suggest_name
from sana_ray.redaction import redact_text

Loc = tuple  # tuple[str | int, ...]


@dataclass
class Problem:
    """One thing wrong with a manifest (or with an override)."""

    file: str
    line: int | None
    column: int | None
    path: str
    message: str
    hint: str | None = None

    def __post_init__(self) -> None:
        # Messages quote what the user wrote; a URI with a password must not reach the terminal or a log.
        self.path = redact_text(self.path)
        self.message = redact_text(self.message)
        self.hint = redact_text(self.hint) if self.hint else self.hint

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        text = f"{where}: "
        if self.path:
            text += f"{self.path}: "
        text += self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class ManifestError(Exception):
    """A manifest that cannot be used. ``str(e)`` is the full message, one line per problem."""

    def __init__(self, problems: Sequence[Problem], source: str | None = None):
        self.problems: list[Problem] = list(problems)
        self.source = source if source is not None else (self.problems[0].file if self.problems else "manifest")
        super().__init__(self._format())

    def _format(self) -> str:
        lines = [str(p) for p in self.problems]
        n = len(self.problems)
        noun = "problem" if n == 1 else "problems"
        pronoun = "it" if n == 1 else "them"
        if self.source.startswith("<"):
            lines.append(f"{n} {noun} in {self.source}; fix {pronoun} and try again")
        else:
            lines.append(f"{n} {noun} in {self.source}; fix {pronoun} and run `sana-ray validate {shlex.quote(self.source)}`")
        return "\n".join(lines)

    def __str__(self) -> str:  # keep str(e) the full message even if args are changed
        return self._format()

    def __reduce__(self):  # picklable (Ray ships exceptions between processes)
        return (type(self), (self.problems, self.source))


# --------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------


def format_path(loc: Iterable[str | int]) -> str:
    """("spec", "datasets", 0, "resolution") -> "spec.datasets[0].resolution"."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def shorten(text: str, keep: int = 60) -> str:
    """Text quoted in a message (an override, a value): long ones cut in the middle."""
    text = str(text)
    return text if len(text) <= 2 * keep + 5 else f"{text[:keep]} ... {text[-keep:]}"


def describe_value(value: Any) -> str:
    """A short rendering of what the user wrote, for "got ..." messages."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1:,} digits"  # repr() refuses 4,300+
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        if len(value) > 60:
            value = value[:57] + "..."
        return repr(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


# --------------------------------------------------------------------------------------
# Walking the model classes by loc
# --------------------------------------------------------------------------------------


def _strip(tp: Any) -> Any:
    """Unwrap Annotated and Optional (a union with None and a single other type)."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) == 1:
                tp = args[0]
                continue
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            if len(models) == 1:
                tp = models[0]
                continue
        return tp


def type_at(root: type[BaseModel], loc: Sequence[str | int]) -> Any:
    """The (unwrapped) annotation at ``loc`` starting from model ``root``; None if unknown."""
    tp: Any = root
    for part in loc:
        tp = _strip(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            tp = field.annotation
            continue
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (list, set, frozenset, typing.Sequence) and args:
            tp = args[0]
        elif origin is tuple and args:
            if len(args) == 2 and args[1] is Ellipsis:
                tp = args[0]
            elif isinstance(part, int) and part < len(args):
                tp = args[part]
            else:
                return None
        elif origin in (dict, typing.Mapping) and len(args) == 2:
            tp = args[1]
        else:
            return None
    return _strip(tp)


def field_at(root: type[BaseModel], loc: Sequence[str | int]):
    """The pydantic FieldInfo for the last element of ``loc`` (None if not a model field)."""
    if not loc or not isinstance(loc[-1], str):
        return None
    parent = type_at(root, loc[:-1])
    if isinstance(parent, type) and issubclass(parent, BaseModel):
        return parent.model_fields.get(loc[-1])
    return None


def valid_keys(root: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    tp = type_at(root, loc)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return []


def literal_values(root: type[BaseModel], loc: Sequence[str | int]) -> list[Any]:
    tp = type_at(root, loc)
    if typing.get_origin(tp) is typing.Literal:
        return list(typing.get_args(tp))
    return []


def _quoted(values: Iterable[Any]) -> str:
    return ", ".join(repr(v) if isinstance(v, str) else describe_value(v) for v in values)


# --------------------------------------------------------------------------------------
# Pydantic errors -> messages
# --------------------------------------------------------------------------------------

_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "path_type": "a path (a string)",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list",
    "set_type": "a list",
}

_COMPARISONS = {
    "greater_than": ("gt", "greater than"),
    "greater_than_equal": ("ge", "at least"),
    "less_than": ("lt", "less than"),
    "less_than_equal": ("le", "at most"),
    "multiple_of": ("multiple_of", "a multiple of"),
}


def describe_error(root: type[BaseModel], err: Mapping[str, Any]) -> tuple[str, str | None]:
    """(message, hint) for one pydantic error dict."""
    kind = err.get("type", "")
    loc = tuple(err.get("loc", ()))
    ctx = err.get("ctx") or {}
    value = err.get("input")
    got = describe_value(value)
    last = loc[-1] if loc else None

    if kind == "extra_forbidden":
        keys = valid_keys(root, loc[:-1])
        message = f"unknown key '{last}'"
        close = difflib.get_close_matches(str(last), keys, n=1, cutoff=0.6)
        if close:
            return message, f"did you mean '{close[0]}'?"
        if keys:
            return message, "valid keys: " + ", ".join(keys)
        return message, None

    if kind == "missing":
        if isinstance(last, int):
            return f"missing item [{last}]", None
        message = f"missing required field '{last}'"
        allowed = literal_values(root, loc)
        if len(allowed) == 1:
            return message, f"set it to {_quoted(allowed)}"
        field = field_at(root, loc)
        if field is not None and field.description:
            return message, field.description
        return message, f"add `{last}:` to {format_path(loc[:-1]) or 'the top level'}"

    if kind == "literal_error":
        allowed = literal_values(root, loc)
        if allowed:
            choices = _quoted(allowed)
        else:
            choices = str(ctx.get("expected", "")).replace(" or ", ", ")
        if len(allowed) == 1:
            message = f"must be {choices}, got {got}"
        else:
            message = f"must be one of {choices}; got {got}"
        hint = None
        if isinstance(value, str) and allowed:
            close = difflib.get_close_matches(value, [str(a) for a in allowed], n=1, cutoff=0.5)
            if close:
                hint = f"did you mean '{close[0]}'?"
        return message, hint

    if kind == "invalid_key":  # _normalize moved the key out of loc into ctx
        key = ctx.get("key")
        keys = valid_keys(root, loc)
        return (f"the key {describe_value(key)} is not a name: keys must be strings",
                "valid keys: " + ", ".join(keys) if keys else "put quotes around it")

    if kind == "dict_key":  # a key of a free-form mapping (labels, nccl_env) that is not a string
        return f"the key {describe_value(ctx.get('key'))} must be a string", "put quotes around it"

    if kind in _EXPECTED:
        message = f"expected {_EXPECTED[kind]}, got {got}"
        hint = None
        if kind == "string_type" and isinstance(value, (int, float, bool)):
            hint = "put quotes around it to make it a string"
        elif kind in ("int_type", "int_parsing", "float_type", "float_parsing") and isinstance(value, str) and _is_number(value):
            hint = "remove the quotes (or the !!str tag): numbers are written without them"
        elif kind in ("int_type", "float_type") and isinstance(value, bool):
            hint = "write a number, not true/false"
        elif kind in ("bool_type", "bool_parsing") and isinstance(value, str) and value.lower() in _YAML_1_1_BOOLS:
            hint = "write true or false (yes/no/on/off are plain strings in YAML 1.2, which sana-ray reads)"
        elif kind in ("bool_type", "bool_parsing") and isinstance(value, (int, float)):
            hint = "write true or false"
        elif kind in ("list_type", "tuple_type") and isinstance(value, str):
            hint = "write a list, e.g. [a, b] or one '- item' per line"
        elif kind in ("model_type", "dict_type"):
            keys = valid_keys(root, loc)
            if keys:
                hint = "valid keys: " + ", ".join(keys)
        elif kind == "int_from_float":
            hint = "no fractional part allowed"
        return message, hint

    if kind in _COMPARISONS:
        key, words = _COMPARISONS[kind]
        bound = ctx.get(key)
        return f"must be {words} {describe_value(bound)}, got {got}", None

    if kind == "tuple_length":  # our own type, see _normalize
        return f"needs exactly {ctx['length']} items, got {ctx['actual_length']}", None

    if kind in ("too_short", "too_long"):
        n_key = "min_length" if kind == "too_short" else "max_length"
        bound = ctx.get(n_key)
        actual = ctx.get("actual_length")
        words = "at least" if kind == "too_short" else "at most"
        item = "item" if bound == 1 else "items"
        return f"needs {words} {bound} {item}, got {actual}", None

    if kind in ("string_too_short", "string_too_long"):
        n_key = "min_length" if kind == "string_too_short" else "max_length"
        words = "at least" if kind == "string_too_short" else "at most"
        return f"must be {words} {ctx.get(n_key)} characters long, got {got}", None

    if kind == "string_pattern_mismatch" and ctx.get("pattern") == NAME_PATTERN:
        suggestion = suggest_name(value) if isinstance(value, str) else None
        example = f"try '{suggestion}'" if suggestion and suggestion != value else "e.g. my-run.v2"
        return f"{got} is not a valid name", f"a name has {NAME_RULE}; {example}"

    if kind == "string_pattern_mismatch":
        field = field_at(root, loc)
        hint = field.description if field is not None and field.description else None
        return f"{got} is not allowed here: it must match the pattern {ctx.get('pattern')}", hint

    if kind == "finite_number":
        return f"expected a finite number, got {got}", "NaN and infinity are not allowed; write a finite number"

    if kind.startswith("sana_"):  # raised by the schema's own checks: "what is wrong; what to do"
        message, _, hint = str(err.get("msg", "")).partition("; ")
        return message, (hint or None)

    if kind in ("value_error", "assertion_error"):
        error = ctx.get("error")
        text = str(error) if error is not None else str(err.get("msg", ""))
        # Our validators write "what is wrong; what to do".
        message, _, hint = text.partition("; ")
        return message, (hint or None)

    if kind == "recursion_loop":
        return "the YAML refers to itself (a recursive anchor/alias)", None

    text = str(err.get("msg", kind))
    return (text[:1].lower() + text[1:]) if text else kind, None


_YAML_1_1_BOOLS = {"yes", "no", "on", "off", "y", "n"}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _without_union_tags(root: type[BaseModel], loc: Loc) -> Loc:
    """Drop the names pydantic gives the members of a union (``resolution.int``, ``resolution.float``):
    they are not places in the manifest."""
    out: list = []
    for part in loc:
        here = type_at(root, out)
        if isinstance(part, str) and typing.get_origin(here) in (typing.Union, types.UnionType):
            continue
        out.append(part)
    return tuple(out)


_ITEM = re.compile(r"item (\d+): ")


def _normalize(root: type[BaseModel], err: dict) -> dict:
    """Reshape pydantic errors whose loc or type would mislead:

    * union member names in the loc are dropped (``_union`` marks such errors: one is kept per path);
    * a mapping key that is not a string (``1: x``) is reported on its mapping, naming the key
      (pydantic's loc ends in the key, which reads like a list index); ``_where`` keeps the key's place;
    * a fixed-length tuple given too few items is reported by pydantic as missing items
      (``betas[1]: Field required``); report it on the list itself instead;
    * a list item's own check (``values.check_value``: "item 0: expected a number ...") names the
      item in the path (``betas[0]``) rather than in the message.
    """
    loc = tuple(err.get("loc", ()))
    stripped = _without_union_tags(root, loc)
    if stripped != loc:
        err = {**err, "loc": stripped, "_union": True}
        loc = stripped
    if err.get("type") == "sana_item":
        message, items = str(err.get("msg", "")), ()
        while (index := _ITEM.match(message)) is not None:
            items, message = (*items, int(index.group(1))), message[index.end():]
        if items:
            return {**err, "loc": (*loc, *items), "msg": message}
    if err.get("type") == "invalid_key" and loc:
        return {**err, "loc": loc[:-1], "_where": loc, "ctx": {"key": loc[-1]}}
    if len(loc) >= 2 and loc[-1] == "[key]":
        return {**err, "type": "dict_key", "loc": loc[:-2], "_where": loc[:-1], "ctx": {"key": loc[-2]}}
    value = err.get("input")
    if err.get("type") == "missing" and loc and isinstance(loc[-1], int) and isinstance(value, (list, tuple)):
        parent = type_at(root, loc[:-1])
        args = typing.get_args(parent)
        if typing.get_origin(parent) is tuple and Ellipsis not in args:
            ctx = {"length": len(args), "actual_length": len(value)}
            return {**err, "type": "tuple_length", "loc": loc[:-1], "ctx": ctx}
    if err.get("type") == "too_long" and isinstance(value, (list, tuple)):
        here = type_at(root, loc)
        args = typing.get_args(here)
        if typing.get_origin(here) is tuple and Ellipsis not in args:
            return {**err, "type": "tuple_length", "ctx": {"length": len(args), "actual_length": len(value)}}
    return err


def problems_from_validation_error(
    exc: ValidationError,
    root: type[BaseModel],
    file: str,
    position: Callable[[Loc, str], tuple[int | None, int | None]],
    override_for: Callable[[Loc], str | None] = lambda loc: None,
) -> list[Problem]:
    """Translate a pydantic error into Problems.

    ``position(loc, kind)`` gives (line, column) for an error of pydantic type ``kind`` at ``loc``;
    ``override_for(loc)`` gives the override text that set the value at ``loc`` (or None).
    """
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    union_at: dict[str, int] = {}  # path -> index in problems of the error kept for a union there
    for err in exc.errors(include_url=False):
        err = _normalize(root, err)
        loc = tuple(err.get("loc", ()))
        kind = err.get("type", "")
        message, hint = describe_error(root, err)
        override = override_for(loc)
        if override is not None:
            line, column = None, None
            message += f" (set by override '{shorten(override)}')"
        else:
            line, column = position(err.get("_where", loc), kind)
        path = format_path(loc)
        if (path, message) in seen:
            continue
        seen.add((path, message))
        problem = Problem(file=file, line=line, column=column, path=path, message=message, hint=hint)
        if err.get("_union") and path in union_at:  # every member failed: the last (the widest type) says it best
            problems[union_at[path]] = problem
            continue
        if err.get("_union"):
            union_at[path] = len(problems)
        problems.append(problem)
    big = 1 << 62
    problems.sort(key=lambda p: (p.line if p.line is not None else big, p.column or 0))
    return problems
