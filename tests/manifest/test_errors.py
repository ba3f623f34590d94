"""Validation errors name the file, the line, the dotted path, and say what to do."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from sana_ray.manifest import ManifestError, Problem, load_manifest

VALID = """\
apiVersion: sana-ray/v1
kind: TrainingRun
metadata:
  name: test-run
spec:
  model:
    pretrained: tiny
  datasets:
    - name: shapes
      path: data/shapes
      resolution: 64
  training:
    steps: 10
    batch_size: 2
    mixed_precision: auto
  output:
    dir: out
"""


def problems_for(tmp_path: Path, text: str) -> tuple[ManifestError, Path]:
    path = tmp_path / "m.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    return info.value, path


def only(err: ManifestError) -> Problem:
    assert len(err.problems) == 1, str(err)
    return err.problems[0]


def test_unknown_key_names_file_line_path_and_suggests_the_right_key(tmp_path):
    err, path = problems_for(tmp_path, VALID.replace("    batch_size: 2", "    batch_size: 2\n    stesp: 5"))
    p = only(err)
    assert (p.file, p.line, p.column, p.path) == (str(path), 15, 5, "spec.training.stesp")
    assert p.message == "unknown key 'stesp'"
    assert p.hint == "did you mean 'steps'?"
    assert str(err).splitlines()[0] == f"{path}:15:5: spec.training.stesp: unknown key 'stesp' (did you mean 'steps'?)"


def test_unknown_key_with_nothing_close_lists_the_valid_keys(tmp_path):
    err, _ = problems_for(tmp_path, VALID.replace("    pretrained: tiny", "    pretrained: tiny\n    colour: blue"))
    p = only(err)
    assert p.line == 8 and p.path == "spec.model.colour"
    assert p.hint.startswith("valid keys: pretrained, revision, variant")


def test_unknown_key_inside_a_list_item(tmp_path):
    err, _ = problems_for(tmp_path, VALID.replace("      resolution: 64", "      resolution: 64\n      resolutoin: 64"))
    p = only(err)
    assert (p.line, p.path, p.hint) == (12, "spec.datasets[0].resolutoin", "did you mean 'resolution'?")


def test_wrong_type_says_what_was_expected_and_given(tmp_path):
    err, _ = problems_for(tmp_path, VALID.replace("steps: 10", "steps: fifty"))
    p = only(err)
    assert (p.line, p.column, p.path) == (13, 12, "spec.training.steps")
    assert p.message == "expected an integer, got 'fifty'"


@pytest.mark.parametrize(
    ("old", "new", "path", "expected"),
    [
        ("batch_size: 2", "batch_size: 2.5", "spec.training.batch_size", "expected an integer, got 2.5"),
        ("batch_size: 2", "batch_size: [2]", "spec.training.batch_size", "expected an integer, got a list"),
        ("resolution: 64", "crop: maybe", "spec.datasets[0].crop", "expected true or false, got 'maybe'"),
        ("pretrained: tiny", "pretrained: 12", "spec.model.pretrained", "expected a string, got 12"),
        ("  training:\n", "  training: 5\n  x:\n", "spec.training", "expected a mapping, got 5"),
    ],
)
def test_type_errors(tmp_path, old, new, path, expected):
    err, _ = problems_for(tmp_path, VALID.replace(old, new))
    assert any(p.path == path and p.message == expected for p in err.problems), str(err)


def test_missing_required_field(tmp_path):
    err, _ = problems_for(tmp_path, VALID.replace("    steps: 10\n", ""))
    p = only(err)
    assert p.path == "spec.training.steps"
    assert p.message == "missing required field 'steps'"
    assert p.line == 12  # the `training:` mapping that lacks it


def test_missing_model_section(tmp_path):
    err, _ = problems_for(tmp_path, VALID.replace("  model:\n    pretrained: tiny\n", ""))
    p = only(err)
    assert (p.path, p.message, p.line) == ("spec.model", "missing required field 'model'", 5)


def test_missing_api_version_says_what_to_write(tmp_path):
    err, _ = problems_for(tmp_path, VALID.replace("apiVersion: sana-ray/v1\n", ""))
    p = only(err)
    assert p.message == "missing required field 'apiVersion'"
    assert p.hint == "set it to 'sana-ray/v1'"


def test_resolution_not_a_multiple_of_32(tmp_path):
    err, _ = problems_for(tmp_path, VALID.replace("resolution: 64", "resolution: 100"))
    p = only(err)
    assert (p.line, p.path) == (11, "spec.datasets[0].resolution")
    assert "multiple of 32" in p.message
    assert p.hint == "try 96 or 128"


def test_validation_resolution_must_also_be_a_multiple_of_32(tmp_path):
    err, _ = problems_for(tmp_path, VALID + "  validation:\n    resolution: 80\n")
    p = only(err)
    assert p.path == "spec.validation.resolution" and "multiple of 32" in p.message


def test_literal_error_lists_the_allowed_values(tmp_path):
    err, _ = problems_for(tmp_path, VALID.replace("mixed_precision: auto", "mixed_precision: bf61"))
    p = only(err)
    assert (p.line, p.path) == (15, "spec.training.mixed_precision")
    assert p.message == "must be one of 'auto', 'bf16', 'fp16', 'fp32'; got 'bf61'"
    assert p.hint == "did you mean 'bf16'?"


def test_wrong_api_version(tmp_path):
    err, _ = problems_for(tmp_path, VALID.replace("sana-ray/v1", "sana-ray/v2"))
    assert only(err).message == "must be 'sana-ray/v1', got 'sana-ray/v2'"


def test_bounds_and_patterns(tmp_path):
    text = VALID.replace("steps: 10", "steps: 0").replace("name: test-run", "name: My Run")
    err, _ = problems_for(tmp_path, text)
    by_path = {p.path: p for p in err.problems}
    assert by_path["spec.training.steps"].message == "must be at least 1, got 0"
    assert "'My Run'" in by_path["metadata.name"].message
    assert "lower-case" in by_path["metadata.name"].hint


def test_empty_dataset_list_and_list_given_as_string(tmp_path):
    text = VALID.replace(
        "    - name: shapes\n      path: data/shapes\n      resolution: 64\n", ""
    ).replace("  datasets:\n", "  datasets: []\n  validation:\n    prompts: a cat\n")
    err, _ = problems_for(tmp_path, text)
    by_path = {p.path: p for p in err.problems}
    assert by_path["spec.datasets"].message == "needs at least 1 item, got 0"
    assert by_path["spec.validation.prompts"].message == "expected a list, got 'a cat'"


def test_tuple_of_wrong_length(tmp_path):
    err, _ = problems_for(tmp_path, VALID.replace("mixed_precision: auto", "optimizer:\n      betas: [0.9]"))
    p = only(err)
    assert (p.path, p.message, p.line) == ("spec.training.optimizer.betas", "needs exactly 2 items, got 1", 16)


def test_model_level_rule_points_at_the_section(tmp_path):
    text = VALID.replace("      resolution: 64\n", "      resolution: 64\n    - name: shapes\n      path: other\n")
    p = only(problems_for(tmp_path, text)[0])
    assert p.path == "spec" and "dataset names must be unique" in p.message and p.line == 5


def test_password_in_tracking_uri_is_refused_without_echoing_it(tmp_path):
    text = VALID + "  tracking:\n    mlflow_tracking_uri: https://bob:hunter2@mlflow.example.com\n"
    err, _ = problems_for(tmp_path, text)
    assert only(err).path == "spec.tracking.mlflow_tracking_uri"
    assert "hunter2" not in str(err)


def test_all_problems_are_reported_at_once_in_line_order(tmp_path):
    text = VALID.replace("steps: 10", "steps: ten").replace("resolution: 64", "resolution: 65").replace("name: test-run", "name: Bad Name")
    err, path = problems_for(tmp_path, text)
    assert [p.line for p in err.problems] == [4, 11, 13]
    lines = str(err).splitlines()
    assert len(lines) == 4
    assert lines[-1] == f"3 problems in {path}; fix them and run `sana-ray validate {path}`"


def test_manifest_error_survives_pickling(tmp_path):
    err, _ = problems_for(tmp_path, VALID.replace("steps: 10", "steps: fifty"))
    again = pickle.loads(pickle.dumps(err))
    assert again.problems == err.problems and str(again) == str(err)
