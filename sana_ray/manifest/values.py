"""Values pydantic's lax mode would accept but a manifest must not: the checks behind ``schema.Strict``.

Pydantic (lax) turns ``true`` into 1.0 for a float, ``0`` into False for a bool and ``"30"`` into
30 for an int; in a manifest each of those is a mistake it should name (``flow_shift: true``,
``disabled: 0``, ``steps: !!str 30``). ``check_value`` looks at a field's raw value against its
annotation (into lists and mappings) before pydantic does, and raises the pydantic error type
that errors.py turns into "expected a number, got true" with a fix. It also refuses, in any
string, a NUL or a lone surrogate, and for a path, an empty one or a URI.
"""

from __future__ import annotations

import math
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticCustomError

from sana_ray.manifest._yaml import INT_MAX
from sana_ray.manifest.errors import describe_error

_SCALAR_KINDS = {bool: "bool", int: "int", float: "float"}
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def _scalar_kind(tp: Any) -> str | None:
    """'bool', 'int', 'float' or 'int_literal' for a scalar annotation (Annotated stripped); else None."""
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if tp in _SCALAR_KINDS:
        return _SCALAR_KINDS[tp]
    if typing.get_origin(tp) is Literal and all(type(a) is int for a in typing.get_args(tp)):
        return "int_literal"
    return None


def _check_scalar(value: Any, kinds: set[str]) -> None:
    """Refuse the coercions pydantic's lax mode would make silently: true for a number (1.0), 0 or 1
    for a boolean, '30' (a quoted number, or !!str) for a number, and integers past 64 bits."""
    numbers = kinds & {"int", "float", "int_literal"}
    if isinstance(value, bool):
        if "bool" not in kinds:
            if "int_literal" in kinds:
                raise PydanticCustomError("literal_error", "Input should be one of the listed values")
            raise PydanticCustomError("int_type" if "float" not in kinds else "float_type", "wrong type")
    elif isinstance(value, (int, float)):
        if not numbers:
            raise PydanticCustomError("bool_type", "wrong type")
        if "float" not in kinds and math.isfinite(value) and abs(value) > INT_MAX:
            raise PydanticCustomError("sana_number_too_large", f"is too large; integers here are at most {INT_MAX}")
    elif isinstance(value, str) and "int_literal" not in kinds:  # literals: pydantic lists the allowed values
        kind = "float" if "float" in kinds else "int" if "int" in kinds else "bool"
        raise PydanticCustomError(f"{kind}_type", "wrong type")


def _check_text(value: str) -> None:
    """No NUL (file names and C libraries stop there) and no lone surrogate (not encodable as UTF-8:
    printing or logging it would fail) in any string of a manifest."""
    if "\x00" in value:
        raise PydanticCustomError("sana_nul", "contains a NUL character (\\0); remove it")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        char = value[error.start]
        raise PydanticCustomError(
            "sana_bad_character", f"contains U+{ord(char):04X}, a lone surrogate that is not a character; remove it"
        ) from None


def check_value(value: Any, annotation: Any, item: str = "") -> None:
    """The checks above, applied to a field's raw value by its annotation (into lists and mappings)."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    try:
        if value is None:
            return
        if origin in (typing.Union, types.UnionType):
            members = [a for a in args if a is not type(None)]
            kinds = {_scalar_kind(a) for a in members}
            if len(members) == 1:
                check_value(value, members[0], item)
            elif None not in kinds:
                _check_scalar(value, kinds)  # int | float
            return
        kind = _scalar_kind(annotation)
        if kind is not None:
            _check_scalar(value, {kind})
        elif annotation in (str, Path):
            if isinstance(value, (str, Path)):
                text = str(value)
                _check_text(text)
                if annotation is Path and not text.strip():
                    raise PydanticCustomError("sana_empty_path", "is empty; write a path (relative paths are relative to the manifest)")
                if annotation is Path and _URI.match(text):
                    # (Normalising would also fold its '//' and hide a user:password@ from redaction.)
                    raise PydanticCustomError("sana_uri_path", "is a URI, not a local path; mount the storage and give "
                                              "the folder's local path")
        elif origin in (list, tuple) and isinstance(value, (list, tuple)):
            for i, child in enumerate(value):
                child_type = args[0] if origin is list or (len(args) == 2 and args[1] is Ellipsis) else (
                    args[i] if i < len(args) else None)
                if child_type is not None:
                    check_value(child, child_type, f"item {i}")
        elif origin is dict and isinstance(value, dict) and len(args) == 2:
            for key, child in value.items():
                if isinstance(key, str):
                    _check_text(key)
                check_value(child, args[1], f"'{key}'")
    except PydanticCustomError as error:
        if not item or error.type.startswith("sana_item"):
            raise
        # An item of a list or mapping: say which, in a message of its own (the loc is the field's).
        message, hint = describe_error(BaseModel, {"type": error.type, "loc": (), "input": value, "msg": error.message()})
        text = f"{item}: {message}" + (f"; {hint}" if hint else "")
        raise PydanticCustomError("sana_item", text.replace("{", "{{").replace("}", "}}")) from None
