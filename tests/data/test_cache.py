"""Latent and text caches built with Ray Data on the tiny model: contents, reuse, partial rebuilds.

One build is shared by the tests of this module (building costs an encoder-actor start-up);
the tests run in file order and each leaves the cache complete.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from sana_ray.data.cache import build as cache_module
from sana_ray.data.cache import build_caches, open_reader
from sana_ray.data.images import load_pixels
from sana_ray.data.synthetic import make_shapes
from sana_ray.manifest.schema import DatasetSpec, ModelSpec

MODEL = ModelSpec(pretrained="tiny")


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    """Two datasets, the tiny model, and a first build of their caches."""
    from sana_ray.model.loading import resolve_pretrained

    root = tmp_path_factory.mktemp("caches")
    source = resolve_pretrained("tiny", root / "models")

    a = root / "a"  # 6 squares; two share a caption (text rows are per unique caption)
    make_shapes(a, count=6, size=64, seed=0)
    (a / "shape_001.txt").write_text((a / "shape_000.txt").read_text())
    b = root / "b"  # 4 squares, one wide image (another latent shape), one truncated JPEG (caught at discovery)
    make_shapes(b, count=4, size=64, seed=5)
    Image.new("RGB", (128, 64), (0, 128, 255)).save(b / "wide.png")
    (b / "wide.txt").write_text("a wide blue picture")
    jpeg = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(jpeg, "JPEG")
    (b / "broken.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])  # passes PIL's verify()
    (b / "broken.txt").write_text("a broken file")

    specs = [
        DatasetSpec(name="a", path=a, resolution=64, repeats=2),
        DatasetSpec(name="b", path=b, resolution=64, crop=False),
    ]
    lines: list[str] = []
    cache_set, reports = build_caches(
        specs, model_source=source, model=MODEL, cache_root=root / "cache", batch_size=2, progress=lines.append
    )
    return {"root": root, "source": source, "specs": specs, "cache": cache_set, "reports": reports, "lines": lines}


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_first_build(world):
    cs, lines, reports = world["cache"], world["lines"], world["reports"]
    # Samples: 6 from a, 5 from b (the truncated JPEG is dropped and reported).
    assert len(cs) == 11 and cs.datasets == ["a"] * 6 + ["b"] * 5
    assert (reports[0].found, reports[0].used) == (6, 6)
    assert (reports[1].found, reports[1].used) == (6, 5)
    assert [Path(p).name for p in reports[1].skipped["unreadable"]] == ["broken.jpg"]
    assert cs.repeats.tolist() == [2] * 6 + [0] * 5
    # 64 px through the tiny VAE (4x): [4, 16, 16]; the 128x64 image is its own bucket.
    assert cs.bucket_shapes == [(4, 16, 16), (4, 16, 32)]
    assert cs.buckets.tolist() == [0] * 10 + [1]
    assert cs.text.shape == (300, 32) and cs.text.dtype == "F32"  # float32 store: training on the CPU is fp32

    # Progress went through the callback; text and latents were encoded by the actor pool.
    assert "a: 6 images used of 6 found" in lines
    assert "latents a: 6/6 images" in lines and "latents b: 5/5 images" in lines
    captions = [Path(p).with_suffix(".txt").read_text().strip() for p in cs.image_paths]
    unique = sorted(set(captions))  # the truncated JPEG was caught at discovery: its caption is not encoded
    assert f"text embeddings: {len(unique)}/{len(unique)} captions" in lines
    assert cs.text.count == len(unique)  # one row per unique caption
    assert cs.first_text_rows[0] == cs.first_text_rows[1]  # a's shape_000 and shape_001 share a caption

    data = open_reader(cs)
    assert data.batch(list(range(10)))["latents"].shape == (10, 4, 16, 16) and data.batch([10])["latents"].shape == (1, 4, 16, 32)

    from sana_ray.model.latents import LatentEncoder
    from sana_ray.model.text import PromptEncoder

    text = PromptEncoder.from_pretrained(world["source"], device="cpu", dtype=torch.float32, max_sequence_length=300)
    embeds, mask = text.encode(captions[5:7])
    batch = data.batch([5, 6])
    assert torch.equal(batch["prompt_embeds"], embeds) and torch.equal(batch["prompt_attention_mask"], mask)
    assert batch["prompt_attention_mask"].dtype == torch.int64

    vae = LatentEncoder.from_pretrained(world["source"], device="cpu", dtype=torch.float32)
    pixels = torch.stack([load_pixels(cs.image_paths[i], 64, crop=True) for i in (0, 7)])
    assert torch.allclose(data.batch([0, 7])["latents"], vae.encode(pixels), atol=1e-5)
    wide = vae.encode(load_pixels(cs.image_paths[10], 64, crop=False)[None])
    assert torch.allclose(data.batch([10])["latents"], wide, atol=1e-5)

    # The CacheSet travels to Ray Train workers (pickled) and makes the batch plan the trainer uses.
    import pickle

    assert pickle.loads(pickle.dumps(cs)) == cs
    plan = cs.batch_plan(batch_size=2, world_size=2, seed=0)
    assert plan.global_batches_per_epoch() == (6 * 3 + 4) // 4


def test_second_build_reuses_everything(world, monkeypatch):
    cache_root = world["root"] / "cache"
    before = _files(cache_root)

    def no_ray_data(*args, **kwargs):
        raise AssertionError("a second build must not start Ray Data")

    monkeypatch.setattr(cache_module, "_run_encoders", no_ray_data)
    lines: list[str] = []
    again, _ = build_caches(
        world["specs"], model_source=world["source"], model=MODEL, cache_root=cache_root, batch_size=2, progress=lines.append
    )
    assert _files(cache_root) == before  # no shard or index rewritten
    assert sum(line.startswith("reusing") for line in lines) == 3, lines
    assert any(line.startswith("reusing text embeddings cache") for line in lines)
    assert again == world["cache"]


def test_new_resolution_and_half_finished_build(world):
    cache_root = world["root"] / "cache"
    old = world["cache"]
    b_folder = Path(old.latent_dirs[1])
    text_before = _files(Path(old.text_dir))
    # Simulate a build of b's latents killed half-way: no index.json, one shard missing
    # (test_cache_integrity.py SIGKILLs a real build in another process).
    (b_folder / "index.json").unlink()
    (b_folder / "shard_00001.safetensors").unlink()
    (b_folder / "shard_00001.safetensors.sha256").unlink()  # its checksum record (rewritten with it)
    b_before = _files(b_folder)

    specs = [world["specs"][0].model_copy(update={"resolution": 32}), world["specs"][1]]
    lines: list[str] = []
    new, _ = build_caches(specs, model_source=world["source"], model=MODEL, cache_root=cache_root, batch_size=2, progress=lines.append)

    # a at 32 px is a new latent cache; the 64 px one stays for whoever uses it.
    assert new.latent_dirs[0] != old.latent_dirs[0] and (Path(old.latent_dirs[0]) / "index.json").is_file()
    assert "latents a: 6/6 images" in lines
    # The captions did not change: the text cache is reused, untouched.
    assert new.text_dir == old.text_dir and _files(Path(old.text_dir)) == text_before
    assert any(line.startswith("reusing text embeddings cache") for line in lines)
    # b: only the missing shard was encoded; the others were not rewritten.
    assert new.latent_dirs[1] == str(b_folder)
    assert "latents b: 3/5 images already cached in " + str(b_folder) + ", encoding the rest" in lines
    after = _files(b_folder)
    assert {k: after[k] for k in b_before} == b_before
    assert "shard_00001.safetensors" in after and "index.json" in after

    data = open_reader(new)
    assert new.bucket_shapes == [(4, 8, 8), (4, 16, 16), (4, 16, 32)]
    assert new.buckets.tolist() == [0] * 6 + [1] * 4 + [2]
    old_data = open_reader(old)  # the rebuilt shard holds the same latents as before
    assert torch.allclose(data.batch(list(range(6, 10)))["latents"], old_data.batch(list(range(6, 10)))["latents"], atol=1e-6)
    assert not any(p.name.endswith(".tmp") for p in cache_root.rglob("*"))


def test_use_gpu_without_gpu_is_a_clear_error(world, tmp_path):
    if world["root"] and ray_has_gpu():
        pytest.skip("this cluster has a GPU")
    with pytest.raises(cache_module.DataError, match="no GPU"):
        build_caches(world["specs"][:1], model_source=world["source"], model=MODEL, cache_root=tmp_path, use_gpu=True, progress=None)


def ray_has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def test_encoder_failure_is_returned_with_its_message(tmp_path):
    """A shard that fails comes back as an error row (Ray Data would bury a raised message)."""
    import json

    import numpy as np

    job = {
        "kind": "text",
        "model": {"source": str(tmp_path), "revision": None, "variant": None, "trust_remote_code": False,
                  "instruction": None, "max_sequence_length": 300, "use_gpu": False},
        "folder": 0, "shard": 3, "path": str(tmp_path / "shard_00003.safetensors"), "items": ["a cat"],
    }
    actor = cache_module._ShardEncoder()
    for _ in range(2):  # the second shard fails fast with the same message
        out = actor({"job": np.array([json.dumps(job)], dtype=object)})
        result = json.loads(out["result"][0])
        assert result["shard"] == 3 and result["count"] == 0
        assert result["error"].startswith(f"RuntimeError: cannot load the text encoder from {tmp_path}")
    assert not (tmp_path / "shard_00003.safetensors").exists()
