"""End-to-end sweep (`kind: Sweep`): Ray Tune + ASHA over 4 Ray Train trials, real MLflow, diffusers.

The template holds out a small eval dataset, so the trials are compared on the stable eval loss
(`eval_loss`, the default metric then; 4 sigmas on 2 images keep it cheap).

One sweep (module-scoped), interrupted by SIGKILL and resumed by applying it again, is asserted on
from every angle: it is the slow part (~2.5-4 min on 2 cores).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

STEPS = 6
CHECKPOINT_EVERY = 2
EVAL_TIMESTEPS = 4  # sigmas 0.125, 0.375, 0.625, 0.875
PROMPTS = ["a red circle on a white background", "a blue square"]
SPACE = {
    # A good and a hopeless learning rate, x two shifts. Trials run one at a time in grid order, so
    # ASHA's decisions (rungs at steps 2 and 4, keep the better half) are the same on every run.
    "training.optimizer.lr": {"grid_search": [3e-3, 1e-7]},
    "training.flow_shift": {"grid_search": [1.0, 3.0]},
}


def write_sweep(path: Path, *, data_dir: Path, eval_dir: Path, output_dir: Path, name: str) -> Path:
    doc = {
        "apiVersion": "sana-ray/v1",
        "kind": "Sweep",
        "metadata": {"name": name},
        "spec": {
            "template": {
                "model": {"pretrained": "tiny"},
                "datasets": [
                    {"name": "shapes", "path": str(data_dir), "resolution": 64},
                    {"name": "holdout", "path": str(eval_dir), "resolution": 64, "dataset_type": "eval"},
                ],
                "training": {"steps": STEPS, "batch_size": 2, "seed": 7, "checkpoint_every": CHECKPOINT_EVERY},
                "validation": {"prompts": PROMPTS, "num_inference_steps": 2},
                "evaluation": {"num_timesteps": EVAL_TIMESTEPS},  # every checkpoint (the default)
                # Half a CPU per worker: on 2 cores a stopped trial's leaked worker placement group (see
                # docs/sweeps.md) then cannot starve the next trial even if the clean-up misses it.
                "hardware": {"num_workers": 1, "cpus_per_worker": 0.5},
                "tracking": {"experiment": "sweeps"},
                "output": {"dir": str(output_dir)},
            },
            "search": {
                "space": SPACE,  # no metric: eval_loss, because the template has an eval dataset
                "mode": "min",
                "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 2},
                "max_concurrent_trials": 1,
            },
        },
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _trial_outcomes(trials_dir: Path) -> dict[str, dict]:
    outcomes = {}
    for path in trials_dir.glob("*/run.json"):
        try:
            outcomes[path.parent.name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass  # being replaced right now
    return outcomes


def _tune_recorded_a_finished_trial(tune_dir: Path) -> bool:
    """Whether Tune's saved experiment state lists a TERMINATED trial."""
    for path in tune_dir.glob("attempt-*/experiment_state-*.json"):
        try:
            trials = [json.loads(entry[0]) for entry in json.loads(path.read_text())["trial_data"]]
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            continue  # being written
        if any(trial.get("status") == "TERMINATED" for trial in trials):
            return True
    return False


@pytest.fixture(scope="module")
def sweep_run(ray_local, tmp_path_factory):
    """The sweep is interrupted and resumed: `sana-ray apply` runs in a subprocess until the first
    trial has finished and the second has started, is SIGKILLed (driver, trials and its Ray), and the
    same manifest is applied again here. Every test below then checks the resumed sweep, and
    test_resumed_sweep_did_not_rerun_the_finished_trial checks that nothing was done twice."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from sana_ray.data.synthetic import make_shapes
    from sana_ray.launch.sweep import apply_sweep
    from sana_ray.manifest import load_document

    work = tmp_path_factory.mktemp("sweep")
    make_shapes(work / "shapes", count=8, size=64, seed=3)
    make_shapes(work / "holdout", count=2, size=64, seed=11)
    path = write_sweep(work / "sweep.yaml", data_dir=work / "shapes", eval_dir=work / "holdout",
                       output_dir=work / "runs", name="lr-shift")
    root = work / "runs" / "lr-shift"
    trials_dir = root / "attempt-1" / "trials"

    log = work / "interrupted-sweep.log"
    with log.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "sana_ray.cli", "apply", str(path)],
                                   start_new_session=True, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.time() + 900  # ~1.5 min on an idle 2-core machine
    try:
        # Trials run one at a time: the second has started, so the first has finished; and Tune has
        # saved that in its experiment state (what a resume reads; within ~1 s, see launch/sweep.py).
        while len(_trial_outcomes(trials_dir)) < 2 or not _tune_recorded_a_finished_trial(root / "tune"):
            assert process.poll() is None, f"the sweep ended before it could be interrupted:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"no second trial within 900 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    before = _trial_outcomes(trials_dir)
    first = next(name for name, outcome in before.items() if outcome["status"] == "completed")
    first_export = Path(before[first]["export_path"], "model_index.json")
    interrupted = {"trials": before, "first": first, "first_export_mtime": first_export.stat().st_mtime_ns,
                   "parent_run_id": json.loads((root / "state.json").read_text())["mlflow_run_id"]}

    sweep = load_document(path)
    assert apply_sweep(sweep) == 0
    return sweep, root, json.loads((root / "summary.json").read_text()) | {"_interrupted": interrupted}


def test_resumed_sweep_did_not_rerun_the_finished_trial(sweep_run):
    from mlflow.tracking import MlflowClient

    _, root, summary = sweep_run
    interrupted = summary["_interrupted"]
    assert summary["mlflow_run_id"] == interrupted["parent_run_id"]  # the same parent run continued
    after = _trial_outcomes(root / "attempt-1" / "trials")
    first, before = interrupted["first"], interrupted["trials"][interrupted["first"]]
    # Not run again: same start time and MLflow run, its export untouched, one loss per step.
    assert after[first]["started_at"] == before["started_at"]
    assert after[first]["mlflow_run_id"] == before["mlflow_run_id"]
    assert Path(after[first]["export_path"], "model_index.json").stat().st_mtime_ns == interrupted["first_export_mtime"]
    history = MlflowClient(summary["mlflow_tracking_uri"]).get_metric_history(before["mlflow_run_id"], "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    # The trial that was running when the driver died kept its MLflow run and finished in it.
    for name, outcome in interrupted["trials"].items():
        assert after[name]["mlflow_run_id"] == outcome["mlflow_run_id"], name


def test_summary_statuses_and_best(sweep_run):
    _, root, summary = sweep_run
    assert summary["status"] == "completed" and summary["kind"] == "Sweep"
    assert summary["metric"] == "eval_loss"
    trials = summary["trials"]
    assert len(trials) == 4
    assert {(t["values"]["training.optimizer.lr"], t["values"]["training.flow_shift"]) for t in trials} == {
        (lr, shift) for lr in (3e-3, 1e-7) for shift in (1.0, 3.0)
    }
    statuses = [t["status"] for t in trials]
    assert "early-stopped" in statuses and "completed" in statuses, statuses
    for trial in trials:
        if trial["status"] == "completed":
            assert trial["steps"] == STEPS and Path(trial["export_path"], "model_index.json").is_file()
        else:
            assert trial["status"] == "early-stopped" and 0 < trial["steps"] < STEPS and trial["export_path"] is None
        assert Path(trial["run_dir"], "manifest.yaml").is_file()  # each trial has apply's run layout
    best = summary["best"]
    assert best["status"] == "completed"
    completed = [t for t in trials if t["status"] == "completed"]
    assert best["metric"] == min(t["metric"] for t in completed)


def test_mlflow_parent_children_params_statuses_histories(sweep_run):
    """Checked through an `mlflow server` REST API on 127.0.0.1, as a user's client would."""
    import urllib.request

    from sana_ray.launch.tracking import LocalServer

    _, _, summary = sweep_run
    by_run = {t["mlflow_run_id"]: t for t in summary["trials"]}
    with LocalServer(summary["mlflow_tracking_uri"]) as server:
        def call(endpoint: str, body: dict | None = None, query: str = "") -> dict:
            request = urllib.request.Request(
                f"{server.uri}/api/2.0/mlflow/{endpoint}{query}",
                data=json.dumps(body).encode() if body is not None else None,
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())

        experiment = call("experiments/get-by-name", query="?experiment_name=sweeps")["experiment"]
        runs = call("runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
        tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
        params = {r["info"]["run_id"]: {p["key"]: p["value"] for p in r["data"].get("params", [])} for r in runs}
        parents = [rid for rid, t in tags.items() if t.get("sana_ray.kind") == "sweep"]
        children = [rid for rid, t in tags.items() if t.get("mlflow.parentRunId")]
        assert parents == [summary["mlflow_run_id"]]
        assert sorted(children) == sorted(by_run)
        parent = parents[0]
        assert tags[parent]["sana_ray.best_trial"] == summary["best"]["trial_id"]
        assert tags[parent]["sana_ray.status"] == "completed"
        assert tags[parent]["sana_ray.metric"] == "eval_loss"
        parent_metrics = {m["key"]: m["value"] for r in runs if r["info"]["run_id"] == parent for m in r["data"].get("metrics", [])}
        assert parent_metrics["best_eval_loss"] == summary["best"]["metric"]
        for rid in children:
            trial = by_run[rid]
            assert tags[rid]["mlflow.parentRunId"] == parent
            assert tags[rid]["sana_ray.status"] == trial["status"]
            assert float(params[rid]["training.optimizer.lr"]) == trial["values"]["training.optimizer.lr"]
            assert float(params[rid]["spec.training.flow_shift"]) == trial["values"]["training.flow_shift"]
            history = call("metrics/get-history", query=f"?run_id={rid}&metric_key=loss")["metrics"]
            steps = sorted({m["step"] for m in history})
            if trial["status"] == "completed":
                assert steps == list(range(1, STEPS + 1))
            else:  # stopped at a rung: it logged up to that checkpoint (and maybe on while the stop was in flight)
                assert trial["steps"] in steps and trial["steps"] < STEPS
            # The stable eval loss: at every checkpoint, the value Tune compared is the one MLflow holds,
            # and one history per sigma.
            evals = {m["step"]: m["value"] for m in call("metrics/get-history", query=f"?run_id={rid}&metric_key=eval_loss")["metrics"]}
            assert evals and all(step % CHECKPOINT_EVERY == 0 for step in evals), evals
            assert evals[trial["steps"]] == trial["metric"]
            if trial["status"] == "completed":
                assert sorted(evals) == list(range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY))
            for sigma in ("0.1250", "0.8750"):
                per_sigma = call("metrics/get-history", query=f"?run_id={rid}&metric_key=eval_loss/sigma_{sigma}")["metrics"]
                assert sorted(m["step"] for m in per_sigma) == sorted(evals)
        artifacts = call("artifacts/list", query=f"?run_id={parent}")
        assert {"grid.png", "summary.json", "sweep.yaml"} <= {f["path"] for f in artifacts.get("files", [])}


def test_grid_image_has_prompts_by_trials(sweep_run):
    from PIL import Image

    from sana_ray.launch.grid import grid_size

    _, root, summary = sweep_run
    with Image.open(summary["grid_path"]) as grid:
        assert grid.size == grid_size(columns=4, prompts=len(PROMPTS), resolution=64, label_lines=len(SPACE))
    assert Path(summary["grid_path"]) == root / "grid.png"


def test_best_export_loads_in_sana_pipeline(sweep_run):
    import torch
    from diffusers import SanaPipeline

    _, _, summary = sweep_run
    pipeline = SanaPipeline.from_pretrained(summary["best"]["export_path"])
    image = pipeline("a blue square", height=64, width=64, num_inference_steps=2, use_resolution_binning=False,
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_runs_command_and_second_apply(sweep_run, capsys):
    from sana_ray.cli import main
    from sana_ray.launch.sweep import apply_sweep

    sweep, root, summary = sweep_run
    assert main(["runs", "lr-shift", "--store", summary["mlflow_tracking_uri"]]) == 0
    out = capsys.readouterr().out
    for trial in summary["trials"]:
        line = next(line for line in out.splitlines() if line.startswith(trial["trial_id"]))
        assert trial["status"] in line and str(trial["steps"]) in line
    assert "training.optimizer.lr" in out and "early-stopped" in out
    assert main(["runs", "--store", summary["mlflow_tracking_uri"]]) == 0
    assert "lr-shift" in capsys.readouterr().out

    assert apply_sweep(sweep) == 0  # same manifest again: nothing re-runs
    assert "already complete" in capsys.readouterr().out
