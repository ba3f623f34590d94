"""Load, validate, resolve and print manifests.

YAML is read with a SafeLoader subclass only (``_yaml``: YAML 1.2 scalars and budgets on depth,
size and alias expansion). The node tree is composed first so that every value keeps its line
and column; validation errors then point at the line to fix. Only a regular file of at most
1 MiB is read (a FIFO, ``/dev/zero`` or a huge file is refused before reading).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Sequence

import yaml
from pydantic import ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from sana_ray.redaction import redact_data, redact_text

from ._yaml import MAX_FILE_BYTES, LimitError, SafeDumper, SafeLoader
from .errors import ManifestError, Problem, describe_value, format_path, problems_from_validation_error, shorten
from .overrides import apply_override, parse_overrides
from .paths import system_location
from .schema import API_VERSION, Manifest

_MERGE_TAG = "tag:yaml.org,2002:merge"
Mark = tuple  # (line, column), 1-based


class _Positions:
    """Where each path of the document was written: the key's mark and the value's mark.

    A value is recorded once, where it was written. A path that reaches it again through an
    alias (``*base``) is a *link* to that place, and a mapping's merge keys (``<<: *base``) are
    *merges*; :meth:`lookup` follows both. So recording costs one visit per written value, not one
    per expanded value (an alias bomb of a few KB would otherwise be walked billions of times).
    """

    def __init__(self) -> None:
        self.key: dict[tuple, Mark] = {}
        self.value: dict[tuple, Mark] = {}
        self.scalar: set[tuple] = set()
        self.links: dict[tuple, tuple] = {}  # path -> path where its (aliased) value was written
        self.merges: dict[tuple, list[tuple]] = {}  # mapping path -> paths of the mappings merged into it

    def add(self, path: tuple, key_node: Node | None, value_node: Node, merged: bool) -> None:
        store = dict.setdefault if merged else dict.__setitem__
        if key_node is not None:
            store(self.key, path, _mark(key_node))
        store(self.value, path, _mark(value_node))
        if isinstance(value_node, ScalarNode):
            self.scalar.add(path)

    def known(self, path: tuple) -> bool:
        return path in self.key or path in self.value

    def locate(self, loc: tuple) -> tuple:
        """The path where the value at ``loc`` (a pydantic loc) was written."""
        out: tuple = ()
        for part in loc:
            here = (*out, part)
            if not self.known(here) and isinstance(part, int) and self.known((*out, str(part))):
                here = (*out, str(part))  # a mapping key written as a number: `1: x`
            if here in self.links:
                here = self.links[here]
            elif not self.known(here):
                for source in self.merges.get(out, ()):
                    merged = (*source, here[-1])
                    merged = self.links.get(merged, merged)
                    if self.known(merged):
                        here = merged
                        break
            out = here
        return out

    def lookup(self, loc: tuple, kind: str) -> tuple[int | None, int | None]:
        """(line, column) to report an error of pydantic type ``kind`` at ``loc``."""
        if kind == "missing":
            loc = loc[:-1]  # the field is not there: point at the mapping that lacks it
        if kind in ("extra_forbidden", "invalid_key") and loc:
            # The key itself, where it was written (not where an alias's value was).
            parent = self.locate(loc[:-1])
            for key in (loc[-1], str(loc[-1])):
                if (*parent, key) in self.key:
                    return self.key[(*parent, key)]
        loc = self.locate(loc)
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


def _walk(node: Node, path: tuple, positions: _Positions, duplicates: list, file: str, walked: dict[int, tuple],
          merged: bool = False) -> None:
    """Record where every value was written (and every duplicate key), visiting each node once.

    ``walked`` maps id(node) -> the path it was recorded under. The composer has already refused
    recursive aliases, nesting deeper than MAX_DEPTH and oversized collections.
    """
    walked[id(node)] = path
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
            _visit(value_node, child, positions, duplicates, file, walked, merged)
        for merge in merges:  # keys from `<<: *anchor` never replace explicit ones
            sources = merge.value if isinstance(merge, SequenceNode) else [merge]
            for source in sources:
                if id(source) in walked:
                    positions.merges.setdefault(path, []).append(walked[id(source)])
                else:
                    _walk(source, path, positions, duplicates, file, walked, merged=True)
    elif isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            child = (*path, i)
            positions.add(child, None, item, merged)
            _visit(item, child, positions, duplicates, file, walked, merged)


def _visit(node: Node, path: tuple, positions: _Positions, duplicates: list, file: str, walked: dict[int, tuple],
           merged: bool) -> None:
    if id(node) in walked:  # an alias of a value recorded elsewhere
        positions.links.setdefault(path, walked[id(node)])
    elif isinstance(node, (MappingNode, SequenceNode)):
        _walk(node, path, positions, duplicates, file, walked, merged)


def _file_problem(file: str, message: str, hint: str | None = None, line: int | None = None, column: int | None = None) -> ManifestError:
    return ManifestError([Problem(file, line, column, "", message, hint)], source=file)


def _line_column(text: str | bytes, offset: int) -> tuple[int, int]:
    newline = "\n" if isinstance(text, str) else b"\n"
    line_start = text.rfind(newline, 0, offset) + 1
    return text.count(newline, 0, offset) + 1, offset - line_start + 1


def _yaml_error(file: str, exc: yaml.YAMLError, text: str = "") -> ManifestError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = mark.line + 1 if mark is not None else None
    column = mark.column + 1 if mark is not None else None
    if isinstance(exc, LimitError):
        return _file_problem(file, exc.problem, exc.hint, line, column)
    if isinstance(exc, yaml.reader.ReaderError):
        line, column = _line_column(text, exc.position) if text else (None, None)
        character = f"U+{exc.character:04X}" if isinstance(exc.character, int) else repr(exc.character)
        return _file_problem(file, f"cannot read the file: {exc.reason} ({character})",
                             "remove that character; YAML allows only printable text", line, column)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    if isinstance(exc, yaml.composer.ComposerError) and "single document" in str(exc):
        return _file_problem(file, "the file holds more than one YAML document ('---')", "keep one manifest per file", line, column)
    if isinstance(exc, yaml.constructor.ConstructorError):
        return _file_problem(file, f"unsupported YAML: {problem}", "plain mappings, lists, strings and numbers only", line, column)
    hint = next((h for start, h in _SYNTAX_HINTS if str(problem).startswith(start)), None)
    if hint is None and context:
        ctx_mark = getattr(exc, "context_mark", None)
        hint = context + (f" on line {ctx_mark.line + 1}" if ctx_mark is not None and ctx_mark is not mark else "")
        hint += f"; {_SYNTAX_HINT}"
    return _file_problem(file, f"YAML syntax error: {problem}", hint or _SYNTAX_HINT, line, column)


# What usually causes PyYAML's syntax errors, as a fix to try.
_SYNTAX_HINTS = (
    ("mapping values are not allowed", "a ': ' inside a value starts a new key: put quotes around the value, or fix the indentation"),
    ("found undefined alias", "define the anchor (&name) before the alias (*name) that uses it"),
    ("found duplicate anchor", "give each anchor (&name) its own name"),
    ("sequence entries are not allowed", "a '- item' must be indented under the key it belongs to"),
    ("found character '\\t'", "indent with spaces, not tabs"),
    ("found unexpected end of stream", "close the quote or bracket opened before"),
    ("found a tab character", "indent with spaces, not tabs"),
)
_SYNTAX_HINT = "check the indentation, quotes and brackets on this line and the one before"


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_manifest_text(path: Path, file: str) -> str:
    """The text of a manifest file, refusing what is not one before reading a byte of it.

    Opened without blocking (a FIFO with no writer would wait forever) and checked on the open
    descriptor (no swap between the check and the read): only a regular file of at most
    MAX_FILE_BYTES is read, and never more than that (``/dev/zero`` would fill memory).
    """
    not_found = _file_problem(file, f"file not found (looked for {path.absolute()})",
                              "check the path; a relative path is relative to the current folder")
    folder = _file_problem(file, "is a folder, not a manifest file", "pass the manifest's .yaml file")

    def refuse_if_special(mode: int) -> None:
        if stat.S_ISDIR(mode):
            raise folder
        if not stat.S_ISREG(mode):
            raise _file_problem(file, f"is {_file_kind(mode)}, not a regular file; it was not read",
                                "save the manifest to a file and pass that file's path")

    try:
        refuse_if_special(os.stat(path).st_mode)  # before opening: opening a socket fails, a tape device rewinds
    except FileNotFoundError:
        raise not_found from None
    except (OSError, ValueError):
        pass  # os.open below says what is wrong
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise not_found from None
    except IsADirectoryError:
        raise folder from None
    except PermissionError:
        raise _file_problem(file, "cannot read the file: permission denied", "check the file's permissions") from None
    except (OSError, ValueError) as exc:  # ENAMETOOLONG, ELOOP, a NUL in the name, ...
        raise _file_problem(file, f"cannot open the file: {getattr(exc, 'strerror', None) or exc}",
                            "check the path") from None
    try:
        refuse_if_special(os.fstat(fd).st_mode)  # again on what was opened: the path may have changed meanwhile
        info = os.fstat(fd)
        too_big = _file_problem(file, f"is larger than {MAX_FILE_BYTES // 1024:,} KiB, the most a manifest may be",
                                "a manifest is a few KB of YAML; is this the right file?")
        if info.st_size > MAX_FILE_BYTES:
            raise too_big
        chunks, size = [], 0
        while size <= MAX_FILE_BYTES:  # st_size can lie (files in /proc, a file still growing)
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_FILE_BYTES:
            raise too_big
    except OSError as exc:
        raise _file_problem(file, f"cannot read the file: {exc.strerror or exc}", "check the file") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, column = _line_column(data, exc.start)
        raise _file_problem(file, f"cannot read the file: it is not UTF-8 text ({exc.reason} at byte {exc.start})",
                            "save it as UTF-8", line, column) from None


def _read_yaml(path: Path, file: str) -> tuple[dict, _Positions]:
    """Read and parse the file: (data, positions). Every failure is a ManifestError."""
    text = read_manifest_text(path, file)
    try:
        loader = SafeLoader(text)
    except yaml.YAMLError as exc:  # non-printable characters are rejected up front
        raise _yaml_error(file, exc, text) from None
    try:
        try:
            root = loader.get_single_node()
        except yaml.YAMLError as exc:
            raise _yaml_error(file, exc, text) from None
        if root is None:
            raise _file_problem(file, "the file is empty", f"start from manifests/quickstart.yaml; a manifest begins with `apiVersion: {API_VERSION}`")
        if not isinstance(root, MappingNode):
            line, col = _mark(root)
            kind = "a list" if isinstance(root, SequenceNode) else f"the value {describe_value(root.value)}"
            raise _file_problem(file, f"the top level must be a mapping (apiVersion, kind, metadata, spec), got {kind}",
                                "start from manifests/quickstart.yaml", line, col)
        positions = _Positions()
        positions.value[()] = _mark(root)
        duplicates: list[Problem] = []
        _walk(root, (), positions, duplicates, file, {})
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


def _resolve_spec_paths(spec, base: Path) -> None:
    for dataset in spec.datasets:
        dataset.path = Path(_resolve(base, dataset.path))
        if dataset.mask_path is not None:
            dataset.mask_path = Path(_resolve(base, dataset.mask_path))
    spec.output.dir = Path(_resolve(base, spec.output.dir))
    if spec.output.cache_dir is not None:
        spec.output.cache_dir = Path(_resolve(base, spec.output.cache_dir))
    pretrained = spec.model.pretrained
    if pretrained.startswith(("./", "../", "/", "~")):
        spec.model.pretrained = _resolve(base, pretrained)


def _check_write_locations(spec, prefix: tuple, file: str, positions: _Positions, override_for) -> list[Problem]:
    """Refuse output and cache folders in system locations (after resolution), unless
    ``output.allow_system_dirs`` says the user means it. See ``paths.system_location``."""
    if spec.output.allow_system_dirs:
        return []
    cache_root = spec.output.cache_dir or spec.output.dir / "cache"
    targets: list[tuple[tuple, Path]] = [(("output", "dir"), spec.output.dir)]
    if spec.output.cache_dir is not None:
        targets.append((("output", "cache_dir"), spec.output.cache_dir))
    for i, dataset in enumerate(spec.datasets):
        if dataset.cache_dir is not None:  # relative to the cache root, as the cache builder resolves it
            folder = Path(os.path.expanduser(str(dataset.cache_dir)))
            targets.append((("datasets", i, "cache_dir"), Path(os.path.normpath(cache_root / folder))))
    problems = []
    for loc, folder in targets:
        where = system_location(folder)
        if where is None:
            continue
        full = (*prefix, *loc)
        override = override_for(full)
        line, column = (None, None) if override is not None else positions.lookup(full, "")
        message = f"resolves to {folder}, {where}: sana-ray does not write there"
        if override is not None:
            message += f" (set by override '{shorten(override)}')"
        problems.append(Problem(file, line, column, format_path(full), message,
                                "choose a folder you own (relative paths are relative to the manifest), "
                                "or set output.allow_system_dirs: true if you really mean it"))
    return problems


def _unshared(value: Any) -> Any:
    """A copy of plain YAML data in which no two places share an object (aliases make them share),
    so that an override of one place does not change every place an alias repeats."""
    if isinstance(value, dict):
        return {key: _unshared(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_unshared(item) for item in value]
    return value


def _apply_overrides(data: dict, parsed: list, texts: Sequence[str] | str, file: str, positions: _Positions,
                     relocate=None):
    """Set every parsed override into ``data``; returns ``override_for(loc)``: the override text
    that set the value at ``loc`` (the last one wins), or that created ``loc`` (a key the file
    does not have, e.g. a misspelt ``optimizer.lr=...``), or None."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    set_by: list[tuple[tuple, str]] = []
    for (segments, value), text in zip(parsed, texts):
        if relocate is not None:
            segments = relocate(segments)
        apply_override(data, segments, value, text, file=file)
        set_by.append((tuple(segments), text))

    def override_for(loc: tuple) -> str | None:
        loc = tuple(loc)
        for segments, text in reversed(set_by):
            if loc[: len(segments)] == segments:
                return text
        if not positions.known(positions.locate(loc)):
            for segments, text in reversed(set_by):
                if segments[: len(loc)] == loc:
                    return text
        return None

    return override_for


def _validate(model: type, data: Any, file: str, positions: _Positions, override_for):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(problems_from_validation_error(exc, model, file, positions.lookup, override_for), source=file) from None


def _training_run(data: dict, positions: _Positions, parsed: list, overrides, file: str) -> Manifest:
    if parsed:
        data = _unshared(data)
    override_for = _apply_overrides(data, parsed, overrides, file, positions)
    manifest = _validate(Manifest, data, file, positions, override_for)
    _resolve_spec_paths(manifest.spec, Path(file).absolute().parent)
    problems = _check_write_locations(manifest.spec, ("spec",), file, positions, override_for)
    if problems:
        raise ManifestError(problems, source=file)
    return manifest


def load_manifest(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Manifest:
    """Read, override, validate and resolve a manifest file.

    Relative paths in the manifest (datasets' ``path`` and ``mask_path``, ``output.dir``, ``output.cache_dir``
    and a local ``model.pretrained``) are made absolute against the manifest's folder.
    Raises :class:`ManifestError` (never a bare traceback) when anything is wrong.
    """
    file = os.fspath(path)
    parsed = parse_overrides(overrides, file=file)
    data, positions = _read_yaml(Path(file), file)
    return _training_run(data, positions, parsed, overrides, file)


def load_document(path: str | os.PathLike, overrides: Sequence[str] = ()):
    """Load a manifest of either kind: a TrainingRun :class:`Manifest` or a :class:`~.sweep.Sweep`.

    For a Sweep, overrides relative to ``spec`` (``training.steps=50``) apply to ``spec.template``,
    and every searched path is checked by validating the template with each bound and listed value
    set (:func:`~.sweep.check_space`), so errors name ``spec.search.space.<path>`` and the value.
    """
    file = os.fspath(path)
    parsed = parse_overrides(overrides, file=file)
    data, positions = _read_yaml(Path(file), file)
    if not (isinstance(data, dict) and data.get("kind") == "Sweep"):
        return _training_run(data, positions, parsed, overrides, file)

    from .sweep import Sweep, check_space

    space = ((data.get("spec") or {}).get("search") or {}).get("space") if isinstance(data.get("spec"), dict) else None
    searched = set(space) if isinstance(space, dict) else set()

    def relocate(segments):
        if len(segments) > 1 and segments[0] == "spec" and segments[1] not in ("template", "search"):
            return ["spec", "template", *segments[1:]]
        if segments[:3] == ["spec", "search", "space"] and len(segments) > 4:
            # Space keys are dotted paths themselves: search.space.training.flow_shift.choice=[1, 3]
            # sets `choice` of the key 'training.flow_shift' (the longest key the sweep has, else all of it).
            rest = [str(s) for s in segments[3:]]
            cut = next((i for i in range(len(rest), 0, -1) if ".".join(rest[:i]) in searched), len(rest))
            return [*segments[:3], ".".join(rest[:cut]), *rest[cut:]]
        return segments

    if parsed:
        data = _unshared(data)
    override_for = _apply_overrides(data, parsed, overrides, file, positions, relocate)
    sweep = _validate(Sweep, data, file, positions, override_for)
    problems = check_space(data, sweep.spec.search, file, positions.lookup)
    if problems:
        raise ManifestError(problems, source=file)
    _resolve_spec_paths(sweep.spec.template, Path(file).absolute().parent)
    problems = _check_write_locations(sweep.spec.template, ("spec", "template"), file, positions, override_for)
    if problems:
        raise ManifestError(problems, source=file)
    return sweep


# --------------------------------------------------------------------------------------
# Printing, flattening, fingerprinting
# --------------------------------------------------------------------------------------


def dump_manifest(m: Manifest) -> str:
    """YAML of the fully resolved manifest: every default filled in, in the schema's key order.

    Secrets are masked (sana_ray.redaction): this text is printed, written into the run's folder
    and logged to MLflow."""
    data = redact_data(m.model_dump(mode="json"))
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
    """Dotted keys -> string values (for MLflow params; secrets masked); list items are numbered (``spec.datasets.0.name``)."""
    out: dict[str, str] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, child in value.items():
                visit(f"{prefix}.{key}" if prefix else str(key), child)
        elif isinstance(value, list) and value:
            for i, child in enumerate(value):
                visit(f"{prefix}.{i}", child)
        else:
            text = redact_text(_flat_value(value))
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
