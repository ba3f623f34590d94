"""`sana-ray runs [NAME]`: what MLflow holds, as a table (MLflow only: no torch, no Ray).

Without NAME: the top-level runs (training runs and sweeps), newest first. With NAME: the sweep of
that name, one row per trial (values, metric, steps, status; * marks the best), or a plain run.
"""

from __future__ import annotations

import json


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)] if rows else [len(h) for h in header]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def _all_runs(client, filter_string: str) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    return list(client.search_runs(experiments, filter_string=filter_string, order_by=["attributes.start_time DESC"],
                                   max_results=1000))


def _metric(run, key: str) -> str:
    value = run.data.tags.get("sana_ray.metric_value")
    if value is None:
        value = run.data.metrics.get(key)
    return "-" if value is None else f"{float(value):.4f}"


def show(tracking_uri: str, name: str | None) -> int:
    from sana_ray.launch.tracking import client as mlflow_client

    client = mlflow_client(tracking_uri)
    if name is None:
        runs = [r for r in _all_runs(client, "") if "mlflow.parentRunId" not in r.data.tags]
        if not runs:
            print("no runs in this store")
            return 0
        rows = []
        for run in runs:
            tags = run.data.tags
            kind = tags.get("sana_ray.kind", "run")
            status = tags.get("sana_ray.status", run.info.status.lower())
            rows.append([run.info.run_name, kind, status, _metric(run, tags.get("sana_ray.metric", "loss")),
                         tags.get("sana_ray.best_trial", "-"), run.info.run_id])
        print_table(["name", "kind", "status", "loss/best", "best trial", "run id"], rows)
        return 0

    matches = _all_runs(client, f"attributes.run_name = '{name}'")
    matches = [r for r in matches if "mlflow.parentRunId" not in r.data.tags]
    if not matches:
        print(f"no run named {name!r} in this store")
        return 1
    parent = matches[0]  # the newest
    tags = parent.data.tags
    if tags.get("sana_ray.kind") != "sweep":
        print_table(["name", "status", "loss", "run id"],
                    [[parent.info.run_name, parent.info.status.lower(), _metric(parent, "loss"), parent.info.run_id]])
        return 0
    metric = tags.get("sana_ray.metric", "loss")
    paths = json.loads(tags.get("sana_ray.search_paths", "[]"))
    children = _all_runs(client, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    children.sort(key=lambda r: r.data.tags.get("sana_ray.trial_id", ""))
    best = tags.get("sana_ray.best_trial")
    rows = []
    for child in children:
        ct = child.data.tags
        trial = ct.get("sana_ray.trial_id", child.info.run_name)
        steps = ct.get("sana_ray.steps")
        if steps is None:
            history = client.get_metric_history(child.info.run_id, "loss")
            steps = str(max((m.step for m in history), default=0))
        rows.append([trial, *(child.data.params.get(p, "-") for p in paths), _metric(child, metric), steps,
                     ct.get("sana_ray.status", child.info.status.lower()) + (" *" if trial == best else "")])
    print(f"sweep {name} ({tags.get('sana_ray.status', parent.info.status.lower())}), {metric} "
          f"({tags.get('sana_ray.mode', 'min')}); * = best")
    print_table(["trial", *paths, metric, "steps", "status"], rows)
    return 0
