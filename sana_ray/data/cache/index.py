"""The run's sample index: which cached rows each training sample uses, and where they lie on disk.

A :class:`CacheSet` is built by the driver (``build.build_caches``) and sent to every training
worker, which reads the rows it needs from the shard files on demand (``reader.CacheReader``).
It is compact, because every worker holds it for the whole run: the per-sample numbers are numpy
arrays (about 70 bytes a sample, 16 of them for the loss mask's place and the loss weight), the
strings are one path per sample and one per shard file.
At 100k samples that is ~20 MB, independent of the tensors' sizes (a real Sana text row alone
is 300 x 2304 x 4 B = 2.76 MB).

Per sample ``i``:

* latent: ``files[latent_file[i]]`` at byte ``latent_offset[i]`` (``latent_dtype``, shape
  ``bucket_shapes[buckets[i]]``); ``latent_file[i] == -1``: a ``cache_latents: false`` sample,
  encoded by the worker from ``image_paths[i]`` with ``online_geometry[latent_offset[i]]``;
* text: row ``caption_rows[caption_offsets[i]:caption_offsets[i + 1]]`` of the text cache, one per
  caption choice (the first is the sample's first caption); ``null_text_row`` is the empty
  prompt, drawn with probability ``dropout[i]`` (caption dropout);
* sampling: ``repeats[i]``, ``weights[i]`` (its dataset's probability), ``groups[i]`` (its
  dataset's number; ``dataset_names[groups[i]]``), ``regularisation[i]``;
* objective: ``loss_weights[i]`` (its dataset's ``loss_weight``); its loss mask at
  ``files[mask_file[i]]`` byte ``mask_offset[i]`` (float32 ``[1, h, w]``, the latent grid),
  ``mask_file[i] == -1``: none cached -- an online sample's mask, if any, is the image
  ``online_masks[latent_offset[i]]``, made by the worker like its latent.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from sana_ray.data.sampler import BatchPlan


@dataclass
class TextShards:
    """Where the text cache's rows are: row ``r`` is row ``r % rows_per_shard`` of shard
    ``r // rows_per_shard``, at ``embeds_offset[shard] + (r % rows_per_shard) * L * C * itemsize``."""

    folder: str
    files: list[str]  # shard paths, in row order
    sizes: list[int]  # their sizes in bytes, as written (checked when a reader opens them)
    rows_per_shard: int
    count: int  # rows in all
    embeds_offset: list[int]  # per shard: byte offset of prompt_embeds [n, L, C]
    mask_offset: list[int]  # per shard: byte offset of prompt_attention_mask [n, L] (I64)
    dtype: str  # safetensors dtype of prompt_embeds: F32 or BF16
    shape: tuple[int, int]  # (L, C) of a row


@dataclass(eq=False)
class CacheSet:
    """See the module docstring. Picklable; ``==`` compares every field (arrays element-wise)."""

    latents_dir: str  # <cache_root>/latents (for messages)
    text: TextShards
    files: list[str]  # distinct latent and mask shard files (absolute paths)
    file_sizes: list[int]  # their sizes in bytes, as written
    latent_file: np.ndarray  # [n] int32, index into files; -1: encoded online
    latent_offset: np.ndarray  # [n] int64, byte offset in the file (online: index into online_geometry)
    latent_dtype: str  # safetensors dtype of the latents (F32)
    buckets: np.ndarray  # [n] int32, index into bucket_shapes
    bucket_shapes: list[tuple[int, ...]]  # latent shape [C, h, w] of each bucket
    caption_offsets: np.ndarray  # [n + 1] int64
    caption_rows: np.ndarray  # [sum of choices] int32, text rows
    dropout: np.ndarray  # [n] float64, caption dropout probability
    repeats: np.ndarray  # [n] int32
    weights: np.ndarray  # [n] float64
    groups: np.ndarray  # [n] int32, index into dataset_names
    regularisation: np.ndarray  # [n] bool
    image_paths: list[str]  # [n]
    dataset_names: list[str]  # per group
    latent_dirs: list[str]  # per group: its latent cache folder (for messages)
    null_text_row: int | None = None  # text row of the empty prompt (present when any dropout > 0)
    online_geometry: list[list] = field(default_factory=list)  # images.Geometry.to_json() of online samples
    mask_file: np.ndarray | None = None  # [n] int32, index into files; -1: no cached mask. None: no masks at all
    mask_offset: np.ndarray | None = None  # [n] int64, byte offset of the mask row in its file
    online_masks: list[str | None] = field(default_factory=list)  # per online sample (as online_geometry): its mask image
    loss_weights: np.ndarray | None = None  # [n] float32, the dataset's loss_weight. None: all 1
    eval_sets: dict[str, "CacheSet"] = field(default_factory=dict)  # dataset_type eval sets, by name (never trained on)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CacheSet):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            same = np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
            if not same:
                return False
        return True

    # --- per-sample views (driver side: reports, messages, tests)

    @property
    def text_dir(self) -> str:
        return self.text.folder

    @property
    def datasets(self) -> list[str]:
        return [self.dataset_names[g] for g in self.groups.tolist()]

    def choices(self, i: int) -> tuple[int, ...]:
        """Text rows of sample ``i``'s caption choices (the first is its first caption)."""
        return tuple(self.caption_rows[self.caption_offsets[i] : self.caption_offsets[i + 1]].tolist())

    @property
    def first_text_rows(self) -> np.ndarray:
        """[n] int64: each sample's first caption's text row."""
        return self.caption_rows[self.caption_offsets[:-1]].astype(np.int64)

    def is_online(self, i: int) -> bool:
        return bool(self.latent_file[i] < 0)

    @property
    def has_online(self) -> bool:
        return bool((self.latent_file < 0).any())

    @property
    def has_masks(self) -> bool:
        """Whether any sample trains with a loss mask (cached, or made online)."""
        cached = self.mask_file is not None and bool((self.mask_file >= 0).any())
        return cached or any(m is not None for m in self.online_masks)

    def mask_image(self, i: int) -> str | None:
        """The mask image of online sample ``i`` (None: no mask, or a cached sample)."""
        if self.latent_file[i] >= 0 or not self.online_masks:
            return None
        return self.online_masks[int(self.latent_offset[i])]

    def bucket_labels(self) -> list[str]:
        return ["latent " + "x".join(map(str, shape)) for shape in self.bucket_shapes]

    def batch_plan(self, batch_size: int, world_size: int, seed: int) -> "BatchPlan":
        from sana_ray.data.sampler import BatchPlan

        return BatchPlan(
            self.buckets.tolist(), self.repeats.tolist(), batch_size=batch_size, world_size=world_size, seed=seed,
            weights=self.weights.tolist(), groups=self.groups.tolist(), bucket_labels=self.bucket_labels(),
        )
