"""MLflow: one run per training run, written through ``MlflowClient`` with an explicit run id.

The driver creates (or, on resume, reopens) the run and logs params and the resolved manifest;
rank 0 of the Ray Train workers logs per-step metrics and validation images into the same run
by id. An explicit id, not ``mlflow.start_run``'s process-global active run, is what lets a
worker process on another node write into the driver's run.

Credentials never come from the manifest: MLflow reads ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD`` / ``MLFLOW_TRACKING_TOKEN`` from the environment itself, and what
is written here (params, tags) goes through ``sana_ray.redaction`` (the one place that decides
what is a secret), as do ``redact_uri`` / ``redact_text`` for what the launcher prints or logs.
"""

from __future__ import annotations

import time
from pathlib import Path

from sana_ray.redaction import redact_data, redact_text, redact_uri  # noqa: F401 - re-exported: what apply and sweep call

SQLITE_PREFIX = "sqlite:///"


def default_tracking_uri(output_dir: Path) -> str:
    """The store used when the manifest names none: a SQLite file beside the runs."""
    return f"{SQLITE_PREFIX}{(output_dir / 'mlflow.db').resolve()}"


def local_artifact_root(tracking_uri: str) -> str | None:
    """For a SQLite store, artifacts live in a folder beside the database file (not in the CWD)."""
    if tracking_uri.startswith(SQLITE_PREFIX):
        db = Path(tracking_uri[len(SQLITE_PREFIX) :])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith(SQLITE_PREFIX):
        Path(tracking_uri[len(SQLITE_PREFIX) :]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(mlflow_client, name: str, tracking_uri: str) -> str:
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow_client.create_experiment(name, artifact_location=local_artifact_root(tracking_uri))


def open_run(
    tracking_uri: str,
    *,
    experiment: str,
    run_name: str,
    tags: dict[str, str],
    params: dict[str, str],
    resume_run_id: str | None = None,
) -> str:
    """Reopen ``resume_run_id`` if it still exists, else create a run. Returns its id.

    Tag and param values are redacted here, whatever the caller passed."""
    mlflow_client = client(tracking_uri)
    tags, params = redact_data(dict(tags)), redact_data(dict(params))
    if resume_run_id:
        try:
            run = mlflow_client.get_run(resume_run_id)
            if run.info.lifecycle_stage == "active":
                mlflow_client.update_run(resume_run_id, status="RUNNING")
                return resume_run_id
        except Exception:  # deleted store or run: fall through to a new run
            pass
    exp_id = experiment_id(mlflow_client, experiment, tracking_uri)
    run = mlflow_client.create_run(exp_id, run_name=run_name, tags=tags)
    log_params(mlflow_client, run.info.run_id, params)
    return run.info.run_id


def log_params(mlflow_client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        mlflow_client.log_batch(run_id, params=items[start : start + 100])


def finish_run(tracking_uri: str, run_id: str, status: str) -> None:
    """status: FINISHED, FAILED or KILLED."""
    client(tracking_uri).set_terminated(run_id, status=status)


class RunLogger:
    """Metrics and artifacts into one MLflow run; used by rank 0 inside the train loop."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.run_id = run_id
        self._client = client(tracking_uri)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        self._client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client(tracking_uri).get_metric_history(run_id, key)]


def free_loopback_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalServer:
    """An ``mlflow server`` on 127.0.0.1 over a SQLite store, for many concurrent writers.

    SQLite takes one writer at a time: trials writing to the file directly risk "database is
    locked". Through one server process (one worker) every write goes through one connection pool.
    Started in its own process group: stopping it also stops its uvicorn children.
    """

    def __init__(self, sqlite_uri: str, port: int | None = None):
        self.backend = sqlite_uri
        self.port = port or free_loopback_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._process = None

    def __enter__(self) -> "LocalServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout_s: float = 90.0) -> None:
        import subprocess
        import sys
        import urllib.request

        client(self.backend).search_experiments(max_results=1)  # create the schema before the server does
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
                   "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        artifacts = local_artifact_root(self.backend)
        if artifacts:
            command += ["--default-artifact-root", artifacts]
        self._process = subprocess.Popen(command, start_new_session=True,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self._process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server on {self.uri} did not answer within {timeout_s:.0f} s")

    def stop(self) -> None:
        import os
        import signal
        import subprocess

        if self._process is None or self._process.poll() is not None:
            return
        os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
