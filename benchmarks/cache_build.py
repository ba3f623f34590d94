"""Cache build throughput: the Ray Data build vs a plain single-process loop, in one run.

    .venv/bin/python benchmarks/cache_build.py [--images 256] [--size 256] [--resolution 128] [--actors 2]

Both encode the same generated images (latents, through each image's planned geometry) and the
same unique captions (text embeddings) with the same tiny random Sana encoders, in float32 on
CPU. The plain loop is what a script without Ray would do: load both encoders once, then decode
and encode batch after batch in one process (PIL decoding in 8 threads, as the actors do). The
Ray build is ``build_caches`` into an empty cache folder with ``--actors`` encoder actors, timed
from the call to its return, so it includes Ray Data's start-up and each actor's imports and
model loading; the plain loop is reported with and without its own model loading.

Prints images/s of each and their ratio. Run by hand (not a test); the load average is printed
because other processes on the machine skew the figures.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def plain_loop(samples, captions, source: str, batch_size: int, max_sequence_length: int) -> tuple[float, float]:
    """(seconds including model loading, seconds encoding only)."""
    import torch

    from sana_ray.data.images import load_prepared
    from sana_ray.model.latents import LatentEncoder
    from sana_ray.model.text import DEFAULT_INSTRUCTION, PromptEncoder

    started = time.perf_counter()
    vae = LatentEncoder.from_pretrained(source, device="cpu", dtype=torch.float32)
    text = PromptEncoder.from_pretrained(source, device="cpu", dtype=torch.float32, instruction=DEFAULT_INSTRUCTION,
                                         max_sequence_length=max_sequence_length)
    loaded = time.perf_counter()
    with torch.inference_mode(), ThreadPoolExecutor(max_workers=8) as pool:
        for start in range(0, len(captions), batch_size):
            text.encode(captions[start : start + batch_size])
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            pixels = list(pool.map(lambda s: load_prepared(s.image_path, s.geometry), chunk))
            groups: dict[tuple, list] = {}
            for p in pixels:
                groups.setdefault(tuple(p.shape), []).append(p)
            for group in groups.values():
                vae.encode(torch.stack(group))
    done = time.perf_counter()
    return done - started, done - loaded


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=256, help="generated image size (px)")
    parser.add_argument("--resolution", type=int, default=128, help="training resolution (px)")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="vae_batch_size / write_batch_size")
    args = parser.parse_args(argv)

    from sana_ray.data.cache import build_caches
    from sana_ray.data.samples import discover_samples
    from sana_ray.data.synthetic import make_shapes
    from sana_ray.launch.ray_cluster import ensure_ray
    from sana_ray.manifest.schema import DatasetSpec, ModelSpec
    from sana_ray.model.loading import resolve_pretrained

    with tempfile.TemporaryDirectory(prefix="sana-ray-bench-") as tmp:
        root = Path(tmp)
        make_shapes(root / "images", count=args.images, size=args.size, seed=0)
        spec = DatasetSpec(name="bench", path=root / "images", resolution=args.resolution)
        model = ModelSpec(pretrained="tiny")
        source = resolve_pretrained("tiny", root / "models")
        samples, _ = discover_samples(spec)
        captions = sorted({s.caption for s in samples})

        total, encode_only = plain_loop(samples, captions, source, args.batch_size, model.max_sequence_length)

        ensure_ray(num_cpus=os.cpu_count())
        started = time.perf_counter()
        build_caches([spec], model_source=source, model=model, cache_root=root / "cache", num_actors=args.actors,
                     batch_size=args.batch_size, progress=None)
        ray_total = time.perf_counter() - started

    n = args.images
    print(f"{n} images of {args.size} px at {args.resolution} px + {len(captions)} captions, tiny encoders, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"plain loop, 1 process:     {n / total:7.1f} images/s  ({total:.1f} s incl. model loading; "
          f"{n / encode_only:.1f} images/s encoding only)")
    print(f"Ray Data, {args.actors} actors:        {n / ray_total:7.1f} images/s  ({ray_total:.1f} s incl. start-up)")
    print(f"ratio Ray / plain:         {total / ray_total:7.2f}x end to end, {encode_only / ray_total:.2f}x vs encoding only")


if __name__ == "__main__":
    main()
