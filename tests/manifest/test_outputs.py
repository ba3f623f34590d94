"""What other parts of sana-ray get from a manifest: YAML, MLflow params, fingerprint, JSON Schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sana_ray.manifest import flatten_manifest, load_manifest, manifest_fingerprint, manifest_json_schema

REPO = Path(__file__).resolve().parents[2]

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
    optimizer:
      lr: 0.001
"""

# The same content: other key order, flow style, comments, a default written out, 1e-3 spelled differently.
REFORMATTED = """\
# a comment
kind: TrainingRun
apiVersion: "sana-ray/v1"
spec:
  training: {optimizer: {lr: 1e-3}, steps: 10}   # inline
  datasets: [{resolution: 64, path: data/shapes, name: shapes}]
  model: {pretrained: tiny, max_sequence_length: 300}
metadata: {name: another-name}
"""


def load(tmp_path: Path, text: str, name: str = "m.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return load_manifest(path)


def test_fingerprint_ignores_formatting_comments_and_key_order(tmp_path):
    a = load(tmp_path, VALID, "a.yaml")
    b = load(tmp_path, REFORMATTED, "b.yaml")
    assert manifest_fingerprint(a) == manifest_fingerprint(b)
    assert len(manifest_fingerprint(a)) == 64


def test_fingerprint_changes_when_a_value_changes(tmp_path):
    a = load(tmp_path, VALID, "a.yaml")
    b = load(tmp_path, VALID.replace("lr: 0.001", "lr: 0.002"), "b.yaml")
    assert manifest_fingerprint(a) != manifest_fingerprint(b)


def test_flatten_for_mlflow(tmp_path):
    flat = flatten_manifest(load(tmp_path, VALID))
    assert flat["spec.training.optimizer.lr"] == "0.001"
    assert flat["spec.training.steps"] == "10"
    assert flat["spec.datasets.0.name"] == "shapes"
    assert flat["spec.datasets.0.path"] == str(tmp_path / "data" / "shapes")
    assert flat["spec.training.optimizer.betas"] == "null"  # the optimizer's own default
    assert flat["spec.training.gradient_checkpointing"] == "false"
    assert flat["spec.model.revision"] == "null"
    assert all(isinstance(v, str) for v in flat.values())


def test_flatten_truncates_long_values(tmp_path):
    m = load(tmp_path, VALID.replace("name: test-run", "name: test-run\n  description: " + "x" * 800))
    value = flatten_manifest(m)["metadata.description"]
    assert len(value) == 500 and value.endswith("...")


def test_json_schema():
    schema = manifest_json_schema()
    assert "$schema" in schema and schema["title"]
    assert set(schema["required"]) == {"apiVersion", "kind", "metadata", "spec"}
    json.dumps(schema)  # serialisable


def test_importing_the_manifest_package_stays_light():
    code = (
        "import sana_ray.manifest, sys; "
        "heavy = [m for m in ['torch', 'ray', 'diffusers', 'transformers', 'mlflow', 'numpy'] if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
