"""Hostile and odd input, the rules the fuzz test (test_fuzz.py) does not spell out: each budget's own
message, where errors point through aliases, YAML 1.2 booleans, where a run may write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sana_ray.manifest import ManifestError, dump_manifest, load_document, load_manifest
from sana_ray.manifest._yaml import MAX_DEPTH, MAX_ITEMS, MAX_VALUES

VALID = """\
apiVersion: sana-ray/v1
kind: TrainingRun
metadata:
  name: test-run
spec:
  model:
    pretrained: tiny
  datasets:
    - &base
      name: shapes
      path: data/shapes
      resolution: 64
  training:
    steps: 10
  output:
    dir: out
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(path, overrides=()) -> list:
    with pytest.raises(ManifestError) as info:
        load_document(path, overrides)
    return info.value.problems


def _bomb(levels: int) -> str:
    lines = ["  hardware:", "    deepspeed:", "      overrides:", "        l0: &l0 [a, a, a, a, a, a, a, a, a]"]
    lines += [f"        l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "expected", "line"),
    [
        (VALID + _bomb(9), f"past {MAX_VALUES:,} values with its aliases expanded", 24),  # l4 holds 9**5 > 50,000
        (VALID.replace("  training:", "  junk: &j [*j]\n  training:"), "the alias *j is used inside the value it names", 13),
        (VALID + "  hardware: {deepspeed: {overrides: &o {zero: {x: *o}}}}\n", "recursive alias", 17),
        (VALID + "  x: " + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5) + "\n", f"nest more than {MAX_DEPTH} levels", 17),
        (VALID + "  x: [" + ", ".join(["1"] * (MAX_ITEMS + 1)) + "]\n", f"has more than {MAX_ITEMS:,} items", 17),
        (VALID.replace("steps: 10", "steps: " + "9" * 4301), "the integer 999999999999...999999999999 is too large (4,301 digits)", 14),
        (VALID.replace("steps: 10", "steps: 9223372036854775808"), "is too large", 14),
    ],
)
def test_each_budget_fails_fast_with_its_own_message(tmp_path, text, expected, line):
    (problem,) = problems(write(tmp_path, text))
    assert expected in problem.message and problem.hint
    assert problem.line == line


def test_file_budgets_and_files_that_are_not_files(tmp_path):
    big = write(tmp_path, VALID.replace("name: test-run", "name: test-run\n  description: " + "x" * (1 << 20)))
    (problem,) = problems(big)
    assert problem.message == "is larger than 1,024 KiB, the most a manifest may be"
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)  # nobody writes to it: a blocking open would wait forever
    (problem,) = problems(fifo)
    assert problem.message.startswith("is a FIFO (named pipe), not a regular file")
    (problem,) = problems("/dev/zero")
    assert problem.message.startswith("is a character device")


def test_errors_point_where_the_value_was_written_through_aliases_and_merges(tmp_path):
    text = VALID.replace("      resolution: 64\n", "      resolution: 100\n    - *base\n    - <<: *base\n      name: other\n")
    found = {p.path: p.line for p in problems(write(tmp_path, text))}
    # One bad value, written once (line 12), reached three ways: directly, by an alias, by a merge key.
    assert found == {"spec.datasets[0].resolution": 12, "spec.datasets[1].resolution": 12, "spec.datasets[2].resolution": 12}
    text = VALID.replace("  training:\n", "  training: &t\n").replace("  output:", "  trainnig: *t\n  output:")
    (problem,) = problems(write(tmp_path, text))
    assert (problem.path, problem.line, problem.hint) == ("spec.trainnig", 15, "did you mean 'training'?")


def test_an_override_changes_one_place_not_every_alias_of_it(tmp_path):
    path = write(tmp_path, VALID.replace("      resolution: 64\n", "      resolution: 64\n    - <<: *base\n      name: copy\n"))
    manifest = load_manifest(path, ["datasets.0.resolution=128"])
    assert [d.resolution for d in manifest.spec.datasets] == [128, 64]


def test_yaml_1_2_booleans(tmp_path):
    (problem,) = problems(write(tmp_path, VALID.replace("    steps: 10", "    steps: 10\n    on: 1")))
    assert (problem.path, problem.message) == ("spec.training.on", "unknown key 'on'")  # not key True, "spec.training[1]"
    (problem,) = problems(write(tmp_path, VALID.replace("resolution: 64", "resolution: 64\n      crop: yes")))
    assert (problem.path, problem.message) == ("spec.datasets[0].crop", "expected true or false, got 'yes'")
    manifest = load_manifest(write(tmp_path, VALID.replace("name: test-run", "name: test-run\n  description: yes")))
    assert manifest.metadata.description == "yes"
    assert "description: 'yes'" in dump_manifest(manifest)  # quoted: any YAML 1.1 reader reads it back as a string


def test_keys_that_are_not_strings_are_named_with_a_fix(tmp_path):
    (problem,) = problems(write(tmp_path, VALID.replace("    steps: 10", "    steps: 10\n    1: 2")))
    assert (problem.path, problem.line) == ("spec.training", 15)
    assert problem.message == "the key 1 is not a name: keys must be strings" and problem.hint.startswith("valid keys: steps")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("output.dir=/", "resolves to /, the filesystem root"),
        ("output.dir=/etc/sana", "a system folder (/etc)"),
        ("output.dir=" + "../" * 40 + "usr/lib", "a system folder (/usr)"),
        ("output.cache_dir=/var/cache/sana", "a system folder (/var)"),
        ("datasets.0.cache_dir=" + "../" * 40 + "boot/x", "a system folder (/boot)"),
    ],
)
def test_runs_do_not_write_into_system_folders_unless_asked(tmp_path, override, expected):
    path = write(tmp_path, VALID)
    (problem,) = problems(path, [override])
    assert expected in problem.message and "output.allow_system_dirs: true" in problem.hint
    assert load_manifest(path, [override, "output.allow_system_dirs=true"])


def test_temp_folders_and_a_home_under_var_are_fine(tmp_path, monkeypatch):
    path = write(tmp_path, VALID)
    assert load_manifest(path, ["output.dir=/var/tmp/sana-runs"]).spec.output.dir == Path("/var/tmp/sana-runs")
    monkeypatch.setenv("HOME", "/var/lib/jenkins")  # a CI service account's home
    assert load_manifest(path, ["output.dir=~/workspace/runs"]).spec.output.dir == Path("/var/lib/jenkins/workspace/runs")


def test_a_sweep_space_entry_can_be_overridden_by_its_dotted_path(tmp_path):
    sweep = Path(__file__).resolve().parents[2] / "manifests" / "sweep-quickstart.yaml"
    document = load_document(sweep, ["search.space.training.flow_shift.grid_search=[2.0, 4.0]"])
    assert document.spec.search.space["training.flow_shift"].grid_search == [2.0, 4.0]
