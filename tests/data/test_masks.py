"""Loss masks (``datasets[].mask_path``): geometry, discovery, the mask cache and the reader.

No Ray: the mask shards are written by the build's own job code (``_ShardEncoder._encode_shard``
called in this process) and indexed by the build's ``_cache_set``; synthetic caches
(``data.cache.synthetic``) stand in for latents. The one ``apply`` that builds masks with the Ray
Data pool is tests/launch/test_objectives_e2e.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from sana_ray.data.cache import open_reader
from sana_ray.data.cache.build import MASKS, _cache_set, _finish_folder, _plan_latents, _plan_masks, _ShardEncoder
from sana_ray.data.cache.synthetic import (
    SyntheticDataset, cache_set, cache_set_of, write_latent_cache, write_mask_cache, write_text_cache,
)
from sana_ray.data.images import PixelOptions, load_mask, load_prepared, plan_geometry
from sana_ray.data.samples import (
    MASK_MISMATCH, MISSING_MASK, UNREADABLE_MASK, DataError, discover_samples,
)
from sana_ray.manifest.schema import DatasetSpec, ModelSpec


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster when the 2 cores are busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _grey_picture(width: int, height: int, seed: int) -> Image.Image:
    """Greyscale shapes on a gradient: every pixel's value says where it came from."""
    rng = np.random.default_rng(seed)
    base = np.tile(np.linspace(0, 255, width, dtype=np.float64), (height, 1))
    image = Image.fromarray(base.astype(np.uint8), "L")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        draw.ellipse((x, y, x + width // 4, y + height // 4), fill=int(rng.integers(0, 256)))
    return image


@pytest.mark.parametrize("options", [
    PixelOptions(resolution=64),  # square centre crop
    PixelOptions(resolution=64, crop_style="random", crop_aspect="random", crop_aspect_buckets=(0.5, 1.0, 2.0)),
    PixelOptions(resolution=64, crop=False),
    PixelOptions(resolution=64, maximum_image_size=100, target_downsample_size=80, crop_style="corner"),
], ids=["center", "random", "no-crop", "downsample"])
def test_a_mask_gets_exactly_the_images_geometry(tmp_path: Path, options: PixelOptions):
    """The same greyscale picture saved as the image (RGB) and as its mask (L): after each one's
    preparation the mask equals the image's red channel pixel for pixel -- same resize, same crop."""
    picture = _grey_picture(150, 110, seed=1)
    image_path, mask_path = tmp_path / "img.png", tmp_path / "mask.png"
    picture.convert("RGB").save(image_path)
    picture.save(mask_path)
    geometry = plan_geometry(150, 110, options, str(image_path))
    pixels = load_prepared(str(image_path), geometry)  # [3, H, W] in [-1, 1]
    full = load_mask(str(mask_path), geometry, factor=1)  # [1, H, W] in [0, 1]
    assert full.shape == (1, *pixels.shape[1:])
    assert torch.equal(torch.round((pixels[0] + 1) * 127.5), torch.round(full[0] * 255))
    # Downsampled to the latent grid: the mean over each factor x factor cell (area interpolation).
    pooled = load_mask(str(mask_path), geometry, factor=4)
    assert pooled.shape == (1, pixels.shape[1] // 4, pixels.shape[2] // 4)
    assert torch.equal(pooled, F.interpolate(full[None], scale_factor=0.25, mode="area")[0])


def test_white_and_black_masks_are_exactly_one_and_zero(tmp_path: Path):
    geometry = plan_geometry(90, 70, PixelOptions(resolution=64), "x")
    for value, expected in ((255, 1.0), (0, 0.0)):
        Image.new("L", (90, 70), value).save(tmp_path / f"{value}.png")
        mask = load_mask(str(tmp_path / f"{value}.png"), geometry, factor=4)
        assert torch.equal(mask, torch.full((1, 16, 16), expected))
    Image.new("RGBA", (90, 70), (255, 255, 255, 0)).save(tmp_path / "rgba.png")  # alpha is ignored
    assert torch.equal(load_mask(str(tmp_path / "rgba.png"), geometry, factor=4), torch.ones(1, 16, 16))


def test_each_file_keeps_its_own_exif_orientation(tmp_path: Path):
    """The image is stored sideways with EXIF orientation 6, its mask upright without a tag: both
    display the same, so the mask is accepted and lines up with the image as displayed."""
    upright = Image.new("L", (32, 64), 0)
    upright.paste(255, (0, 0, 32, 16))  # white band at the top of the displayed picture
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    stored = upright.rotate(90, expand=True)  # 64 x 32; orientation 6 turns it back clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.convert("RGB").save(images / "a.jpg", exif=exif, quality=100)
    (images / "a.txt").write_text("a band")
    upright.save(masks / "a.png")
    samples, report = discover_samples(DatasetSpec(name="d", path=images, mask_path=masks, resolution=32, crop=False))
    assert report.skipped == {} and samples[0].mask == str(masks / "a.png") and samples[0].size == (32, 64)
    mask = load_mask(samples[0].mask, samples[0].geometry, factor=1)[0]
    pixels = load_prepared(samples[0].image_path, samples[0].geometry)[0]
    assert mask[:16].min() == 1 and mask[17:].max() == 0
    assert pixels[:14].min() > 0.9 and pixels[18:].max() < -0.9  # JPEG: not exact at the edge


def test_missing_unreadable_and_mismatched_masks_are_skipped_and_counted(tmp_path: Path):
    images, masks = tmp_path / "data", tmp_path / "data" / "masks"  # masks inside the dataset folder
    masks.mkdir(parents=True)
    for name in ("good", "grey", "missing", "broken", "small", "sub/deep"):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), (200, 10, 10)).save(images / f"{name}.png")
        (images / f"{name}.txt").write_text(f"a {name} picture")
    Image.new("L", (64, 64), 255).save(masks / "good.png")
    Image.new("L", (64, 64), 128).save(masks / "grey.jpg")  # another extension is fine
    (masks / "broken.png").write_bytes(b"not a png")
    Image.new("L", (32, 64), 255).save(masks / "small.png")
    (masks / "sub").mkdir()
    Image.new("L", (64, 64), 255).save(masks / "sub" / "deep.webp")  # same relative path
    samples, report = discover_samples(DatasetSpec(name="d", path=images, mask_path=masks, resolution=64))
    # The masks under data/masks are not training images; found counts the 6 images only.
    assert report.found == 6 and report.used == 3
    assert sorted(Path(s.image_path).stem for s in samples) == ["deep", "good", "grey"]
    assert {k: [Path(p).stem for p in v] for k, v in report.skipped.items()} == {
        MISSING_MASK: ["missing"], UNREADABLE_MASK: ["broken"], MASK_MISMATCH: ["small"]}
    assert "32x64" in report.details[str(images / "small.png")] and "not an image" in report.details[str(images / "broken.png")]
    assert report.masked and "3 images used of 6 found" in report.summary()

    # No usable mask at all: the error says how to fix it; a mask_path that is not a folder is named.
    for name in ("good", "grey"):
        (masks / f"{name}.png").unlink(missing_ok=True)
        (masks / f"{name}.jpg").unlink(missing_ok=True)
    (masks / "sub" / "deep.webp").unlink()
    with pytest.raises(DataError, match="give every image a mask of the same size in mask_path"):
        discover_samples(DatasetSpec(name="d", path=images, mask_path=masks, resolution=64))
    with pytest.raises(DataError, match="mask_path .* is not a folder"):
        discover_samples(DatasetSpec(name="d", path=images, mask_path=tmp_path / "nowhere", resolution=64))
    with pytest.raises(DataError, match="mask_path is the dataset folder itself"):
        discover_samples(DatasetSpec(name="d", path=images, mask_path=images, resolution=64))


def test_mask_shards_keys_and_the_index(tmp_path: Path):
    """The build's mask job (no model), its key, and the CacheSet rows: a mask that disappears
    after discovery skips its image as an unreadable mask; latent keys do not depend on masks."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(5):
        Image.new("RGB", (80, 64), (40 * i, 0, 0)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"picture {i}")
        _grey_picture(80, 64, seed=i).save(masks / f"{i}.png")
    spec = DatasetSpec(name="d", path=images, mask_path=masks, resolution=64, crop=False)
    samples, report = discover_samples(spec)
    plain, _ = discover_samples(DatasetSpec(name="d", path=images, resolution=64, crop=False))
    model = ModelSpec(pretrained="tiny")
    latents = _plan_latents(spec, samples, "fp", model, tmp_path / "cache" / "latents", 8)
    assert latents.key == _plan_latents(spec, plain, "fp", model, tmp_path / "cache" / "latents", 8).key
    folder = _plan_masks(spec, samples, latents, 4, tmp_path / "cache" / MASKS)
    assert folder.key == _plan_masks(spec, samples, latents, 4, tmp_path / "cache" / MASKS).key
    os.utime(masks / "3.png", ns=(1, 1))  # a changed mask file: a new mask folder
    assert folder.key != _plan_masks(spec, samples, latents, 4, tmp_path / "cache" / MASKS).key
    assert folder.key != _plan_masks(spec, samples, latents, 8, tmp_path / "cache" / MASKS).key

    (masks / "3.png").unlink()  # gone after discovery: its row is recorded as failed
    folder.path.mkdir(parents=True)
    job = {"kind": MASKS, "folder": 0, "shard": 0, "path": str(folder.path / "shard_00000.safetensors"),
           "items": folder.shard_items(0), "seq": 0, "masks": folder.extras, **folder.params}
    assert _ShardEncoder()._encode_shard(json.loads(json.dumps(job)))["count"] == 5
    _finish_folder(folder)
    assert folder.index["kind"] == MASKS and "error" in folder.index["items"][3]

    # A latent folder for the same samples (synthetic latents of the right shape), then the index.
    lat = write_latent_cache(latents.path, latents.items, [torch.randn(4, 16, 16) for _ in range(5)])
    text = write_text_cache(tmp_path / "cache" / "text" / "t", [s.caption for s in samples],
                            [(torch.randn(6, 32), torch.ones(6, dtype=torch.int64)) for _ in samples])
    members = [((spec, samples, report), lat)]
    lines: list[str] = []
    cs = _cache_set(tmp_path / "cache", text, members, lines.append, masks={"d": folder})
    assert len(cs) == 4 and report.used == 4 and [Path(p).stem for p in report.skipped[UNREADABLE_MASK]] == ["3"]
    assert "its mask could not be loaded" in lines[0]
    reader = open_reader(cs)
    for i in range(4):
        stem = Path(cs.image_paths[i]).stem
        sample = next(s for s in samples if Path(s.image_path).stem == stem)
        batch = reader.batch([i])
        assert torch.equal(batch["loss_mask"][0], load_mask(sample.mask, sample.geometry, 4))
    reader.close()


def _world(root: Path, masks_of: dict[str, list[torch.Tensor] | None], weights: dict[str, float]):
    """Synthetic caches: datasets of 4 latents [4, 8, 8] each, with the given masks [1, 8, 8] and loss weights."""
    generator = torch.Generator().manual_seed(0)
    captions = [f"caption {i}" for i in range(8)]
    text = write_text_cache(root / "text" / "t", captions, [(torch.randn(6, 32, generator=generator),
                                                            torch.ones(6, dtype=torch.int64)) for _ in captions])
    parts = []
    for number, (name, masks) in enumerate(masks_of.items()):
        paths = [f"/data/{name}/{i}.png" for i in range(4)]
        latents = write_latent_cache(root / "latents" / name, paths, [torch.randn(4, 8, 8, generator=generator) for _ in paths])
        mask_folder = write_mask_cache(root / "masks" / name, paths, masks) if masks is not None else None
        parts.append(SyntheticDataset(latents, [[(4 * number + i) % 8] for i in range(4)], name=name,
                                      loss_weight=weights.get(name, 1.0), masks=mask_folder))
    return cache_set_of(text, parts)


def test_the_reader_adds_masks_and_weights_only_when_they_change_the_loss(tmp_path: Path):
    half = torch.ones(1, 8, 8)
    half[:, :, :4] = 0.25
    cs = _world(tmp_path, {"plain": None, "white": [torch.ones(1, 8, 8)] * 4, "half": [half] * 4},
                {"half": 2.0})
    assert cs.has_masks and list(cs.loss_weights) == [1.0] * 8 + [2.0] * 4
    assert list(cs.mask_file[:4]) == [-1] * 4 and (cs.mask_file[4:] >= 0).all()
    reader = open_reader(cs)
    plain, white, half_batch = reader.batch([0, 1]), reader.batch([4, 5]), reader.batch([8, 9])
    # All white: no loss_mask (the exact, unmasked loss); no weight other than 1: no loss_weight.
    assert set(plain) == set(white) == {"latents", "prompt_embeds", "prompt_attention_mask"}
    assert torch.equal(half_batch["loss_mask"], torch.stack([half, half]))
    assert torch.equal(half_batch["loss_weight"], torch.tensor([2.0, 2.0]))
    # A batch mixing a masked and an unmasked sample: ones for the one without a mask.
    mixed = reader.batch([0, 8])
    assert torch.equal(mixed["loss_mask"], torch.stack([torch.ones(1, 8, 8), half]))
    assert torch.equal(mixed["loss_weight"], torch.tensor([1.0, 2.0]))
    reader.close()


def test_an_all_white_mask_trains_bit_for_bit_like_no_mask(tmp_path: Path):
    """The same latents and captions with and without an all-white mask: identical batches, so
    identical losses and gradients (not merely close)."""
    from diffusers import SanaTransformer2DModel

    from sana_ray.model.flow import flow_matching_loss
    from sana_ray.model.tiny import TRANSFORMER_CONFIG

    generator = torch.Generator().manual_seed(0)
    text = write_text_cache(tmp_path / "text" / "t", ["a", "b"], [(torch.randn(6, 32, generator=generator),
                                                                 torch.ones(6, dtype=torch.int64)) for _ in range(2)])
    latents = [torch.randn(4, 8, 8, generator=generator) for _ in range(2)]
    paths = ["/x/0.png", "/x/1.png"]
    plain = cache_set(text, write_latent_cache(tmp_path / "latents" / "a", paths, latents), [[0], [1]])
    masked = cache_set(text, write_latent_cache(tmp_path / "latents" / "b", paths, latents), [[0], [1]],
                       masks=write_mask_cache(tmp_path / "masks" / "b", paths, [torch.ones(1, 8, 8)] * 2))
    losses, grads = [], []
    for cs in (plain, masked):
        batch = open_reader(cs).batch([0, 1])
        torch.manual_seed(0)
        transformer = SanaTransformer2DModel(**TRANSFORMER_CONFIG)
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        loss = flow_matching_loss(transformer, batch["latents"], batch["prompt_embeds"], batch["prompt_attention_mask"],
                                  sigmas=torch.tensor([0.4, 0.7]), noise=noise,
                                  loss_mask=batch.get("loss_mask"), sample_weights=batch.get("loss_weight"))
        loss.backward()
        losses.append(loss)
        grads.append([p.grad for p in transformer.parameters()])
    assert torch.equal(losses[0], losses[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_online_samples_get_their_masks_from_the_worker(tmp_path: Path):
    """A cache_latents: false dataset's masks are made by the reader with the mask cache's code."""
    from sana_ray.data.cache.build import _plan_online
    from sana_ray.model.latents import LatentEncoder
    from sana_ray.model.loading import resolve_pretrained

    source = resolve_pretrained("tiny", tmp_path / "models")
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(3):
        Image.new("RGB", (96, 64), (90 * i, 50, 50)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"online {i}")
        _grey_picture(96, 64, seed=10 + i).save(masks / f"{i}.png")
    spec = DatasetSpec(name="o", path=images, mask_path=masks, resolution=64, crop_style="random", cache_latents=False)
    samples, report = discover_samples(spec)
    model = ModelSpec(pretrained="tiny")
    online = _plan_online(spec, samples, source, model, tmp_path / "cache" / "latents")
    text = write_text_cache(tmp_path / "cache" / "text" / "t", [s.caption for s in samples],
                            [(torch.randn(6, 32), torch.ones(6, dtype=torch.int64)) for _ in samples])
    cs = _cache_set(tmp_path / "cache", text, [((spec, samples, report), online)], lambda _: None)
    assert cs.has_masks and cs.mask_image(0) == samples[0].mask and (cs.mask_file == -1).all()
    vae = LatentEncoder.from_pretrained(source, device="cpu", dtype=torch.float32)
    reader = open_reader(cs, encoder=vae)
    batch = reader.batch([0, 1, 2])
    expected = torch.stack([load_mask(s.mask, s.geometry, 4) for s in samples])
    assert torch.equal(batch["loss_mask"], expected) and batch["loss_mask"].shape == (3, 1, 16, 16)
    assert batch["latents"].shape == (3, 4, 16, 16)

    # A mask deleted after discovery: its image is skipped like an unreadable one, the run goes on.
    (masks / "1.png").unlink()
    batch = reader.batch([0, 1, 2])
    assert torch.equal(batch["loss_mask"][1], expected[0]) and list(reader.unreadable) == [samples[1].image_path]
    reader.close()


def test_schema_rules_for_masks_and_weights(tmp_path: Path):
    with pytest.raises(ValueError, match="mask_path and loss_weight are for training datasets"):
        DatasetSpec(name="e", path=tmp_path, dataset_type="eval", mask_path=tmp_path)
    with pytest.raises(ValueError, match="mask_path and loss_weight are for training datasets"):
        DatasetSpec(name="e", path=tmp_path, dataset_type="eval", loss_weight=2.0)
    with pytest.raises(ValueError, match="remove loss_weight, mask_path"):
        DatasetSpec(name="t", dataset_type="text_embeds", mask_path=tmp_path, loss_weight=2.0)
    with pytest.raises(ValueError):
        DatasetSpec(name="d", path=tmp_path, loss_weight=0)
    assert DatasetSpec(name="d", path=tmp_path).loss_weight == 1.0
