"""The streamed cache reader (data.cache.reader) on synthetic caches written by the build's own code.

No Ray and no encoders: ``data.cache.synthetic`` writes shards, checksum records and index.json
with the build's writer and makes the CacheSet with the build's indexer. The reference for every
tensor is safetensors' own ``load_file`` of the whole shard (what the first version of the loader
did), so a wrong byte offset, dtype or row cannot pass. That the streamed batches equal the old
in-memory loader's batch for batch (same caption draws and dropout) was also checked once against
the previous release's code on a real build (docs/data.md, "Streaming").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sana_ray.data.cache import Prefetcher, open_reader, store
from sana_ray.data.cache.build import EMPTY_PROMPT, _plan_text, text_store_dtype
from sana_ray.data.cache.synthetic import cache_set, write_latent_cache, write_text_cache
from sana_ray.data.samples import DataError, Sample
from sana_ray.manifest.schema import ModelSpec

SHAPES = [(4, 8, 8), (4, 8, 12), (4, 12, 8)]
CAPTIONS = [EMPTY_PROMPT] + [f"caption {i}" for i in range(9)]  # row 0: the caption-dropout row


def _world(root: Path, *, dtype=torch.float32, count: int = 17, seed: int = 0):
    """``count`` samples over three latent buckets, 1-3 caption choices each, caption dropout 0.25."""
    generator = torch.Generator().manual_seed(seed)
    rows = [(torch.randn(12, 32, generator=generator), torch.randint(0, 2, (12,), generator=generator)) for _ in CAPTIONS]
    latents = [torch.randn(*SHAPES[i % 3], generator=generator) for i in range(count)]
    text = write_text_cache(root / "text" / "t", CAPTIONS, rows, shard_size=3, dtype=dtype)
    images = write_latent_cache(root / "latents" / "l", [f"/data/{i}.png" for i in range(count)], latents, shard_size=4)
    choices = [tuple(1 + (i + j) % 9 for j in range(1 + i % 3)) for i in range(count)]
    return cache_set(text, images, choices, dropout=0.25), text, images


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return _world(tmp_path_factory.mktemp("reader"))


def _reference(text, images) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(latents per sample, all embeds, all masks) by loading every shard whole with safetensors."""
    shards = [load_file(str(images.path / store.shard_name(s))) for s in range(images.num_shards)]
    latents = [shards[i // images.shard_size][f"latents.{i % images.shard_size}"] for i in range(len(images.items))]
    parts = [load_file(str(text.path / store.shard_name(s))) for s in range(text.num_shards)]
    return latents, torch.cat([p["prompt_embeds"] for p in parts]), torch.cat([p["prompt_attention_mask"] for p in parts])


def _draw(cs, indices, key) -> list[int]:
    """The caption draw of the first version (CachedData.text_rows_for), written out: the contract."""
    import hashlib

    digest = hashlib.sha256(f"sana-ray-captions:{json.dumps(key, default=str)}".encode()).digest()
    draws = torch.rand(len(indices), 2, generator=torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1),
                       dtype=torch.float64).tolist()
    rows = []
    for i, (drop, pick) in zip(indices, draws):
        choices = cs.choices(i)
        rows.append(cs.null_text_row if drop < 0.25 else choices[min(int(pick * len(choices)), len(choices) - 1)])
    return rows


def test_batches_are_the_shards_bytes_with_the_documented_caption_draws(world):
    cs, text, images = world
    latents, embeds, masks = _reference(text, images)
    reader = open_reader(cs)
    assert cs.bucket_shapes == SHAPES and cs.null_text_row == 0 and cs.text.dtype == "F32"
    for i in range(len(cs)):  # every sample alone: its first caption, no dropout
        batch = reader.batch([i])
        first = cs.choices(i)[0]
        assert torch.equal(batch["latents"][0], latents[i])
        assert torch.equal(batch["prompt_embeds"][0], embeds[first]) and torch.equal(batch["prompt_attention_mask"][0], masks[first])
    plan = cs.batch_plan(batch_size=2, world_size=2, seed=5)
    dropped = chosen = 0
    for micro_batch in range(plan.global_batches_per_epoch() * 4):  # several epochs, both ranks, all buckets
        for rank in range(2):
            indices, key = plan.batch(micro_batch, rank), (5, rank, micro_batch)
            batch, rows = reader.batch(indices, key=key), _draw(cs, indices, key)
            assert reader.text_rows_for(indices, key) == rows
            assert torch.equal(batch["latents"], torch.stack([latents[i] for i in indices]))
            assert torch.equal(batch["prompt_embeds"], embeds[rows]) and torch.equal(batch["prompt_attention_mask"], masks[rows])
            dropped += rows.count(0)
            chosen += sum(r != cs.choices(i)[0] for i, r in zip(indices, rows) if r != 0)
    assert dropped and chosen  # the draws exercised dropout and other caption lines
    reader.close()


def test_prefetcher_yields_the_readers_batches_in_order_and_from_a_resume_point(world):
    cs = world[0]
    reader = open_reader(cs)
    plan = cs.batch_plan(batch_size=2, world_size=1, seed=1)
    want = {m: reader.batch(plan.batch(m, 0), key=(1, 0, m)) for m in range(24)}
    for start, depth in ((0, 2), (9, 3), (9, 0)):  # 9: a resumed run; depth 0: no thread
        prefetcher = Prefetcher(reader, plan, rank=0, seed=1, start=start, stop=24, depth=depth)
        for m in range(start, 24):
            got = prefetcher.get(m)
            assert all(torch.equal(got[k], want[m][k]) for k in got), (start, depth, m)
        with pytest.raises(IndexError):
            prefetcher.get(24)
        prefetcher.close()
    prefetcher = Prefetcher(reader, plan, rank=0, seed=1, start=0, stop=24)
    with pytest.raises(RuntimeError, match="asked for micro-batch 3"):
        prefetcher.get(3)
    prefetcher.close()


def test_a_read_error_in_the_prefetch_thread_reaches_the_loop(tmp_path):
    cs, _, images = _world(tmp_path)
    reader = open_reader(cs)
    plan = cs.batch_plan(batch_size=1, world_size=1, seed=0)
    prefetcher = Prefetcher(reader, plan, rank=0, seed=0, start=0, stop=10, depth=1)
    prefetcher.get(0)
    prefetcher.close()
    for s in range(images.num_shards):  # truncated while the run reads them
        path = images.path / store.shard_name(s)
        os.truncate(path, path.stat().st_size // 2)
    from sana_ray.data.cache import CacheReader

    reader = CacheReader(cs, check_files=False)  # as if opened before the damage
    prefetcher = Prefetcher(reader, plan, rank=0, seed=0, start=0, stop=10, depth=2)
    with pytest.raises(DataError, match="short read .* truncated while the run was reading it"):
        for m in range(10):
            prefetcher.get(m)
    prefetcher.close()


def test_damaged_or_missing_shards_stop_the_worker_at_open_with_the_fix(tmp_path):
    cs, text, images = _world(tmp_path)
    shard = images.path / store.shard_name(1)
    os.truncate(shard, shard.stat().st_size - 10)
    with pytest.raises(DataError) as error:
        open_reader(cs)
    message = str(error.value)
    assert str(shard) in message and "truncated or replaced" in message and "apply the manifest again" in message
    shard.unlink()
    with pytest.raises(DataError, match=f"cache shard {shard} is missing on node {os.uname().nodename}"):
        open_reader(cs)


def test_a_node_that_cannot_see_the_cache_is_told_so(tmp_path):
    cs, _, _ = _world(tmp_path / "shared")
    os.rename(tmp_path / "shared", tmp_path / "elsewhere")  # what a node without the shared mount sees
    with pytest.raises(DataError) as error:
        open_reader(cs)
    message = str(error.value)
    assert f"node {os.uname().nodename} cannot see the cache folder {tmp_path / 'shared'}" in message
    assert "shared storage" in message and "same path" in message


def test_bf16_text_rows_are_the_float32_rows_rounded(tmp_path):
    cs32, _, _ = _world(tmp_path / "f32", dtype=torch.float32)
    cs16, _, _ = _world(tmp_path / "bf16", dtype=torch.bfloat16)
    assert cs16.text.dtype == "BF16"
    a, b = open_reader(cs32).batch(list(range(0, 17, 3))), open_reader(cs16).batch(list(range(0, 17, 3)))
    assert b["prompt_embeds"].dtype == torch.bfloat16
    assert torch.equal(b["prompt_embeds"], a["prompt_embeds"].to(torch.bfloat16))
    assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["prompt_attention_mask"], b["prompt_attention_mask"])
    # Half the bytes on disk.
    assert sum(cs16.text.sizes) < 0.6 * sum(cs32.text.sizes)


def test_bf16_rows_lose_nothing_under_bf16_autocast():
    """The fact the bf16 store rests on: under bf16 autocast SanaTransformer2DModel's first use of
    encoder_hidden_states is the caption_projection linear layer, which casts its input to bf16, so
    fp32 rows and the same rows rounded to bf16 give bit-identical outputs."""
    from diffusers import SanaTransformer2DModel

    from sana_ray.model.tiny import TRANSFORMER_CONFIG

    torch.manual_seed(0)
    model = SanaTransformer2DModel(**TRANSFORMER_CONFIG).eval()
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 12, 32)
    mask = torch.ones(2, 12, dtype=torch.int64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=torch.tensor([300.0, 700.0]))[0]
        rounded = model(x, encoder_hidden_states=text.to(torch.bfloat16).float(), encoder_attention_mask=mask,
                        timestep=torch.tensor([300.0, 700.0]))[0]
    assert torch.equal(full, rounded)
    with torch.no_grad():  # without autocast (fp32 training) the rounding does change the output
        fp32 = model(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=torch.tensor([300.0, 700.0]))[0]
        lossy = model(x, encoder_hidden_states=text.to(torch.bfloat16).float(), encoder_attention_mask=mask,
                      timestep=torch.tensor([300.0, 700.0]))[0]
    assert not torch.equal(fp32, lossy)


def test_text_key_keeps_float32_caches_and_separates_bf16(tmp_path):
    """A float32 store keeps the key earlier versions gave it (their caches stay valid); bf16 gets its own."""
    model = ModelSpec(pretrained="tiny")
    samples = [Sample(dataset="d", image_path="/a.png", caption="a cat")]
    old_key = store.digest({"format": 1, "kind": "text", "model": "fp", "variant": None, "dtype": "float32",
                            "instruction": None, "max_sequence_length": 300, "captions": ["a cat"]})
    assert _plan_text(samples, "fp", model, None, tmp_path, 8).key == old_key
    assert _plan_text(samples, "fp", model, None, tmp_path, 8, store_dtype="bfloat16").key != old_key
    assert text_store_dtype(model, bf16_training=True) == "bfloat16" and text_store_dtype(model, bf16_training=False) == "float32"
    assert text_store_dtype(ModelSpec(pretrained="tiny", text_embeds_dtype="float32"), bf16_training=True) == "float32"


def test_bf16_text_with_fp32_training_is_a_manifest_error(tmp_path):
    from sana_ray.manifest import ManifestError, load_manifest

    path = tmp_path / "m.yaml"
    path.write_text(textwrap.dedent("""\
        apiVersion: sana-ray/v1
        kind: TrainingRun
        metadata: {name: m}
        spec:
          model: {pretrained: tiny, text_embeds_dtype: bfloat16}
          datasets: [{name: d, path: .}]
          training: {steps: 1}
        """))
    with pytest.raises(ManifestError, match="text_embeds_dtype is bfloat16 but training does not compute in bf16"):
        load_manifest(path)
    assert load_manifest(path, ["training.mixed_precision=bf16"]).spec.bf16_training()
    assert load_manifest(path, ["model.text_embeds_dtype=auto", "hardware.use_gpu=true"]).spec.bf16_training()


MEMORY_PROBE = """
import json, pickle, sys, torch
from pathlib import Path
from sana_ray.data.cache import Prefetcher, open_reader

def peak_mb():
    status = Path("/proc/self/status").read_text()
    return int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) / 1024

torch.randn(1)  # torch's own start-up before the baseline
before = peak_mb()
cs = pickle.loads(Path(sys.argv[1]).read_bytes())  # what Ray hands a worker
reader = open_reader(cs)
plan = cs.batch_plan(batch_size=8, world_size=1, seed=0)
prefetcher = Prefetcher(reader, plan, rank=0, seed=0, start=0, stop=60, depth=2)
for m in range(60):
    prefetcher.get(m)
prefetcher.close()
print(json.dumps({"before": before, "peak": peak_mb()}))
"""


def _real_shaped_cache(root: Path, count: int) -> Path:
    """``count`` samples with 300-token text rows (64 channels: 77 KB a row) and 4x16x16 latents;
    returns the pickled CacheSet's path."""
    import pickle

    generator = torch.Generator().manual_seed(0)
    rows = ((torch.randn(300, 64, generator=generator), torch.ones(300, dtype=torch.int64)) for _ in range(count))
    text = write_text_cache(root / "text" / "t", [f"c{i}" for i in range(count)], rows, shard_size=64)
    latents = (torch.randn(4, 16, 16, generator=generator) for _ in range(count))
    images = write_latent_cache(root / "latents" / "l", [f"/x/{i}.png" for i in range(count)], latents, shard_size=64)
    path = root / "cache_set.pkl"
    path.write_bytes(pickle.dumps(cache_set(text, images, [(i,) for i in range(count)])))
    return path


def test_worker_memory_does_not_grow_with_the_dataset(tmp_path):
    """A training worker's peak memory with 300 and with 3,000 samples (230 MB of text rows more):
    it grows by the index alone (~200 bytes a sample), far below the data's size (an in-memory
    loader grows by the data). Each probe is a fresh process reading 60 batches of 8."""
    probe = tmp_path / "probe.py"
    probe.write_text(MEMORY_PROBE)
    peaks = {}
    for count in (300, 3000):
        pickled = _real_shaped_cache(tmp_path / str(count), count)
        out = subprocess.run([sys.executable, str(probe), str(pickled)], capture_output=True, text=True, timeout=300,
                             env=os.environ | {"OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[count] = json.loads(out.stdout.strip().splitlines()[-1])
    data_mb = 2700 * (300 * 64 * 4 + 4 * 16 * 16 * 4) / 1e6  # the extra samples' rows
    grown = (peaks[3000]["peak"] - peaks[3000]["before"]) - (peaks[300]["peak"] - peaks[300]["before"])
    assert grown < 20, f"peak memory grew {grown:.0f} MB for {data_mb:.0f} MB more data: {peaks}"
