"""Load, validate, resolve and print manifests.

YAML is read with a SafeLoader subclass only. The node tree is composed first so that every
value keeps its line and column; validation errors then point at the line to fix.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import yaml
from pydantic import ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ._yaml import SafeDumper, SafeLoader
from .errors import ManifestError, Problem, format_path, problems_from_validation_error
from .overrides import apply_override, parse_overrides
from .schema import API_VERSION, Manifest

_MERGE_TAG = "tag:yaml.org,2002:merge"
Mark = tuple  # (line, column), 1-based


class _Positions:
    """Where each path of the document was written: the key's mark and the value's mark."""

    def __init__(self) -> None:
        self.key: dict[tuple, Mark] = {}
        self.value: dict[tuple, Mark] = {}
        self.scalar: set[tuple] = set()

    def add(self, path: tuple, key_node: Node | None, value_node: Node, merged: bool) -> None:
        store = dict.setdefault if merged else dict.__setitem__
        if key_node is not None:
            store(self.key, path, _mark(key_node))
        store(self.value, path, _mark(value_node))
        if isinstance(value_node, ScalarNode):
            self.scalar.add(path)

    def lookup(self, loc: tuple, kind: str) -> tuple[int | None, int | None]:
        """(line, column) to report an error of pydantic type ``kind`` at ``loc``."""
        if kind == "missing":
            loc = loc[:-1]  # the field is not there: point at the mapping that lacks it
        elif kind == "extra_forbidden" and loc in self.key:
            return self.key[loc]
        while True:
            if loc in self.scalar and loc in self.value:
                return self.value[loc]
            if loc in self.key:
                return self.key[loc]
            if loc in self.value:
                return self.value[loc]
            if not loc:
                return (None, None)
            loc = loc[:-1]


def _mark(node: Node) -> Mark:
    return (node.start_mark.line + 1, node.start_mark.column + 1)


def _walk(node: Node, path: tuple, positions: _Positions, duplicates: list, file: str, stack: set[int], merged: bool = False) -> None:
    if id(node) in stack:  # a recursive alias; pydantic reports it
        return
    stack.add(id(node))
    try:
        if isinstance(node, MappingNode):
            seen: dict[Any, Node] = {}
            merges: list[Node] = []
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    merges.append(value_node)
                    continue
                key = key_node.value if isinstance(key_node, ScalarNode) else None
                if key is None:
                    continue  # a complex key; the constructor reports it
                child = (*path, key)
                if key in seen and not merged:
                    first = seen[key].start_mark.line + 1
                    line, col = _mark(key_node)
                    duplicates.append(
                        Problem(file, line, col, format_path(child), f"duplicate key '{key}' (first set on line {first})",
                                "a later value would silently replace the earlier one; keep one")
                    )
                    continue
                seen[key] = key_node
                positions.add(child, key_node, value_node, merged)
                _walk(value_node, child, positions, duplicates, file, stack, merged)
            for merge in merges:  # keys from `<<: *anchor` never replace explicit ones
                sources = merge.value if isinstance(merge, SequenceNode) else [merge]
                for source in sources:
                    _walk(source, path, positions, duplicates, file, stack, merged=True)
        elif isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                child = (*path, i)
                positions.add(child, None, item, merged)
                _walk(item, child, positions, duplicates, file, stack, merged)
    finally:
        stack.discard(id(node))


def _file_problem(file: str, message: str, hint: str | None = None, line: int | None = None, column: int | None = None) -> ManifestError:
    return ManifestError([Problem(file, line, column, "", message, hint)], source=file)


def _yaml_error(file: str, exc: yaml.YAMLError) -> ManifestError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = mark.line + 1 if mark is not None else None
    column = mark.column + 1 if mark is not None else None
    if isinstance(exc, yaml.reader.ReaderError):
        return _file_problem(file, f"cannot read the file: {exc.reason} (character {exc.character!r})", None, None, None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    if isinstance(exc, yaml.composer.ComposerError) and "single document" in str(exc):
        return _file_problem(file, "the file holds more than one YAML document ('---')", "keep one manifest per file", line, column)
    if isinstance(exc, yaml.constructor.ConstructorError):
        return _file_problem(file, f"unsupported YAML: {problem}", "plain mappings, lists, strings and numbers only", line, column)
    hint = None
    if context:
        ctx_mark = getattr(exc, "context_mark", None)
        hint = context + (f" on line {ctx_mark.line + 1}" if ctx_mark is not None and ctx_mark is not mark else "")
    return _file_problem(file, f"YAML syntax error: {problem}", hint, line, column)


def _read_yaml(path: Path, file: str) -> tuple[dict, _Positions]:
    """Read and parse the file: (data, positions). Every failure is a ManifestError."""
    if not path.exists():
        raise _file_problem(file, f"file not found (looked for {path.absolute()})")
    if path.is_dir():
        raise _file_problem(file, "is a folder, not a manifest file")
    try:
        text = path.read_text(encoding="utf-8")
    except PermissionError:
        raise _file_problem(file, "cannot read the file: permission denied") from None
    except UnicodeDecodeError as exc:
        raise _file_problem(file, f"cannot read the file: it is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise _file_problem(file, f"cannot read the file: {exc.strerror or exc}") from None

    try:
        loader = SafeLoader(text)
    except yaml.YAMLError as exc:  # non-printable characters are rejected up front
        raise _yaml_error(file, exc) from None
    try:
        try:
            root = loader.get_single_node()
        except yaml.YAMLError as exc:
            raise _yaml_error(file, exc) from None
        if root is None:
            raise _file_problem(file, "the file is empty", f"start from manifests/quickstart.yaml; a manifest begins with `apiVersion: {API_VERSION}`")
        if not isinstance(root, MappingNode):
            line, col = _mark(root)
            kind = "a list" if isinstance(root, SequenceNode) else f"the value {root.value!r}"
            raise _file_problem(file, f"the top level must be a mapping (apiVersion, kind, metadata, spec), got {kind}", None, line, col)
        positions = _Positions()
        positions.value[()] = _mark(root)
        duplicates: list[Problem] = []
        _walk(root, (), positions, duplicates, file, set())
        if duplicates:
            raise ManifestError(duplicates, source=file)
        try:
            data = loader.construct_document(root)
        except yaml.YAMLError as exc:
            raise _yaml_error(file, exc) from None
    finally:
        loader.dispose()
    return data, positions


def _resolve(base: Path, value: Path | str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(str(value))))


def _resolve_paths(manifest: Manifest, base: Path) -> None:
    _resolve_spec_paths(manifest.spec, base)


def _resolve_spec_paths(spec, base: Path) -> None:
    for dataset in spec.datasets:
        dataset.path = Path(_resolve(base, dataset.path))
    spec.output.dir = Path(_resolve(base, spec.output.dir))
    if spec.output.cache_dir is not None:
        spec.output.cache_dir = Path(_resolve(base, spec.output.cache_dir))
    pretrained = spec.model.pretrained
    if pretrained.startswith(("./", "../", "/", "~")):
        spec.model.pretrained = _resolve(base, pretrained)


def load_manifest(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Manifest:
    """Read, override, validate and resolve a manifest file.

    Relative paths in the manifest (datasets' ``path``, ``output.dir``, ``output.cache_dir``
    and a local ``model.pretrained``) are made absolute against the manifest's folder.
    Raises :class:`ManifestError` (never a bare traceback) when anything is wrong.
    """
    file = os.fspath(path)
    parsed = parse_overrides(overrides, file=file)
    manifest_path = Path(file)
    data, positions = _read_yaml(manifest_path, file)

    set_by: list[tuple[tuple, str]] = []
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    for (segments, value), text in zip(parsed, overrides):
        apply_override(data, segments, value, text, file=file)
        set_by.append((tuple(segments), text))

    def override_for(loc: tuple) -> str | None:
        for segments, text in reversed(set_by):  # the last override of a path wins
            if loc[: len(segments)] == segments:
                return text
        return None

    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        problems = problems_from_validation_error(exc, Manifest, file, positions.lookup, override_for)
        raise ManifestError(problems, source=file) from None

    _resolve_paths(manifest, manifest_path.absolute().parent)
    return manifest


def load_document(path: str | os.PathLike, overrides: Sequence[str] = ()):
    """Load a manifest of either kind: a TrainingRun :class:`Manifest` or a :class:`~.sweep.Sweep`.

    For a Sweep, overrides relative to ``spec`` (``training.steps=50``) apply to ``spec.template``,
    and every searched path is checked by validating the template with each bound and listed value
    set (:func:`~.sweep.check_space`), so errors name ``spec.search.space.<path>`` and the value.
    """
    file = os.fspath(path)
    manifest_path = Path(file)
    data, positions = _read_yaml(manifest_path, file)
    if not (isinstance(data, dict) and data.get("kind") == "Sweep"):
        return load_manifest(path, overrides)

    from .sweep import Sweep, check_space

    parsed = parse_overrides(overrides, file=file)
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    set_by: list[tuple[tuple, str]] = []
    for (segments, value), text in zip(parsed, overrides):
        if len(segments) > 1 and segments[0] == "spec" and segments[1] not in ("template", "search"):
            segments = ["spec", "template", *segments[1:]]
        apply_override(data, segments, value, text, file=file)
        set_by.append((tuple(segments), text))

    def override_for(loc: tuple) -> str | None:
        for segments, text in reversed(set_by):
            if loc[: len(segments)] == segments:
                return text
        return None

    try:
        sweep = Sweep.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(problems_from_validation_error(exc, Sweep, file, positions.lookup, override_for), source=file) from None
    problems = check_space(data, sweep.spec.search, file, positions.lookup)
    if problems:
        raise ManifestError(problems, source=file)
    _resolve_spec_paths(sweep.spec.template, manifest_path.absolute().parent)
    return sweep


# --------------------------------------------------------------------------------------
# Printing, flattening, fingerprinting
# --------------------------------------------------------------------------------------


def dump_manifest(m: Manifest) -> str:
    """YAML of the fully resolved manifest: every default filled in, in the schema's key order."""
    data = m.model_dump(mode="json")
    return yaml.dump(data, Dumper=SafeDumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=1000)


def _flat_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[]"
    if isinstance(value, dict):
        return "{}"
    return str(value)


def flatten_manifest(m: Manifest, max_length: int = 500) -> dict[str, str]:
    """Dotted keys -> string values (for MLflow params); list items are numbered (``spec.datasets.0.name``)."""
    out: dict[str, str] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, child in value.items():
                visit(f"{prefix}.{key}" if prefix else str(key), child)
        elif isinstance(value, list) and value:
            for i, child in enumerate(value):
                visit(f"{prefix}.{i}", child)
        else:
            text = _flat_value(value)
            if len(text) > max_length:
                text = text[: max_length - 3] + "..."
            out[prefix] = text

    visit("", m.model_dump(mode="json"))
    return out


def manifest_fingerprint(m: Manifest) -> str:
    """sha256 of the canonical JSON of the resolved ``spec`` (ignores formatting, comments, key order, metadata)."""
    spec = m.model_dump(mode="json")["spec"]
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def manifest_json_schema() -> dict:
    """JSON Schema of a manifest (for editors: point yaml-language-server at it)."""
    schema = Manifest.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **schema,
        "title": f"sana-ray manifest ({API_VERSION})",
    }
