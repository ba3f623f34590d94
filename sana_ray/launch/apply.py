"""`sana-ray apply`: manifest -> caches -> Ray Train -> diffusers export -> MLflow record.

``apply`` is declarative and idempotent, like ``kubectl apply``:

* the same manifest applied again resumes an interrupted run from its latest checkpoint (same
  Ray Train storage folder, same MLflow run), or says the run is already complete;
* a manifest whose training identity changed (model, data, training, worker count) is a new
  attempt: a fresh Ray Train folder and a new MLflow run; earlier attempts stay on disk;
* ``--restart`` forces a new attempt of an unchanged manifest.

Layout of a run (``<output.dir>/<metadata.name>/``)::

    manifest.yaml   the resolved manifest (all defaults filled)
    state.json      fingerprint, attempt number and MLflow run id (what resume needs)
    run.json        the outcome, for scripts
    ray/            Ray Train storage: attempt-N/checkpoint-000010/ ...
    model/          the exported diffusers pipeline
    validation/     validation images per step
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sana_ray.files import read_json, write_json_atomic, write_text_atomic
from sana_ray.launch import tracking
from sana_ray.launch.console import console, say
from sana_ray.manifest import Manifest, dump_manifest, flatten_manifest


@dataclass(frozen=True)
class RunPaths:
    root: Path
    cache: Path

    @classmethod
    def of(cls, manifest: Manifest) -> "RunPaths":
        output = manifest.spec.output
        return cls(root=output.dir / manifest.metadata.name, cache=output.cache_dir or output.dir / "cache")

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.yaml"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def ray_storage(self) -> Path:
        return self.root / "ray"

    @property
    def export(self) -> Path:
        return self.root / "model"


def training_fingerprint(manifest: Manifest) -> str:
    """What decides the trained weights: model, data, training and the number of workers.

    Validation prompts, tracking and output settings can change without restarting training.
    """
    spec = manifest.spec.model_dump(mode="json")
    identity = {
        "model": spec["model"],
        "datasets": spec["datasets"],
        "training": spec["training"],
        "num_workers": spec["hardware"]["num_workers"],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def write_outcome(path: Path, outcome: dict) -> None:
    """run.json (or a sweep's summary.json): the outcome for scripts, secrets masked. It quotes
    manifest values and error text, so it goes through sana_ray.redaction like every writer."""
    write_json_atomic(path, tracking.redact_data(outcome))


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_dataset_folders(manifest: Manifest) -> None:
    """Fail in a second, not after Ray has started, when a dataset folder is not there."""
    from sana_ray.data.samples import DataError

    for dataset in manifest.spec.datasets:
        if dataset.disabled if hasattr(dataset, "disabled") else False:
            continue
        if not dataset.path.is_dir():
            raise DataError(
                f"dataset '{dataset.name}': folder {dataset.path} does not exist. Fix spec.datasets "
                f"entry '{dataset.name}' path (relative paths are relative to the manifest's folder)."
            )
        if dataset.mask_path is not None and not dataset.mask_path.is_dir():
            raise DataError(
                f"dataset '{dataset.name}': mask_path {dataset.mask_path} does not exist. Fix spec.datasets entry "
                f"'{dataset.name}' mask_path (a folder of masks named like the images; relative to the manifest's folder)."
            )


def prepare_model_and_caches(manifest: Manifest, paths: RunPaths):
    """Resolve the model and build (or reuse) the latent and text caches; prints the data table.

    Returns ``(model_source, cache_set)``. Needs Ray started. Used by apply and by sweeps (once per sweep).
    """
    from sana_ray.data.cache import build_caches
    from sana_ray.launch.report import print_data_report
    from sana_ray.model.loading import resolve_pretrained

    spec = manifest.spec
    model_source = resolve_pretrained(spec.model.pretrained, paths.cache)
    say(f"Model: {spec.model.pretrained}" + (f" -> {model_source}" if model_source != spec.model.pretrained else ""))
    cache_set, reports = build_caches(
        spec.datasets,
        model_source=model_source,
        model=spec.model,
        cache_root=paths.cache,
        num_actors=spec.hardware.cache_workers,
        use_gpu=spec.hardware.use_gpu,
        bf16_training=spec.bf16_training(),
        progress=say,
    )
    print_data_report(reports, cache_set, spec, out_dir=paths.root)  # also writes data_report.json/.txt there
    return model_source, cache_set


def resolve_strategy(manifest: Manifest) -> Manifest:
    """``hardware.strategy: auto`` -> the strategy `sana-ray plan` picks (said on the console); a
    declared strategy is returned unchanged. Raises plan.PlanError (naming the field) when nothing fits."""
    from sana_ray.plan import resolve_auto_strategy

    resolved, note = resolve_auto_strategy(manifest)
    if note:
        say(note)
    return resolved


def apply(manifest: Manifest, *, restart: bool = False) -> int:
    """Run (or resume) the training run a manifest describes. Returns the process exit code."""
    started = time.time()
    manifest = resolve_strategy(manifest)
    spec = manifest.spec
    _check_dataset_folders(manifest)
    paths = RunPaths.of(manifest)
    fingerprint = training_fingerprint(manifest)
    previous = read_json(paths.state)
    previous_outcome = read_json(paths.run_json)

    same_spec = previous.get("fingerprint") == fingerprint
    if same_spec and not restart and previous_outcome.get("status") == "completed":
        say(f"[bold green]{manifest.metadata.name}[/] is already complete "
            f"({previous_outcome.get('steps')} steps, final loss {previous_outcome.get('final_loss'):.4f}); "
            f"model at {previous_outcome.get('export_path')}. Use --restart to train again.")
        return 0
    if same_spec and not restart and previous:
        attempt, resume_run_id = previous["attempt"], previous.get("mlflow_run_id")
        say(f"Resuming [bold]{manifest.metadata.name}[/] (attempt {attempt}) from its latest checkpoint, if any")
    else:
        attempt, resume_run_id = previous.get("attempt", 0) + 1, None
        if previous and not same_spec:
            say(f"The training spec of [bold]{manifest.metadata.name}[/] changed since attempt {previous['attempt']}: "
                f"starting attempt {attempt} (earlier checkpoints are kept under {paths.ray_storage})")

    paths.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(paths.manifest, dump_manifest(manifest))

    # Heavy imports only now: `sana-ray validate` and `--help` never pay for them.
    with console.status("Starting Ray"):
        from sana_ray.launch.ray_cluster import ensure_ray

        ensure_ray(spec.hardware.ray_address)

    model_source, cache_set = prepare_model_and_caches(manifest, paths)

    tracking_uri = spec.tracking.mlflow_tracking_uri or tracking.default_tracking_uri(spec.output.dir)
    tags = {"sana_ray.fingerprint": fingerprint, "sana_ray.attempt": str(attempt)} | {
        f"label.{k}": v for k, v in manifest.metadata.labels.items()
    }
    run_id = tracking.open_run(
        tracking_uri,
        experiment=spec.tracking.experiment,
        run_name=manifest.metadata.name,
        tags=tags,
        params=flatten_manifest(manifest),
        resume_run_id=resume_run_id,
    )
    tracking.RunLogger(tracking_uri, run_id).log_artifact(paths.manifest)
    from sana_ray.launch.report import log_data_report

    log_data_report(tracking_uri, run_id, paths.root)  # every image accounted for, in the run
    say(f"MLflow run {run_id} in {tracking.redact_uri(tracking_uri)} (experiment {spec.tracking.experiment})")
    write_json_atomic(paths.state, {"fingerprint": fingerprint, "attempt": attempt, "mlflow_run_id": run_id})

    outcome = {
        "name": manifest.metadata.name,
        "status": "running",
        "attempt": attempt,
        "fingerprint": fingerprint,
        "steps": 0,
        "target_steps": spec.training.steps,
        "final_loss": None,
        "export_path": None,
        "checkpoint_path": None,
        "mlflow_tracking_uri": tracking.redact_uri(tracking_uri),
        "mlflow_experiment": spec.tracking.experiment,
        "mlflow_run_id": run_id,
        "started_at": now_iso(),
    }
    write_outcome(paths.run_json, outcome)

    from sana_ray.launch.trainer import fit

    status = "failed"
    try:
        result = fit(
            manifest,
            model_source=model_source,
            cache_set=cache_set,
            paths=paths,
            attempt=attempt,
            fingerprint=fingerprint,
            tracking_uri=tracking_uri,
            run_id=run_id,
        )
        status = "completed"
        outcome |= {
            "steps": int(result.metrics.get("step", 0)),
            "final_loss": float(result.metrics["loss"]),
            "final_eval_loss": float(result.metrics["eval_loss"]) if "eval_loss" in result.metrics else None,
            "export_path": str(paths.export),
            "checkpoint_path": result.checkpoint.path if result.checkpoint else None,
        }
    except KeyboardInterrupt:
        status = "interrupted"
        say("[yellow]Interrupted.[/] Apply the same manifest again to resume from the latest checkpoint.")
    except Exception as error:  # the workers' tracebacks were already streamed by Ray
        outcome["error"] = tracking.redact_text(f"{type(error).__name__}: {error}")[:4000]
        say(f"[bold red]Training failed:[/] {outcome['error'].splitlines()[0]}")
        say("Fix the cause and apply the same manifest again: it resumes from the latest checkpoint.")
    finally:
        outcome |= {"status": status, "finished_at": now_iso(), "duration_s": round(time.time() - started, 1)}
        write_outcome(paths.run_json, outcome)
        tracking.finish_run(
            tracking_uri, run_id, {"completed": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
        )

    if status != "completed":
        return 1 if status == "failed" else 130
    say(f"[bold green]Done[/] in {outcome['duration_s']:.0f} s: {outcome['steps']} steps, final loss "
        f"{outcome['final_loss']:.4f}\n  model:  {paths.export}\n  run:    {paths.run_json}\n"
        f"  MLflow: sana-ray ui {paths.manifest}")
    return 0
