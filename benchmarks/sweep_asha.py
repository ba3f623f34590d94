"""What ASHA saves: the same sweep run with ASHA and run to completion (FIFO), and each trial's start-up.

    .venv/bin/python benchmarks/sweep_asha.py [--steps 12] [--trials 4]

Both sweeps train the tiny random Sana on generated shapes, one trial at a time (one CPU worker per
trial), over the same grid of learning rates and flow shifts, so ASHA's decisions are deterministic.
Printed per scheduler: training steps summed over trials (the compute spent), time spent in trials
(each child run's start to end), and per trial
the start-up overhead: from the trial's MLflow run start (the Tune trial begins) to the first logged
training step, which covers the TorchTrainer's worker start, model load and cache read.

Run by hand on a quiet machine; figures go to docs/benchmarks.md. Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml

LRS = [3e-3, 1e-7, 1e-3, 1e-5]  # a good and a hopeless one first: ASHA has something to stop
SHIFTS = [1.0, 3.0]


def write_sweep(root: Path, data: Path, *, scheduler: str, steps: int, trials: int) -> Path:
    lrs = LRS[: max(1, trials // len(SHIFTS))]
    doc = {
        "apiVersion": "sana-ray/v1",
        "kind": "Sweep",
        "metadata": {"name": f"bench-{scheduler}"},
        "spec": {
            "template": {
                "model": {"pretrained": "tiny"},
                "datasets": [{"name": "shapes", "path": str(data), "resolution": 64}],
                "training": {"steps": steps, "batch_size": 2, "seed": 7, "checkpoint_every": max(1, steps // 4)},
                "hardware": {"num_workers": 1, "cpus_per_worker": 1},
                "output": {"dir": str(root / "runs"), "cache_dir": str(root / "cache")},
            },
            "search": {
                "space": {"training.optimizer.lr": {"grid_search": lrs}, "training.flow_shift": {"grid_search": SHIFTS}},
                "metric": "loss",
                "mode": "min",
                "scheduler": {"name": scheduler} | ({"grace_period": max(1, steps // 4), "reduction_factor": 2}
                                                    if scheduler == "asha" else {}),
                "max_concurrent_trials": 1,
            },
        },
    }
    path = root / f"sweep-{scheduler}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def trial_seconds(summary: dict, tracking_uri: str) -> tuple[list[float], list[float]]:
    """(start-up, whole trial) seconds per trial, from each child MLflow run's start, first loss and end."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    startups, durations = [], []
    for trial in summary["trials"]:
        if not trial.get("mlflow_run_id"):
            continue
        run = client.get_run(trial["mlflow_run_id"])
        history = client.get_metric_history(trial["mlflow_run_id"], "loss")
        if history:
            startups.append((min(m.timestamp for m in history) - run.info.start_time) / 1e3)
        if run.info.end_time:
            durations.append((run.info.end_time - run.info.start_time) / 1e3)
    return startups, durations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--trials", type=int, default=4)
    args = parser.parse_args()

    import ray

    from sana_ray.data.synthetic import make_shapes
    from sana_ray.launch.sweep import apply_sweep
    from sana_ray.manifest import load_document

    root = Path(tempfile.mkdtemp(prefix="sana-ray-sweep-bench-"))
    make_shapes(root / "shapes", count=8, size=64, seed=3)
    rows = {}
    for scheduler in ("asha", "fifo"):
        sweep = load_document(write_sweep(root, root / "shapes", scheduler=scheduler, steps=args.steps, trials=args.trials))
        started = time.perf_counter()
        assert apply_sweep(sweep) == 0, scheduler
        wall = time.perf_counter() - started
        run_root = root / "runs" / f"bench-{scheduler}"
        summary = json.loads((run_root / "summary.json").read_text())
        steps = [t["steps"] for t in summary["trials"]]
        startups, durations = trial_seconds(summary, summary["mlflow_tracking_uri"])
        rows[scheduler] = {"wall_s": wall, "steps": steps, "total_steps": sum(steps), "startup_s": startups,
                           "trial_s": sum(durations), "statuses": [t["status"] for t in summary["trials"]]}
        print(json.dumps({scheduler: rows[scheduler]}), flush=True)
        ray.shutdown()  # each sweep starts its own local Ray, as `sana-ray apply` would

    asha, fifo = rows["asha"], rows["fifo"]
    print(f"\n{args.trials} trials x {args.steps} steps, one trial at a time, 1 CPU worker each")
    for name, row in rows.items():
        print(f"{name:5}: {row['total_steps']:3d} training steps, {row['trial_s']:6.1f} s in trials "
              f"({row['wall_s']:.1f} s wall, the first sweep also builds the caches), "
              f"start-up per trial median {statistics.median(row['startup_s']):.1f} s "
              f"(min {min(row['startup_s']):.1f}, max {max(row['startup_s']):.1f}); {row['statuses']}")
    print(f"ASHA / run-to-completion: compute (steps) {asha['total_steps'] / fifo['total_steps']:.2f}, "
          f"time in trials {asha['trial_s'] / fifo['trial_s']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
