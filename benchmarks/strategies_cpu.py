"""DDP vs DeepSpeed ZeRO-2 vs ZeRO-3 (and ZeRO-3 with optimizer offload) on CPU: step time and memory.

    .venv/bin/python benchmarks/strategies_cpu.py [--steps 40] [--warmup 5] [--only ddp,zero2,...]

Every strategy trains the tiny random Sana transformer through the real `apply` on the same
cached latents and embeddings (48 generated 64 px shapes), 2 Ray workers x batch 4, fp32, one
local Ray for all runs, so the figures compare strategies on one machine at one time even where
absolute figures are not meaningful.

* ms/step: the per-step ``step_time_s`` metric rank 0 logs to MLflow (forward, backward, the
  strategy's gradient reduction and optimizer step; not checkpoints), median and mean over the
  steps after the first ``--warmup`` (allocator warm-up, DeepSpeed's first-step set-up).
* peak RSS per worker: ``getrusage(RUSAGE_SELF).ru_maxrss`` of each worker process when its train
  function returns (after the final checkpoint and, on rank 0, the export), written by a thin
  wrapper around ``sana_ray.train.loop.train_func``. It includes the process's imports (torch,
  Ray, diffusers, DeepSpeed), which dwarf the tiny model: read the differences between rows.

The tiny model has 54 k parameters (216 KB in fp32), so what ZeRO partitions is a few hundred KB: this
measures each strategy's overhead on CPU/gloo, not the savings it brings to a real model (for
those, `sana-ray plan`). Run by hand; figures go to docs/benchmarks.md. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

STRATEGIES = {
    "ddp": {"strategy": "ddp"},
    "zero2": {"strategy": "deepspeed", "deepspeed": {"stage": 2}},
    "zero3": {"strategy": "deepspeed", "deepspeed": {"stage": 3}},
    "zero3-offload": {"strategy": "deepspeed", "deepspeed": {"stage": 3, "offload_optimizer": True}},
}
RSS_FILE = "rss-rank-{rank}.json"


def manifest_for(root: Path, data: Path, name: str, hardware: dict, steps: int) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "apiVersion": "sana-ray/v1",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": {
            "model": {"pretrained": "tiny"},
            "datasets": [{"name": "shapes", "path": str(data), "resolution": 64}],
            "training": {"steps": steps, "batch_size": 4, "checkpoint_every": steps, "optimizer": {"lr": 1e-3}},
            "hardware": {"num_workers": 2} | hardware,
            "output": {"dir": str(root / "runs")},  # one cache (output/cache) and MLflow store for all
        },
    }))
    return path


def measured_train_func(config: dict) -> None:
    """The real train function, then this process's peak RSS into the run folder (one file per rank)."""
    import resource

    import ray.train

    from sana_ray.train.loop import train_func

    train_func(config)
    rank = ray.train.get_context().get_world_rank()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    (Path(config["run_dir"]) / RSS_FILE.format(rank=rank)).write_text(json.dumps({"rank": rank, "pid": os.getpid(), "peak_rss_kib": peak_kib}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the step-time figures")
    parser.add_argument("--only", default=",".join(STRATEGIES), help=f"comma-separated subset of {', '.join(STRATEGIES)}")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(STRATEGIES))
    if unknown:
        parser.error(f"unknown strategies: {', '.join(unknown)}")

    from mlflow.tracking import MlflowClient

    import sana_ray.train.loop
    from sana_ray.data.synthetic import make_shapes
    from sana_ray.launch.apply import RunPaths, apply
    from sana_ray.manifest import load_manifest

    # trainer.fit imports train_func from the module when it runs: the wrapper goes to the workers.
    sana_ray.train.loop.train_func = measured_train_func

    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="sana-ray-bench-strategies-") as tmp:
        root = Path(tmp)
        make_shapes(root / "shapes", count=48, size=64, seed=0)
        for name in names:
            manifest = load_manifest(manifest_for(root, root / "shapes", name, STRATEGIES[name], args.steps))
            started = time.time()
            assert apply(manifest) == 0, name
            wall = time.time() - started
            paths = RunPaths.of(manifest)
            outcome = json.loads(paths.run_json.read_text())
            client = MlflowClient(outcome["mlflow_tracking_uri"])
            history = sorted(client.get_metric_history(outcome["mlflow_run_id"], "step_time_s"), key=lambda m: m.step)
            times = [m.value * 1000 for m in history[args.warmup:]]
            rss = [json.loads((paths.root / RSS_FILE.format(rank=r)).read_text())["peak_rss_kib"] / 1024 for r in (0, 1)]
            rows.append((name, statistics.median(times), statistics.mean(times), min(times), max(times), rss, outcome["final_loss"], wall))
            print(f"[bench] {name}: median {rows[-1][1]:.1f} ms/step, peak RSS {rss[0]:.0f} / {rss[1]:.0f} MiB", flush=True)
    load_after = os.getloadavg()

    print()
    print(f"tiny Sana, 64 px, 2 workers x batch 4, fp32, {args.steps} steps ({args.warmup} warm-up steps left out)")
    print(f"load average before {load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f} (1/5/15 min) on {os.cpu_count()} CPUs")
    header = f"{'strategy':<15}{'median ms/step':>16}{'mean':>9}{'min':>9}{'max':>9}{'peak RSS rank 0':>17}{'rank 1':>9}{'final loss':>12}{'apply s':>9}"
    print(header)
    print("-" * len(header))
    for name, median, mean, low, high, rss, loss, wall in rows:
        print(f"{name:<15}{median:>16.1f}{mean:>9.1f}{low:>9.1f}{high:>9.1f}{rss[0]:>13.0f} MiB{rss[1]:>5.0f} MiB{loss:>12.4f}{wall:>9.0f}")


if __name__ == "__main__":
    main()
