"""Command-line overrides (`training.steps=50`) are applied before validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from sana_ray.manifest import ManifestError, load_manifest, parse_overrides

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
"""


@pytest.fixture
def manifest_path(tmp_path) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(VALID, encoding="utf-8")
    return path


def test_relative_and_absolute_keys(manifest_path):
    m = load_manifest(manifest_path, ["training.steps=50", "metadata.name=foo"])
    assert m.spec.training.steps == 50 and m.metadata.name == "foo"
    m = load_manifest(manifest_path, ["spec.training.steps=60"])
    assert m.spec.training.steps == 60


def test_list_index_and_list_value(manifest_path):
    m = load_manifest(manifest_path, ["datasets.0.resolution=128", "validation.prompts=[a cat, a dog]"])
    assert m.spec.datasets[0].resolution == 128
    assert m.spec.validation.prompts == ["a cat", "a dog"]


def test_value_types(manifest_path):
    m = load_manifest(
        manifest_path,
        [
            "training.optimizer.lr=1e-4",
            "training.gradient_checkpointing=true",
            "training.max_grad_norm=null",
            "hardware.cpus_per_worker=2.5",
            "validation.negative_prompt=blurry, ugly",
        ],
    )
    assert m.spec.training.optimizer.lr == pytest.approx(1e-4)
    assert m.spec.training.gradient_checkpointing is True
    assert m.spec.training.max_grad_norm is None
    assert m.spec.hardware.cpus_per_worker == 2.5
    assert m.spec.validation.negative_prompt == "blurry, ugly"


def test_parse_overrides_returns_absolute_paths_and_typed_values():
    assert parse_overrides(["training.optimizer.lr=1e-4", "datasets.0.crop=false", "metadata.name=x", "model.pretrained='1e-4'"]) == [
        (["spec", "training", "optimizer", "lr"], 1e-4),
        (["spec", "datasets", 0, "crop"], False),
        (["metadata", "name"], "x"),
        (["spec", "model", "pretrained"], "1e-4"),  # quoted: stays a string
    ]


@pytest.mark.parametrize("bad", ["training.steps", "=50", " =1", "training..steps=1", "x=[a, b"])
def test_bad_override_syntax_names_the_override(manifest_path, bad):
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest_path, [bad])
    assert f"override '{bad}'" in str(info.value)
    with pytest.raises(ManifestError):
        parse_overrides([bad])


def test_index_out_of_range(manifest_path):
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest_path, ["datasets.3.resolution=128"])
    assert "out of range" in str(info.value) and "datasets.3.resolution=128" in str(info.value)


def test_setting_inside_a_scalar_is_an_error(manifest_path):
    with pytest.raises(ManifestError, match="not a mapping"):
        load_manifest(manifest_path, ["training.steps.x=1"])


def test_missing_sections_are_created(manifest_path):
    m = load_manifest(manifest_path, ["tracking.experiment=exp", "metadata.labels.team=vision"])
    assert m.spec.tracking.experiment == "exp" and m.metadata.labels == {"team": "vision"}


def test_invalid_value_from_an_override_says_so(manifest_path):
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest_path, ["training.steps=abc"])
    (problem,) = info.value.problems
    assert problem.path == "spec.training.steps"
    assert problem.line is None
    assert "(set by override 'training.steps=abc')" in problem.message
    assert "expected an integer, got 'abc'" in problem.message


def test_unknown_key_from_an_override_still_gets_a_suggestion(manifest_path):
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest_path, ["training.stesp=5"])
    (problem,) = info.value.problems
    assert "set by override" in problem.message and problem.hint == "did you mean 'steps'?"


def test_later_override_wins(manifest_path):
    assert load_manifest(manifest_path, ["training.steps=5", "training.steps=7"]).spec.training.steps == 7
