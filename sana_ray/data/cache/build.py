"""Building the latent and text-embedding caches with Ray Data, keyed by everything that produced them.

Layout under ``cache_root``::

    latents/<key>/shard_00000.safetensors   one folder per (dataset images, resolution, crop, model)
                  ...                        tensors "latents.<row>" [C, h, w] float32
                  index.json                 written last (atomically): the folder is complete
    text/<key>/shard_00000.safetensors      one folder per (unique captions, model, instruction, L, dtype)
               ...                           "prompt_embeds" [n, L, C] float32 or bfloat16,
                                             "prompt_attention_mask" [n, L] int64
               index.json
    masks/<key>/shard_00000.safetensors     one folder per masked dataset's latent folder and mask files
                ...                          tensors "masks.<row>" [1, h, w] float32 in [0, 1] (latent grid)
                index.json

A latent key hashes the model fingerprint, the pixel pipeline version and every image's (path,
size, mtime, geometry) -- the geometry (downsample, resize, crop box) is planned at discovery from
all of the dataset's pixel options, so resolution, resolution_type, crop, crop_style, crop_aspect
and the size limits are all in the key; a text key hashes the model fingerprint, the instruction
prefix, ``max_sequence_length``, the storage dtype when it is not float32 (so float32 caches of
earlier versions keep their key) and the sorted unique captions (plus ``""``, the empty prompt,
encoded as SanaPipeline encodes ``negative_prompt=""``, when a dataset uses caption dropout).
Change any of them and a new folder is built; change nothing and the folder is reused without
starting Ray Data.

Loss masks (``datasets[].mask_path``) have folders of their own, keyed by the latent folder's key
(so by everything that decides the image geometry and the model), the mask pipeline version, the
VAE's downsampling factor and every mask file's (path, size, mtime): adding, changing or removing
masks never re-encodes latents. Their shards are built by the same actor pool as a third job kind
that needs no model (``images.load_mask``: the image's geometry, averaged down to the latent grid).
A ``cache_latents: false`` dataset's masks are computed by the workers, like its latents.

Text rows are stored in the dtype the transformer computes in (``model.text_embeds_dtype``,
default ``auto``: bfloat16 when training runs under bf16 autocast, float32 otherwise). The
encoder always runs in float32; under bf16 autocast the transformer's first operation on
``encoder_hidden_states`` is the ``caption_projection`` linear layer, which casts its input to
bf16, so a bf16 store loses nothing for bf16 training (tests/data/test_text_dtype.py checks the
forward is bit-identical) and halves the text cache's disk and I/O; fp32 training keeps fp32 rows.

Building splits a folder's items into shards (``vae_batch_size`` images or the text store's
``write_batch_size`` captions; default ``batch_size``; deterministic order) and maps
them through a pool of encoder actors with ``ray.data``: each actor loads its encoder once and
writes each shard itself (``store.write_shard``), so finished shards survive a kill and are not
redone by the next build. Each shard records its items in its safetensors metadata; a shard whose
items do not match (e.g. batch_size changed between builds) is rebuilt.

Checksums: every build that looks at a folder (complete or not) checks each shard's size and
sha256 against its record (up to VERIFY_THREADS files at a time; sha256 ran at ~1 GB/s per core
on a 2-core CPU machine, benchmarks/data_wait.py) and rebuilds only the shards that fail, saying
which and why. A shard from an older build, without a record, is re-verified (header parses,
every tensor's bytes present, items match) and its record is written then. Leftover temp files of
dead writers are removed when the folder is finished.

``cache_latents: false`` datasets (SimpleTuner's ``vae_cache_disable``) are planned (geometry,
buckets) but not encoded: their samples point at the image and its planned geometry, and the
training workers encode them (``reader``).

Every node that runs encoder actors or training workers must see ``cache_root`` (and a local
``model_source``) at the same path: on a multi-node cluster that means shared storage (or a copy
of the finished cache on every node at the same path; see docs/data.md).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from sana_ray.data.cache import store
from sana_ray.data.cache.index import CacheSet, TextShards
from sana_ray.data.images import MASKS_VERSION, PIXELS_VERSION, Geometry, PixelOptions
from sana_ray.data.samples import (
    UNREADABLE, UNREADABLE_MASK, DataError, DatasetReport, Sample, discover_datasets, text_store,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from sana_ray.manifest.schema import DatasetSpec, ModelSpec

EMPTY_PROMPT = ""  # the caption-dropout row: encoded without the instruction prefix, like negative_prompt=""
ENCODE_DTYPE = "float32"  # encoders run, and latents are stored, in float32 (exact, reproducible)
PROGRESS_INTERVAL_S = 5.0
DECODE_THREADS = 8  # per encoder actor
VERIFY_THREADS = 8  # shards hashed in parallel when a build checks a folder (hashlib releases the GIL)
DAMAGED_LINES = 10  # damaged shards named one per line, per folder; then a count
HOLD_ENV = "SANA_RAY_CACHE_HOLD_AT_SHARD"  # testing aid, see _injected_hold
ONLINE = "online"  # the kind of a cache_latents: false dataset's stand-in folder
MASKS = "masks"  # the kind of a loss-mask folder
MASK_SHARD_SIZE = 64  # masks per shard: a 1024 px mask is 4 KB at the latent grid, so shards can be larger
ROW_TENSOR = {"latents": "latents", MASKS: "masks"}  # per-image folders: tensor "<name>.<row>"
UNITS = {"text": "captions", MASKS: "masks"}  # progress lines; otherwise "images"

Progress = Callable[[str], None]


def text_store_dtype(model: "ModelSpec", *, bf16_training: bool) -> str:
    """The torch dtype name text rows are stored in: ``model.text_embeds_dtype``, where ``auto``
    is bfloat16 when training computes in bf16 (``bf16_training``) and float32 otherwise."""
    choice = getattr(model, "text_embeds_dtype", "auto")
    if choice == "auto":
        return "bfloat16" if bf16_training else "float32"
    return choice


@dataclass
class _Folder:
    """One cache folder to reuse or build."""

    kind: str  # "text", "latents", "masks" or "online"
    label: str  # for progress lines
    key: str
    path: Path
    items: list[str]  # captions or image paths, in row order
    shard_size: int
    params: dict[str, Any]  # latents: resolution, crop; text: store_dtype
    index: dict | None = None  # set once complete
    todo: list[int] = field(default_factory=list)  # shard numbers to encode
    extras: list | None = None  # latents: per item geometry; masks: per item [mask path, geometry] (travel with the job)
    headers: dict[int, store.ShardHeader] = field(default_factory=dict)  # shard -> its header, once verified

    def shard_items(self, shard: int) -> list[str]:
        return self.items[shard * self.shard_size : (shard + 1) * self.shard_size]

    @property
    def num_shards(self) -> int:
        return -(-len(self.items) // self.shard_size)


# --------------------------------------------------------------------------------------------
# The encoder actor (runs inside Ray Data)


class _ShardEncoder:
    """Ray Data actor: encodes and writes one shard per row; loads each encoder once, when first needed.

    One pool serves both caches (text shards are queued first), so a build pays for one actor
    start-up (imports, model loading) rather than one per cache. The model settings travel in
    each row (a few KB), so the class needs no constructor arguments.
    """

    def __init__(self) -> None:
        self.encoders: dict[str, Any] = {}

    def _encoder(self, kind: str, model: dict):
        import torch

        key = json.dumps([kind, model], sort_keys=True)
        cached = self.encoders.get(key)
        if isinstance(cached, Exception):
            raise cached  # loading failed for an earlier shard: fail this one fast too
        if cached is not None:
            return cached
        device = torch.device("cuda" if model["use_gpu"] and torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, ENCODE_DTYPE)
        try:
            if kind == "text":
                from sana_ray.model.text import PromptEncoder

                encoder = PromptEncoder.from_pretrained(
                    model["source"],
                    device=device,
                    dtype=dtype,
                    instruction=model["instruction"],
                    max_sequence_length=model["max_sequence_length"],
                    revision=model["revision"],
                    variant=model["variant"],
                    trust_remote_code=model["trust_remote_code"],
                )
            else:
                from sana_ray.model.latents import LatentEncoder

                encoder = LatentEncoder.from_pretrained(
                    model["source"], device=device, dtype=dtype, revision=model["revision"], variant=model["variant"]
                )
        except Exception as error:
            what = "text encoder" if kind == "text" else "VAE"
            failure = RuntimeError(f"cannot load the {what} from {model['source']}: {type(error).__name__}: {error}")
            self.encoders[key] = failure
            raise failure from error
        self.encoders[key] = (encoder, device, dtype)
        return self.encoders[key]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        results = []
        for text in batch["job"]:
            job = json.loads(str(text))
            try:
                result = self._encode_shard(job)
            except Exception as error:
                # Returned, not raised: Ray Data would bury the message under its own traceback,
                # and the other shards still get written (a rerun then has less to do).
                message = f"{type(error).__name__}: {error}".strip()
                result = {"folder": job["folder"], "shard": job["shard"], "count": 0, "error": message[:2000]}
            results.append(json.dumps(result))
        return {"result": np.array(results, dtype=object)}

    def _encode_shard(self, job: dict) -> dict:
        from safetensors.torch import save

        _injected_hold(job, written=False)
        items: list[str] = job["items"]
        if job["kind"] == MASKS:  # no model: the image geometry, averaged down to the latent grid
            tensors, failed = _mask_tensors(job)
        else:
            tensors, failed = self._encode_with_model(job)  # failed: row -> why its image could not be loaded
        metadata = {"items": json.dumps(items, ensure_ascii=False), "failed": json.dumps(failed), "format": str(store.CACHE_FORMAT)}
        blob = save(tensors, metadata=metadata)  # the file's bytes, hashed before they reach the disk
        store.write_shard(Path(job["path"]), blob, before_rename=lambda: _injected_hold(job, written=True))
        return {"folder": job["folder"], "shard": job["shard"], "count": len(items)}

    def _encode_with_model(self, job: dict) -> tuple[dict, dict[str, str]]:
        import torch

        items: list[str] = job["items"]
        tensors: dict[str, torch.Tensor] = {}
        failed: dict[str, str] = {}
        encoder, device, dtype = self._encoder(job["kind"], job["model"])
        with torch.inference_mode():
            if job["kind"] == "text":
                embeds, mask = _encode_captions(encoder, items)
                tensors["prompt_embeds"] = embeds.to("cpu", getattr(torch, job.get("store_dtype", "float32"))).contiguous()
                tensors["prompt_attention_mask"] = mask.to("cpu", torch.int64).contiguous()
            else:
                from sana_ray.data.images import load_prepared

                def load(row: int) -> torch.Tensor | str:
                    try:
                        return load_prepared(items[row], Geometry.from_json(job["geometry"][row]))
                    except Exception as error:  # e.g. a file changed or damaged since discovery
                        return f"{type(error).__name__}: {error}"

                # PIL decodes and resizes without the GIL: load the shard's images in parallel.
                with ThreadPoolExecutor(max_workers=min(DECODE_THREADS, len(items))) as pool:
                    loaded = list(pool.map(load, range(len(items))))
                groups: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
                for row, pixels in enumerate(loaded):
                    if isinstance(pixels, str):
                        failed[str(row)] = pixels
                    else:
                        groups.setdefault(tuple(pixels.shape), []).append((row, pixels))
                for members in groups.values():  # one forward per shape (no-crop shards can mix shapes)
                    pixels = torch.stack([p for _, p in members]).to(device, dtype)
                    latents = encoder.encode(pixels).to("cpu", torch.float32)
                    for (row, _), latent in zip(members, latents):
                        tensors[f"latents.{row}"] = latent.contiguous()
        return tensors, failed


def _mask_tensors(job: dict) -> tuple[dict, dict[str, str]]:
    """A mask shard's tensors ``masks.<row>`` [1, h, w] and the rows whose mask could not be loaded."""
    from sana_ray.data.images import load_mask

    def load(entry: list):
        mask_path, geometry = entry
        try:
            return load_mask(mask_path, Geometry.from_json(geometry), job["factor"])
        except Exception as error:  # changed or damaged since discovery
            return f"{type(error).__name__}: {error}"

    with ThreadPoolExecutor(max_workers=min(DECODE_THREADS, len(job["masks"]))) as pool:
        loaded = list(pool.map(load, job["masks"]))
    tensors = {f"masks.{row}": mask for row, mask in enumerate(loaded) if not isinstance(mask, str)}
    failed = {str(row): mask for row, mask in enumerate(loaded) if isinstance(mask, str)}
    return tensors, failed


def _injected_hold(job: dict, *, written: bool) -> None:
    """Testing aid (like train.loop's SANA_RAY_HOLD_AT_STEP): with SANA_RAY_CACHE_HOLD_AT_SHARD=N in
    the environment of the process that calls ``build_caches``, the encoder actors finish the first
    N shards of the build's queue (text shards first, then each latent folder's, in order), write
    shard N's temp file and checksum record but do not rename it, and never start later shards:
    they sleep instead, so a test can kill the build at a known point (with a temp file left, as
    by a kill mid-write) however fast the machine encodes. The driver puts N in every job."""
    at = job.get("hold_at")
    if at is None or job["seq"] < at or (job["seq"] == at and not written):
        return
    print(f"[sana-ray] {HOLD_ENV}={at}: holding before {'renaming' if written else 'encoding'} "
          f"{Path(job['path']).name} (queue position {job['seq']})", flush=True)
    time.sleep(3600)


def _encode_captions(encoder, items: list[str]):
    """Encode captions; the empty prompt (caption dropout) as SanaPipeline encodes negative_prompt="":
    without the instruction prefix, ``max_sequence_length`` tokens."""
    import torch

    real = [i for i, text in enumerate(items) if text != EMPTY_PROMPT]
    empty = [i for i, text in enumerate(items) if text == EMPTY_PROMPT]
    parts = {}
    if real:
        parts.update(zip(real, zip(*encoder.encode([items[i] for i in real]))))
    if empty:
        saved = encoder.instruction
        encoder.instruction = None
        try:
            embeds, mask = encoder.encode([EMPTY_PROMPT])
        finally:
            encoder.instruction = saved
        parts.update({i: (embeds[0], mask[0]) for i in empty})
    return torch.stack([parts[i][0] for i in range(len(items))]), torch.stack([parts[i][1] for i in range(len(items))])


# --------------------------------------------------------------------------------------------
# Planning


def _plan_text(samples: list[Sample], fingerprint: str, model: "ModelSpec", instruction: list[str] | None, root: Path,
               shard_size: int, *, store_dtype: str = "float32", empty_prompt: bool = False) -> _Folder:
    captions = sorted({c for s in samples for c in s.choices} | ({EMPTY_PROMPT} if empty_prompt else set()))
    material = {
        "format": store.CACHE_FORMAT,
        "kind": "text",
        "model": fingerprint,
        "variant": model.variant,
        "dtype": ENCODE_DTYPE,  # what the encoder computes in
        "instruction": instruction,
        "max_sequence_length": model.max_sequence_length,
        "captions": captions,
    }
    if store_dtype != "float32":  # float32 stores keep the key they had before the dtype was a choice
        material["store_dtype"] = store_dtype
    key = store.digest(material)
    return _Folder("text", "text embeddings", key, root / key, captions, shard_size, {"store_dtype": store_dtype})


def _plan_latents(dataset: "DatasetSpec", samples: list[Sample], fingerprint: str, model: "ModelSpec", root: Path, shard_size: int) -> _Folder:
    paths = [s.image_path for s in samples]
    geometry = [s.geometry.to_json() if s.geometry else None for s in samples]
    files = []
    for path, planned in zip(paths, geometry):
        stat = os.stat(path)
        files.append([path, stat.st_size, stat.st_mtime_ns, planned])
    key = store.digest(
        {
            "format": store.CACHE_FORMAT,
            "kind": "latents",
            "pixels": PIXELS_VERSION,
            "model": fingerprint,
            "variant": model.variant,
            "dtype": ENCODE_DTYPE,
            "images": files,
        }
    )
    options = PixelOptions.of(dataset)
    params = {"resolution": options.resolution, "resolution_type": options.resolution_type, "crop": options.crop}
    folder = _Folder("latents", f"latents {dataset.name}", key, root / key, paths, shard_size, params)
    folder.extras = geometry
    return folder


def _plan_masks(dataset: "DatasetSpec", samples: list[Sample], latents: _Folder, factor: int, root: Path) -> _Folder:
    """The loss-mask folder of a cached dataset with a ``mask_path``: one row per sample, in the
    latent folder's order, keyed by that folder's key and the mask files (see the module docstring)."""
    entries, files = [], []
    for sample in samples:
        if sample.mask is None or sample.geometry is None:  # pragma: no cover - discovery skips those
            raise DataError(f"{sample.image_path}: no mask or planned geometry")
        stat = os.stat(sample.mask)
        files.append([sample.mask, stat.st_size, stat.st_mtime_ns])
        entries.append([sample.mask, sample.geometry.to_json()])
    key = store.digest({"format": store.CACHE_FORMAT, "kind": MASKS, "masks_version": MASKS_VERSION,
                        "latents": latents.key, "factor": factor, "masks": files})
    folder = _Folder(MASKS, f"masks {dataset.name}", key, root / key, [s.image_path for s in samples],
                     MASK_SHARD_SIZE, {"factor": factor})
    folder.extras = entries
    return folder


def vae_layout(model_source: str, revision: str | None = None) -> tuple[int, int]:
    """(latent channels, downsample factor) of the run's VAE, from its config only (no weights)."""
    from diffusers import AutoencoderDC

    kwargs = {"revision": revision} if revision else {}
    config = AutoencoderDC.load_config(model_source, subfolder="vae", **kwargs)
    # As LatentEncoder.downsample_factor (and SanaPipeline's vae_scale_factor) compute it.
    return int(config["latent_channels"]), 2 ** (len(config["encoder_block_out_channels"]) - 1)


def latent_shape(geometry: Geometry, channels: int, factor: int) -> list[int]:
    """[C, h, w] of the latent of an image prepared with ``geometry``."""
    width, height = geometry.size
    if width % factor or height % factor:
        raise DataError(f"planned image size {width}x{height} is not a multiple of the VAE's downsampling ({factor})")
    return [channels, height // factor, width // factor]


def _plan_online(dataset: "DatasetSpec", samples: list[Sample], model_source: str, model: "ModelSpec", root: Path) -> _Folder:
    """The stand-in for a latent folder of a ``cache_latents: false`` dataset: complete already
    (nothing to encode or write), its index listing each image's planned geometry and latent shape."""
    channels, factor = vae_layout(model_source, model.revision)
    items = []
    for sample in samples:
        if sample.geometry is None:  # pragma: no cover - discovery always plans one
            raise DataError(f"{sample.image_path}: no planned geometry")
        items.append({"path": sample.image_path, "geometry": sample.geometry.to_json(),
                      "shape": latent_shape(sample.geometry, channels, factor)})
    folder = _Folder(ONLINE, f"online latents {dataset.name}", ONLINE, root / ONLINE, [s.image_path for s in samples], 1, {})
    folder.index = {"kind": ONLINE, "items": items}
    return folder


# --------------------------------------------------------------------------------------------
# Checking, encoding, finishing


def _check_folder(folder: _Folder, say: Progress) -> None:
    """Reuse a complete folder whose shards all match their checksums, or list the shards that
    still need encoding: absent, stale (other items) or damaged (those are named in ``say``).

    A complete folder with a missing or damaged shard keeps its index.json while that shard is
    redone (it is rewritten when the build finishes): the index fixes the folder's shard layout,
    and a rebuild that is itself interrupted finds the same shard bad again next time."""
    index = store.read_index(folder.path, folder.kind)
    unit = UNITS.get(folder.kind, "images")
    complete = index is not None and index.get("items_count") == len(folder.items)
    if complete:
        # Keep the folder's own shard layout (the key does not depend on the shard size), so a
        # damaged shard is redone alone rather than the whole folder in a new layout.
        folder.shard_size = int(index.get("shard_size") or folder.shard_size)
    else:
        folder.path.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    shards = range(folder.num_shards)
    with ThreadPoolExecutor(max_workers=VERIFY_THREADS) as pool:
        checks = list(pool.map(lambda s: store.verify_shard(folder.path / store.shard_name(s), folder.shard_items(s)), shards))
    elapsed = time.monotonic() - started
    damaged = [(s, c.problem) for s, c in zip(shards, checks) if c.problem]
    for shard, problem in damaged[:DAMAGED_LINES]:
        say(f"{folder.label}: {folder.path / store.shard_name(shard)} is damaged: {problem}; rebuilding it")
    if len(damaged) > DAMAGED_LINES:
        say(f"{folder.label}: ... and {len(damaged) - DAMAGED_LINES} more damaged shards; rebuilding them")
    adopted = sum(c.adopted for c in checks)
    if adopted:
        say(f"{folder.label}: {adopted} shard(s) from an older build had no checksum: re-verified, checksum recorded")
    folder.headers = {s: c.header for s, c in zip(shards, checks) if c.header is not None}
    folder.todo = [s for s, c in zip(shards, checks) if c.header is None]
    if complete and not folder.todo:
        folder.index = index
        hashed = sum(c.size for c in checks)
        say(f"reusing {folder.label} cache {folder.path} ({len(folder.items)} {unit}; "
            f"{len(checks)} shards verified, {hashed / 1e6:.1f} MB hashed in {elapsed:.2f} s)")
        return
    done = len(folder.items) - sum(len(folder.shard_items(s)) for s in folder.todo)
    if done:
        say(f"{folder.label}: {done}/{len(folder.items)} {unit} already cached in {folder.path}, encoding the rest")


def _finish_folder(folder: _Folder) -> None:
    """Check every shard (header, items, size against its checksum record: the shards were just
    written or verified, so they are not hashed again), remove dead writers' temp files, and write
    index.json (last, atomically): the folder is then complete."""
    shards, items, shape = [], [], None
    for s in range(folder.num_shards):
        name = store.shard_name(s)
        expected = folder.shard_items(s)
        header = store.verify_shard(folder.path / name, expected, full=False).header
        if header is None:
            raise DataError(f"{folder.label}: shard {folder.path / name} is missing or incomplete after the build; rerun to rebuild it")
        folder.headers[s] = header
        shards.append(name)
        if folder.kind == "text":
            shape = list(header.tensors["prompt_embeds"].shape[1:])
        else:
            failed, tensor = header.failed(), ROW_TENSOR[folder.kind]
            for row, path in enumerate(expected):
                if str(row) in failed:
                    items.append({"path": path, "shard": name, "row": row, "error": failed[str(row)]})
                else:
                    items.append({"path": path, "shard": name, "row": row, "shape": list(header.tensors[f"{tensor}.{row}"].shape)})
    index: dict[str, Any] = {
        "format": store.CACHE_FORMAT,
        "kind": folder.kind,
        "key": folder.key,
        "items_count": len(folder.items),
        "shard_size": folder.shard_size,
        "shards": shards,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **folder.params,
    }
    if folder.kind == "text":
        index["captions"] = folder.items
        index["shape"] = shape
    else:
        index["items"] = items
    store.remove_stale_temps(folder.path)
    store.write_index(folder.path, index)
    folder.index = index


def _run_encoders(folders: list[_Folder], model: dict, num_actors: int, use_gpu: bool, say: Progress) -> None:
    """Encode every folder's missing shards with one Ray Data actor pool."""
    import ray

    jobs = []
    hold = os.environ.get(HOLD_ENV)  # testing aid: see _injected_hold
    for number, folder in enumerate(folders):
        for shard in folder.todo:
            job = {
                "kind": folder.kind,
                "model": model,
                "folder": number,
                "shard": shard,
                "path": str(folder.path / store.shard_name(shard)),
                "items": folder.shard_items(shard),
                "seq": len(jobs),
                **folder.params,
            }
            if hold:
                job["hold_at"] = int(hold)
            if folder.extras is not None:  # latents: "geometry"; masks: "masks" ([mask path, geometry] per row)
                job["masks" if folder.kind == MASKS else "geometry"] = folder.extras[shard * folder.shard_size : (shard + 1) * folder.shard_size]
            jobs.append({"job": json.dumps(job, ensure_ascii=False)})
    if not jobs:
        return
    resources = ray.cluster_resources()
    if use_gpu:
        gpus = int(resources.get("GPU", 0))
        if gpus < 1:
            raise DataError("use_gpu is set but the Ray cluster has no GPU; set hardware.use_gpu: false or join a cluster with GPUs")
        actors = max(1, min(num_actors, len(jobs), gpus))
    else:
        # A fixed-size pool larger than the cluster would wait for CPUs that never come.
        actors = max(1, min(num_actors, len(jobs), int(resources.get("CPU", 1))))

    # One row (one block) per shard, so that the shards spread over the actor pool.
    dataset = ray.data.from_items(jobs, override_num_blocks=len(jobs)).map_batches(
        _ShardEncoder,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
        num_gpus=1 if use_gpu else 0,
    )
    done = [len(f.items) - sum(len(f.shard_items(s)) for s in f.todo) for f in folders]
    last_said = [0.0] * len(folders)
    errors: list[str] = []
    try:
        for row in dataset.iter_rows():
            result = json.loads(row["result"])
            number = result["folder"]
            folder = folders[number]
            if "error" in result:
                errors.append(f"{folder.label} shard {result['shard']}: {result['error']}")
                continue
            done[number] += result["count"]
            now = time.monotonic()
            # A line per shard would flood a large build: at most one per folder every few seconds, and the last.
            if done[number] == len(folder.items) or now - last_said[number] >= PROGRESS_INTERVAL_S:
                last_said[number] = now
                unit = UNITS.get(folder.kind, "images")
                say(f"{folder.label}: {done[number]}/{len(folder.items)} {unit}")
    except Exception as error:  # an actor died (e.g. out of memory): Ray's message, without its traceback
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        raise DataError(
            f"building the caches failed: {lines[-1] if lines else repr(error)}. "
            f"Finished shards are kept; running again continues from them."
        ) from error
    if errors:
        raise DataError(
            f"building the caches failed for {len(errors)} of {len(jobs)} shards; the first: {errors[0].rstrip('. ')}. "
            f"Finished shards are kept; running again continues from them."
        )


def _under(root: Path, folder: "Path | None", default: str) -> Path:
    """A configured cache folder (relative to the cache root), or ``root/default``."""
    if folder is None:
        return root / default
    folder = Path(folder).expanduser()
    return (folder if folder.is_absolute() else root / folder).resolve()


def build_caches(
    datasets: list["DatasetSpec"],
    *,
    model_source: str,
    model: "ModelSpec",
    cache_root: Path,
    num_actors: int = 1,
    batch_size: int = 8,
    progress: Progress | None = print,
    use_gpu: bool = False,
    bf16_training: bool = False,
) -> tuple[CacheSet, list[DatasetReport]]:
    """Find every dataset's samples, reuse or build their caches, and say where everything is.

    ``model_source`` is what the encoders load (a local diffusers folder or a hub id); ``model``
    supplies revision, variant, max_sequence_length, the instruction-prefix switch and the text
    storage dtype (``bf16_training``: whether training computes in bf16, for ``auto``).
    Disabled entries are left out; a ``dataset_type: text_embeds`` entry sets the text cache's
    folder and shard size; ``dataset_type: eval`` datasets are cached too but returned apart, in
    ``cache_set.eval_sets`` (never trained on). ``batch_size`` is the shard size of folders whose
    dataset sets no ``vae_batch_size`` / ``write_batch_size``.
    """
    from sana_ray.model.loading import model_fingerprint
    from sana_ray.model.text import DEFAULT_INSTRUCTION

    say: Progress = progress or (lambda _line: None)
    if batch_size < 1 or num_actors < 1:
        raise ValueError(f"batch_size and num_actors must be >= 1 (got {batch_size}, {num_actors})")
    root = Path(cache_root).expanduser().resolve()
    fingerprint = model_fingerprint(model_source, model.revision)
    instruction = DEFAULT_INSTRUCTION if model.use_instruction_prefix else None

    found = discover_datasets(datasets)
    for _, _, report in found:
        say(report.summary())
    reports = [report for _, _, report in found]
    all_samples = [s for _, samples, _ in found for s in samples]
    text_settings = text_store(datasets)
    empty_prompt = any(getattr(d, "caption_dropout_probability", 0) > 0 for d, _, r in found if r.role != "eval")
    text = _plan_text(
        all_samples, fingerprint, model, instruction, _under(root, text_settings and text_settings.cache_dir, "text"),
        (text_settings and text_settings.write_batch_size) or batch_size,
        store_dtype=text_store_dtype(model, bf16_training=bf16_training), empty_prompt=empty_prompt,
    )
    latent_folders: dict[Path, _Folder] = {}
    dataset_folders: list[_Folder] = []
    for dataset, samples, _ in found:
        if not getattr(dataset, "cache_latents", True):  # encoded in the training loop instead (reader)
            dataset_folders.append(_plan_online(dataset, samples, model_source, model, root / "latents"))
            continue
        folder = _plan_latents(
            dataset, samples, fingerprint, model, _under(root, getattr(dataset, "cache_dir", None), "latents"),
            getattr(dataset, "vae_batch_size", None) or batch_size,
        )
        folder = latent_folders.setdefault(folder.path, folder)  # identical datasets share one folder
        dataset_folders.append(folder)
    mask_folders = _plan_mask_folders(found, dataset_folders, model_source, model, root / MASKS)

    pending: list[_Folder] = []
    # text first: its shards are queued first; masks last (they need no model, and are quick)
    for folder in [text, *latent_folders.values(), *{f.path: f for f in mask_folders.values()}.values()]:
        _check_folder(folder, say)
        if folder.index is None:
            pending.append(folder)

    if any(f.todo for f in pending):
        from sana_ray.launch.ray_cluster import ensure_ray

        ensure_ray()
        model_settings = {
            "source": model_source,
            "revision": model.revision,
            "variant": model.variant,
            "trust_remote_code": model.trust_remote_code,
            "instruction": instruction,
            "max_sequence_length": model.max_sequence_length,
            "use_gpu": use_gpu,
        }
        started = time.monotonic()
        _run_encoders([f for f in pending if f.todo], model_settings, num_actors, use_gpu, say)
        say(f"caches built in {time.monotonic() - started:.1f} s")
    for folder in pending:
        _finish_folder(folder)

    members = list(zip(found, dataset_folders))
    train = [(m, f) for m, f in members if m[2].role != "eval"]
    cache_set = _cache_set(root, text, train, say, masks=mask_folders)
    cache_set.eval_sets = {m[0].name: _cache_set(root, text, [(m, f)], say) for m, f in members if m[2].role == "eval"}
    return cache_set, reports


def _plan_mask_folders(found: list, dataset_folders: list[_Folder], model_source: str, model: "ModelSpec",
                       root: Path) -> dict[str, _Folder]:
    """Dataset name -> its loss-mask folder, for the cached datasets with a ``mask_path`` (identical
    ones share a folder). Online datasets' masks are made by the workers (reader)."""
    masked = [(d, samples, f) for (d, samples, _), f in zip(found, dataset_folders)
              if getattr(d, "mask_path", None) is not None and f.kind != ONLINE]
    if not masked:
        return {}
    _, factor = vae_layout(model_source, model.revision)
    folders: dict[Path, _Folder] = {}
    planned = {}
    for dataset, samples, latents in masked:
        folder = _plan_masks(dataset, samples, latents, factor, root)
        planned[dataset.name] = folders.setdefault(folder.path, folder)
    return planned


# --------------------------------------------------------------------------------------------
# The sample index


def _text_shards(text: _Folder) -> TextShards:
    assert text.index is not None
    files, sizes, embeds, masks, dtype = [], [], [], [], None
    for s in range(text.num_shards):
        path = text.path / store.shard_name(s)
        header = text.headers[s]
        files.append(str(path))
        sizes.append(path.stat().st_size)
        embeds.append(header.tensors["prompt_embeds"].start)
        masks.append(header.tensors["prompt_attention_mask"].start)
        dtype = header.tensors["prompt_embeds"].dtype
        if header.tensors["prompt_attention_mask"].dtype != "I64":
            raise DataError(f"text cache shard {path}: prompt_attention_mask is not int64; delete the folder to rebuild it")
    return TextShards(
        folder=str(text.path), files=files, sizes=sizes, rows_per_shard=text.shard_size, count=int(text.index["items_count"]),
        embeds_offset=embeds, mask_offset=masks, dtype=dtype or "F32", shape=tuple(text.index["shape"]),
    )


def _cache_set(root: Path, text: _Folder, members: list, say: Progress,
               masks: dict[str, _Folder] | None = None) -> CacheSet:
    """The CacheSet of some datasets: ``members`` is [((dataset, samples, report), folder), ...];
    ``masks``: dataset name -> its loss-mask folder (cached datasets with a ``mask_path``)."""
    assert text.index is not None
    masks = masks or {}
    text_row = {caption: row for row, caption in enumerate(text.index["captions"])}
    file_number: dict[str, int] = {}
    files: list[str] = []
    file_sizes: list[int] = []

    def file_of(folder: _Folder, item: dict) -> tuple[int, store.TensorInfo]:
        """(index into files, the row's tensor) of a latent or mask row."""
        shard = int(item["shard"][len("shard_"):].split(".")[0])
        info = folder.headers[shard].tensors[f"{ROW_TENSOR[folder.kind]}.{item['row']}"]
        path = str(folder.path / item["shard"])
        if path not in file_number:
            file_number[path] = len(files)
            files.append(path)
            file_sizes.append(os.stat(path).st_size)
        return file_number[path], info

    latent_file, latent_offset, buckets, mask_file, mask_offset = [], [], [], [], []
    shapes: dict[tuple[int, ...], int] = {}
    online_geometry: list[list] = []
    online_masks: list[str | None] = []
    latent_dtypes: set[str] = set()
    caption_offsets, caption_rows = [0], []
    paths, repeats, dropout, weights, groups, regularisation, names, dirs = [], [], [], [], [], [], [], []
    loss_weights = []
    for number, ((dataset, samples, report), folder) in enumerate(members):
        assert folder.index is not None
        names.append(dataset.name)
        dirs.append(str(folder.path))
        where = {item["path"]: item for item in folder.index["items"]}
        mask_folder = masks.get(dataset.name)
        mask_where = {item["path"]: item for item in mask_folder.index["items"]} if mask_folder is not None else {}
        for sample in samples:
            item = where[sample.image_path]
            if "error" in item:  # the image passed discovery but could not be decoded
                report.skip(UNREADABLE, sample.image_path, item["error"])
                report.used -= 1
                say(f"{dataset.name}: skipping unreadable {sample.image_path} ({item['error']})")
                continue
            mask_item = mask_where.get(sample.image_path)
            if mask_item is not None and "error" in mask_item:  # the mask passed discovery but could not be loaded
                report.skip(UNREADABLE_MASK, sample.image_path, f"{sample.mask}: {mask_item['error']}")
                report.used -= 1
                say(f"{dataset.name}: skipping {sample.image_path}: its mask could not be loaded ({mask_item['error']})")
                continue
            if folder.kind == ONLINE:
                latent_file.append(-1)
                latent_offset.append(len(online_geometry))
                online_geometry.append(item["geometry"])
                online_masks.append(sample.mask)  # made by the worker, like the latent
            else:
                number_in_files, info = file_of(folder, item)
                latent_file.append(number_in_files)
                latent_offset.append(info.start)
                latent_dtypes.add(info.dtype)
            if mask_item is not None:
                number_in_files, info = file_of(mask_folder, mask_item)
                if info.dtype != "F32" or tuple(info.shape) != (1, *item["shape"][1:]):
                    raise DataError(f"mask cache {mask_folder.path}: row {mask_item['row']} is {info.dtype} {list(info.shape)}, "
                                    f"not F32 [1, h, w] of latent {item['shape']}; delete the folder to rebuild it")
                mask_file.append(number_in_files)
                mask_offset.append(info.start)
            else:
                mask_file.append(-1)
                mask_offset.append(-1)
            buckets.append(shapes.setdefault(tuple(item["shape"]), len(shapes)))
            caption_rows.extend(text_row[c] for c in sample.choices)
            caption_offsets.append(len(caption_rows))
            paths.append(sample.image_path)
            repeats.append(dataset.repeats)
            dropout.append(float(getattr(dataset, "caption_dropout_probability", 0.0)))
            weights.append(float(getattr(dataset, "probability", 1.0)))
            loss_weights.append(float(getattr(dataset, "loss_weight", 1.0)))
            groups.append(number)
            regularisation.append(bool(getattr(dataset, "is_regularisation_data", False)))
        if report.used == 0:
            raise DataError(f"dataset '{dataset.name}': none of its images could be decoded ({report.summary()})")
    if len(latent_dtypes) > 1:  # pragma: no cover - every build stores float32 latents
        raise DataError(f"latent caches of one run hold several dtypes ({sorted(latent_dtypes)}); rebuild them")
    return CacheSet(
        latents_dir=str(root / "latents"),
        text=_text_shards(text),
        files=files,
        file_sizes=file_sizes,
        latent_file=np.asarray(latent_file, dtype=np.int32),
        latent_offset=np.asarray(latent_offset, dtype=np.int64),
        latent_dtype=latent_dtypes.pop() if latent_dtypes else "F32",
        buckets=np.asarray(buckets, dtype=np.int32),
        bucket_shapes=list(shapes),
        caption_offsets=np.asarray(caption_offsets, dtype=np.int64),
        caption_rows=np.asarray(caption_rows, dtype=np.int32),
        dropout=np.asarray(dropout, dtype=np.float64),
        repeats=np.asarray(repeats, dtype=np.int32),
        weights=np.asarray(weights, dtype=np.float64),
        groups=np.asarray(groups, dtype=np.int32),
        regularisation=np.asarray(regularisation, dtype=bool),
        image_paths=paths,
        dataset_names=names,
        latent_dirs=dirs,
        null_text_row=text_row.get(EMPTY_PROMPT),
        online_geometry=online_geometry,
        mask_file=np.asarray(mask_file, dtype=np.int32),
        mask_offset=np.asarray(mask_offset, dtype=np.int64),
        online_masks=online_masks,
        loss_weights=np.asarray(loss_weights, dtype=np.float32),
    )
