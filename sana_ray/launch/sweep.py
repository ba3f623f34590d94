"""`sana-ray apply` of a ``kind: Sweep`` manifest: a Ray Tune search over training runs.

Ray >= 2.60 (Train v2) pattern: each Tune trial is a small function (0.01 CPU) that builds the
trial's manifest (the template with the trial's values), then builds and fits a ``TorchTrainer``
with ``TuneReportCallback``: every ``ray.train.report({"step", "loss", "eval_loss", ...}, checkpoint)``
of the train loop (at ``training.checkpoint_every``) reaches Tune, whose scheduler (ASHA, ...) may
stop the trial there. The default metric is ``eval_loss``, the stable evaluation loss on the
template's ``dataset_type: eval`` datasets (``train.evaluation``), when there are any.

Layout of a sweep (``<output.dir>/<metadata.name>/``)::

    sweep.yaml        the resolved Sweep manifest
    state.json        fingerprint, attempt and the MLflow parent run id (what resume needs)
    summary.json      the outcome: every trial (values, status, steps, metric) and the best one
    grid.png          validation prompts (rows) x trials (columns)
    cache/ ...        (unless output.cache_dir) the caches, built once for all trials
    tune/attempt-N/   Ray Tune's experiment folder (what `Tuner.restore` resumes)
    attempt-N/trials/<trial id>/   one run folder per trial, laid out like `apply`'s
                      (manifest.yaml, state.json, run.json, ray/, model/, validation/)

MLflow: one parent run per sweep and one child run per trial (tag ``mlflow.parentRunId``), all
through ``MlflowClient`` with explicit run ids. When the store is a local SQLite file and more
than one trial runs at once, the trials log through an ``mlflow server`` that the sweep starts on
127.0.0.1 for its duration (SQLite has one writer at a time; see docs/sweeps.md).

Resume: apply the same manifest again. Completed trials are not re-run (``Tuner.restore``);
unfinished ones restart and their TorchTrainer resumes from its latest checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from pathlib import Path
from typing import Any

from sana_ray.launch import tracking
from sana_ray.launch.apply import (
    RunPaths,
    _check_dataset_folders,
    now_iso,
    prepare_model_and_caches,
    read_json,
    resolve_strategy,
    training_fingerprint,
    write_json_atomic,
    write_outcome,
    write_text_atomic,
)
from sana_ray.launch.console import say
from sana_ray.manifest import Manifest, Sweep, dump_manifest, flatten_manifest
from sana_ray.manifest.sweep import EVAL_METRIC, trial_manifest_data

TRIAL_CPU = 0.01  # the trial function only waits on its TorchTrainer; Tune rejects 0
STATUS_TAG = "sana_ray.status"


class SweepPaths:
    def __init__(self, sweep: Sweep):
        template = sweep.spec.template
        self.root = template.output.dir / sweep.metadata.name
        self.cache = template.output.cache_dir or template.output.dir / "cache"
        self.manifest = self.root / "sweep.yaml"
        self.state = self.root / "state.json"
        self.summary = self.root / "summary.json"
        self.grid = self.root / "grid.png"
        self.tune = self.root / "tune"

    def trials(self, attempt: int) -> Path:
        return self.root / f"attempt-{attempt}" / "trials"


def sweep_fingerprint(sweep: Sweep) -> str:
    """What decides the trials: the template's training identity and the whole search spec, and,
    when trials are compared on the eval loss, how it is measured (finished trials scored with
    other eval settings would not be comparable with new ones)."""
    identity = {
        "template": training_fingerprint(sweep.template_manifest()),
        "search": sweep.spec.search.model_dump(mode="json"),
    }
    if compares_eval_loss(sweep):
        identity["evaluation"] = sweep.spec.template.evaluation.model_dump(mode="json")
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def compares_eval_loss(sweep: Sweep) -> bool:
    metric = sweep.spec.search.metric or ""
    return metric == EVAL_METRIC or metric.startswith(EVAL_METRIC + "/")


def metric_note(sweep: Sweep) -> str | None:
    """What to tell the user about the metric when it is the noisy training loss for lack of eval data."""
    template = sweep.spec.template
    if sweep.spec.search.metric != "loss" or template.evaluation_datasets():
        return None
    return ("Trials are compared on 'loss', the training loss of each checkpoint step (a different batch, noise "
            "and timesteps every step: noisy). Add a held-out dataset with dataset_type: eval to the template to "
            "compare them on the stable 'eval_loss' (the default metric then).")


def trial_name(trial_id: str) -> str:
    return re.sub(r"[^a-z0-9._-]", "-", trial_id.lower()).strip("-._") or "trial"


def value_label(path: str, value: Any) -> str:
    name = path.rsplit(".", 1)[-1]
    if isinstance(value, float):
        text = f"{value:.0e}" if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4) else f"{value:g}"
    else:
        text = str(value)
    return f"{name}={text}"


# --------------------------------------------------------------------------------------
# Ray Tune pieces (imported lazily: `sana-ray validate` never pays for Ray)
# --------------------------------------------------------------------------------------


def param_space(sweep: Sweep) -> dict:
    from ray import tune

    search = sweep.spec.search
    space = {}
    for path, domain in search.space.items():
        kind, value = domain.kind, getattr(domain, domain.kind)
        if search.algorithm == "grid" or kind == "grid_search":
            space[path] = tune.grid_search(list(value))
        elif kind == "loguniform":
            space[path] = tune.loguniform(*value)
        elif kind == "uniform":
            space[path] = tune.uniform(*value)
        elif kind == "randint":
            space[path] = tune.randint(*value)
        else:
            space[path] = tune.choice(list(value))
    return space


def make_scheduler(sweep: Sweep):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule

    scheduler = sweep.spec.search.scheduler
    training = sweep.spec.template.training
    grace = scheduler.grace_period or training.checkpoint_every
    max_t = scheduler.max_t or training.steps
    final = {"final_step": training.steps}
    # time is the training step the loop reports with every checkpoint, so grace_period is in steps
    if scheduler.name == "asha":
        return _finishing(ASHAScheduler)(time_attr="step", max_t=max_t, grace_period=min(grace, max_t),
                                         reduction_factor=scheduler.reduction_factor, **final)
    if scheduler.name == "hyperband":
        return _finishing(HyperBandScheduler)(time_attr="step", max_t=max_t, reduction_factor=scheduler.reduction_factor, **final)
    if scheduler.name == "median":
        return _finishing(MedianStoppingRule)(time_attr="step", grace_period=grace, min_samples_required=2, **final)
    return FIFOScheduler()


_FINISHING: dict[type, type] = {}


def _finishing(base: type) -> type:
    """``base`` that never stops a trial at its final report (step == training.steps).

    The train loop reports its last checkpoint *before* rank 0 exports the model and renders the
    validation images; ASHA stops any trial that reaches max_t, and a stop ends the trial's actors
    at once, so without this a trial that trained to the end would lose its export.
    """
    if base not in _FINISHING:
        from ray.tune.schedulers import TrialScheduler

        def __init__(self, *args, final_step: int, **kwargs):
            base.__init__(self, *args, **kwargs)
            self._sana_final_step = final_step

        def on_trial_result(self, tune_controller, trial, result):
            action = base.on_trial_result(self, tune_controller, trial, result)
            if action == TrialScheduler.STOP and result.get("step", 0) >= self._sana_final_step:
                return TrialScheduler.CONTINUE
            return action

        _FINISHING[base] = type(f"Finishing{base.__name__}", (base,), {"__init__": __init__, "on_trial_result": on_trial_result})
    return _FINISHING[base]


def make_search_alg(sweep: Sweep, max_concurrent: int = 0):
    """The searcher. BasicVariantGenerator takes the concurrency limit itself (Tune ignores
    ``max_concurrent_trials`` when given a generator instance); Tune wraps Optuna in a ConcurrencyLimiter."""
    search = sweep.spec.search
    if search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=search.seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=search.seed, max_concurrent=max_concurrent)


def concurrent_trials(sweep: Sweep) -> int:
    """max_concurrent_trials, or as many trials as the cluster fits at once (each trial: its workers
    plus its 0.01-CPU trial function), so trial functions never wait for workers that cannot start."""
    search, hardware = sweep.spec.search, sweep.spec.template.hardware
    if search.max_concurrent_trials:
        return search.max_concurrent_trials
    import ray

    total = ray.cluster_resources()
    fits = [math.floor(total.get("CPU", 0) / (hardware.num_workers * hardware.cpus_per_worker + TRIAL_CPU))]
    if hardware.use_gpu:
        fits.append(math.floor(total.get("GPU", 0) / hardware.num_workers))
    return max(1, min(fits))


def run_trial(config: dict, ctx: dict) -> None:
    """One trial, inside a Tune trial actor: the template with ``config`` set, trained by a TorchTrainer."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from sana_ray.launch.trainer import fit

    trial_id = ray.tune.get_context().get_trial_id()
    data = trial_manifest_data(ctx["template"], config)
    data["metadata"]["name"] = trial_name(trial_id)
    data["spec"]["output"] |= {"dir": ctx["trials_dir"], "cache_dir": ctx["cache_dir"]}
    manifest = resolve_strategy(Manifest.model_validate(data))  # strategy auto: per trial (batch size may be searched)
    paths = RunPaths.of(manifest)
    fingerprint = training_fingerprint(manifest)
    previous = read_json(paths.state)
    uri = ctx["tracking_uri"]

    tags = {
        "mlflow.parentRunId": ctx["parent_run_id"],
        "sana_ray.kind": "trial",
        "sana_ray.sweep": ctx["sweep_name"],
        "sana_ray.trial_id": trial_id,
        "sana_ray.trial_label": " ".join(value_label(p, v) for p, v in config.items()),
        STATUS_TAG: "running",
    }
    params = {path: json.dumps(value) if not isinstance(value, str) else value for path, value in config.items()}
    run_id = tracking.open_run(uri, experiment=ctx["experiment"], run_name=f"{ctx['sweep_name']}-{trial_name(trial_id)}",
                               tags=tags, params=params | flatten_manifest(manifest),
                               resume_run_id=previous.get("mlflow_run_id"))
    paths.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(paths.manifest, dump_manifest(manifest))
    write_json_atomic(paths.state, {"fingerprint": fingerprint, "attempt": 1, "mlflow_run_id": run_id,
                                    "trial_id": trial_id, "values": config})
    outcome = {"name": manifest.metadata.name, "trial_id": trial_id, "values": config, "status": "running",
               "mlflow_run_id": run_id, "started_at": now_iso()}
    write_outcome(paths.run_json, outcome)
    try:
        result = fit(manifest, model_source=ctx["model_source"], cache_set=ctx["cache_set"], paths=paths, attempt=1,
                     fingerprint=fingerprint, tracking_uri=uri, run_id=run_id, callbacks=[TuneReportCallback()])
    except Exception as error:
        outcome |= {"status": "failed", "error": tracking.redact_text(f"{type(error).__name__}: {error}")[:4000]}
        write_outcome(paths.run_json, outcome | {"finished_at": now_iso()})
        client = tracking.client(uri)
        client.set_tag(run_id, STATUS_TAG, "failed")
        client.set_terminated(run_id, status="FAILED")
        raise
    outcome |= {"status": "completed", "steps": int(result.metrics.get("step", 0)),
                "final_loss": float(result.metrics["loss"]), "export_path": str(paths.export),
                "finished_at": now_iso()}
    write_outcome(paths.run_json, outcome)
    tracking.client(uri).set_tag(run_id, STATUS_TAG, "completed")
    tracking.finish_run(uri, run_id, "FINISHED")


# --------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------


def apply_sweep(sweep: Sweep, *, restart: bool = False) -> int:
    """Run (or resume) the sweep a manifest describes. Returns the process exit code."""
    started = time.time()
    name = sweep.metadata.name
    search = sweep.spec.search
    template = sweep.template_manifest()
    resolve_strategy(template)  # strategy auto that fits nothing: say so before any trial starts
    _check_dataset_folders(template)
    paths = SweepPaths(sweep)
    fingerprint = sweep_fingerprint(sweep)
    previous = read_json(paths.state)
    summary = read_json(paths.summary)
    same = previous.get("fingerprint") == fingerprint and not restart
    if same and summary.get("status") == "completed":
        best = summary.get("best") or {}
        say(f"[bold green]{name}[/] is already complete ({len(summary.get('trials', []))} trials; best "
            f"{best.get('trial_id')} {search.metric}={best.get('metric')}). Use --restart to sweep again.")
        return 0
    attempt = previous["attempt"] if same and previous else previous.get("attempt", 0) + 1
    if previous and not same:
        say(f"The sweep spec of [bold]{name}[/] changed since attempt {previous['attempt']}"
            f"{' (--restart)' if restart else ''}: starting attempt {attempt} (earlier trials are kept)")
    tune_path = paths.tune / f"attempt-{attempt}"

    paths.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(paths.manifest, dump_manifest(sweep))

    from sana_ray.launch.ray_cluster import ensure_ray

    ensure_ray(sweep.spec.template.hardware.ray_address)
    # The searched values are under training.* only, so one set of caches serves every trial.
    model_source, cache_set = prepare_model_and_caches(template, RunPaths(root=paths.root, cache=paths.cache))

    uri = sweep.spec.template.tracking.mlflow_tracking_uri or tracking.default_tracking_uri(sweep.spec.template.output.dir)
    experiment = sweep.spec.template.tracking.experiment
    parent_tags = {"sana_ray.kind": "sweep", "sana_ray.fingerprint": fingerprint, "sana_ray.attempt": str(attempt),
                   "sana_ray.metric": search.metric, "sana_ray.mode": search.mode,
                   "sana_ray.search_paths": json.dumps(list(search.space)), STATUS_TAG: "running"}
    parent_tags |= {f"label.{k}": v for k, v in sweep.metadata.labels.items()}
    parent_id = tracking.open_run(uri, experiment=experiment, run_name=name, tags=parent_tags,
                                  params=flatten_manifest(sweep), resume_run_id=previous.get("mlflow_run_id") if same else None)
    tracking.RunLogger(uri, parent_id).log_artifact(paths.manifest)
    write_json_atomic(paths.state, {"fingerprint": fingerprint, "attempt": attempt, "mlflow_run_id": parent_id})

    concurrency = concurrent_trials(sweep)
    server = None
    trial_uri = uri
    if concurrency > 1 and uri.startswith(tracking.SQLITE_PREFIX):
        server = tracking.LocalServer(uri)
        server.start()
        trial_uri = server.uri
        say(f"Trials log through an MLflow server on {server.uri} (SQLite takes one writer at a time)")
    say(f"Sweep [bold]{name}[/] (attempt {attempt}): {search.algorithm} search over {', '.join(search.space)}, "
        f"{search.scheduler.name} scheduler, {concurrency} trial(s) at a time, metric {search.metric} ({search.mode}); "
        f"MLflow parent run {parent_id}")
    note = metric_note(sweep)
    if note:
        say(f"[yellow]Note:[/] {note}")

    ctx = {
        "template": template.model_dump(mode="json"),
        "trials_dir": str(paths.trials(attempt)),
        "cache_dir": str(paths.cache),
        "model_source": model_source,
        "cache_set": cache_set,
        "tracking_uri": trial_uri,
        "experiment": experiment,
        "parent_run_id": parent_id,
        "sweep_name": name,
    }
    status, error_text, results = "failed", None, None
    try:
        results = _run_tuner(sweep, ctx, tune_path, concurrency)
        status = "completed"
    except KeyboardInterrupt:
        status = "interrupted"
        say("[yellow]Interrupted.[/] Apply the same manifest again to resume the sweep.")
    except Exception as error:
        error_text = tracking.redact_text(f"{type(error).__name__}: {error}")[:4000]
        say(f"[bold red]Sweep failed:[/] {error_text.splitlines()[0]}")
    finally:
        if server is not None:
            server.stop()

    outcome = _summarize(sweep, results, paths, attempt, uri, parent_id) if results is not None else {"trials": []}
    outcome |= {"name": name, "kind": "Sweep", "status": status, "attempt": attempt, "fingerprint": fingerprint,
                "metric": search.metric, "mode": search.mode, "mlflow_tracking_uri": tracking.redact_uri(uri),
                "mlflow_experiment": experiment, "mlflow_run_id": parent_id,
                "finished_at": now_iso(), "duration_s": round(time.time() - started, 1)}
    if error_text:
        outcome["error"] = error_text
    write_outcome(paths.summary, outcome)
    client = tracking.client(uri)
    client.set_tag(parent_id, STATUS_TAG, status)
    tracking.RunLogger(uri, parent_id).log_artifact(paths.summary)
    tracking.finish_run(uri, parent_id, {"completed": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"))
    if status != "completed":
        return 1 if status == "failed" else 130
    _print_table(outcome)
    best = outcome.get("best")
    say(f"[bold green]Done[/] in {outcome['duration_s']:.0f} s: {len(outcome['trials'])} trials"
        + (f"; best {best['trial_id']} ({best['label']}) {search.metric}={best['metric']:.4f}\n  model:   {best['export_path']}"
           if best else "; no trial completed")
        + f"\n  summary: {paths.summary}\n  grid:    {paths.grid}\n  compare: sana-ray runs {name}")
    return 0


# Tune saves its experiment state (which trials have finished: what a resume skips) at most every
# TUNE_GLOBAL_CHECKPOINT_S seconds, 10 s by default in Ray 2.60 ("auto"): a sweep killed within 10 s
# of a trial finishing ran that whole trial again on resume. One second makes the window that small
# for the cost of a small JSON write per second (the state of a few trials).
EXPERIMENT_STATE_PERIOD_S = "1"


def _run_tuner(sweep: Sweep, ctx: dict, tune_path: Path, concurrency: int):
    import os

    from ray import tune

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", EXPERIMENT_STATE_PERIOD_S)  # read by Tune's controller
    search = sweep.spec.search
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"cpu": TRIAL_CPU})
    if tune.Tuner.can_restore(str(tune_path)):
        say(f"Resuming the sweep from {tune_path} (finished trials are not run again)")
        tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep),
            tune_config=tune.TuneConfig(
                metric=search.metric,
                mode=search.mode,
                num_samples=search.num_samples,
                scheduler=make_scheduler(sweep),
                search_alg=make_search_alg(sweep, concurrency),
                max_concurrent_trials=concurrency if search.algorithm == "optuna" else None,
            ),
            run_config=tune.RunConfig(name=tune_path.name, storage_path=str(tune_path.parent), verbose=1,
                                      callbacks=[_orphan_reaper()]),
        )
    return tuner.fit()


def remove_orphan_placement_groups() -> list[str]:
    """Remove placement groups whose actors are all dead: a stopped trial's Train worker group.

    When a scheduler stops a trial, Tune ends the trial actor and its placement group (which holds
    the TorchTrainer's controller), and the workers die with their owner; their own placement group
    is left to Train's detached PlacementGroupCleaner, which on this 2-core machine did not always
    remove it (FIELD-NOTES): the next trial's workers then waited forever for the CPUs. A group
    that held actors, all dead now, is not used by anyone.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray.util.state import list_actors

    live, dead = set(), set()
    # An explicit address: with several Ray instances on the machine, the state API refuses to guess
    # (which is also what can break Train's own cleaner).
    address = ray.get_runtime_context().gcs_address
    for actor in list_actors(address=address, detail=True, limit=10_000, raise_on_missing_output=False):
        pg = actor.placement_group_id
        if pg:
            (dead if actor.state == "DEAD" else live).add(pg)
    removed = []
    for pg_id, info in ray.util.placement_group_table().items():
        if info.get("state") == "CREATED" and pg_id in dead and pg_id not in live:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
            removed.append(pg_id)
    return removed


def _orphan_reaper(every_s: float = 3.0):
    """A Tune callback that runs :func:`remove_orphan_placement_groups` every few seconds while trials run."""
    from ray.tune import Callback

    class OrphanPlacementGroupReaper(Callback):
        def __init__(self):
            self._last = 0.0
            self._pending = False

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._pending = True  # a stopped trial's workers die shortly after: look for a while

        def on_step(self, iteration, trials, **info):
            if not self._pending or time.time() - self._last < every_s:
                return
            self._last = time.time()
            try:
                removed = remove_orphan_placement_groups()
            except Exception:  # the state API can time out on a busy machine: try again later
                return
            for pg_id in removed:
                say(f"Removed the placement group {pg_id[:12]}... of a stopped trial's workers")

    return OrphanPlacementGroupReaper()


_TRIAL_ID = re.compile(r"_([0-9a-f]{5}_\d{5})")


def _result_trial_id(result) -> str | None:
    if result.metrics and result.metrics.get("trial_id"):
        return result.metrics["trial_id"]
    match = _TRIAL_ID.search(Path(result.path).name) if result.path else None
    return match.group(1) if match else None


def _summarize(sweep: Sweep, results, paths: SweepPaths, attempt: int, uri: str, parent_id: str) -> dict:
    """Trial outcomes (from Tune's results and each trial's run folder), status tags, best trial, grid."""
    from sana_ray.launch.grid import Column, make_grid

    search, template = sweep.spec.search, sweep.spec.template
    sign = 1 if search.mode == "min" else -1
    client = tracking.client(uri)
    trials = []
    for result in results:
        trial_id = _result_trial_id(result)
        if trial_id is None:
            continue
        root = paths.trials(attempt) / trial_name(trial_id)
        run = read_json(root / "run.json")
        steps = int(result.metrics.get("step", 0)) if result.metrics else 0
        metric = result.metrics.get(search.metric) if result.metrics else None
        # Tune's view decides: a stopped trial's fit() may raise (its controller's placement group
        # is removed under it) before its actor is ended, so its own run.json can say "failed".
        if result.error is not None:
            status = "failed"
        elif run.get("status") == "completed":
            status = "completed"
        else:
            status = "early-stopped"
            if run:
                write_outcome(root / "run.json", {k: v for k, v in run.items() if k != "error"}
                              | {"status": status, "steps": steps})
        values = dict(result.config or run.get("values") or {})
        trial = {
            "trial_id": trial_id,
            "values": values,
            "label": " ".join(value_label(p, v) for p, v in values.items()),
            "status": status,
            "steps": steps,
            "metric": float(metric) if metric is not None else None,
            "run_dir": str(root),
            "mlflow_run_id": run.get("mlflow_run_id"),
            "export_path": run.get("export_path") if status == "completed" else None,
        }
        trials.append(trial)
        if trial["mlflow_run_id"]:
            client.set_tag(trial["mlflow_run_id"], STATUS_TAG, status)
            client.set_tag(trial["mlflow_run_id"], "sana_ray.steps", str(steps))
            if trial["metric"] is not None:
                client.set_tag(trial["mlflow_run_id"], "sana_ray.metric_value", repr(trial["metric"]))
            if status != "completed":  # an early-stopped trial's actor was ended before it could close its run
                client.set_terminated(trial["mlflow_run_id"], status="FINISHED" if status == "early-stopped" else "FAILED")
    trials.sort(key=lambda t: t["trial_id"])

    # The best trial: among those that finished training (their export exists), else any.
    ranked = [t for t in trials if t["metric"] is not None and math.isfinite(t["metric"])]
    finished = [t for t in ranked if t["status"] == "completed"] or ranked
    best = min(finished, key=lambda t: sign * t["metric"]) if finished else None
    if best is not None:
        client.set_tag(parent_id, "sana_ray.best_trial", best["trial_id"])
        client.set_tag(parent_id, "sana_ray.best_run_id", best["mlflow_run_id"] or "")
        client.log_metric(parent_id, f"best_{search.metric}", best["metric"])
        if best["mlflow_run_id"]:
            client.set_tag(best["mlflow_run_id"], "sana_ray.best", "true")

    grid_path = None
    prompts = template.validation.prompts
    if prompts and trials:
        resolution = template.validation.resolution or template.datasets[0].resolution
        columns = []
        for trial in trials:
            images = _final_images(Path(trial["run_dir"]), len(prompts)) if trial["status"] == "completed" else None
            note = {"early-stopped": f"stopped at {trial['steps']}", "failed": "failed"}.get(trial["status"], "no image")
            columns.append(Column([value_label(p, v) for p, v in trial["values"].items()], images, note))
        grid_path = make_grid(columns, len(prompts), int(resolution), paths.grid)
        tracking.RunLogger(uri, parent_id).log_artifact(grid_path)
    return {"trials": trials, "best": best, "grid_path": str(grid_path) if grid_path else None}


def _final_images(run_dir: Path, prompts: int) -> list[Path] | None:
    steps = sorted((run_dir / "validation").glob("step-*"))
    if not steps:
        return None
    images = sorted(steps[-1].glob("*.png"))
    return images if len(images) >= prompts else None


def _print_table(outcome: dict) -> None:
    from sana_ray.launch.runs import print_table

    rows = [[t["trial_id"], *(json.dumps(v) for v in t["values"].values()), _fmt(t["metric"]), str(t["steps"]),
             t["status"] + (" *" if outcome.get("best") and t["trial_id"] == outcome["best"]["trial_id"] else "")]
            for t in outcome["trials"]]
    paths = list(outcome["trials"][0]["values"]) if outcome["trials"] else []
    print_table(["trial", *paths, outcome["metric"], "steps", "status"], rows)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
