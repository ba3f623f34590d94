"""How much of a training step waits for data (target: < 2 %), cached or encoded online.

    .venv/bin/python benchmarks/data_wait.py [--steps 30] [--batch-size 4] [--images 48] [--resolution 64]
                                             [--prefetch 2] [--online]

Builds the quickstart's caches (48 generated shapes at 64 px, the tiny random Sana model; the
build uses Ray Data, then Ray is shut down), opens them as a training worker does
(``data.cache.open_reader``), and runs the training loop's per-step work in this one process,
without Ray, so that only the data path and the model remain: per micro-batch exactly what
``train/loop.py`` does -- ``Prefetcher.get(micro_batch)`` (the BatchPlan's samples, read from the
shard files in a background thread ``--prefetch`` batches ahead; 0: in the loop) and
``.to(device)`` -- then noise, timesteps, the rectified-flow loss, backward, clipping and the
AdamW step. "Data wait" is the time spent in those data calls; "step" is the whole optimizer
step. The first ``--warmup`` steps are not counted. One torch thread by default
(``cpus_per_worker: 1``, as in the quickstart). ``--online``: the dataset is
``cache_latents: false``, so each batch's images are decoded and VAE-encoded (the tiny VAE) by
the prefetcher: run it with ``--prefetch 0`` and ``--prefetch 2`` to see how much of that the
overlap hides.

It also times what the cache checksums cost: the second ``build_caches`` call (discovery plus
size and sha256 of every shard, no Ray) and sha256 of one ``--hash-mb`` MB shard file (from a
warm page cache: hashing speed alone; a cold read from disk costs the disk's read time too).

Run by hand (not a test); the load average is printed because other processes skew the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def time_checksum(folder: Path, megabytes: int) -> float:
    """Seconds to sha256 a ``megabytes`` MB safetensors file (warm page cache), as a build's check does."""
    import torch
    from safetensors.torch import save_file

    from sana_ray.data.cache.store import file_sha256 as _file_sha256

    path = folder / "hash-bench.safetensors"
    save_file({"x": torch.randn(megabytes * (1 << 20) // 4)}, str(path))
    _file_sha256(path)  # page cache warm
    started = time.perf_counter()
    _file_sha256(path)
    hashed = time.perf_counter() - started
    path.unlink()
    return hashed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a worker's cpus_per_worker)")
    parser.add_argument("--hash-mb", type=int, default=256)
    parser.add_argument("--prefetch", type=int, default=2, help="hardware.prefetch_batches (0: read in the loop)")
    parser.add_argument("--online", action="store_true", help="cache_latents: false (VAE-encode every batch)")
    args = parser.parse_args(argv)

    import torch

    from sana_ray.data.cache import Prefetcher, build_caches, open_reader
    from sana_ray.model.latents import LatentEncoder
    from sana_ray.data.synthetic import make_shapes
    from sana_ray.launch.ray_cluster import ensure_ray
    from sana_ray.manifest.schema import DatasetSpec, ModelSpec, TrainingSpec
    from sana_ray.model.flow import flow_matching_loss, sample_u, shift_sigmas
    from sana_ray.model.loading import load_transformer, resolve_pretrained
    from sana_ray.train.loop import micro_batch_seed

    training = TrainingSpec(steps=args.steps, batch_size=args.batch_size)  # seed 42, flow_shift, sampling: defaults
    rank, world_size, device = 0, 1, torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="sana-ray-bench-") as tmp:
        root = Path(tmp)
        make_shapes(root / "images", count=args.images, size=64, seed=0)
        spec = DatasetSpec(name="shapes", path=root / "images", resolution=args.resolution, cache_latents=not args.online)
        model = ModelSpec(pretrained="tiny")
        source = resolve_pretrained("tiny", root / "models")
        ensure_ray(num_cpus=os.cpu_count())
        build_caches([spec], model_source=source, model=model, cache_root=root / "cache", progress=None)
        import ray

        ray.shutdown()  # from here on: one process, no Ray

        lines: list[str] = []
        started = time.perf_counter()
        cache_set, _ = build_caches([spec], model_source=source, model=model, cache_root=root / "cache", progress=lines.append)
        reuse = time.perf_counter() - started
        verified = [line for line in lines if line.startswith("reusing")]
        started = time.perf_counter()
        data = open_reader(cache_set, encoder=lambda: LatentEncoder.from_pretrained(source, device=device))
        loaded = time.perf_counter() - started
        hashed_big = time_checksum(root, args.hash_mb)

        torch.set_num_threads(args.threads)
        plan = cache_set.batch_plan(training.batch_size, world_size, training.seed)
        batches = Prefetcher(data, plan, rank=rank, seed=training.seed, start=0, stop=args.warmup + args.steps,
                             depth=args.prefetch)
        transformer = load_transformer(source).to(device).train()
        optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-3)
        sampling = training.timestep_sampling
        waits, steps = [], []
        for micro_batch in range(args.warmup + args.steps):  # accumulation 1: one micro-batch per step
            step_started = time.perf_counter()
            # --- the data path, as train/loop.py does it
            planned = time.perf_counter()
            batch = batches.get(micro_batch)
            latents = batch["latents"].to(device)
            prompt_embeds = batch["prompt_embeds"].to(device).float()
            prompt_mask = batch["prompt_attention_mask"].to(device)
            fetched = time.perf_counter()
            # --- the rest of the step
            generator = torch.Generator(device="cpu").manual_seed(micro_batch_seed(training.seed, rank, micro_batch))
            u = sample_u(latents.shape[0], scheme=sampling.scheme, logit_mean=sampling.logit_mean,
                         logit_std=sampling.logit_std, generator=generator, device="cpu")
            sigmas = shift_sigmas(u, training.flow_shift).to(device)
            noise = torch.randn(latents.shape, generator=generator).to(device)
            loss = flow_matching_loss(transformer, latents, prompt_embeds, prompt_mask, sigmas=sigmas, noise=noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(transformer.parameters(), training.max_grad_norm or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            float(loss.detach())
            done = time.perf_counter()
            if micro_batch >= args.warmup:
                waits.append(fetched - step_started)
                steps.append(done - step_started)

        batches.close()
    wait, step = sum(waits), sum(steps)
    print(f"{args.images} images at {args.resolution} px (latents {'x'.join(map(str, cache_set.bucket_shapes[0]))}, "
          f"text {'x'.join(map(str, cache_set.text.shape))} {cache_set.text.dtype}), tiny model, batch {args.batch_size}, "
          f"{'online VAE encoding, ' if args.online else ''}prefetch {args.prefetch}, "
          f"{args.steps} steps after {args.warmup} warm-up, {args.threads} torch thread(s), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"data wait per step: mean {wait / len(waits) * 1e6:.0f} us, median {statistics.median(waits) * 1e6:.0f} us, "
          f"max {max(waits) * 1e6:.0f} us")
    print(f"step time:          mean {step / len(steps) * 1e3:.1f} ms, median {statistics.median(steps) * 1e3:.1f} ms")
    print(f"data wait / step time: {100 * wait / step:.2f} %  (target < 2 %)")
    print(f"cache reuse check (discovery + size and sha256 of every shard, no Ray): {reuse:.2f} s; "
          f"open_reader: {loaded:.3f} s")
    for line in verified:
        print(f"  {line}")
    print(f"sha256 of a {args.hash_mb} MB shard: {hashed_big:.2f} s ({args.hash_mb / hashed_big:.0f} MB/s, one thread)")


if __name__ == "__main__":
    main()
