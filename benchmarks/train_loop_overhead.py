"""Ray Train loop vs a bare PyTorch loop, and the time from `apply` to the first training step.

    .venv/bin/python benchmarks/train_loop_overhead.py [--steps 60]

Both loops train the tiny random Sana transformer on the same cached latents and embeddings with
the same global batch (2 Ray workers x 4 = 8 samples per step vs one process with batch 8 and
all cores), in one run on one machine, so the ratio is meaningful even where absolute figures
are not. Step times under Ray come from the per-step ``step_time_s`` metric (MLflow), which
excludes start-up; start-up is reported separately as time to first step.

Run by hand; figures go to docs/benchmarks.md. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import yaml


def manifest_for(root: Path, data: Path, steps: int) -> Path:
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump({
        "apiVersion": "sana-ray/v1",
        "kind": "TrainingRun",
        "metadata": {"name": "bench"},
        "spec": {
            "model": {"pretrained": "tiny"},
            "datasets": [{"name": "shapes", "path": str(data), "resolution": 64}],
            "training": {"steps": steps, "batch_size": 4, "checkpoint_every": steps, "optimizer": {"lr": 1e-3}},
            "hardware": {"num_workers": 2},
            "output": {"dir": str(root / "runs")},
        },
    }))
    return path


def bare_loop(model_source: str, cache_set, steps: int, batch_size: int) -> list[float]:
    import torch

    from sana_ray.data.cache import open_reader
    from sana_ray.model.flow import flow_matching_loss, sample_u, shift_sigmas
    from sana_ray.model.loading import load_transformer

    torch.set_num_threads(2)
    data = open_reader(cache_set)
    plan = cache_set.batch_plan(batch_size, 1, 42)
    model = load_transformer(model_source).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps):
        started = time.perf_counter()
        batch = data.batch(plan.batch(step, 0))
        latents = batch["latents"]
        sigmas = shift_sigmas(sample_u(latents.shape[0], scheme="logit_normal", generator=generator, device="cpu"), 3.0)
        noise = torch.randn(latents.shape, generator=generator)
        loss = flow_matching_loss(model, latents, batch["prompt_embeds"], batch["prompt_attention_mask"], sigmas=sigmas, noise=noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from sana_ray.data.synthetic import make_shapes
    from sana_ray.launch.apply import RunPaths, apply
    from sana_ray.manifest import load_manifest

    with tempfile.TemporaryDirectory(prefix="sana-ray-bench-") as tmp:
        root = Path(tmp)
        make_shapes(root / "shapes", count=48, size=64, seed=0)
        manifest = load_manifest(manifest_for(root, root / "shapes", args.steps))

        # A first apply: cold caches (tiny model written, Ray Data build), Ray start-up included.
        started = time.time()
        assert apply(manifest) == 0
        wall = time.time() - started
        outcome = __import__("json").loads(RunPaths.of(manifest).run_json.read_text())
        client = MlflowClient(outcome["mlflow_tracking_uri"])
        history = sorted(client.get_metric_history(outcome["mlflow_run_id"], "step_time_s"), key=lambda m: m.step)
        first_step_at = history[0].timestamp / 1000
        ray_times = [m.value for m in history[5:]]

        from sana_ray.data.cache import build_caches
        from sana_ray.model.loading import resolve_pretrained

        paths = RunPaths.of(manifest)
        source = resolve_pretrained("tiny", paths.cache)
        cache_set, _ = build_caches(manifest.spec.datasets, model_source=source, model=manifest.spec.model,
                                    cache_root=paths.cache, progress=None)
        bare_times = bare_loop(source, cache_set, args.steps, batch_size=8)[5:]

    ray_step, bare_step = statistics.median(ray_times), statistics.median(bare_times)
    print(f"apply wall time (cold caches, {args.steps} steps, export + validation): {wall:.1f} s")
    print(f"time from apply to first training step (cold caches): {first_step_at - started:.1f} s")
    print(f"median step, Ray Train 2 workers x batch 4 (DDP, gloo): {ray_step * 1000:.1f} ms  ({1 / ray_step:.2f} steps/s)")
    print(f"median step, bare PyTorch 1 process x batch 8:          {bare_step * 1000:.1f} ms  ({1 / bare_step:.2f} steps/s)")
    print(f"ratio Ray/bare steps/s: {bare_step / ray_step:.2f}")


if __name__ == "__main__":
    main()
