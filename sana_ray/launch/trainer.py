"""Building and running the Ray Train ``TorchTrainer`` for a manifest (Ray Train v2 API)."""

from __future__ import annotations

from sana_ray.manifest import Manifest


def fit(manifest: Manifest, *, model_source: str, cache_set, paths, attempt: int, fingerprint: str,
        tracking_uri: str, run_id: str, callbacks: list | None = None):
    """Train to completion (resuming from the attempt's latest checkpoint, if any); returns Ray's Result.

    Ray Train v2 restores automatically when a run with the same ``RunConfig(name, storage_path)``
    exists, which is exactly `apply`'s resume semantics: the attempt folder is the run's identity.
    ``callbacks``: Ray Train callbacks (a sweep trial passes Tune's ``TuneReportCallback``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sana_ray.launch.ray_cluster import worker_env, worker_label_selectors
    from sana_ray.train.loop import WorkerConfig, train_func

    hardware = manifest.spec.hardware
    config = WorkerConfig(
        manifest=manifest.model_dump(mode="json"),
        model_source=model_source,
        cache=cache_set,
        run_dir=str(paths.root),
        fingerprint=fingerprint,
        mlflow_tracking_uri=tracking_uri,
        mlflow_run_id=run_id,
    )
    trainer = TorchTrainer(
        train_func,
        train_loop_config=config.to_dict(),
        scaling_config=ScalingConfig(
            num_workers=hardware.num_workers,
            use_gpu=hardware.use_gpu,
            resources_per_worker={"CPU": hardware.cpus_per_worker} | ({"GPU": 1} if hardware.use_gpu else {})
            | dict(hardware.worker_resources),
            # hardware.nodes[*].labels: each worker runs on a node of its pool.
            label_selector=worker_label_selectors(hardware),
        ),
        run_config=RunConfig(
            name=f"attempt-{attempt}",
            storage_path=str(paths.ray_storage),
            checkpoint_config=CheckpointConfig(num_to_keep=manifest.spec.training.keep_checkpoints),
            # A crashed worker (OOM, preempted node) restarts the group from the latest checkpoint.
            failure_config=FailureConfig(max_failures=hardware.max_failures),
            worker_runtime_env={"env_vars": worker_env(hardware) | _passthrough_env()},
            callbacks=callbacks,
        ),
    )
    return trainer.fit()


# Driver variables the workers see too: a stable DeepSpeed op build cache (its CPU ops compile on
# first use, ~30 s) and the tests' fault injection (train.loop.FAULT_ENV, train.loop.HOLD_ENV).
_PASSTHROUGH = ("TORCH_EXTENSIONS_DIR", "SANA_RAY_FAULT_AT_STEP", "SANA_RAY_HOLD_AT_STEP")


def _passthrough_env() -> dict[str, str]:
    import os

    return {name: os.environ[name] for name in _PASSTHROUGH if os.environ.get(name)}
