"""Generate docs/manifest.md from the schema, so the reference never drifts from the code.

    python -m sana_ray.manifest.reference > docs/manifest.md

A test regenerates it and compares with the committed file.
"""

from __future__ import annotations

import json
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from sana_ray.manifest import schema

HEADER = """# Manifest reference (`apiVersion: sana-ray/v1`, `kind: TrainingRun`)

Generated from `sana_ray/manifest/schema.py` by `python -m sana_ray.manifest.reference`; do not
edit by hand. Every section rejects unknown keys. Relative paths are relative to the manifest's
folder. `sana-ray validate FILE` prints a manifest with every default below filled in, and
`sana-ray schema` writes the JSON Schema for editor completion.

Rules for every field (docs/security.md has the whole list): YAML is read safely and as YAML 1.2
(only `true`/`false` are booleans: `yes`, `on` are strings); numbers are finite (no `.nan`,
`.inf`) and integers fit in 64 bits; a boolean is not a number, a number is not a boolean and a
quoted number is not a number; no string holds a NUL; paths are local (not URIs) and not empty;
output and cache folders are not system folders (see `allow_system_dirs`). A manifest file is a
regular file of at most 1 MiB, nesting at most 32 levels, at most 10,000 items per list or mapping
and 50,000 values with aliases expanded. URIs with a password are refused in
`mlflow_tracking_uri` and `ray_address`, and masked in everything sana-ray writes.
"""


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + (
            " or null" if type(None) in args else ""
        )
    if origin in (list, tuple, dict):
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(see section)"
    return f"`{json.dumps(value, default=str)}`"


def _models(root: type[BaseModel]) -> list[type[BaseModel]]:
    """Every model reachable from ``root``, in first-seen order."""
    seen: list[type[BaseModel]] = []

    def visit(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.append(model)
        for field in model.model_fields.values():
            stack = [field.annotation]
            while stack:
                annotation = stack.pop()
                if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                    visit(annotation)
                stack.extend(typing.get_args(annotation))

    visit(root)
    return seen


def render() -> str:
    lines = [HEADER]
    for model in _models(schema.Manifest):
        lines.append(f"## {model.__name__}\n")
        doc = (model.__doc__ or "").strip()
        if doc and not doc.startswith(("Base for", "!!")) and model is not schema.Strict:
            lines.append(doc.splitlines()[0] + "\n")
        lines.append("| field | type | default | description |")
        lines.append("|---|---|---|---|")
        for name, field in model.model_fields.items():
            description = (field.description or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {description} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
