"""Worker memory and data wait against dataset size, at real Sana 1.6B / 1024 px shapes.

    python benchmarks/data_scale.py --samples N [--workdir DIR] [--step-ms 150] [--batch 8] [--json]
                                    [--text-dtype float32|bfloat16] [--warm] [--keep]

Writes a synthetic cache of N samples at the real shapes -- a text row is 300 tokens x 2304
(Gemma2-2B's hidden size), one unique caption per sample (2.76 MB a row in float32, 1.38 MB in
bfloat16); latents 32 x 32 x 32 (1024x1024) and 32 x 24 x 40 (768x1280) for half of the samples
each (131 KB) -- with the project's own shard writer (``data.cache.synthetic``: the build's
``write_shard`` and indexer, random tensors, no encoders). Then, in a separate process (a
training worker's situation: imports done, the pickled CacheSet received), it opens the cache
with ``data.cache.open_reader`` and takes 200 micro-batches of ``--batch`` from the
``Prefetcher`` (``hardware.prefetch_batches`` 2, as in a run) while a fake step sleeps
``--step-ms``. Before the worker starts, every shard is dropped from the page cache
(``posix_fadvise(DONTNEED)``), so reads come from the disk; ``--warm`` skips that.

Prints one JSON object (``--json``) or a line per figure: samples, worker_rss_before_mb (after
imports and the CacheSet), worker_peak_rss_mb (VmHWM at the end), index_mb (the pickled
CacheSet), data_wait_fraction (time ``get`` waited / (that + the fake steps)), open_s (the
reader's check of every shard), disk_mb, write_s. Run by hand; figures in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEXT_TOKENS, TEXT_CHANNELS = 300, 2304  # Sana: 300 tokens of Gemma2-2B's last hidden state
LATENT_SHAPES = [(32, 32, 32), (32, 24, 40)]  # DC-AE 32x: 1024x1024 and 768x1280 px
MICRO_BATCHES = 200

WORKER = r"""
import json, os, pickle, sys, time
from pathlib import Path

def status(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
    return int(line.split()[1]) / 1024

import torch
from sana_ray.data.cache import Prefetcher, open_reader
cache = pickle.loads(Path(sys.argv[1]).read_bytes())
batch, step_s, micro_batches = int(sys.argv[2]), float(sys.argv[3]) / 1000, int(sys.argv[4])
before = status("VmRSS")
started = time.perf_counter()
reader = open_reader(cache)
open_s = time.perf_counter() - started
plan = cache.batch_plan(batch_size=batch, world_size=1, seed=0)
prefetcher = Prefetcher(reader, plan, rank=0, seed=0, start=0, stop=micro_batches, depth=2)
slept = 0.0
for m in range(micro_batches):
    prefetcher.get(m)
    time.sleep(step_s)  # the training step
    slept += step_s
prefetcher.close()
print(json.dumps({"worker_rss_before_mb": before, "worker_peak_rss_mb": status("VmHWM"), "open_s": open_s,
                  "wait_s": prefetcher.wait_s, "step_s": slept}))
"""


def write_cache(root: Path, samples: int, text_dtype: str):
    """The synthetic cache; returns its CacheSet (the index the driver would send to workers)."""
    import torch

    from sana_ray.data.cache.synthetic import cache_set, write_latent_cache, write_text_cache

    generator = torch.Generator().manual_seed(0)
    rows = ((torch.randn(TEXT_TOKENS, TEXT_CHANNELS, generator=generator), torch.ones(TEXT_TOKENS, dtype=torch.int64))
            for _ in range(samples))
    text = write_text_cache(root / "text" / "synthetic", [f"caption {i}" for i in range(samples)], rows,
                            shard_size=8, dtype=getattr(torch, text_dtype))
    latents = (torch.randn(*LATENT_SHAPES[i % 2], generator=generator) for i in range(samples))
    images = write_latent_cache(root / "latents" / "synthetic", [f"/data/{i:07d}.jpg" for i in range(samples)], latents,
                                shard_size=8)
    return cache_set(text, images, [(i,) for i in range(samples)])


def drop_page_cache(cache) -> None:
    for path in [*cache.text.files, *cache.files]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, required=True)
    parser.add_argument("--workdir", type=Path, default=None, help="where the cache is written (default: a temp folder)")
    parser.add_argument("--step-ms", type=float, default=150.0, help="the fake training step (H200 batch 1 is ~150 ms)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--warm", action="store_true", help="leave the shards in the page cache")
    parser.add_argument("--keep", action="store_true", help="keep the cache folder")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="sana-ray-data-scale-", dir=args.workdir))
    try:
        started = time.perf_counter()
        cache = write_cache(root, args.samples, args.text_dtype)
        write_s = time.perf_counter() - started
        pickled = root / "cache_set.pkl"
        pickled.write_bytes(pickle.dumps(cache))
        if not args.warm:
            drop_page_cache(cache)
        disk = sum(p.stat().st_size for p in root.rglob("*.safetensors"))
        out = subprocess.run([sys.executable, "-c", WORKER, str(pickled), str(args.batch), str(args.step_ms),
                              str(MICRO_BATCHES)], capture_output=True, text=True, check=False,
                             env=os.environ | {"OMP_NUM_THREADS": "1"})
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        worker = json.loads(out.stdout.strip().splitlines()[-1])
        result = {
            "samples": args.samples,
            "worker_peak_rss_mb": round(worker["worker_peak_rss_mb"], 1),
            "worker_rss_before_mb": round(worker["worker_rss_before_mb"], 1),
            "data_wait_fraction": round(worker["wait_s"] / (worker["wait_s"] + worker["step_s"]), 5),
            "open_s": round(worker["open_s"], 4),
            "disk_mb": round(disk / 1e6, 1),
            "index_mb": round(pickled.stat().st_size / 1e6, 3),
            "write_s": round(write_s, 1),
            "text_dtype": args.text_dtype,
            "batch": args.batch,
            "step_ms": args.step_ms,
            "micro_batches": MICRO_BATCHES,
            "page_cache": "warm" if args.warm else "dropped",
            "load_average": round(os.getloadavg()[0], 2),
            "cpus": os.cpu_count(),
        }
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return result


if __name__ == "__main__":
    main()
