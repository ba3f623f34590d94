"""Hostile manifests, generated from the shipped ones: what tests/manifest/test_fuzz.py runs.

A seeded generator of our own (not hypothesis): the same seed gives the same cases, every case
knows whether it must be accepted or refused and which field path / line its error must name,
and the cases come in named categories so that a run can be counted per category (and replayed
against an older checkout for comparison: ``python tests/manifest/fuzz_cases.py --help``).

Every case mutates a manifest under ``manifests/`` or ``clusters/manifests/`` (the text, so that
lines and comments stay as a user wrote them), or its overrides, or is a file that is not a
manifest at all (a FIFO, ``/dev/zero``, a folder).
"""

from __future__ import annotations

import io
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import typing
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel

from sana_ray.manifest._yaml import SafeDumper, SafeLoader

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "manifests").glob("*.yaml")) + sorted((REPO / "clusters" / "manifests").glob("*.yaml"))
SECRET = "hunter2-Xq9"  # planted in URIs and query strings; must never be printed

CATEGORIES = (
    "misspelt-keys", "wrong-types", "coercions", "nan-inf", "huge-ints", "yaml-syntax", "aliases", "sizes",
    "overrides", "sweeps", "names-and-paths", "secrets", "non-regular-files", "valid",
)


@dataclass
class Case:
    category: str
    name: str
    source: str  # the shipped manifest it starts from (relative to the repository)
    text: str | bytes | None = None  # the file's content; None: `special` says what the file is
    overrides: list[str] = field(default_factory=list)
    valid: bool = False  # True: must be accepted (exit 0)
    path: str | None = None  # a field path some error line must name
    located: bool = False  # some error line must carry file:line:column
    special: str | None = None  # fifo, devzero, devnull, folder, missing, symlink-devzero, socket
    secret: str | None = None  # must appear nowhere in the output

    def materialize(self, folder: Path, index: int) -> str:
        """Write the case's file into ``folder`` (next to a copy of the data it points at); its path."""
        path = folder / f"case-{index:04d}.yaml"
        if self.special is None:
            if isinstance(self.text, bytes):
                path.write_bytes(self.text)
            else:
                path.write_text(self.text, encoding="utf-8", errors="surrogatepass")
            return str(path)
        if self.special == "fifo":
            os.mkfifo(path)
        elif self.special == "devzero":
            return "/dev/zero"
        elif self.special == "devnull":
            return "/dev/null"
        elif self.special == "folder":
            path.mkdir()
        elif self.special == "symlink-devzero":
            path.symlink_to("/dev/zero")
        elif self.special == "socket":
            path = folder / f"s{index}.sock"  # AF_UNIX paths are limited to ~100 bytes
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(str(path))
            sock.close()
        elif self.special != "missing":
            raise ValueError(self.special)
        return str(path)


# --------------------------------------------------------------------------------------
# The shipped manifests' structure: every key and leaf, with its place in the text
# --------------------------------------------------------------------------------------


@dataclass
class Leaf:
    loc: tuple
    key: yaml.Node | None  # the key node (None for list items)
    value: yaml.Node
    kind: str | None  # what the schema takes there (see _kind)


def _root_model(data: dict) -> type[BaseModel]:
    from sana_ray.manifest import Manifest, Sweep

    return Sweep if isinstance(data, dict) and data.get("kind") == "Sweep" else Manifest


def _kind(root: type[BaseModel], loc: tuple) -> str | None:
    from sana_ray.manifest.errors import type_at

    tp = type_at(root, loc)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return "bool"
    if tp is int:
        return "int"
    if tp is float:
        return "float"
    if tp is str:
        return "str"
    if tp is Path:
        return "path"
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")) and set(args) <= {int, float}:
        return "number"
    if origin is typing.Literal:
        return "literal_int" if all(type(a) is int for a in args) else "literal_str"
    if origin is tuple:
        return "tuple"
    if origin is list:
        return "list"
    if origin is dict:
        return "dict"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "model"
    return None


def leaves(text: str) -> tuple[type[BaseModel], list[Leaf]]:
    root_node = yaml.compose(text, Loader=yaml.SafeLoader)
    root = _root_model(yaml.safe_load(text))
    out: list[Leaf] = []

    def walk(node, loc):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = (*loc, key.value)
                out.append(Leaf(child, key, value, _kind(root, child)))
                walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                out.append(Leaf((*loc, i), None, item, _kind(root, (*loc, i))))
                walk(item, (*loc, i))

    walk(root_node, ())
    return root, out


def fmt(loc: tuple) -> str:
    from sana_ray.manifest.errors import format_path

    return format_path(loc)


def replace(text: str, node: yaml.Node, new: str) -> str:
    end = node.end_mark.index
    if isinstance(node, yaml.CollectionNode) and not node.flow_style:
        end = text.rfind("\n", node.start_mark.index, end) + 1  # a block ends where the next line's indentation starts
    return text[: node.start_mark.index] + new + ("\n" if end > node.start_mark.index and text[end - 1] == "\n" else "") + text[end:]


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# --------------------------------------------------------------------------------------
# Categories
# --------------------------------------------------------------------------------------


def _misspell(rng: random.Random, key: str) -> str:
    ops = [
        lambda k: k[:-1] + k[-1] * 2,  # doubled last letter
        lambda k: k[1:] if len(k) > 3 else k + "x",  # dropped first letter
        lambda k: k[:2] + k[3] + k[2] + k[4:] if len(k) > 4 else k + "s",  # swapped letters
        lambda k: k.upper(),
        lambda k: k.replace("_", "-") if "_" in k else k + "_",
    ]
    return rng.choice(ops)(key)


def misspelt_keys(rng, sources) -> list[Case]:
    from sana_ray.manifest.errors import type_at, valid_keys

    candidates = []
    for path, text in sources:
        root, found = leaves(text)
        for leaf in found:
            if leaf.key is None:
                continue
            parent = type_at(root, leaf.loc[:-1])
            if not (isinstance(parent, type) and issubclass(parent, BaseModel)):
                continue  # a free-form mapping (labels, search space): any key is fine
            candidates.append((path, text, root, leaf))
    cases = []
    for path, text, root, leaf in rng.sample(candidates, min(40, len(candidates))):
        keys = valid_keys(root, leaf.loc[:-1])
        new = _misspell(rng, leaf.key.value)
        if new in keys:
            new = new + "z"
        cases.append(Case("misspelt-keys", f"{fmt(leaf.loc)} -> {new}", _rel(path), replace(text, leaf.key, new),
                          path=fmt((*leaf.loc[:-1], new)), located=True))
    return cases


_WRONG = {
    "int": ["fifty", "true", "2.5", "[1, 2]", "{a: 1}"],
    "float": ["fast", "true", "[1.0]", "{x: 1}"],
    "number": ["big", "false", "[64]"],
    "bool": ["maybe", "2.5", "[true]", "{a: b}"],
    "str": ["123", "[a, b]", "{a: b}", "true", "4.5"],
    "path": ["123", "[a]", "{a: b}", '""'],
    "literal_str": ["not-a-choice", "12", "[a]"],
    "literal_int": ["7", "'2'", "[1]"],
    "tuple": ["abc", "[0.9]", "[0.9, 0.99, 0.999]"],
    "list": ["{a: b}", "[[1]]"],
    "dict": ["[a]", "5"],
    "model": ["5", "[a, b]", "just a string"],
}


def _leaf_cases(rng, sources, category: str, values_for, limit: int, *, located=True, name_path=True) -> list[Case]:
    candidates = []
    for path, text in sources:
        _, found = leaves(text)
        for leaf in found:
            for value in values_for(leaf):
                candidates.append((path, text, leaf, value))
    cases = []
    for path, text, leaf, value in rng.sample(candidates, min(limit, len(candidates))):
        loc = leaf.loc
        if loc[:3] == ("spec", "search", "space") and len(loc) > 4:
            loc = loc[:4]  # a listed value is checked in the template: the error names the searched path
        cases.append(Case(category, f"{fmt(leaf.loc)}: {value[:40]}", _rel(path), replace(text, leaf.value, value),
                          path=fmt(loc) if name_path else None, located=located))
    return cases


def _scalar(leaf: Leaf) -> bool:
    return isinstance(leaf.value, yaml.ScalarNode) and leaf.value.value not in ("", "null", "~")


def wrong_types(rng, sources):
    return _leaf_cases(rng, sources, "wrong-types",
                       lambda leaf: _WRONG.get(leaf.kind, []) if leaf.kind and (leaf.kind not in ("str", "path") or _scalar(leaf)) else [],
                       40)


def coercions(rng, sources):
    def values(leaf):
        if not _scalar(leaf):
            return []
        return {"bool": ["0", "1", "yes", "on", "'true'"], "float": ["true", "false", "'3.0'"],
                "number": ["true", "'64'"], "int": ["'30'", "!!str 30", "true", "false"]}.get(leaf.kind, [])

    cases = _leaf_cases(rng, sources, "coercions", values, 32)
    q = _rel(SHIPPED_BY_NAME["quickstart.yaml"])
    cases.append(Case("coercions", "stage: true", q, SOURCES[q], ["hardware.deepspeed.stage=true"],
                      path="spec.hardware.deepspeed.stage"))
    return cases


def nan_inf(rng, sources):
    bad = [".nan", ".inf", "-.inf", "1e309", "-1e400", ".NaN", "+.INF"]
    cases = _leaf_cases(rng, sources, "nan-inf",
                        lambda leaf: bad if leaf.kind in ("float", "number") and _scalar(leaf) else [], 30)
    q = _rel(SHIPPED_BY_NAME["quickstart.yaml"])
    for override, path in (("training.optimizer.lr=.inf", "spec.training.optimizer.lr"),
                           ("training.max_grad_norm=.nan", "spec.training.max_grad_norm"),
                           ("hardware.worker_resources={gpu: .inf}", "spec.hardware.worker_resources"),
                           ("training.optimizer.betas=[0.9, .nan]", "spec.training.optimizer.betas"),
                           ("hardware.deepspeed.overrides={zero_optimization: {reduce_bucket_size: .inf}}",
                            "spec.hardware.deepspeed.overrides")):
        cases.append(Case("nan-inf", override, q, SOURCES[q], [override], path=path))
    return cases


def huge_ints(rng, sources):
    def values(leaf):
        if leaf.kind in ("int", "float", "number", "str") and _scalar(leaf):
            return ["9" * 4301, "-" + "9" * 5000, "1" + "0" * 30, "0x" + "f" * 40]
        return []

    cases = _leaf_cases(rng, sources, "huge-ints", values, 20, name_path=False)
    q = _rel(SHIPPED_BY_NAME["quickstart.yaml"])
    for override in (f"training.seed={'9' * 4301}", f"training.steps={'1' + '0' * 25}", f"datasets.{'9' * 5000}.path=x",
                     f"training.steps={'9' * 100000}"):
        cases.append(Case("huge-ints", override[:60], q, SOURCES[q], [override]))
    return cases


def yaml_syntax(rng, sources) -> list[Case]:
    cases = []
    for path, text in sources:
        lines = text.splitlines(keepends=True)
        body = [i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")]

        def broken(mutated: str) -> bool:
            try:
                yaml.load(mutated, Loader=yaml.SafeLoader)  # noqa: S506 - PyYAML's own safe loader, as a reference
            except yaml.YAMLError:
                return True
            return False

        for name, edit in (
            ("unclosed bracket", lambda line: line.rstrip("\n") + " [1, 2\n"),
            ("bad indentation", lambda line: " " + line if line.startswith("  ") else "   " + line),
            ("tab indentation", lambda line: "\t" + line.lstrip(" ")),
            ("unterminated quote", lambda line: line.rstrip("\n") + ' "oops\n'),
            ("stray colon", lambda line: line.rstrip("\n") + ": : :\n"),
            ("control character", lambda line: line.rstrip("\n") + " \x07\n"),
            ("undefined alias", lambda line: re.sub(r":\s.*$", ": *nowhere", line.rstrip("\n")) + "\n" if ":" in line else "x: *nowhere\n"),
            ("unsafe tag", lambda line: re.sub(r":\s.*$", ": !!python/object/apply:os.system [id]", line.rstrip("\n")) + "\n"),
            ("directive in the middle", lambda line: "%YAML 1.1\n" + line),
        ):
            for _ in range(20):  # a line where the edit really breaks the YAML (a plain scalar takes '[' in stride)
                i = rng.choice(body)
                mutated = "".join(lines[:i] + [edit(lines[i])] + lines[i + 1 :])
                if broken(mutated):
                    cases.append(Case("yaml-syntax", f"line {i + 1}: {name}", _rel(path), mutated, located=True))
                    break
        cases.append(Case("yaml-syntax", "two documents", _rel(path), text + "\n---\n" + text, located=True))
        key_lines = [i for i in body if re.match(r"^\s+\w+: \S", lines[i]) and not lines[i].strip().startswith("-")]
        i = rng.choice(key_lines)
        cases.append(Case("yaml-syntax", "duplicate key", _rel(path), "".join(lines[: i + 1] + [lines[i]] + lines[i + 1 :]), located=True))
        data = text.encode("utf-8")
        cut = rng.randrange(len(data) // 3, len(data))
        cases.append(Case("yaml-syntax", "invalid UTF-8", _rel(path), data[:cut] + b"\xff\xfe" + data[cut:], located=True))
    q = _rel(SHIPPED_BY_NAME["quickstart.yaml"])
    for name, content in (("empty file", ""), ("only comments", "# nothing\n"), ("a list", "- a\n- b\n"),
                          ("a scalar", "just words\n"), ("UTF-16", "apiVersion: x\n".encode("utf-16")),
                          ("binary", bytes(random.Random(7).randrange(256) for _ in range(300)))):
        cases.append(Case("yaml-syntax", name, q, content))
    return cases


def _bomb(levels: int, fanout: int = 9) -> str:
    """A "billion laughs" under hardware.deepspeed.overrides (a free-form mapping): level i is a list
    of ``fanout`` aliases of level i-1, so the last level expands to fanout**levels values."""
    out = ["    deepspeed:", "      overrides:", "        bomb:", f"          l0: &l0 [{', '.join(['lol'] * fanout)}]"]
    for i in range(1, levels):
        out.append(f"          l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fanout)}]")
    return "\n".join(out) + "\n"


def aliases(rng, sources) -> list[Case]:
    q = _rel(SHIPPED_BY_NAME["quickstart.yaml"])
    text = SOURCES[q]
    hardware = "  hardware:\n"
    assert hardware in text
    cases = []
    for levels in (3, 4, 6, 7, 9, 12):
        bomb = text.replace(hardware, hardware + _bomb(levels))
        valid = 9**levels < 100_000
        cases.append(Case("aliases", f"alias bomb, {levels} levels", q, bomb, valid=valid, located=not valid))
    recursive = [
        ("in deepspeed.overrides", hardware + "    deepspeed:\n      overrides: &o {a: *o}\n"),
        ("in a list", hardware + "    nodes: &n [*n]\n"),
        ("in labels", None),
        ("through a merge", hardware + "    deepspeed: &d\n      overrides: {<<: *d}\n"),
    ]
    for name, edit in recursive:
        if edit is None:
            mutated = text.replace("metadata:\n", "metadata:\n  labels: &l {self: *l}\n", 1)
        else:
            mutated = text.replace(hardware, edit, 1)
        cases.append(Case("aliases", f"recursive alias {name}", q, mutated, located=True))
    cases.append(Case("aliases", "merge a scalar", q, text.replace(hardware, hardware + "    <<: 5\n", 1), located=True))
    cases.append(Case("aliases", "duplicate anchor", q,
                      text.replace("  model:\n", "  model: &m\n").replace(hardware, "  hardware: &m\n"), located=True))
    anchored = text.replace("  training:\n", "  training: &t\n").replace("  tracking:\n", "  junk: *t\n  tracking:\n")
    cases.append(Case("aliases", "alias into an unknown key", q, anchored, path="spec.junk", located=True))
    # Valid: an anchor reused with a merge key, and an error inside an anchored value reported where it was written.
    m = _rel(SHIPPED_BY_NAME["simpletuner-sana-multidataset.yaml"])
    multi = SOURCES[m]
    first = "    - name: dreambooth-subject\n"
    merged = multi.replace("    - name: pseudo-camera-10k-sana", "    - &camera\n      name: pseudo-camera-10k-sana", 1)
    merged = merged.replace(first, "    - <<: *camera\n      name: camera-copy\n" + first, 1)
    cases.append(Case("aliases", "merge key reuses a dataset", m, merged, valid=True))
    bad_anchor = merged.replace("      repeats: 0\n      is_regularisation_data: true", "      repeats: -3\n      is_regularisation_data: true", 1)
    cases.append(Case("aliases", "error inside a merged anchor", m, bad_anchor, path="spec.datasets[1].repeats", located=True))
    rng.shuffle(cases)
    return cases


def sizes(rng, sources) -> list[Case]:
    q = _rel(SHIPPED_BY_NAME["quickstart.yaml"])
    text = SOURCES[q]
    s = _rel(SHIPPED_BY_NAME["sweep-quickstart.yaml"])
    sweep = SOURCES[s]
    description = "Tiny random Sana on CPU, to try sana-ray end to end."
    assert description in text
    hardware = "  hardware:\n"
    overrides = hardware + "    deepspeed:\n      overrides:\n"
    cases = [
        Case("sizes", "1.1 MiB file", q, text.replace(description, "x" * (1_150_000))),
        Case("sizes", "just under 1 MiB (valid)", q, text.replace(description, "x" * 1_000_000), valid=True),
        Case("sizes", "nested 40 deep (block)", q,
             text.replace(hardware, overrides + "".join(f"{'  ' * (4 + i)}k{i}:\n" for i in range(40)) + "  " * 44 + "leaf: 1\n"),
             located=True),
        Case("sizes", "nested 2,000 deep (flow)", q, text.replace(description, "[" * 2000 + "]" * 2000), located=True),
        Case("sizes", "nested 300,000 deep (flow, unclosed)", q, text.replace(description, "[" * 300_000), located=True),
        Case("sizes", "20,000 validation prompts", q,
             text.replace("    prompts:\n", "    prompts:\n" + "      - a prompt\n" * 20_000), located=True),
        Case("sizes", "12,000 labels", q,
             text.replace("metadata:\n", "metadata:\n  labels: {" + ", ".join(f"k{i}: v" for i in range(12_000)) + "}\n", 1),
             located=True),
        Case("sizes", "55,000 values in 6 lists", q,
             text.replace(hardware, overrides + "".join(f"        a{i}: [{', '.join(['1'] * 9_200)}]\n" for i in range(6))),
             located=True),
        Case("sizes", "200,000-value sweep choice", s,
             sweep.replace("{grid_search: [1.0, 3.0]}", "{choice: [" + ", ".join(["3.0"] * 200_000) + "]}"), located=True),
        Case("sizes", "1,500-value sweep choice", s,
             sweep.replace("{grid_search: [1.0, 3.0]}", "{choice: [" + ", ".join(str(1 + i / 100) for i in range(1500)) + "]}"),
             path="spec.search.space.training.flow_shift.choice", located=True),
        Case("sizes", "1,000-value sweep choice (valid)", s,
             sweep.replace("{grid_search: [1.0, 3.0]}", "{choice: [" + ", ".join(str(1 + i / 100) for i in range(1000)) + "]}"),
             valid=True),
        Case("sizes", "5,000 prompts (valid)", q,
             text.replace("    prompts:\n", "    prompts:\n" + "      - a prompt\n" * 5_000), valid=True),
    ]
    return cases


def overrides(rng, sources) -> list[Case]:
    q = _rel(SHIPPED_BY_NAME["quickstart.yaml"])
    s = _rel(SHIPPED_BY_NAME["sweep-quickstart.yaml"])
    bad = [
        (["training.steps"], None), (["=5"], None), (["training..steps=5"], None), (["training.steps=["], None),
        (["training.steps=abc"], "spec.training.steps"), (["training.steps=0"], "spec.training.steps"),
        (["datasets.5.path=x"], None), (["datasets.x.path=y"], None), (["training.steps.x=1"], None),
        (["trainig.steps=5"], "spec.trainig"), (["optimizer.lr=1e-3"], "spec.optimizer"),
        ([".".join(["a"] * 100) + "=1"], None), (["training.steps=" + "[" * 100 + "]" * 100], None),
        (["training.flow_shift=true"], "spec.training.flow_shift"), (["datasets.0.disabled=0"], "spec.datasets[0].disabled"),
        (["training.steps=!!str 30"], "spec.training.steps"), (["training.steps=*x"], None),
        (["training.steps=!!python/object/apply:os.system [id]"], None), (["training.steps=5", "training.steps=-1"], "spec.training.steps"),
        (["datasets.0.resolution=100"], "spec.datasets[0].resolution"), (["hardware.strategy=zero4"], "spec.hardware.strategy"),
        (["metadata.name=Bad Name"], "metadata.name"), (["kind=Sweep"], None), (["apiVersion=v2"], "apiVersion"),
        (["datasets.0=5"], "spec.datasets[0]"), (["spec=5"], "spec"), (["datasets.0.name.x=1"], None),
        (["training.steps=5\x00"], None), (["validation.prompts=" + "[" + ", ".join(["p"] * 12_000) + "]"], None),
    ]
    cases = [Case("overrides", " ".join(o)[:60], q, SOURCES[q], o, path=p) for o, p in bad]
    cases += [Case("overrides", "sweep: " + " ".join(o)[:50], s, SOURCES[s], o, path=p) for o, p in (
        (["training.steps=0"], "spec.template.training.steps"), (["search.num_samples=0"], "spec.search.num_samples"),
        (["search.space.training.flow_shift={choice: []}"], "spec.search.space.training.flow_shift.choice"),
    )]
    cases += [Case("overrides", " ".join(o)[:60], q, SOURCES[q], o, valid=True) for o in (
        ["training.steps=5", "datasets.0.resolution=128"], ["training.optimizer.lr=1e-4"], ["metadata.name=other"],
        ["hardware.deepspeed.overrides={zero_optimization: {reduce_bucket_size: 500000000}}"],
    )]
    cases.append(Case("overrides", "sweep: training.steps=6 (valid)", s, SOURCES[s], ["training.steps=6"], valid=True))
    return cases


def sweeps(rng, sources) -> list[Case]:
    s = _rel(SHIPPED_BY_NAME["sweep-quickstart.yaml"])
    text = SOURCES[s]
    lr = "training.optimizer.lr: {grid_search: [1.0e-3, 1.0e-6]}"
    assert lr in text
    space = "spec.search.space.training.optimizer.lr"
    domains = [
        ("{loguniform: [.nan, 1.0e-3]}", space + ".loguniform"), ("{loguniform: [1.0e-6, .inf]}", space + ".loguniform"),
        ("{loguniform: [1.0e-3, 1.0e-6]}", space), ("{loguniform: [0, 1.0e-3]}", space),
        ("{uniform: [-.inf, 1]}", space + ".uniform"), ("{loguniform: [1e309, 1e310]}", space + ".loguniform"),
        ("{choice: []}", space + ".choice"), ("{choice: [.nan]}", space), ("{choice: [-1]}", space),
        ("{choice: [true]}", space), ("{grid_search: ['1e-3']}", space), ("{choice: [1], uniform: [0, 1]}", space),
        ("{bogus: [1]}", space + ".bogus"), ("[1, 2]", space), ("{loguniform: [true, 1]}", space + ".loguniform"),
        ("{loguniform: [1e-6]}", space + ".loguniform"),
    ]
    cases = [Case("sweeps", f"lr {d}", s, text.replace(lr, f"training.optimizer.lr: {d}"), path=p, located=True) for d, p in domains]
    steps_domains = [("training.steps: {randint: [0, 1e30]}", "spec.search.space.training.steps.randint"),
                     ("training.steps: {randint: [0, 5]}", "spec.search.space.training.steps"),
                     ("model.pretrained: {choice: [tiny]}", "spec.search.space.model.pretrained"),
                     ("training.nonexistent: {choice: [1]}", "spec.search.space.training.nonexistent"),
                     ("training.99999999999999999999: {choice: [1]}", "spec.search.space.training.99999999999999999999"),
                     ("hardware.num_workers: {choice: [1, 2]}", "spec.search.space.hardware.num_workers")]
    cases += [Case("sweeps", d, s, text.replace(lr, d), path=p, located=True) for d, p in steps_domains]
    for old, new, p in (
        ("algorithm: random", "algorithm: optuna", "spec.search"), ("metric: loss", "metric: eval_loss", "spec"),
        ("num_samples: 1 ", "num_samples: 0 ", "spec.search.num_samples"),
        ("reduction_factor: 2", "reduction_factor: .inf", "spec.search.scheduler.reduction_factor"),
        ("max_concurrent_trials: null", "max_concurrent_trials: true", "spec.search.max_concurrent_trials"),
        ("grace_period: 3", "grace_period: 3.5", "spec.search.scheduler.grace_period"),
        ("mode: min", "mode: minimum", "spec.search.mode"),
    ):
        assert old in text, old
        cases.append(Case("sweeps", new, s, text.replace(old, new), path=p, located=True))
    return cases


def names_and_paths(rng, sources) -> list[Case]:
    q = _rel(SHIPPED_BY_NAME["quickstart.yaml"])
    text = SOURCES[q]
    bad = [
        ("metadata.name=Quickstart", "metadata.name"), ("metadata.name=..", "metadata.name"), ("metadata.name=a/b", "metadata.name"),
        ("metadata.name=" + "x" * 64, "metadata.name"), ("metadata.name=naïve", "metadata.name"), ('metadata.name=""', "metadata.name"),
        ('metadata.name="\\ud800"', "metadata.name"), ("datasets.0.name=.", "spec.datasets[0].name"),
        ("datasets.0.name=..", "spec.datasets[0].name"), ("datasets.0.name=a/b", "spec.datasets[0].name"),
        ("datasets.0.name=-x-", "spec.datasets[0].name"), ("output.dir=/", "spec.output.dir"), ("output.dir=/etc", "spec.output.dir"),
        ("output.dir=/usr/local/runs", "spec.output.dir"), ("output.dir=/proc/self", "spec.output.dir"),
        ("output.dir=/dev/shm/runs", "spec.output.dir"), ("output.dir=" + "../" * 40, "spec.output.dir"),
        ('output.dir=""', "spec.output.dir"), ('output.dir="a\\0b"', "spec.output.dir"), ("output.cache_dir=/sys/x", "spec.output.cache_dir"),
        ("output.cache_dir=/var/lib/x", "spec.output.cache_dir"),
        ("datasets.0.cache_dir=" + "../" * 30 + "etc/x", "spec.datasets[0].cache_dir"), ('datasets.0.path=""', "spec.datasets[0].path"),
        ('datasets.0.path="\\0"', "spec.datasets[0].path"), ("datasets.0.path=s3://bucket/data", "spec.datasets[0].path"),
        ('model.pretrained="a\\0b"', "spec.model.pretrained"), ('validation.prompts=["\\ud83d"]', "spec.validation.prompts"),
        ('metadata.labels={"\\0": x}', "metadata.labels"),
    ]
    cases = [Case("names-and-paths", o[:60], q, text, [o], path=p) for o, p in bad]
    in_file = text.replace("    dir: ../runs ", "    dir: ../../../../../../../../../../../.. ")
    cases.append(Case("names-and-paths", "output.dir climbs to / (in the file)", q, in_file, path="spec.output.dir", located=True))
    cases += [Case("names-and-paths", o[:60], q, text, [o], valid=True) for o in (
        "output.dir=/var/tmp/sana-runs", "output.dir=~/sana-runs", "model.pretrained=" + "x" * 5000,
        "metadata.name=" + "x" * 63, "datasets.0.name=shapes.v2_a-b",
    )]
    cases.append(Case("names-and-paths", "allow_system_dirs", q, text, ["output.dir=/etc/sana", "output.allow_system_dirs=true"], valid=True))
    return cases


def secrets(rng, sources) -> list[Case]:
    q = _rel(SHIPPED_BY_NAME["quickstart.yaml"])
    text = SOURCES[q]
    refused = [f"tracking.mlflow_tracking_uri={u}" for u in (
        f"postgresql+psycopg2://mlflow:{SECRET}@db:5432/mlflow", f"mysql2://root:{SECRET}@db/mlflow",
        f"HTTPS://bob:{SECRET}@mlflow.example.com", f"Mssql+Pyodbc://sa:{SECRET}@h/db", f"https://mlflow.example.com/?token={SECRET}",
        f"https://h/api?access_token={SECRET}", f"https://h/x?sig={SECRET}&se=2030", f"http://h:5000/?api_key={SECRET}",
        f"https://u:{SECRET}@h:443/path?x=1",
    )] + [f"hardware.ray_address=ray://u:{SECRET}@head:10001", f"hardware.ray_address=ray://head:10001/?token={SECRET}"]
    cases = [Case("secrets", o.split("=", 1)[1][:50], q, text, [o], secret=SECRET,
                  path="spec.tracking.mlflow_tracking_uri" if "tracking" in o else "spec.hardware.ray_address") for o in refused]
    in_file = text.replace("    mlflow_tracking_uri: null ", f"    mlflow_tracking_uri: 'PostgreSQL://u:{SECRET}@h/db' ")
    cases.append(Case("secrets", "password in the file", q, in_file, secret=SECRET, path="spec.tracking.mlflow_tracking_uri", located=True))
    cases.append(Case("secrets", "secret in a wrong-typed value", q, text, [f"training.steps=https://u:{SECRET}@h"], secret=SECRET,
                      path="spec.training.steps"))
    cases.append(Case("secrets", "secret in a dataset path URI", q, text, [f"datasets.0.path=s3://key:{SECRET}@bucket/x"],
                      secret=SECRET, path="spec.datasets[0].path"))
    accepted = [f"metadata.labels={{source: 'https://bob:{SECRET}@host/x'}}", f"metadata.description='see https://h/?token={SECRET}'",
                f"validation.prompts=['https://a:{SECRET}@h']", f"model.pretrained=https://u:{SECRET}@hub.example/org/model",
                f"hardware.deepspeed.overrides={{note: 'https://h/?sig={SECRET}'}}"]
    cases += [Case("secrets", o[:50], q, text, [o], valid=True, secret=SECRET) for o in accepted]
    return cases


def non_regular_files(rng, sources) -> list[Case]:
    q = _rel(SHIPPED_BY_NAME["quickstart.yaml"])
    out = [Case("non-regular-files", kind, q, special=kind) for kind in
            ("fifo", "devzero", "devnull", "folder", "missing", "symlink-devzero", "socket")]
    return out


def valid(rng, sources) -> list[Case]:
    cases = []
    for path, text in sources:
        cases.append(Case("valid", "as shipped", _rel(path), text, valid=True))
        stripped = "\n".join(re.sub(r"\s+#.*$", "", line) for line in text.splitlines() if not line.lstrip().startswith("#"))
        cases.append(Case("valid", "comments removed", _rel(path), stripped + "\n", valid=True))
        flowed = yaml.dump(yaml.load(text, Loader=SafeLoader), Dumper=SafeDumper, default_flow_style=True, width=10_000)  # noqa: S506
        cases.append(Case("valid", "flow style", _rel(path), flowed, valid=True))
    return cases


GENERATORS = {
    "misspelt-keys": misspelt_keys, "wrong-types": wrong_types, "coercions": coercions, "nan-inf": nan_inf,
    "huge-ints": huge_ints, "yaml-syntax": yaml_syntax, "aliases": aliases, "sizes": sizes, "overrides": overrides,
    "sweeps": sweeps, "names-and-paths": names_and_paths, "secrets": secrets, "non-regular-files": non_regular_files,
    "valid": valid,
}
SHIPPED_BY_NAME = {p.name: p for p in SHIPPED}
SOURCES = {_rel(p): p.read_text(encoding="utf-8") for p in SHIPPED}


def generate(seed: int = 13) -> list[Case]:
    """Every case, in a fixed order for ``seed``."""
    rng = random.Random(seed)
    sources = [(p, SOURCES[_rel(p)]) for p in SHIPPED]
    cases = []
    for category in CATEGORIES:
        cases += GENERATORS[category](random.Random(rng.random()), sources)
    return cases


# --------------------------------------------------------------------------------------
# Running a case and judging the answer
# --------------------------------------------------------------------------------------

SUMMARY = re.compile(r"^\d+ problems? in .+; fix (it|them) and (run `sana-ray validate .+`|try again)$")
FIX_WORDS = ("expected", "must", "did you mean", "valid keys", "needs", "at least", "at most", "is not allowed",
             "remove", "write", "set it", "use ", "refers to itself")
MAX_LINE = 2000


@dataclass
class Result:
    case: Case
    rc: int | None  # None: it did not finish (a hang)
    stdout: str
    stderr: str
    seconds: float
    verdict: str = ""  # clear, unclear, traceback, wrongly-accepted, hang, accepted, wrongly-rejected, leak
    why: str = ""


def judge(result: Result, file: str) -> Result:
    case, out, err = result.case, result.stdout, result.stderr
    if result.rc is None:
        result.verdict, result.why = "hang", f"no answer within {result.seconds:.0f} s"
        return result
    if "Traceback (most recent call last)" in err or result.rc not in (0, 1, 2):
        result.verdict, result.why = "traceback", err.strip().splitlines()[-1][:300] if err.strip() else f"exit {result.rc}"
        return result
    if case.secret and (case.secret in out or case.secret in err):
        result.verdict, result.why = "leak", "the secret was printed"
        return result
    if case.valid:
        result.verdict = "accepted" if result.rc == 0 else "wrongly-rejected"
        result.why = "" if result.rc == 0 else err.strip()[:500]
        return result
    if result.rc == 0:
        result.verdict, result.why = "wrongly-accepted", "exit 0"
        return result
    lines = [line for line in err.strip().splitlines() if line.strip()]
    problems = lines[:-1]
    reasons = []
    if result.rc != 1:
        reasons.append(f"exit {result.rc}")
    if not lines or not SUMMARY.match(lines[-1]):
        reasons.append("no summary line")
    if not problems:
        reasons.append("no problem line")
    if any(not line.startswith(file + ":") for line in problems):
        reasons.append("a line does not start with the file")
    if any(len(line) > MAX_LINE for line in problems):
        reasons.append("a line is longer than 2,000 characters")
    if case.located and not any(re.match(re.escape(file) + r":\d+:\d+: ", line) for line in problems):
        reasons.append("no line:column")
    if case.path and not any(re.search(r"(^|: )" + re.escape(case.path) + r"(\[|\.|: )", line[len(file):]) for line in problems):
        reasons.append(f"does not name {case.path}")
    if not all(line.endswith(")") or any(w in line for w in FIX_WORDS) for line in problems):
        reasons.append("a line says no fix")
    result.verdict = "unclear" if reasons else "clear"
    result.why = "; ".join(reasons)
    return result


class _Alarm(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Alarm()


def run_in_process(case: Case, file: str, timeout_s: float) -> Result:
    """``sana-ray validate FILE OVERRIDES`` through the CLI's main(), stdout/stderr captured.

    A SIGALRM after ``timeout_s`` stops a hang in Python code (a hang in a blocking system call is
    what the subprocess sample is for)."""
    from sana_ray.cli import main

    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    start = time.perf_counter()
    rc: int | None
    try:
        with redirect_stdout(out), redirect_stderr(err):
            rc = main(["validate", file, *case.overrides])
    except SystemExit as exit_:
        rc = exit_.code if isinstance(exit_.code, int) else 1
    except _Alarm:
        rc = None
    except BaseException as error:  # noqa: BLE001 - any escaping exception is the traceback a user would see
        import traceback

        err.write("Traceback (most recent call last):\n" + "".join(traceback.format_exception_only(type(error), error)))
        rc = 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return judge(Result(case, rc, out.getvalue(), err.getvalue(), time.perf_counter() - start), file)


def _limit_memory(limit_bytes: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return apply


def run_subprocess(case: Case, file: str, timeout_s: float, pythonpath: str | None = None,
                   memory_bytes: int = 3 << 30) -> Result:
    """``python -m sana_ray.cli validate FILE OVERRIDES`` as a user runs it (in ``pythonpath``'s
    checkout, default this one), with at most ``memory_bytes`` of address space: an alias bomb
    against code without a budget fails with MemoryError instead of taking the machine's memory."""
    if any("\x00" in o for o in case.overrides):
        raise ValueError("a command line cannot hold a NUL character; run this case in-process")
    root = pythonpath or str(REPO)
    env = dict(os.environ, PYTHONPATH=root)
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "sana_ray.cli", "validate", file, *case.overrides], capture_output=True,
                              timeout=timeout_s, env=env, cwd=root, stdin=subprocess.DEVNULL,
                              preexec_fn=_limit_memory(memory_bytes))
        rc, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:
        rc, out, err = None, expired.stdout or b"", expired.stderr or b""
    decode = lambda b: b.decode("utf-8", "replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
    return judge(Result(case, rc, decode(out), decode(err), time.perf_counter() - start), file)


def table(results: list[Result]) -> str:
    """Per category: cases, % clear of the refusals, tracebacks, wrongly accepted, hangs, slowest."""
    rows = ["category              cases  refused-clear  tracebacks  wrongly-accepted  wrongly-rejected  hangs  leaks  slowest"]
    totals = {"n": 0, "bad": 0, "clear": 0}
    for category in CATEGORIES + ("plan",):
        mine = [r for r in results if r.case.category == category]
        if not mine:
            continue
        count = lambda v: sum(r.verdict == v for r in mine)  # noqa: E731
        bad = [r for r in mine if not r.case.valid]
        clear = count("clear")
        slowest = max(mine, key=lambda r: r.seconds)
        share = f"{clear}/{len(bad)} ({100 * clear / len(bad):.0f}%)" if bad else "-"
        rows.append(f"{category:<20} {len(mine):>6}  {share:>13}  {count('traceback'):>10}  {count('wrongly-accepted'):>16}  "
                    f"{count('wrongly-rejected'):>16}  {count('hang'):>5}  {count('leak'):>5}  {slowest.seconds:6.2f} s")
        totals["n"] += len(mine)
        totals["bad"] += len(bad)
        totals["clear"] += clear
    slowest = max(results, key=lambda r: r.seconds)
    rows.append(f"total {totals['n']} cases; {totals['clear']}/{totals['bad']} refusals clear "
                f"({100 * totals['clear'] / max(totals['bad'], 1):.1f}%); slowest: {slowest.case.category} / "
                f"{slowest.case.name[:50]} ({slowest.seconds:.2f} s)")
    return "\n".join(rows)


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="Run every fuzz case through `sana-ray validate` and print the table. "
                                     "Default: a subprocess per case against the checkout --pythonpath names (this one "
                                     "by default). --in-process: through main() of whatever sana_ray this Python imports "
                                     "(PYTHONPATH=/other/checkout python tests/manifest/fuzz_cases.py --in-process).")
    parser.add_argument("--pythonpath", help="e.g. an older checkout, to compare")
    parser.add_argument("--in-process", action="store_true")
    parser.add_argument("--timeout", type=float, default=60, help="seconds before a case counts as a hang")
    parser.add_argument("--memory-gib", type=float, default=3, help="address-space limit (an alias bomb must not take the machine)")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--show", action="store_true", help="print every case that is not clear/accepted")
    args = parser.parse_args()
    all_cases = generate(args.seed)
    results = []
    if args.in_process:
        _limit_memory(int(args.memory_gib * (1 << 30)))()
    with tempfile.TemporaryDirectory() as folder:
        for i, c in enumerate(all_cases):
            if args.in_process:
                results.append(run_in_process(c, c.materialize(Path(folder), i), args.timeout))
            elif any("\x00" in o for o in c.overrides):
                continue  # argv cannot carry it (the in-process test runs it)
            else:
                results.append(run_subprocess(c, c.materialize(Path(folder), i), args.timeout, args.pythonpath,
                                              int(args.memory_gib * (1 << 30))))
            print(f"{i + 1}/{len(all_cases)} {results[-1].verdict:<16} {results[-1].seconds:6.2f} s  {c.category}: {c.name[:60]}",
                  file=sys.stderr, flush=True)
    print(table(results))
    if args.show:
        for r in results:
            if r.verdict not in ("clear", "accepted"):
                print(f"--- {r.verdict} {r.case.category}: {r.case.name[:80]} ({r.why})\n{r.stderr.strip()[-600:]}")
