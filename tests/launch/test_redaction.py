"""A secret in a manifest value is written nowhere: every place sana-ray writes manifest values.

No Ray fit: each writer `apply` (and a sweep) uses is called directly, with a manifest whose
free-text values carry a password in a URI and tokens in query strings, and every written
artifact is read back. The places (PLACES below): what `validate` prints, the resolved
manifest.yaml `apply` writes (dump_manifest), the MLflow params and tags of a real sqlite store
(open_run) and the manifest artifact logged into that run, run.json (write_outcome, with the
error text `apply` records), the console (say), and the error text of a refused manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sana_ray.cli import main
from sana_ray.launch import tracking
from sana_ray.launch.apply import RunPaths, write_outcome, write_text_atomic
from sana_ray.launch.console import say
from sana_ray.manifest import ManifestError, dump_manifest, flatten_manifest, load_manifest

PASSWORD = "pw-Zx81-secret"
TOKEN = "tok-Qm42-secret"
SECRETS = (PASSWORD, TOKEN)

MANIFEST = f"""\
apiVersion: sana-ray/v1
kind: TrainingRun
metadata:
  name: leaky
  description: "mirror of https://alice:{PASSWORD}@data.example/x?token={TOKEN}"
  labels:
    source: "postgresql+psycopg2://bob:{PASSWORD}@db.example/catalog"
spec:
  model:
    pretrained: "https://carol:{PASSWORD}@hub.example/org/sana"
  datasets:
    - name: shapes
      path: data/shapes
      resolution: 64
  training:
    steps: 2
  validation:
    prompts: ["see https://cdn.example/a.png?X-Amz-Signature={TOKEN}&X-Amz-Date=1"]
  hardware:
    deepspeed:
      overrides: {{note: "https://h.example/?api_key={TOKEN}"}}
  output:
    dir: out
"""

PLACES = ("validate stdout", "manifest.yaml", "mlflow params", "mlflow tags", "mlflow manifest artifact", "run.json",
          "console", "error text (validate stderr)", "error text (ManifestError)")


def _no_secret(where: str, text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{where} holds the secret {secret!r}:\n{text[:2000]}"


def test_a_secret_in_a_manifest_value_is_written_nowhere(tmp_path, capsys):
    path = tmp_path / "leaky.yaml"
    path.write_text(MANIFEST)
    manifest = load_manifest(path)
    assert PASSWORD in manifest.metadata.description  # validation keeps the value; only what is written is masked
    written: dict[str, str] = {}

    assert main(["validate", str(path)]) == 0
    written["validate stdout"] = capsys.readouterr().out

    paths = RunPaths.of(manifest)  # what apply writes, with apply's own writers
    write_text_atomic(paths.manifest, dump_manifest(manifest))
    written["manifest.yaml"] = paths.manifest.read_text()

    uri = tracking.default_tracking_uri(manifest.spec.output.dir)
    tags = {"sana_ray.attempt": "1"} | {f"label.{k}": v for k, v in manifest.metadata.labels.items()}
    run_id = tracking.open_run(uri, experiment="leaks", run_name=manifest.metadata.name, tags=tags,
                               params=flatten_manifest(manifest))
    tracking.RunLogger(uri, run_id).log_artifact(paths.manifest)
    client = tracking.client(uri)
    run = client.get_run(run_id)
    written["mlflow params"] = json.dumps(run.data.params)
    written["mlflow tags"] = json.dumps(run.data.tags)
    artifact = Path(client.download_artifacts(run_id, "manifest.yaml", str(tmp_path / "download")))
    written["mlflow manifest artifact"] = artifact.read_text()

    error = RuntimeError(f"could not reach {manifest.spec.model.pretrained}")  # what a failed fit can say
    outcome = {"name": manifest.metadata.name, "status": "failed", "mlflow_tracking_uri": tracking.redact_uri(uri),
               "error": tracking.redact_text(f"{type(error).__name__}: {error}"), "description": manifest.metadata.description}
    write_outcome(paths.run_json, outcome)
    written["run.json"] = paths.run_json.read_text()

    say(f"Model: {manifest.spec.model.pretrained}; {manifest.metadata.description}")
    written["console"] = capsys.readouterr().out

    bad = [f"training.steps={manifest.spec.model.pretrained}", f"tracking.mlflow_tracking_uri=https://u:{PASSWORD}@m.example"]
    with pytest.raises(SystemExit):
        main(["validate", str(path), *bad])
    written["error text (validate stderr)"] = capsys.readouterr().err
    with pytest.raises(ManifestError) as refused:
        load_manifest(path, bad)
    written["error text (ManifestError)"] = str(refused.value) + repr([p.message for p in refused.value.problems])

    assert set(written) == set(PLACES)
    for where, text in written.items():
        _no_secret(where, text)
    # ... and the values were written, masked, not dropped:
    params = run.data.params
    assert params["metadata.description"] == "mirror of https://***@data.example/x?token=***"
    assert params["spec.hardware.deepspeed.overrides.note"] == "https://h.example/?api_key=***"
    assert run.data.tags["label.source"] == "postgresql+psycopg2://***@db.example/catalog"
    assert "X-Amz-Signature=***&X-Amz-Date=1" in written["manifest.yaml"]
    assert "https://***@hub.example/org/sana" in written["console"] and "https://***@hub.example" in written["run.json"]
    assert "spec.training.steps: expected an integer" in written["error text (validate stderr)"]
    assert "must not contain a password" in written["error text (ManifestError)"]
