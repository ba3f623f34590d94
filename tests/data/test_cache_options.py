"""One real Ray Data build (tiny model) over the dataset options: awkward images, caption choices
and dropout (the empty-prompt row), eval sets, a disabled entry, the text store's folder and
write_batch_size, vae_batch_size, and latent shapes following every image's planned geometry."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from sana_ray.data.cache import build_caches, open_reader
from sana_ray.data.cache.build import _plan_latents
from sana_ray.data.samples import discover_samples
from sana_ray.data.synthetic import make_shapes
from sana_ray.manifest.schema import DatasetSpec, ModelSpec
from tests.data.bad_images import make_bad_images, png_header_only

MODEL = ModelSpec(pretrained="tiny")


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local):
    from sana_ray.model.loading import resolve_pretrained

    root = tmp_path_factory.mktemp("options")
    source = resolve_pretrained("tiny", root / "models")
    mixed = make_bad_images(root / "mixed")
    (mixed / "ok_rgb.txt").write_text("a green square\na plain green picture\n")  # two caption choices
    png_header_only(mixed / "nodata.png", 64, 64)  # passes discovery (valid chunks), fails to decode
    (mixed / "nodata.txt").write_text("no pixel data")
    shapes = root / "shapes"
    make_shapes(shapes, count=3, size=64, seed=1)
    Image.new("RGB", (128, 64), (250, 0, 0)).save(shapes / "wide.png")
    (shapes / "wide.txt").write_text("a wide red picture")
    held = root / "held"
    make_shapes(held, count=2, size=64, seed=9)

    specs = [
        DatasetSpec(name="mixed", path=mixed, resolution=32, crop=False, minimum_image_size=32,
                    vae_batch_size=3, caption_dropout_probability=0.5),
        DatasetSpec(name="area", path=shapes, resolution=64, resolution_type="pixel_area", crop_aspect="preserve",
                    crop_style="random", probability=0.5, repeats=1, cache_dir="vae/area"),
        DatasetSpec(name="held", path=held, resolution=32, dataset_type="eval"),
        DatasetSpec(name="off", path=root / "missing", disabled=True),
        DatasetSpec(name="text", dataset_type="text_embeds", cache_dir="my-text", write_batch_size=2),
    ]
    lines: list[str] = []
    cache_set, reports = build_caches(specs, model_source=source, model=MODEL, cache_root=root / "cache",
                                      progress=lines.append)
    return {"root": root, "source": source, "specs": specs, "cache": cache_set, "reports": reports, "lines": lines}


def test_reports_and_sets(built):
    cs, reports = built["cache"], {r.dataset: r for r in built["reports"]}
    assert list(reports) == ["mixed", "area", "held"]  # disabled and text store left out
    mixed = reports["mixed"]
    assert mixed.used == 6 and mixed.found == 15  # 6 usable kinds; nodata.png failed in the encoder
    assert [Path(p).name for p in mixed.skipped["unreadable"]] == ["corrupt.png", "truncated.jpg", "truncated.png", "nodata.png"]
    assert str(built["root"] / "mixed" / "nodata.png") in mixed.details
    assert any("skipping unreadable" in line and "nodata.png" in line for line in built["lines"])
    # Training samples: mixed (6) + area (4); the eval set apart, never in training.
    assert Counter(cs.datasets) == {"mixed": 6, "area": 4}
    held = cs.eval_sets["held"]
    assert held.datasets == ["held"] * 2 and not set(held.image_paths) & set(cs.image_paths)
    assert held.text_dir == cs.text_dir
    assert cs.weights.tolist() == [1.0] * 6 + [0.5] * 4 and cs.groups.tolist() == [0] * 6 + [1] * 4
    plan = cs.batch_plan(batch_size=1, world_size=1, seed=0)
    assert plan.samples_per_epoch == 6 + round(0.5 * 4 * 2)


def test_store_folders_and_shard_sizes(built):
    cs, root = built["cache"], built["root"]
    text_dir = Path(cs.text_dir)
    assert text_dir.parent == root / "cache" / "my-text"
    index = json.loads((text_dir / "index.json").read_text())
    assert "" in index["captions"] and "a plain green picture" in index["captions"]  # dropout row, every choice
    assert index["shard_size"] == 2  # write_batch_size
    assert len(list(text_dir.glob("shard_*.safetensors"))) == math.ceil(index["items_count"] / 2)
    assert Path(cs.latent_dirs[1]).parent == root / "cache" / "vae" / "area"  # the dataset's own cache_dir
    assert cs.files[cs.latent_file[-1]].startswith(str(root / "cache" / "vae" / "area"))  # outside <cache>/latents
    mixed_dir = Path(cs.latent_dirs[0])
    assert len(list(mixed_dir.glob("shard_*.safetensors"))) == math.ceil(7 / 3)  # vae_batch_size 3 (7 images encoded)


def test_latent_shapes_follow_the_planned_geometry(built):
    cs = built["cache"]
    data = open_reader(cs)
    by_path = {}
    for spec in built["specs"][:2]:
        samples, _ = discover_samples(spec)
        by_path.update({s.image_path: s for s in samples})
    for i, path in enumerate(cs.image_paths):
        w, h = by_path[path].geometry.size
        assert cs.bucket_shapes[cs.buckets[i]] == (4, h // 4, w // 4)  # the tiny VAE downsamples 4x
    names = {Path(p).name: i for i, p in enumerate(cs.image_paths)}
    assert cs.bucket_shapes[cs.buckets[names["exif_rotated.jpg"]]] == (4, 8, 8)
    assert cs.bucket_shapes[cs.buckets[names["wide.png"]]] == (4, 8, 24)  # pixel_area 64, aspect 2 -> 96x32
    assert len(cs.bucket_shapes) >= 2
    # The eval set loads on its own.
    held = open_reader(cs.eval_sets["held"])
    assert held.batch([0, 1])["latents"].shape == (2, 4, 8, 8)
    assert data.batch([names["cmyk.jpg"]])["latents"].abs().sum() > 0


def test_caption_choices_and_dropout(built):
    from diffusers import SanaPipeline

    from sana_ray.model.loading import load_text_encoder
    from sana_ray.model.text import DEFAULT_INSTRUCTION

    cs = built["cache"]
    data = open_reader(cs)
    assert cs.null_text_row is not None
    null_embeds, null_mask = data.read_text([cs.null_text_row])
    # The empty-prompt row is exactly what SanaPipeline uses for negative_prompt="" (no instruction prefix).
    tokenizer, encoder = load_text_encoder(built["source"], torch_dtype=torch.float32)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None, transformer=None, scheduler=None)
    _, _, negative, negative_mask = pipe.encode_prompt(
        "a cat", do_classifier_free_guidance=True, negative_prompt="", device="cpu", clean_caption=False,
        max_sequence_length=300, complex_human_instruction=DEFAULT_INSTRUCTION)
    assert torch.allclose(null_embeds[0], negative[0], atol=1e-6)
    assert torch.equal(null_mask[0], negative_mask[0].to(torch.int64))

    ok = cs.image_paths.index(str(built["root"] / "mixed" / "ok_rgb.png"))
    choices = cs.choices(ok)
    assert len(choices) == 2
    # No key: the first caption, no dropout (what the first version did).
    assert data.batch([ok])["prompt_embeds"].equal(data.read_text([choices[0]])[0])
    drawn = Counter(int(data.text_rows_for([ok], key=(7, 0, step))[0]) for step in range(400))
    assert set(drawn) == {*choices, cs.null_text_row}
    assert 150 < drawn[cs.null_text_row] < 250  # caption_dropout_probability 0.5
    assert data.text_rows_for([ok, ok], key=(7, 0, 3)) == data.text_rows_for([ok, ok], key=(7, 0, 3))
    # The area set has no dropout: never the empty prompt.
    area = [i for i, d in enumerate(cs.datasets) if d == "area"]
    rows = {int(r) for step in range(50) for r in data.text_rows_for(area[:2], key=(1, 1, step))}
    assert cs.null_text_row not in rows


def test_changed_option_changes_the_latent_key(tmp_path):
    """The key follows each image's planned geometry: options that change it make a new cache,
    options that do not (here) reuse it."""
    (tmp_path / "d").mkdir()
    Image.new("RGB", (256, 128), (1, 2, 3)).save(tmp_path / "d" / "wide.png")
    (tmp_path / "d" / "wide.txt").write_text("wide")
    base = DatasetSpec(name="d", path=tmp_path / "d", resolution=64)

    def key(**update) -> str:
        spec = base.model_copy(update=update)
        samples, _ = discover_samples(spec)
        return _plan_latents(spec, samples, "model", MODEL, tmp_path, 8).key

    keys = [key(), key(crop_style="corner"), key(crop_aspect="preserve"), key(resolution_type="pixel_area", crop=False),
            key(resolution=32), key(maximum_image_size=100.0)]
    assert len(set(keys)) == 6
    assert key(crop=False) == key(crop_aspect="preserve")  # the same pixels: the same cache
    assert key(minimum_image_size=8.0) == keys[0]


def test_streamed_rows_are_the_shards_tensors(built):
    """What a worker reads for each sample of a real build (several buckets and folders, caption
    choices) is the tensor safetensors loads from that sample's shard: every byte range is right."""
    from safetensors.torch import load_file

    cs = built["cache"]
    reader = open_reader(cs)
    index = {}
    for folder in cs.latent_dirs:
        for item in json.loads((Path(folder) / "index.json").read_text())["items"]:
            index[item["path"]] = (Path(folder) / item["shard"], item["row"])
    text = [load_file(path) for path in cs.text.files]
    rows = cs.text.rows_per_shard
    for i, path in enumerate(cs.image_paths):
        shard, row = index[path]
        first = cs.choices(i)[0]
        batch = reader.batch([i])
        assert torch.equal(batch["latents"][0], load_file(str(shard))[f"latents.{row}"])
        assert torch.equal(batch["prompt_embeds"][0], text[first // rows]["prompt_embeds"][first % rows])
        assert torch.equal(batch["prompt_attention_mask"][0], text[first // rows]["prompt_attention_mask"][first % rows])
