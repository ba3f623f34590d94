"""cache_latents: false (SimpleTuner's vae_cache_disable): latents encoded in the training loop.

The builds use Ray Data for the text cache (the session's local cluster); the comparisons of
online and cached latents run in this process with the tiny VAE. The last test is one short
`apply` (tests/launch/test_apply_e2e.py) whose losses must agree with the cached run's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import numpy as np

from sana_ray.data.cache import build_caches, open_reader
from sana_ray.data.synthetic import make_shapes
from sana_ray.manifest.schema import DatasetSpec, ModelSpec

MODEL = ModelSpec(pretrained="tiny")


def _specs(x: Path, y: Path, *, online: bool) -> list[DatasetSpec]:
    return [
        # random crop place and random aspect: both fixed per image by the cache; online must match
        DatasetSpec(name="x", path=x, resolution=64, crop_style="random", crop_aspect="random",
                    crop_aspect_buckets=[1.0, 2.0], repeats=1, cache_latents=not online),
        DatasetSpec(name="y", path=y, resolution=64, crop=False, caption_dropout_probability=0.5),
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    """Dataset x (bigger images, random crops) online, y cached; then the same with x cached too."""
    from sana_ray.model.loading import resolve_pretrained

    root = tmp_path_factory.mktemp("online")
    source = resolve_pretrained("tiny", root / "models")
    x, y = root / "x", root / "y"
    make_shapes(x, count=5, size=96, seed=1)  # 96 px squares: room for a random 64 px crop
    for n, size in enumerate([(160, 90), (90, 150), (200, 100)]):  # other aspects: other buckets
        Image.effect_noise(size, 60).convert("RGB").save(x / f"noise_{n}.png")
        (x / f"noise_{n}.txt").write_text(f"noise number {n}")
    make_shapes(y, count=4, size=64, seed=2)
    Image.new("RGB", (128, 64), (0, 128, 255)).save(y / "wide.png")
    (y / "wide.txt").write_text("a wide blue picture")

    cache_root = root / "cache"
    lines: list[str] = []
    online, _ = build_caches(_specs(x, y, online=True), model_source=source, model=MODEL, cache_root=cache_root,
                             batch_size=3, progress=lines.append)
    latent_folders_after_online = sorted(p.name for p in (cache_root / "latents").iterdir())
    text_folders = sorted(p.name for p in (cache_root / "text").iterdir())
    cached, _ = build_caches(_specs(x, y, online=False), model_source=source, model=MODEL, cache_root=cache_root,
                             batch_size=3, progress=None)
    return {
        "source": source, "root": root, "online": online, "cached": cached, "lines": lines,
        "latent_folders_after_online": latent_folders_after_online, "text_folders": text_folders,
        "cache_root": cache_root,
    }


@pytest.fixture(scope="module")
def vae(world):
    from sana_ray.model.latents import LatentEncoder

    return LatentEncoder.from_pretrained(world["source"], device="cpu", dtype=torch.float32)


def test_online_build_writes_text_but_no_latents_for_the_dataset(world):
    online, cached, cache_root = world["online"], world["cached"], world["cache_root"]
    # Same samples, same order, same buckets and text rows as the fully cached build.
    assert online.image_paths == cached.image_paths and online.datasets == cached.datasets
    assert online.bucket_shapes == cached.bucket_shapes and np.array_equal(online.buckets, cached.buckets)
    assert len(online.bucket_shapes) == 2  # squares; wide (random aspect 2.0, and y's 128x64)
    assert np.array_equal(online.caption_offsets, cached.caption_offsets)
    assert np.array_equal(online.caption_rows, cached.caption_rows) and online.null_text_row == cached.null_text_row
    assert online.text_dir == cached.text_dir and world["text_folders"] == [Path(online.text_dir).name]
    assert (Path(online.text_dir) / "index.json").is_file()
    # x wrote no latent folder: the only latent folder after the online build is y's.
    assert world["latent_folders_after_online"] == [Path(online.latent_dirs[1]).name]
    assert not any(line.startswith("latents x") for line in world["lines"])
    assert not (cache_root / "latents" / "online").exists()
    x = [i for i, d in enumerate(online.datasets) if d == "x"]
    assert x and all(online.is_online(i) for i in x) and not any(cached.is_online(i) for i in x)
    assert not any(online.is_online(i) for i, d in enumerate(online.datasets) if d == "y")
    # The fully cached build then added x's folder.
    assert len(list((cache_root / "latents").iterdir())) == 2
    # The plan (buckets from the planned geometry) is the cached run's.
    assert online.batch_plan(2, 2, 0).global_batches_per_epoch() == cached.batch_plan(2, 2, 0).global_batches_per_epoch()
    import pickle

    assert pickle.loads(pickle.dumps(online)) == online


def _close(online: torch.Tensor, cached: torch.Tensor) -> bool:
    """Online and cached latents come from the same pixels and the same float32 VAE, encoded in
    different batches (the cache groups a shard's images; online, a micro-batch's) and threads,
    so oneDNN sums the convolutions in another order. fp32 rounding is ~6e-8 per operation and
    the tiny DC-AE's deepest convolutions sum 32 x 3 x 3 = 288 terms, so the reordering can move
    a latent by ~288 x 6e-8 ~ 2e-5 of its magnitude per layer, over a few layers: we allow 1e-4 of
    the largest latent value (measured: at most 1.1e-5 of it, on a 2-core machine under load)."""
    return bool((online - cached).abs().max() <= 1e-4 * cached.abs().max().clamp(min=1.0))


def test_online_latents_equal_cached_latents(world, vae):
    online_set, cached_set = world["online"], world["cached"]
    loads = []
    online = open_reader(online_set, encoder=lambda: loads.append(1) or vae)
    cached = open_reader(cached_set)  # all cached
    assert [i for i in range(len(online_set)) if online_set.is_online(i)] == \
        [i for i, d in enumerate(online_set.datasets) if d == "x"]
    assert not loads  # the VAE is loaded on the first online batch, not before
    for i in range(len(online_set)):
        a, b = online.batch([i]), cached.batch([i])
        assert a["latents"].shape == b["latents"].shape == (1, *online_set.bucket_shapes[online_set.buckets[i]])
        assert _close(a["latents"], b["latents"]), online_set.image_paths[i]
        assert torch.equal(a["prompt_embeds"], b["prompt_embeds"])
    assert loads == [1]  # loaded once

    # Whole batches from the plan: mixed online/cached buckets, caption draws and dropout per key.
    plan = online_set.batch_plan(batch_size=2, world_size=1, seed=3)
    mixed = 0
    for micro_batch in range(plan.global_batches_per_epoch() * 2):
        indices = plan.batch(micro_batch, 0)
        mixed += len({online_set.datasets[i] for i in indices}) > 1
        a, b = online.batch(indices, key=(3, 0, micro_batch)), cached.batch(indices, key=(3, 0, micro_batch))
        assert _close(a["latents"], b["latents"])
        assert torch.equal(a["prompt_embeds"], b["prompt_embeds"])
        assert torch.equal(a["prompt_attention_mask"], b["prompt_attention_mask"])
    assert mixed, "expected a batch holding both an online and a cached sample (one bucket, two datasets)"


def test_unreadable_online_image_is_skipped_and_counted(world, vae, tmp_path):
    """An image deleted after discovery: its place in the batch goes to a readable sample of the same
    batch (same shapes on every rank), it is counted once, and the run goes on."""
    from dataclasses import replace

    online_set = world["online"]
    x = [i for i, d in enumerate(online_set.datasets) if d == "x"]
    gone = tmp_path / "deleted.png"  # as if the file had been deleted after the cache build
    paths = list(online_set.image_paths)
    paths[x[0]] = str(gone)
    reader = open_reader(replace(online_set, image_paths=paths), encoder=vae)
    same_bucket = [i for i in range(len(online_set)) if online_set.buckets[i] == online_set.buckets[x[0]] and i != x[0]]
    batch = reader.batch([x[0], same_bucket[0]], key=(1, 0, 0))
    ok = open_reader(online_set, encoder=vae).batch([same_bucket[0], same_bucket[0]], key=(1, 0, 0))
    assert torch.equal(batch["latents"], ok["latents"])  # the readable sample took the lost one's place
    assert list(reader.unreadable) == [str(gone)] and "FileNotFoundError" in reader.unreadable[str(gone)]
    reader.batch([x[0], same_bucket[0]], key=(1, 0, 1))
    assert len(reader.unreadable) == 1  # counted once
    with pytest.raises(Exception, match="every image of a micro-batch"):
        reader.batch([x[0]], key=(1, 0, 2))


def test_online_random_crop_is_the_cached_one(world, vae):
    """A random crop is placed per image (seeded by its path) at discovery: an online rebuild and
    the cache agree, and the crop is not simply the centre."""
    from sana_ray.data.images import Geometry, load_prepared

    online_set = world["online"]
    x = [i for i, d in enumerate(online_set.datasets) if d == "x"]
    geometries = [Geometry.from_json(online_set.online_geometry[online_set.latent_offset[i]]) for i in x]
    assert any(g.box[:2] != ((g.resize[0] - g.size[0]) // 2, (g.resize[1] - g.size[1]) // 2) for g in geometries)
    index = json.loads((Path(world["cached"].latent_dirs[0]) / "index.json").read_text())
    assert index["items"] and all("shape" in item for item in index["items"])
    # The online build is deterministic: building again gives the same index.
    again, _ = build_caches(_specs(world["root"] / "x", world["root"] / "y", online=True), model_source=world["source"],
                            model=MODEL, cache_root=world["cache_root"], batch_size=3, progress=None)
    assert again == online_set
    g = geometries[0]
    assert isinstance(g, Geometry) and load_prepared(online_set.image_paths[x[0]], g).shape[1:] == (g.size[1], g.size[0])


def test_eval_datasets_cannot_be_online(tmp_path):
    with pytest.raises(ValueError, match="cache_latents"):
        DatasetSpec(name="e", path=tmp_path, dataset_type="eval", cache_latents=False)
    with pytest.raises(ValueError, match="cache_latents"):
        DatasetSpec(name="t", dataset_type="text_embeds", cache_latents=False)


# The real `apply` with an online dataset is tests/launch/test_apply_e2e.py::test_online_latents_train_like_cached_ones
# (it reuses that module's finished cached run as the reference).
