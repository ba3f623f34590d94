"""What a training worker trains from: rows read from the cache's shard files on demand.

:class:`CacheReader` holds only the run's sample index (:class:`~sana_ray.data.cache.index.CacheSet`,
~200 bytes a sample): a micro-batch's latents and text rows are read from the shard files at the
byte ranges their safetensors headers give (``os.preadv`` straight into the batch tensor, so only
the batch's bytes ever enter the process: no whole-file loads, and no memory map whose touched
pages would count as the worker's resident memory). Worker memory is therefore independent of the
dataset's size; ``benchmarks/data_scale.py`` measures it at real Sana shapes.

``cache_latents: false`` samples are loaded with the cache encoder's own image code (same resize,
same crop, a random crop placed where the cache would place it) and encoded with the run's VAE,
loaded once per worker on first use; their loss masks, if any, are made with the mask cache's
own code (``images.load_mask``). An image (or its mask) that became unreadable after discovery
is skipped: its place in the batch is taken by the batch's first readable sample (shapes stay
equal on every rank), and it is counted in ``unreadable`` -- the run goes on.

Objective extras, present only when they change the loss, so that a batch without them is
exactly the batch of a run without the features: ``loss_mask [B, 1, h, w]`` when a sample of
the batch has a mask that is not all white (samples without a mask get ones), and
``loss_weight [B]`` when a sample's dataset has a ``loss_weight`` other than 1. The all-white
check runs here, on the CPU, so the training loop never synchronizes with the GPU to make it.

:class:`Prefetcher` prepares the next micro-batches in a background thread (a bounded queue of
``depth``), in exactly the order the loop consumes them, so the loop does not wait on disk (or on
the VAE for online samples) in steady state. The bytes a batch holds are those the old in-memory
loader produced: the same files, rows, caption draws and dropout (tests/data/test_reader.py).

Every node running training workers must see the cache at the path the driver built it at: the
reader checks every file it will read when it opens (existence and size) and fails at once,
naming the file and the node, rather than with a missing file mid-run.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import socket
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sana_ray.data.cache import store
from sana_ray.data.cache.index import CacheSet
from sana_ray.data.samples import DataError

if TYPE_CHECKING:  # pragma: no cover
    from sana_ray.data.sampler import BatchPlan

TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64}
DECODE_THREADS = 8  # online images decoded in parallel per batch (PIL releases the GIL)
MAX_OPEN_FILES = 64  # shard files kept open per reading thread (a real dataset has thousands)
READ_THREADS = 4  # reads in flight per reader
PARALLEL_READ_BYTES = 1 << 20  # batches smaller than this are read by one thread
DATA_DOC = "docs/data.md (multi-node: shared storage)"


def _node() -> str:
    return socket.gethostname()


class CacheReader:
    """Batches of a CacheSet's samples, read from disk on demand. See the module docstring.

    ``encoder``: a ``model.latents.LatentEncoder``, or a callable returning one (called at the
    first batch with an online sample); needed only when the cache set has online samples.
    """

    def __init__(self, cache: CacheSet, *, encoder: Any = None, check_files: bool = True) -> None:
        self.cache = cache
        self.encoder = encoder
        self.buckets = cache.buckets.tolist()
        self.unreadable: dict[str, str] = {}  # online images that failed to load: path -> why
        self._local = threading.local()  # per thread: OrderedDict path -> fd (see _fd)
        self._caches: list[OrderedDict] = []  # every thread's, for close()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._text_dtype = TORCH_DTYPES[cache.text.dtype]
        self._latent_dtype = TORCH_DTYPES[cache.latent_dtype]
        if check_files:
            self.check_files()

    def __len__(self) -> int:
        return len(self.cache)

    # --- opening

    def check_files(self) -> None:
        """Every shard this reader may read exists with the size it was written with (one stat
        each); else a DataError naming the file, the node and the fix."""
        text = self.cache.text
        for path, size in [*zip(text.files, text.sizes), *zip(self.cache.files, self.cache.file_sizes)]:
            try:
                found = os.stat(path).st_size
            except FileNotFoundError:
                raise self._missing(Path(path)) from None
            except OSError as error:
                raise DataError(f"node {_node()} cannot read cache shard {path}: {error}. See {DATA_DOC}.") from None
            if found != size:
                raise DataError(
                    f"cache shard {path} has {found} bytes where {size} were written (truncated or replaced after the "
                    f"cache was built). Fix: apply the manifest again: the build verifies every shard and re-encodes "
                    f"damaged ones (or delete {Path(path).parent} to rebuild it whole)."
                )

    def _missing(self, path: Path) -> DataError:
        root = path.parent.parent.parent  # <cache_root>/{latents,text}/<key>/shard
        if not root.exists():
            return DataError(
                f"node {_node()} cannot see the cache folder {root} (it does not exist on this node). Every node that "
                f"runs training workers must see output.cache_dir at the same path as the driver: shared storage (NFS, a "
                f"mounted bucket), or a copy of the finished cache at that path on every node. See {DATA_DOC}."
            )
        return DataError(
            f"cache shard {path} is missing on node {_node()} (deleted after the cache was built?). Fix: apply the "
            f"manifest again: the build re-encodes missing shards. If other nodes have it, this node is not seeing the "
            f"same cache folder (see {DATA_DOC})."
        )

    def _fd(self, path: str) -> int:
        """An open descriptor of ``path`` from the calling thread's own cache: a descriptor is only
        ever used and closed by the thread that opened it, so eviction never races a read."""
        files = getattr(self._local, "files", None)
        if files is None:
            files = self._local.files = OrderedDict()
            with self._lock:
                self._caches.append(files)
        fd = files.get(path)
        if fd is not None:
            files.move_to_end(path)
            return fd
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise self._missing(Path(path)) from None
        files[path] = fd
        while len(files) > MAX_OPEN_FILES:
            _, old = files.popitem(last=False)
            os.close(old)
        return fd

    def _read_one(self, job: tuple[str, int, torch.Tensor]) -> None:
        """Fill the contiguous tensor ``out`` with its bytes at ``offset`` of ``path``."""
        path, offset, out = job
        buffer = memoryview(out.view(-1).view(torch.uint8).numpy())
        got = os.preadv(self._fd(path), [buffer], offset)
        if got != len(buffer):
            raise DataError(f"cache shard {path}: short read at byte {offset} ({got} of {len(buffer)}); it was truncated "
                            f"while the run was reading it. Fix: apply the manifest again to rebuild it.")

    def _read(self, jobs: list[tuple[str, int, torch.Tensor]]) -> None:
        """Do these reads, READ_THREADS at a time: on a network file system or a cold disk the
        latency of one read, not the bandwidth, limits a single reader."""
        if len(jobs) < 2 or sum(out.nbytes for _, _, out in jobs) < PARALLEL_READ_BYTES:
            for job in jobs:  # small batches: thread hand-offs would cost more than the reads
                self._read_one(job)
            return
        if self._pool is None or self._pool_pid != os.getpid():  # a forked child has none of the parent's threads
            self._pool = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="sana-ray-read")
            self._pool_pid = os.getpid()
        for _ in self._pool.map(self._read_one, jobs):
            pass

    def close(self) -> None:
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown()
        self._pool = None
        with self._lock:
            for files in self._caches:
                for fd in files.values():
                    os.close(fd)
                files.clear()

    # --- text

    def text_rows_for(self, indices: list[int], key: Any) -> list[int]:
        """Text rows of these samples for draw ``key``: the empty prompt with each sample's dropout
        probability, else one of its captions; a pure function of (key, position, sample).
        ``key`` None: every sample's first caption, no dropout."""
        cache = self.cache
        offsets = cache.caption_offsets
        if key is None:
            return [int(cache.caption_rows[offsets[i]]) for i in indices]
        digest = hashlib.sha256(f"sana-ray-captions:{json.dumps(key, default=str)}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)
        draws = torch.rand(len(indices), 2, generator=generator, dtype=torch.float64).tolist()
        rows = []
        for i, (drop, pick) in zip(indices, draws):
            choices = cache.caption_rows[offsets[i] : offsets[i + 1]]
            if cache.null_text_row is not None and drop < float(cache.dropout[i]):
                rows.append(cache.null_text_row)
            else:
                rows.append(int(choices[min(int(pick * len(choices)), len(choices) - 1)]))
        return rows

    def read_text(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds [B, L, C] in the store's dtype, prompt_attention_mask [B, L] int64)``."""
        length, channels = self.cache.text.shape
        embeds = torch.empty(len(rows), length, channels, dtype=self._text_dtype)
        mask = torch.empty(len(rows), length, dtype=torch.int64)
        self._read(self._text_jobs(rows, embeds, mask))
        return embeds, mask

    def _text_jobs(self, rows: list[int], embeds: torch.Tensor, mask: torch.Tensor) -> list:
        text = self.cache.text
        length, channels = text.shape
        row_bytes = length * channels * embeds.element_size()
        jobs = []
        for b, row in enumerate(rows):
            shard, local = divmod(row, text.rows_per_shard)
            path = text.files[shard]
            jobs.append((path, text.embeds_offset[shard] + local * row_bytes, embeds[b]))
            jobs.append((path, text.mask_offset[shard] + local * length * 8, mask[b]))
        return jobs

    # --- latents

    def latent_encoder(self):
        if self.encoder is not None and not hasattr(self.encoder, "encode"):
            self.encoder = self.encoder()  # loaded once, on first use
        if self.encoder is None:
            raise RuntimeError("this data has online samples but no VAE to encode them with")
        return self.encoder

    def _load_online_pixels(self, indices: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor | None] | str]:
        """(pixels [3, H, W], loss mask [1, h, w] or None) of these online samples, or why an image
        (or its mask) could not be loaded."""
        from sana_ray.data.images import Geometry, load_mask, load_prepared

        cache = self.cache

        def load(i: int) -> tuple[torch.Tensor, torch.Tensor | None] | str:
            try:
                geometry = Geometry.from_json(cache.online_geometry[cache.latent_offset[i]])
                pixels = load_prepared(cache.image_paths[i], geometry)
                mask_path = cache.mask_image(i)
                if mask_path is None:
                    return pixels, None
                factor = geometry.size[0] // cache.bucket_shapes[self.buckets[i]][-1]  # the VAE's downsampling
                return pixels, load_mask(mask_path, geometry, factor)
            except Exception as error:  # changed, damaged or deleted since discovery
                return f"{type(error).__name__}: {error}"

        with ThreadPoolExecutor(max_workers=max(1, min(DECODE_THREADS, len(indices)))) as pool:
            return dict(zip(indices, pool.map(load, indices)))

    def batch(self, indices: list[int], key: Any = None) -> dict[str, torch.Tensor]:
        """Stacked tensors for these samples (which must share a bucket, as BatchPlan batches do):
        ``latents [B, C, h, w]`` (float32, already times the VAE's scaling factor),
        ``prompt_embeds [B, L, C]`` (the store's dtype), ``prompt_attention_mask [B, L]`` (int64).

        ``key`` (e.g. ``(seed, rank, micro_batch)``): draw each sample's caption among its choices
        and apply caption dropout, deterministically per key. ``None``: every sample's first
        caption and no dropout.
        """
        if not indices:
            raise ValueError("empty batch")
        cache = self.cache
        indices = [int(i) for i in indices]
        bucket = self.buckets[indices[0]]
        if any(self.buckets[i] != bucket for i in indices):
            raise ValueError(f"samples {indices} have different latent shapes; batch within a bucket (BatchPlan does)")
        online = [i for i in indices if cache.latent_file[i] < 0]
        pixels = self._load_online_pixels(sorted(set(online))) if online else {}
        failed = {i for i, p in pixels.items() if isinstance(p, str)}
        if failed:
            indices = self._replace_unreadable(indices, failed, pixels)
        latents = torch.empty(len(indices), *cache.bucket_shapes[bucket], dtype=self._latent_dtype)
        length, channels = cache.text.shape
        embeds = torch.empty(len(indices), length, channels, dtype=self._text_dtype)
        mask = torch.empty(len(indices), length, dtype=torch.int64)
        jobs = [(cache.files[cache.latent_file[i]], int(cache.latent_offset[i]), latents[b])
                for b, i in enumerate(indices) if cache.latent_file[i] >= 0]
        loss_mask, mask_jobs = self._loss_mask(indices, latents.shape, pixels)
        self._read(jobs + mask_jobs + self._text_jobs(self.text_rows_for(indices, key), embeds, mask))  # one round of reads
        positions = [b for b, i in enumerate(indices) if cache.latent_file[i] < 0]
        if positions:
            stacked = torch.stack([pixels[indices[b]][0] for b in positions])
            latents[positions] = self.latent_encoder().encode(stacked).to("cpu", self._latent_dtype)
        batch = {"latents": latents, "prompt_embeds": embeds, "prompt_attention_mask": mask}
        if loss_mask is not None and not bool((loss_mask == 1).all()):  # all white: the unmasked loss, exactly
            batch["loss_mask"] = loss_mask
        if cache.loss_weights is not None:
            weights = cache.loss_weights[indices]
            if (weights != 1).any():
                batch["loss_weight"] = torch.from_numpy(weights.astype(np.float32))
        return batch

    def _loss_mask(self, indices: list[int], shape: torch.Size, pixels: dict) -> tuple[torch.Tensor | None, list]:
        """``(loss_mask [B, 1, h, w] or None, reads that fill its cached rows)``: ones where a sample
        has no mask, online masks filled in already; None when no sample of the batch has a mask."""
        cache = self.cache
        cached = [b for b, i in enumerate(indices) if cache.mask_file is not None and cache.mask_file[i] >= 0]
        online = [b for b, i in enumerate(indices) if cache.latent_file[i] < 0 and pixels[i][1] is not None]
        if not cached and not online:
            return None, []
        loss_mask = torch.ones(shape[0], 1, *shape[2:], dtype=torch.float32)
        for b in online:
            loss_mask[b] = pixels[indices[b]][1]
        jobs = [(cache.files[cache.mask_file[indices[b]]], int(cache.mask_offset[indices[b]]), loss_mask[b]) for b in cached]
        return loss_mask, jobs

    def _replace_unreadable(self, indices: list[int], failed: set[int], pixels: dict) -> list[int]:
        cache = self.cache
        for i in failed:
            path = cache.image_paths[i]
            if path not in self.unreadable:
                self.unreadable[path] = pixels[i]
                print(f"[sana-ray] skipping unreadable {path} (online VAE encoding): {pixels[i]}", flush=True)
        good = [i for i in indices if i not in failed]
        if not good:
            raise DataError(
                f"every image of a micro-batch could not be loaded for online VAE encoding (cache_latents: false), "
                f"e.g. {cache.image_paths[indices[0]]}: {pixels[indices[0]]}. Fix the files, or set cache_latents: true."
            )
        return [good[0] if i in failed else i for i in indices]


def open_reader(cache: CacheSet, encoder: Any = None) -> CacheReader:
    """The reader a training worker trains from (checks every shard it may read, see CacheReader)."""
    return CacheReader(cache, encoder=encoder)


# --------------------------------------------------------------------------------------------
# Prefetching


class Prefetcher:
    """Micro-batches ``start, start + 1, ... stop - 1`` of ``plan`` for ``rank``, read ahead.

    A background thread keeps up to ``depth`` batches ready (``depth`` 0: read in ``get``); with
    ``pin_memory`` the tensors are pinned for a non-blocking copy to the GPU. ``get(m)`` must be
    called in order; ``wait_s`` is the time it spent waiting (what the loop lost to data).
    """

    def __init__(self, reader: CacheReader, plan: "BatchPlan", *, rank: int, seed: int, start: int, stop: int,
                 depth: int = 2, pin_memory: bool = False) -> None:
        self.reader, self.plan, self.rank, self.seed = reader, plan, rank, seed
        self.next, self.stop, self.depth, self.pin_memory = start, stop, depth, pin_memory
        self.wait_s = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        if depth > 0 and start < stop:
            self._thread = threading.Thread(target=self._fill, args=(start,), name="sana-ray-prefetch", daemon=True)
            self._thread.start()

    def _read(self, micro_batch: int) -> dict[str, torch.Tensor]:
        batch = self.reader.batch(self.plan.batch(micro_batch, self.rank), key=(self.seed, self.rank, micro_batch))
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def _fill(self, start: int) -> None:
        for micro_batch in range(start, self.stop):
            try:
                item: Any = self._read(micro_batch)
            except BaseException as error:  # handed to the loop, which raises it
                item = error
            while not self._closed.is_set():
                try:
                    self._queue.put((micro_batch, item), timeout=0.5)
                    break
                except queue.Full:
                    continue
            if self._closed.is_set() or isinstance(item, BaseException):
                return

    def get(self, micro_batch: int) -> dict[str, torch.Tensor]:
        if micro_batch != self.next:
            raise RuntimeError(f"prefetcher: asked for micro-batch {micro_batch}, the next one is {self.next}")
        if not self.next < self.stop:
            raise IndexError(f"micro-batch {micro_batch} is past the last one ({self.stop - 1})")
        self.next += 1
        started = time.perf_counter()
        if self._thread is None:
            batch = self._read(micro_batch)
        else:
            while True:
                try:
                    got, batch = self._queue.get(timeout=1.0)
                    break
                except queue.Empty:
                    if not self._thread.is_alive():
                        raise RuntimeError("the prefetch thread stopped without a batch") from None
            if isinstance(batch, BaseException):
                raise batch
            assert got == micro_batch, (got, micro_batch)
        self.wait_s += time.perf_counter() - started
        return batch

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

