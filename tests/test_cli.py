"""The `sana-ray` command line, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "manifests" / "quickstart.yaml"


def sana_ray(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sana_ray.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120, **kwargs)


def test_help_and_validate_import_nothing_heavy():
    code = (
        "import sys; from sana_ray.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"main(['validate', {str(QUICKSTART)!r}])\n"
        "heavy = [m for m in ('torch', 'ray', 'diffusers', 'transformers', 'mlflow') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr


def test_validate_prints_resolved_manifest_with_defaults():
    result = sana_ray("validate", str(QUICKSTART), "training.steps=7")
    assert result.returncode == 0, result.stderr
    assert "steps: 7" in result.stdout
    assert "max_grad_norm: 1.0" in result.stdout  # a default the quickstart does not spell out


def test_validate_bad_manifest_names_line_and_fix_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("    steps: 30", "    stesp: 30"))
    result = sana_ray("validate", str(bad))
    assert result.returncode == 1
    line = next(i for i, text in enumerate(bad.read_text().splitlines(), 1) if "stesp" in text)
    assert f"bad.yaml:{line}:" in result.stderr
    assert "did you mean 'steps'" in result.stderr
    assert "missing required field 'steps'" in result.stderr
    assert "Traceback" not in result.stderr


def test_schema_is_json_schema_of_the_manifest(tmp_path):
    out = tmp_path / "schema.json"
    assert sana_ray("schema", "-o", str(out)).returncode == 0
    schema = json.loads(out.read_text())
    assert {"apiVersion", "kind", "metadata", "spec"} <= set(schema["properties"])


def test_apply_with_missing_dataset_folder_is_a_clean_error(tmp_path):
    result = sana_ray("apply", str(QUICKSTART), f"datasets.0.path={tmp_path / 'nowhere'}", f"output.dir={tmp_path}")
    assert result.returncode == 1
    assert "shapes" in result.stderr and "nowhere" in result.stderr
    assert "Traceback" not in result.stderr


def test_manifest_reference_doc_is_current():
    from sana_ray.manifest.reference import render

    assert (REPO / "docs" / "manifest.md").read_text() == render(), (
        "docs/manifest.md is stale: run `python -m sana_ray.manifest.reference > docs/manifest.md`"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_mlflow_on_loopback_and_stops_cleanly(tmp_path):
    port = _free_port()
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    process = subprocess.Popen([sys.executable, "-m", "sana_ray.cli", "ui", "--store", store, "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                               start_new_session=True)
    try:
        assert f"http://127.0.0.1:{port}" in process.stdout.readline() + process.stdout.readline() + process.stdout.readline()
        deadline = time.time() + 240  # 7-13 s on an idle 2-core machine; minutes when it is busy
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    assert response.read().decode().strip() == "OK"
                    break
            except OSError:
                assert process.poll() is None, "sana-ray ui exited"
                assert time.time() < deadline, "MLflow UI did not answer within 240 s"
                time.sleep(0.5)
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        if listening:  # ss may be missing on a minimal machine
            assert all(line.split()[3].startswith("127.0.0.1:") for line in listening.splitlines()), listening
    finally:
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's process group
        process.wait(timeout=30)
    time.sleep(1)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
