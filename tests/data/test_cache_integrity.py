"""Cache shards that are damaged on disk, or left behind by a killed build, are found and redone alone.

One reference build (8 generated images, the tiny model, shards of 2: 4 text + 4 latent shards)
is shared by the module; each test damages or interrupts something, builds again and compares
the result with the reference, tensor for tensor. The kill test runs the build in a real
separate process (its own local Ray, Ray Data actor pool of 2) and SIGKILLs its process group;
``SANA_RAY_CACHE_HOLD_AT_SHARD`` parks the encoder actors at a known shard first, so the kill
lands at the same point on any machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sana_ray.data.cache import build as cache_module
from sana_ray.data.cache import build_caches, open_reader, store
from sana_ray.data.synthetic import make_shapes
from sana_ray.manifest.schema import DatasetSpec, ModelSpec

MODEL = ModelSpec(pretrained="tiny")
SHARD_SIZE = 2
IMAGES = 8  # 8 distinct captions too: 4 text shards, then 4 latent shards in the build's queue


def _spec(images: Path) -> DatasetSpec:
    return DatasetSpec(name="shapes", path=images, resolution=64)


def _build(world: dict, cache_root: Path, batch_size: int = SHARD_SIZE) -> tuple[object, list[str]]:
    lines: list[str] = []
    cache_set, _ = build_caches(
        [_spec(world["images"])], model_source=world["source"], model=MODEL, cache_root=cache_root,
        batch_size=batch_size, progress=lines.append,
    )
    return cache_set, lines


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    from sana_ray.model.loading import resolve_pretrained

    root = tmp_path_factory.mktemp("integrity")
    world = {"root": root, "source": resolve_pretrained("tiny", root / "models"), "images": root / "images"}
    make_shapes(world["images"], count=IMAGES, size=64, seed=3)
    world["cache_root"] = root / "cache"
    world["cache"], world["lines"] = _build(world, world["cache_root"])
    world["data"] = _tensors(world["cache"])
    return world


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder``: (inode, mtime_ns). A rewrite (temp file + rename) changes both."""
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _tensors(cache_set) -> list[dict[str, torch.Tensor]]:
    """Every sample's latents and text rows, as a training worker reads them."""
    reader = open_reader(cache_set)
    return [reader.batch([i]) for i in range(len(cache_set))]


def _assert_same_data(got: list, want: list) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _data_offset(path: Path) -> int:
    """Where a safetensors file's tensor bytes start (after the 8-byte length and the JSON header)."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def _folders(world: dict) -> tuple[Path, Path]:
    cs = world["cache"]
    return Path(cs.text_dir), Path(cs.latent_dirs[0])


def test_reference_build_records_a_checksum_per_shard(world):
    text_dir, latent_dir = _folders(world)
    for folder in (text_dir, latent_dir):
        shards = sorted(folder.glob("shard_*.safetensors"))
        assert len(shards) == IMAGES // SHARD_SIZE
        for shard in shards:
            record = json.loads((folder / (shard.name + ".sha256")).read_text())
            assert record["size"] == shard.stat().st_size
            assert record["sha256"] == store.file_sha256(shard)
    assert not any(p.name.endswith(".tmp") for p in world["cache_root"].rglob("*"))


def test_flipped_bytes_in_tensor_data_rebuild_exactly_that_shard(world):
    text_dir, latent_dir = _folders(world)
    shard = latent_dir / "shard_00001.safetensors"
    items = json.loads((latent_dir / "index.json").read_text())["items"]
    shard_items = [item["path"] for item in items if item["shard"] == shard.name]
    offset = _data_offset(shard) + 100
    with shard.open("r+b") as handle:  # in place: same inode, same size, header untouched
        handle.seek(offset)
        original = handle.read(4)
        handle.seek(offset)
        handle.write(bytes(b ^ 0xFF for b in original))
    # The header still parses and names the right items: without a checksum this went unnoticed.
    assert store.read_header(shard).items() == shard_items
    before = _files(world["cache_root"])

    cs, lines = _build(world, world["cache_root"])

    assert f"latents shapes: {shard} is damaged: sha256 differs from the one recorded when it was written " \
           f"(damaged data); rebuilding it" in lines, lines
    assert f"latents shapes: 6/8 images already cached in {latent_dir}, encoding the rest" in lines
    assert any(line.startswith(f"reusing text embeddings cache {text_dir} (8 captions; 4 shards verified") for line in lines)
    after = _files(world["cache_root"])
    changed = {name for name in before if after.get(name) != before[name]}
    key = latent_dir.name
    assert changed == {f"latents/{key}/shard_00001.safetensors", f"latents/{key}/shard_00001.safetensors.sha256",
                       f"latents/{key}/index.json"}, changed
    assert set(after) == set(before)
    assert cs == world["cache"]
    _assert_same_data(_tensors(cs), world["data"])


def test_truncated_shards_are_rebuilt_and_older_shards_adopted(world):
    """A truncated shard (with or without a checksum record) and a deleted one are rebuilt; an
    intact shard from an older build (no record) is re-verified and kept, and gets its record. A
    complete folder keeps its shard layout even when the configured shard size changed."""
    text_dir, latent_dir = _folders(world)
    truncated = text_dir / "shard_00002.safetensors"
    truncated.write_bytes(truncated.read_bytes()[: _data_offset(truncated) + 1000])
    legacy_truncated = text_dir / "shard_00003.safetensors"
    (text_dir / "shard_00003.safetensors.sha256").unlink()
    with legacy_truncated.open("r+b") as handle:
        handle.truncate(legacy_truncated.stat().st_size - 64)
    (latent_dir / "shard_00000.safetensors.sha256").unlink()  # an older build's intact shard
    (latent_dir / "shard_00003.safetensors").unlink()
    before = _files(world["cache_root"])

    cs, lines = _build(world, world["cache_root"], batch_size=4)  # the folders keep their shards of 2

    assert any(line.startswith(f"text embeddings: {truncated} is damaged: ") and "were written (truncated" in line
               for line in lines), lines
    assert any(line.startswith(f"text embeddings: {legacy_truncated} is damaged: unreadable (") for line in lines), lines
    assert "text embeddings: 4/8 captions already cached in " + str(text_dir) + ", encoding the rest" in lines
    assert "latents shapes: 1 shard(s) from an older build had no checksum: re-verified, checksum recorded" in lines
    assert "latents shapes: 6/8 images already cached in " + str(latent_dir) + ", encoding the rest" in lines
    after = _files(world["cache_root"])
    changed = {name for name in before if after.get(name) != before[name]}
    tkey, lkey = text_dir.name, latent_dir.name
    assert changed == {f"text/{tkey}/shard_00002.safetensors", f"text/{tkey}/shard_00002.safetensors.sha256",
                       f"text/{tkey}/shard_00003.safetensors", f"text/{tkey}/index.json",
                       f"latents/{lkey}/shard_00003.safetensors.sha256", f"latents/{lkey}/index.json"}, changed
    assert set(after) - set(before) == {f"text/{tkey}/shard_00003.safetensors.sha256",
                                        f"latents/{lkey}/shard_00000.safetensors.sha256",
                                        f"latents/{lkey}/shard_00003.safetensors"}
    for folder in (text_dir, latent_dir):
        assert json.loads((folder / "index.json").read_text())["shard_size"] == SHARD_SIZE
        assert len(list(folder.glob("shard_*.safetensors"))) == IMAGES // SHARD_SIZE
    record = json.loads((latent_dir / "shard_00000.safetensors.sha256").read_text())
    assert record["sha256"] == store.file_sha256(latent_dir / "shard_00000.safetensors")
    _assert_same_data(_tensors(cs), world["data"])


RUNNER = """
import json, sys
from pathlib import Path
from sana_ray.data.cache import build_caches
from sana_ray.manifest.schema import DatasetSpec, ModelSpec
args = json.loads(sys.argv[1])
build_caches([DatasetSpec(name="shapes", path=args["images"], resolution=64)], model_source=args["source"],
             model=ModelSpec(pretrained="tiny"), cache_root=Path(args["cache"]), batch_size=args["batch_size"],
             num_actors=2, progress=lambda line: print(line, flush=True))
print("build finished", flush=True)
"""
HOLD_AT = 6  # the 4 text shards and latent shards 0 and 1 are written; shard 2's temp file is left


def _session_processes(session: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session:
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_killed_build_resumes_without_redoing_finished_shards(world):
    cache_root = world["root"] / "killed-cache"
    log = world["root"] / "killed-build.log"
    args = {"images": str(world["images"]), "source": str(world["source"]), "cache": str(cache_root), "batch_size": SHARD_SIZE}
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-c", RUNNER, json.dumps(args)], start_new_session=True, stdout=sink,
            stderr=subprocess.STDOUT, env=os.environ | {cache_module.HOLD_ENV: str(HOLD_AT)},
        )

    def shards() -> list[Path]:
        return sorted(cache_root.rglob("shard_*.safetensors"))

    def temps() -> list[Path]:
        return sorted(cache_root.rglob("shard_*.safetensors.*.tmp"))

    deadline = time.time() + 600  # ~30 s on an idle 2-core machine
    try:
        while not (len(shards()) == HOLD_AT and temps()):
            assert process.poll() is None, f"the build ended before it could be killed:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"no shard {HOLD_AT} within 600 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        time.sleep(0.5)  # the actors are parked: nothing more appears
        assert len(shards()) == HOLD_AT and len(temps()) == 1 and process.poll() is None
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    deadline = time.time() + 60
    while _session_processes(process.pid):  # Ray's processes follow their driver (fate sharing)
        assert time.time() < deadline, f"processes of the killed build still run: {_session_processes(process.pid)}"
        time.sleep(0.2)

    text_dir, latent_dir = (cache_root / "text" / Path(world["cache"].text_dir).name,
                            cache_root / "latents" / Path(world["cache"].latent_dirs[0]).name)
    assert not (text_dir / "index.json").exists() and not (latent_dir / "index.json").exists()
    assert [p.name for p in temps()] and temps()[0].name.startswith("shard_00002.safetensors.")
    assert sorted(p.name for p in latent_dir.glob("shard_*.safetensors")) == ["shard_00000.safetensors", "shard_00001.safetensors"]
    finished = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards()}

    cs, lines = _build(world, cache_root)

    assert "text embeddings: 8/8 captions already cached in " + str(text_dir) + ", encoding the rest" in lines, lines
    assert "latents shapes: 4/8 images already cached in " + str(latent_dir) + ", encoding the rest" in lines, lines
    assert not any("damaged" in line for line in lines), lines
    for path, identity in finished.items():  # not one finished shard rewritten
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == identity, path
    assert sorted(p.name for p in latent_dir.glob("shard_*.safetensors")) == [f"shard_{i:05d}.safetensors" for i in range(4)]
    assert (text_dir / "index.json").is_file() and (latent_dir / "index.json").is_file()
    assert not [p for p in cache_root.rglob("*") if p.name.endswith(".tmp")]
    _assert_same_data(_tensors(cs), world["data"])
