"""Latent and text-embedding caches, built with Ray Data and keyed by everything that produced them.

Layout under ``cache_root``::

    latents/<key>/shard_00000.safetensors   one folder per (dataset images, resolution, crop, model)
                  ...                        tensors "latents.<row>" [C, h, w] float32
                  index.json                 written last (atomically): the folder is complete
    text/<key>/shard_00000.safetensors      one folder per (unique captions, model, instruction, L)
               ...                           "prompt_embeds" [n, L, C] float32, "prompt_attention_mask" [n, L] int64
               index.json

A latent key hashes the model fingerprint, the pixel pipeline version and every image's (path,
size, mtime, geometry) -- the geometry (downsample, resize, crop box) is planned at discovery from
all of the dataset's pixel options, so resolution, resolution_type, crop, crop_style, crop_aspect
and the size limits are all in the key; a text key hashes the model fingerprint, the instruction
prefix, ``max_sequence_length`` and the sorted unique captions (plus ``""``, the empty prompt,
encoded as SanaPipeline encodes ``negative_prompt=""``, when a dataset uses caption dropout). Change any of them and a new folder is
built; change nothing and the folder is reused without starting Ray Data.

Building splits a folder's items into shards (``vae_batch_size`` images or the text store's
``write_batch_size`` captions; default ``batch_size``; deterministic order) and maps
them through a pool of encoder actors with ``ray.data``: each actor loads its encoder once and
writes each shard itself (``<name>.<pid>.tmp`` then ``os.replace``), so finished shards survive a
kill and are not redone by the next build. Each shard records its items in its safetensors
metadata; a shard whose items do not match (e.g. batch_size changed between builds) is rebuilt.

Checksums: next to every shard, ``shard_XXXXX.safetensors.sha256`` (JSON ``{"sha256", "size"}``
of the whole shard file) is put in place, atomically, *before* the shard is renamed into place,
so a shard counts as finished only when its file matches its record. Every build that looks at a
folder (complete or not) checks each shard's size and sha256 against its record (up to
VERIFY_THREADS files at a time; sha256 ran at ~1 GB/s per core on a 2-core CPU machine, see
benchmarks/data_wait.py) and rebuilds only the shards that fail, saying which and why. A
shard from an older build, without a record, is re-verified (header parses, every tensor's bytes
present, items match) and its record is written then: bit flips that happened before that first
check cannot be seen, later ones can. Leftover temp files of dead writers are removed when the
folder is finished.

Every node that runs encoder actors must see ``cache_root`` (and a local ``model_source``) at the
same path: on a multi-node cluster that means shared storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sana_ray.data.images import PIXELS_VERSION, PixelOptions
from sana_ray.data.samples import UNREADABLE, DataError, DatasetReport, Sample, discover_datasets, text_store

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from sana_ray.data.sampler import BatchPlan
    from sana_ray.manifest.schema import DatasetSpec, ModelSpec

CACHE_FORMAT = 1
EMPTY_PROMPT = ""  # the caption-dropout row: encoded without the instruction prefix, like negative_prompt=""
INDEX_FILE = "index.json"
KEY_LENGTH = 24  # hex characters of the sha256 used as the folder name
ENCODE_DTYPE = "float32"  # encoders run and caches are stored in float32 (exact, reproducible)
PROGRESS_INTERVAL_S = 5.0
DECODE_THREADS = 8  # per encoder actor
CHECKSUM_SUFFIX = ".sha256"  # shard_XXXXX.safetensors.sha256: {"sha256": hex of the file, "size": bytes}
VERIFY_THREADS = 8  # shards hashed in parallel when a build checks a folder (hashlib releases the GIL)
DAMAGED_LINES = 10  # damaged shards named one per line, per folder; then a count
HOLD_ENV = "SANA_RAY_CACHE_HOLD_AT_SHARD"  # testing aid, see _injected_hold

Progress = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# Public types


@dataclass
class CacheSet:
    """Where a run's cached tensors are, and which rows each training sample uses. Picklable.

    Sample ``i`` uses latent ``latents_dir/entries[i][0]`` tensor ``latents.<entries[i][1]>``
    and text row ``entries[i][2]`` of the text cache.
    """

    latents_dir: str  # <cache_root>/latents; entries name files inside it as "<key>/shard_XXXXX.safetensors"
    text_dir: str  # <cache_root>/text/<key>
    entries: list[tuple[str, int, int]]
    datasets: list[str]  # per sample
    captions: list[str]  # per sample
    image_paths: list[str]  # per sample
    repeats: list[int]  # per sample (its dataset's repeats)
    buckets: list[int]  # per sample: index into bucket_shapes
    bucket_shapes: list[tuple[int, ...]]  # latent shape [C, h, w] of each bucket
    text_shape: tuple[int, int]  # (L, C) of prompt_embeds rows
    latent_dirs: list[str] = field(default_factory=list)  # one per dataset, for messages
    caption_rows: list[tuple[int, ...]] = field(default_factory=list)  # per sample: text rows of every caption choice
    dropout: list[float] = field(default_factory=list)  # per sample: caption dropout probability
    null_text_row: int | None = None  # text row of the empty prompt (present when any dropout > 0)
    weights: list[float] = field(default_factory=list)  # per sample: its dataset's probability
    groups: list[int] = field(default_factory=list)  # per sample: its dataset's number
    regularisation: list[bool] = field(default_factory=list)  # per sample
    eval_sets: dict[str, "CacheSet"] = field(default_factory=dict)  # dataset_type eval datasets, by name (never trained on)

    def __len__(self) -> int:
        return len(self.entries)

    def bucket_labels(self) -> list[str]:
        return ["latent " + "x".join(map(str, shape)) for shape in self.bucket_shapes]

    def batch_plan(self, batch_size: int, world_size: int, seed: int) -> "BatchPlan":
        from sana_ray.data.sampler import BatchPlan

        return BatchPlan(
            self.buckets, self.repeats, batch_size=batch_size, world_size=world_size, seed=seed,
            weights=self.weights or None, groups=self.groups or None, bucket_labels=self.bucket_labels(),
        )


@dataclass
class CachedData:
    """All of a run's cached tensors, in memory (what a training worker trains from)."""

    latents: list["torch.Tensor"]  # per bucket: [n_b, C, h, w]
    latent_rows: "torch.Tensor"  # per sample: row in its bucket's tensor (int64)
    buckets: list[int]  # per sample
    prompt_embeds: "torch.Tensor"  # [T, L, C], one row per unique caption
    prompt_attention_mask: "torch.Tensor"  # [T, L] int64
    text_rows: "torch.Tensor"  # per sample: row in prompt_embeds (int64)
    datasets: list[str]
    captions: list[str]
    caption_rows: list[tuple[int, ...]] = field(default_factory=list)  # per sample: every caption choice
    dropout: list[float] = field(default_factory=list)  # per sample
    null_text_row: int | None = None

    def __len__(self) -> int:
        return len(self.buckets)

    def text_rows_for(self, indices: list[int], key: Any) -> "torch.Tensor":
        """Text rows of these samples for draw ``key``: the empty prompt with each sample's dropout
        probability, else one of its captions; a pure function of (key, position, sample)."""
        import torch

        digest = hashlib.sha256(f"sana-ray-captions:{json.dumps(key, default=str)}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)
        draws = torch.rand(len(indices), 2, generator=generator, dtype=torch.float64).tolist()
        rows = []
        for i, (drop, pick) in zip(indices, draws):
            choices = self.caption_rows[i] if self.caption_rows else (int(self.text_rows[i]),)
            if self.dropout and self.null_text_row is not None and drop < self.dropout[i]:
                rows.append(self.null_text_row)
            else:
                rows.append(choices[min(int(pick * len(choices)), len(choices) - 1)])
        return torch.as_tensor(rows, dtype=torch.long)

    def batch(self, indices: list[int], key: Any = None) -> dict[str, "torch.Tensor"]:
        """Stacked tensors for these samples (which must share a bucket, as BatchPlan batches do).

        ``key`` (e.g. ``(seed, rank, micro_batch)``): draw each sample's caption among its choices
        and apply caption dropout, deterministically per key. ``None``: every sample's first
        caption and no dropout.
        """
        import torch

        if not indices:
            raise ValueError("empty batch")
        bucket = self.buckets[indices[0]]
        if any(self.buckets[i] != bucket for i in indices):
            raise ValueError(f"samples {indices} have different latent shapes; batch within a bucket (BatchPlan does)")
        index = torch.as_tensor(indices, dtype=torch.long)
        text = self.text_rows.index_select(0, index) if key is None else self.text_rows_for(indices, key)
        # index_select: the same rows as tensor[rows], several times faster for these row gathers
        # (this runs once per micro-batch in every worker; benchmarks/data_wait.py).
        return {
            "latents": self.latents[bucket].index_select(0, self.latent_rows.index_select(0, index)),
            "prompt_embeds": self.prompt_embeds.index_select(0, text),
            "prompt_attention_mask": self.prompt_attention_mask.index_select(0, text),
        }


# --------------------------------------------------------------------------------------------
# Small helpers


def _digest(material: Any) -> str:
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:KEY_LENGTH]


def _shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _read_index(folder: Path, kind: str, *, require_shards: bool = True) -> dict | None:
    try:
        index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if index.get("format") != CACHE_FORMAT or index.get("kind") != kind:
        return None
    if require_shards and not all((folder / name).is_file() for name in index.get("shards", [])):
        return None
    return index


def _read_header(path: Path, items: list[str]) -> tuple[tuple[dict[str, list[int]], dict[str, str]] | None, str | None]:
    """(header, None) of a readable shard holding ``items``; (None, why) otherwise, where ``why``
    is None for an absent or stale shard (other items) and a reason for a damaged one. safetensors
    refuses a file whose size does not match its header ("file not fully covered"): truncation or
    appended bytes show up here even without a checksum."""
    from safetensors import safe_open

    if not path.is_file():
        return None, None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if json.loads(metadata.get("items", "null")) != items:
                return None, None
            shapes = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
            return (shapes, json.loads(metadata.get("failed", "{}"))), None
    except Exception as error:  # truncated or foreign file: rebuild it
        return None, f"unreadable ({type(error).__name__}: {str(error)[:200]})"


def _checksum_path(shard: Path) -> Path:
    return shard.with_name(shard.name + CHECKSUM_SUFFIX)


def _read_checksum(shard: Path) -> dict | None:
    """A shard's recorded {"sha256", "size"}, or None when there is none (an older build) or it is unreadable."""
    try:
        record = json.loads(_checksum_path(shard).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str) or not isinstance(record.get("size"), int):
        return None
    return record


def _file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@dataclass
class _ShardCheck:
    """What a build found when it checked one shard file."""

    header: tuple[dict[str, list[int]], dict[str, str]] | None  # set when the shard is good
    problem: str | None = None  # why a present shard is damaged (it is rebuilt)
    adopted: bool = False  # it had no checksum (an older build): re-verified, and its checksum recorded now
    size: int = 0  # bytes hashed


def _verify_shard(path: Path, items: list[str], *, full: bool = True) -> _ShardCheck:
    """Check a shard against its checksum record: size always, sha256 of the whole file when ``full``.

    Absent or stale (other items): ``header`` None, no problem (simply (re)encoded). Damaged (size
    or sha256 differs from the record, or safetensors cannot read it): ``problem`` says how. No
    record (an older build): readable with the right items -> adopted, its record written now.
    """
    if not path.is_file():
        return _ShardCheck(None)
    record = _read_checksum(path)
    try:
        size = path.stat().st_size
    except OSError:
        return _ShardCheck(None)
    if record is not None and size != record["size"]:
        return _ShardCheck(None, f"{size} bytes where {record['size']} were written (truncated or overwritten)")
    header, why = _read_header(path, items)
    if header is None:
        return _ShardCheck(None, why)
    if record is None:
        # An older build's shard: it reads, its sizes add up, its items match; record it from now on.
        _write_json_atomic(_checksum_path(path), {"sha256": _file_sha256(path), "size": size})
        return _ShardCheck(header, adopted=True, size=size)
    if full and _file_sha256(path) != record["sha256"]:
        return _ShardCheck(None, "sha256 differs from the one recorded when it was written (damaged data)")
    return _ShardCheck(header, size=size if full else 0)


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: a killed process whose parent has not reaped it yet is a zombie
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _remove_stale_temps(folder: Path) -> list[str]:
    """Remove ``<name>.<pid>.tmp`` files whose writer is no longer running on this machine (a
    killed build's half-written shard or record). A live pid's file is left alone: it may be
    another build on this machine finishing a redundant copy."""
    removed = []
    for path in folder.glob("*.tmp"):
        pid = path.name.rsplit(".", 2)[-2] if path.name.count(".") >= 2 else ""
        if pid.isdigit() and _pid_alive(int(pid)):
            continue
        try:
            path.unlink()
            removed.append(path.name)
        except FileNotFoundError:  # its writer renamed it meanwhile
            pass
    return removed


@dataclass
class _Folder:
    """One cache folder to reuse or build."""

    kind: str  # "text" or "latents"
    label: str  # for progress lines
    key: str
    path: Path
    items: list[str]  # captions or image paths, in row order
    shard_size: int
    params: dict[str, Any]  # latents: resolution, crop
    index: dict | None = None  # set once complete
    todo: list[int] = field(default_factory=list)  # shard numbers to encode
    extras: list | None = None  # latents: per item geometry (travels with the shard's job)

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
        import numpy as np

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
        import torch
        from safetensors.torch import save

        _injected_hold(job, written=False)
        items: list[str] = job["items"]
        tensors: dict[str, torch.Tensor] = {}
        failed: dict[str, str] = {}  # row -> why its image could not be loaded
        encoder, device, dtype = self._encoder(job["kind"], job["model"])
        with torch.inference_mode():
            if job["kind"] == "text":
                embeds, mask = _encode_captions(encoder, items)
                tensors["prompt_embeds"] = embeds.to("cpu", torch.float32).contiguous()
                tensors["prompt_attention_mask"] = mask.to("cpu", torch.int64).contiguous()
            else:
                from sana_ray.data.images import Geometry, load_prepared

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
        final = Path(job["path"])
        tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")
        metadata = {"items": json.dumps(items, ensure_ascii=False), "failed": json.dumps(failed), "format": str(CACHE_FORMAT)}
        blob = save(tensors, metadata=metadata)  # the file's bytes, hashed before they reach the disk
        tmp.write_bytes(blob)
        # The record goes in place before the shard: a shard is finished only when its file matches
        # its record, so a kill between the two renames leaves a missing (or old) shard, redone next time.
        _write_json_atomic(_checksum_path(final), {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)})
        _injected_hold(job, written=True)
        os.replace(tmp, final)
        return {"folder": job["folder"], "shard": job["shard"], "count": len(items)}


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
# Building


def _plan_text(samples: list[Sample], fingerprint: str, model: "ModelSpec", instruction: list[str] | None, root: Path, shard_size: int, empty_prompt: bool = False) -> _Folder:
    captions = sorted({c for s in samples for c in s.choices} | ({EMPTY_PROMPT} if empty_prompt else set()))
    key = _digest(
        {
            "format": CACHE_FORMAT,
            "kind": "text",
            "model": fingerprint,
            "variant": model.variant,
            "dtype": ENCODE_DTYPE,
            "instruction": instruction,
            "max_sequence_length": model.max_sequence_length,
            "captions": captions,
        }
    )
    return _Folder("text", "text embeddings", key, root / key, captions, shard_size, {})


def _plan_latents(dataset: "DatasetSpec", samples: list[Sample], fingerprint: str, model: "ModelSpec", root: Path, shard_size: int) -> _Folder:
    paths = [s.image_path for s in samples]
    geometry = [s.geometry.to_json() if s.geometry else None for s in samples]
    files = []
    for path, planned in zip(paths, geometry):
        stat = os.stat(path)
        files.append([path, stat.st_size, stat.st_mtime_ns, planned])
    key = _digest(
        {
            "format": CACHE_FORMAT,
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


def _check_folder(folder: _Folder, say: Progress) -> None:
    """Reuse a complete folder whose shards all match their checksums, or list the shards that
    still need encoding: absent, stale (other items) or damaged (those are named in ``say``).

    A complete folder with a missing or damaged shard keeps its index.json while that shard is
    redone (it is rewritten when the build finishes): the index fixes the folder's shard layout,
    and a rebuild that is itself interrupted finds the same shard bad again next time."""
    index = _read_index(folder.path, folder.kind, require_shards=False)
    unit = "captions" if folder.kind == "text" else "images"
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
        checks = list(pool.map(lambda s: _verify_shard(folder.path / _shard_name(s), folder.shard_items(s)), shards))
    elapsed = time.monotonic() - started
    damaged = [(s, c.problem) for s, c in zip(shards, checks) if c.problem]
    for shard, problem in damaged[:DAMAGED_LINES]:
        say(f"{folder.label}: {folder.path / _shard_name(shard)} is damaged: {problem}; rebuilding it")
    if len(damaged) > DAMAGED_LINES:
        say(f"{folder.label}: ... and {len(damaged) - DAMAGED_LINES} more damaged shards; rebuilding them")
    adopted = sum(c.adopted for c in checks)
    if adopted:
        say(f"{folder.label}: {adopted} shard(s) from an older build had no checksum: re-verified, checksum recorded")
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
        name = _shard_name(s)
        expected = folder.shard_items(s)
        header = _verify_shard(folder.path / name, expected, full=False).header
        if header is None:
            raise DataError(f"{folder.label}: shard {folder.path / name} is missing or incomplete after the build; rerun to rebuild it")
        shards.append(name)
        shapes, failed = header
        if folder.kind == "text":
            shape = shapes["prompt_embeds"][1:]
        else:
            for row, path in enumerate(expected):
                if str(row) in failed:
                    items.append({"path": path, "shard": name, "row": row, "error": failed[str(row)]})
                else:
                    items.append({"path": path, "shard": name, "row": row, "shape": shapes[f"latents.{row}"]})
    index: dict[str, Any] = {
        "format": CACHE_FORMAT,
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
    _remove_stale_temps(folder.path)
    _write_json_atomic(folder.path / INDEX_FILE, index)
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
                "path": str(folder.path / _shard_name(shard)),
                "items": folder.shard_items(shard),
                "seq": len(jobs),
                **folder.params,
            }
            if hold:
                job["hold_at"] = int(hold)
            if folder.extras is not None:
                job["geometry"] = folder.extras[shard * folder.shard_size : (shard + 1) * folder.shard_size]
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
                unit = "captions" if folder.kind == "text" else "images"
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
) -> tuple[CacheSet, list[DatasetReport]]:
    """Find every dataset's samples, reuse or build their caches, and say where everything is.

    ``model_source`` is what the encoders load (a local diffusers folder or a hub id); ``model``
    supplies revision, variant, max_sequence_length and the instruction-prefix switch.
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
    store = text_store(datasets)
    empty_prompt = any(getattr(d, "caption_dropout_probability", 0) > 0 for d, _, r in found if r.role != "eval")
    text = _plan_text(
        all_samples, fingerprint, model, instruction, _under(root, store and store.cache_dir, "text"),
        (store and store.write_batch_size) or batch_size, empty_prompt=empty_prompt,
    )
    latent_folders: dict[Path, _Folder] = {}
    dataset_folders: list[_Folder] = []
    for dataset, samples, _ in found:
        if not getattr(dataset, "cache_latents", True):  # encoded in the training loop instead (data/online.py)
            from sana_ray.data.online import plan_online

            dataset_folders.append(plan_online(dataset, samples, model_source, model, root / "latents"))
            continue
        folder = _plan_latents(
            dataset, samples, fingerprint, model, _under(root, getattr(dataset, "cache_dir", None), "latents"),
            getattr(dataset, "vae_batch_size", None) or batch_size,
        )
        folder = latent_folders.setdefault(folder.path, folder)  # identical datasets share one folder
        dataset_folders.append(folder)

    pending: list[_Folder] = []
    for folder in [text, *latent_folders.values()]:  # text first: its shards are queued first
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
    cache_set = _cache_set(root, text, train, say)
    cache_set.eval_sets = {m[0].name: _cache_set(root, text, [(m, f)], say) for m, f in members if m[2].role == "eval"}
    return cache_set, reports


def _entry_file(root: Path, folder: _Folder, shard: str) -> str:
    """A shard's name relative to ``<root>/latents`` when it lies there, else its absolute path."""
    latents = root / "latents"
    if folder.kind == "online":  # no file: the entry carries the planned geometry (data/online.py)
        return shard
    if folder.path.parent == latents:
        return f"{folder.key}/{shard}"
    return str(folder.path / shard)


def _cache_set(root: Path, text: _Folder, members: list, say: Progress) -> CacheSet:
    """The CacheSet of some datasets: ``members`` is [((dataset, samples, report), folder), ...]."""
    assert text.index is not None
    text_row = {caption: row for row, caption in enumerate(text.index["captions"])}
    entries: list[tuple[str, int, int]] = []
    buckets: list[int] = []
    shapes: dict[tuple[int, ...], int] = {}
    names, captions, paths, repeats = [], [], [], []
    caption_rows, dropout, weights, groups, regularisation = [], [], [], [], []
    for number, ((dataset, samples, report), folder) in enumerate(members):
        assert folder.index is not None
        where = {item["path"]: item for item in folder.index["items"]}
        for sample in samples:
            item = where[sample.image_path]
            if "error" in item:  # the image passed discovery but could not be decoded
                report.skip(UNREADABLE, sample.image_path, item["error"])
                report.used -= 1
                say(f"{dataset.name}: skipping unreadable {sample.image_path} ({item['error']})")
                continue
            rows = tuple(text_row[c] for c in sample.choices)
            entries.append((_entry_file(root, folder, item["shard"]), item["row"], rows[0]))
            buckets.append(shapes.setdefault(tuple(item["shape"]), len(shapes)))
            names.append(sample.dataset)
            captions.append(sample.caption)
            paths.append(sample.image_path)
            repeats.append(dataset.repeats)
            caption_rows.append(rows)
            dropout.append(float(getattr(dataset, "caption_dropout_probability", 0.0)))
            weights.append(float(getattr(dataset, "probability", 1.0)))
            groups.append(number)
            regularisation.append(bool(getattr(dataset, "is_regularisation_data", False)))
        if report.used == 0:
            raise DataError(f"dataset '{dataset.name}': none of its images could be decoded ({report.summary()})")
    return CacheSet(
        latents_dir=str(root / "latents"),
        text_dir=str(text.path),
        entries=entries,
        datasets=names,
        captions=captions,
        image_paths=paths,
        repeats=repeats,
        buckets=buckets,
        bucket_shapes=list(shapes),
        text_shape=tuple(text.index["shape"]),
        latent_dirs=[str(f.path) for _, f in members],
        caption_rows=caption_rows,
        dropout=dropout,
        null_text_row=text_row.get(EMPTY_PROMPT),
        weights=weights,
        groups=groups,
        regularisation=regularisation,
    )


# --------------------------------------------------------------------------------------------
# Loading (in a training worker)


def load_cache(cache: CacheSet) -> CachedData:
    """Read a CacheSet's tensors into memory (latents grouped by shape, one text row per caption)."""
    import torch
    from safetensors.torch import load_file

    text_dir = Path(cache.text_dir)
    index = _read_index(text_dir, "text")
    if index is None:
        raise DataError(f"text cache {text_dir} is missing or incomplete; run the cache build again")
    prompt_embeds = torch.empty(index["items_count"], *index["shape"], dtype=torch.float32)
    prompt_mask = torch.empty(index["items_count"], index["shape"][0], dtype=torch.int64)
    start = 0
    for name in index["shards"]:  # one shard in memory at a time
        part = load_file(str(text_dir / name))
        end = start + part["prompt_embeds"].shape[0]
        prompt_embeds[start:end] = part["prompt_embeds"]
        prompt_mask[start:end] = part["prompt_attention_mask"]
        start = end

    # Place each distinct latent (two datasets may share a folder) in its bucket's tensor,
    # allocated up front and filled one shard file at a time: peak memory ~ one copy of the latents.
    latents_dir = Path(cache.latents_dir)
    placed: dict[tuple[str, int], int] = {}  # (file, row) -> row in its bucket's tensor
    counts = [0] * len(cache.bucket_shapes)
    latent_rows: list[int] = []
    for (file, row, _), bucket in zip(cache.entries, cache.buckets):
        if (file, row) not in placed:
            placed[(file, row)] = counts[bucket]
            counts[bucket] += 1
        latent_rows.append(placed[(file, row)])
    latents = [torch.empty(n, *shape, dtype=torch.float32) for n, shape in zip(counts, cache.bucket_shapes)]
    bucket_of = {(file, row): bucket for (file, row, _), bucket in zip(cache.entries, cache.buckets)}
    by_file: dict[str, list[int]] = {}
    for file, row in placed:
        by_file.setdefault(file, []).append(row)
    for file in sorted(by_file):
        path = latents_dir / file
        if not path.is_file():
            raise DataError(f"latent cache shard {path} is missing; run the cache build again")
        tensors = load_file(str(path))
        for row in by_file[file]:
            latents[bucket_of[(file, row)]][placed[(file, row)]] = tensors[f"latents.{row}"]

    return CachedData(
        latents=latents,
        latent_rows=torch.tensor(latent_rows, dtype=torch.long),
        buckets=list(cache.buckets),
        prompt_embeds=prompt_embeds,
        prompt_attention_mask=prompt_mask,
        text_rows=torch.tensor([e[2] for e in cache.entries], dtype=torch.long),
        datasets=list(cache.datasets),
        captions=list(cache.captions),
        caption_rows=list(cache.caption_rows),
        dropout=list(cache.dropout),
        null_text_row=cache.null_text_row,
    )
