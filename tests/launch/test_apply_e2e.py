"""End-to-end `sana-ray apply` on a real local Ray cluster, tiny model, real MLflow and diffusers.

These are the slow tests (each fit is ~20-40 s on 2 cores), so each one asserts many things.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

STEPS = 24


def write_manifest(path: Path, *, data_dir: Path, output_dir: Path, name: str, **training) -> Path:
    manifest = {
        "apiVersion": "sana-ray/v1",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": {
            "model": {"pretrained": "tiny"},
            "datasets": [{"name": "shapes", "path": str(data_dir), "resolution": 64, "crop": True}],
            "training": {
                "steps": STEPS,
                "batch_size": 2,
                "seed": 7,
                "optimizer": {"lr": 1e-3},
                "lr_scheduler": {"warmup_steps": 2},
                "checkpoint_every": 6,
            }
            | training,
            "validation": {"prompts": ["a red circle on a white background"], "num_inference_steps": 2},
            "hardware": {"num_workers": 2},
            # One cache for every run of this module: the second run must reuse it.
            "output": {"dir": str(output_dir), "cache_dir": str(output_dir.parent / "cache")},
        },
    }
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def finished_run(ray_local, shapes, workdir):
    """One uninterrupted apply, in-process on the session's Ray cluster."""
    from sana_ray.launch.apply import apply
    from sana_ray.manifest import load_manifest

    path = write_manifest(workdir / "run.yaml", data_dir=shapes, output_dir=workdir / "runs-a", name="e2e")
    manifest = load_manifest(path)
    assert apply(manifest) == 0
    return manifest, workdir / "runs-a" / "e2e"


def test_apply_writes_run_json_export_and_mlflow_record(finished_run):
    import torch
    from diffusers import SanaPipeline
    from mlflow.tracking import MlflowClient

    manifest, run_dir = finished_run
    outcome = json.loads((run_dir / "run.json").read_text())
    for key in ("name", "status", "steps", "final_loss", "export_path", "checkpoint_path", "mlflow_tracking_uri", "mlflow_run_id"):
        assert key in outcome, key
    assert outcome["name"] == "e2e" and outcome["status"] == "completed" and outcome["steps"] == STEPS
    assert Path(outcome["checkpoint_path"]).name == f"checkpoint-{STEPS:06d}"

    # The export is a complete diffusers pipeline that loads offline and generates.
    pipeline = SanaPipeline.from_pretrained(outcome["export_path"])
    image = pipeline(
        "a blue square", height=64, width=64, num_inference_steps=2, use_resolution_binning=False,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)

    # The MLflow run: named after the manifest, params are the flattened manifest, the loss falls.
    client = MlflowClient(outcome["mlflow_tracking_uri"])
    run = client.get_run(outcome["mlflow_run_id"])
    assert run.info.run_name == "e2e" and run.info.status == "FINISHED"
    assert run.data.params["spec.training.steps"] == str(STEPS)
    assert run.data.params["spec.training.flow_shift"] == "3.0"
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) == STEPS
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, f"loss did not fall: {first:.4f} -> {last:.4f}"
    for key in ("lr", "grad_norm", "samples_per_s", "step_time_s"):
        assert client.get_metric_history(run.info.run_id, key), key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "manifest.yaml" in artifacts
    images = client.list_artifacts(run.info.run_id, f"validation/step-{STEPS:06d}")
    assert [Path(a.path).suffix for a in images] == [".png"]


def test_second_apply_reports_complete_and_reuses_caches(finished_run, capsys):
    from sana_ray.launch.apply import apply

    manifest, run_dir = finished_run
    before = json.loads((run_dir / "run.json").read_text())
    assert apply(manifest) == 0
    out = capsys.readouterr().out
    assert "already complete" in out
    assert json.loads((run_dir / "run.json").read_text()) == before


HOLD_AT = 12  # a checkpoint step (checkpoint_every 6): the resumed run starts from it


def _checkpoint_registered(storage: Path, step: int) -> bool:
    return any(
        f"checkpoint-{step:06d}" in snapshot.read_text()
        for snapshot in storage.glob("*/checkpoint_manager_snapshot.json")
    )


def test_killed_run_resumes_from_checkpoint_and_matches_uninterrupted(finished_run, shapes, workdir, capfd):
    """SIGKILL `sana-ray apply` once its step-12 checkpoint is registered; applying again resumes
    from it and ends where the uninterrupted run ended (same final loss, same per-step losses after
    the resume point). SANA_RAY_HOLD_AT_STEP parks the workers after step 12, so the kill lands at
    that step however fast the machine trains."""
    from mlflow.tracking import MlflowClient

    from sana_ray.launch.apply import apply
    from sana_ray.manifest import load_manifest

    _, reference_dir = finished_run
    reference = json.loads((reference_dir / "run.json").read_text())
    path = write_manifest(workdir / "killed.yaml", data_dir=shapes, output_dir=workdir / "runs-b", name="e2e")
    run_dir = workdir / "runs-b" / "e2e"

    log = workdir / "killed-apply.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "sana_ray.cli", "apply", str(path)],
            start_new_session=True, stdout=sink, stderr=subprocess.STDOUT,
            env=os.environ | {"SANA_RAY_HOLD_AT_STEP": str(HOLD_AT)},
        )
    deadline = time.time() + 600  # ~40 s on an idle 2-core machine
    try:
        while not _checkpoint_registered(run_dir / "ray", HOLD_AT):
            assert process.poll() is None, f"apply ended before it could be interrupted:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"no checkpoint within 600 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    interrupted = json.loads((run_dir / "run.json").read_text())
    assert interrupted["status"] == "running"  # killed: nobody wrote the outcome

    capfd.readouterr()
    assert apply(load_manifest(path)) == 0
    out = capfd.readouterr()
    resumed_line = next(line for line in (out.out + out.err).splitlines() if "resuming from step" in line)
    resumed_step = int(resumed_line.split("resuming from step")[1].split()[0])
    assert resumed_step == HOLD_AT

    outcome = json.loads((run_dir / "run.json").read_text())
    assert outcome["status"] == "completed" and outcome["steps"] == STEPS
    assert outcome["mlflow_run_id"] == interrupted["mlflow_run_id"]  # the same MLflow run continued
    assert outcome["final_loss"] == pytest.approx(reference["final_loss"], rel=1e-5)

    def losses(info):
        history = MlflowClient(info["mlflow_tracking_uri"]).get_metric_history(info["mlflow_run_id"], "loss")
        return {m.step: m.value for m in history}  # the latest value logged for each step

    resumed, uninterrupted = losses(outcome), losses(reference)
    for step in range(resumed_step + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5), step


def test_online_latents_train_like_cached_ones(finished_run, shapes, workdir):
    """`cache_latents: false` (SimpleTuner's vae_cache_disable): the same manifest with the dataset
    encoded by the VAE inside the training loop writes no latent shards and trains to the same
    per-step losses as the cached run."""
    from mlflow.tracking import MlflowClient

    from sana_ray.launch.apply import apply
    from sana_ray.manifest import load_manifest

    _, reference_dir = finished_run
    reference = json.loads((reference_dir / "run.json").read_text())
    path = write_manifest(workdir / "online.yaml", data_dir=shapes, output_dir=workdir / "runs-online", name="online",
                          steps=6, checkpoint_every=6)
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["datasets"][0]["cache_latents"] = False
    doc["spec"]["validation"] = {"prompts": []}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    latents_root = workdir / "cache" / "latents"
    before = sorted(p.name for p in latents_root.iterdir())

    assert apply(load_manifest(path)) == 0
    assert sorted(p.name for p in latents_root.iterdir()) == before  # no latent shards written
    outcome = json.loads((workdir / "runs-online" / "online" / "run.json").read_text())

    def losses(info):
        history = MlflowClient(info["mlflow_tracking_uri"]).get_metric_history(info["mlflow_run_id"], "loss")
        return {m.step: m.value for m in history}

    online, cached = losses(outcome), losses(reference)
    assert sorted(online) == list(range(1, 7))
    for step in online:
        assert online[step] == pytest.approx(cached[step], rel=1e-4, abs=1e-6), step
