"""Synthetic caches: given tensors written as a real build writes them, no encoders needed.

For benchmarks at real Sana shapes (``benchmarks/data_scale.py``: random rows of 300 x 2304) and
for tests that need caches with chosen contents. The shards, checksum records and index.json are
written by the build's own code (``store.write_shard``, ``build._finish_folder``) and the
:class:`~sana_ray.data.cache.index.CacheSet` is made by the build's own ``_cache_set``, so what a
reader sees here is what it sees after a real build. Tensors are taken from iterables, one shard
at a time: a 10 GB cache is written without holding it in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import torch

from dataclasses import dataclass

from sana_ray.data.cache import store
from sana_ray.data.cache.build import MASK_SHARD_SIZE, MASKS, _cache_set, _finish_folder, _Folder
from sana_ray.data.cache.index import CacheSet
from sana_ray.data.samples import DatasetReport, Sample

TORCH_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def _shards(items: Iterable, size: int):
    shard: list = []
    for item in items:
        shard.append(item)
        if len(shard) == size:
            yield shard
            shard = []
    if shard:
        yield shard


def _save(path: Path, tensors: dict[str, torch.Tensor], items: list[str]) -> None:
    from safetensors.torch import save

    metadata = {"items": json.dumps(items, ensure_ascii=False), "failed": "{}", "format": str(store.CACHE_FORMAT)}
    store.write_shard(path, save(tensors, metadata=metadata))


def write_text_cache(folder: Path, captions: Sequence[str], rows: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                     shard_size: int = 8, dtype: torch.dtype = torch.float32) -> _Folder:
    """A complete text cache folder: ``rows`` yields ``(prompt_embeds [L, C], prompt_attention_mask [L])``
    for each caption, in order; embeddings are stored in ``dtype``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = _Folder("text", "text embeddings", folder.name, folder, list(captions), shard_size,
                   {"store_dtype": TORCH_NAMES[dtype]})
    count = 0
    for number, shard in enumerate(_shards(rows, shard_size)):
        embeds = torch.stack([e for e, _ in shard]).to(dtype).contiguous()
        mask = torch.stack([m for _, m in shard]).to(torch.int64).contiguous()
        _save(folder / store.shard_name(number), {"prompt_embeds": embeds, "prompt_attention_mask": mask},
              text.shard_items(number))
        count += len(shard)
    if count != len(text.items):
        raise ValueError(f"{count} text rows for {len(text.items)} captions")
    _finish_folder(text)
    return text


def write_latent_cache(folder: Path, image_paths: Sequence[str], latents: Iterable[torch.Tensor], *,
                       shard_size: int = 8) -> _Folder:
    """A complete latent cache folder: ``latents`` yields one float32 ``[C, h, w]`` per image, in order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = _Folder("latents", "latents synthetic", folder.name, folder, list(image_paths), shard_size, {})
    count = 0
    for number, shard in enumerate(_shards(latents, shard_size)):
        tensors = {f"latents.{row}": latent.to(torch.float32).contiguous() for row, latent in enumerate(shard)}
        _save(folder / store.shard_name(number), tensors, images.shard_items(number))
        count += len(shard)
    if count != len(images.items):
        raise ValueError(f"{count} latents for {len(images.items)} images")
    _finish_folder(images)
    return images


def write_mask_cache(folder: Path, image_paths: Sequence[str], masks: Iterable[torch.Tensor], *,
                     shard_size: int = MASK_SHARD_SIZE) -> _Folder:
    """A complete loss-mask folder: ``masks`` yields one float32 ``[1, h, w]`` in [0, 1] per image, in order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    result = _Folder(MASKS, "masks synthetic", folder.name, folder, list(image_paths), shard_size, {"factor": 1})
    count = 0
    for number, shard in enumerate(_shards(masks, shard_size)):
        tensors = {f"masks.{row}": mask.to(torch.float32).clone() for row, mask in enumerate(shard)}  # one may repeat
        _save(folder / store.shard_name(number), tensors, result.shard_items(number))
        count += len(shard)
    if count != len(result.items):
        raise ValueError(f"{count} masks for {len(result.items)} images")
    _finish_folder(result)
    return result


class _Dataset:
    """The dataset options ``_cache_set`` reads (a DatasetSpec would insist on a real folder of images)."""

    def __init__(self, name: str, dropout: float, repeats: int = 0, loss_weight: float = 1.0) -> None:
        self.name, self.caption_dropout_probability, self.repeats = name, dropout, repeats
        self.probability, self.is_regularisation_data, self.loss_weight = 1.0, False, loss_weight


@dataclass
class SyntheticDataset:
    """One dataset of a synthetic CacheSet: image ``i`` of ``latents`` with the captions ``choices[i]``
    (indices into the text cache's captions; the first is its first caption) and, with ``masks``,
    the ``i``-th mask of that folder."""

    latents: _Folder
    choices: Sequence[Sequence[int]]
    name: str = "synthetic"
    dropout: float = 0.0
    repeats: int = 0
    loss_weight: float = 1.0
    masks: _Folder | None = None


def cache_set_of(text: _Folder, datasets: Sequence[SyntheticDataset]) -> CacheSet:
    """The CacheSet of several synthetic datasets, in order (``dropout`` > 0 needs the empty caption
    ``""`` among the text cache's captions)."""
    captions = text.items
    members, masks = [], {}
    for d in datasets:
        samples = [
            Sample(dataset=d.name, image_path=path, caption=captions[rows[0]], captions=tuple(captions[r] for r in rows),
                   mask=f"{path}.mask" if d.masks is not None else None)
            for path, rows in zip(d.latents.items, d.choices)
        ]
        report = DatasetReport(dataset=d.name, found=len(samples), used=len(samples))
        members.append(((_Dataset(d.name, d.dropout, d.repeats, d.loss_weight), samples, report), d.latents))
        if d.masks is not None:
            masks[d.name] = d.masks
    return _cache_set(datasets[0].latents.path.parent.parent, text, members, lambda _line: None, masks=masks)


def cache_set(text: _Folder, latents: _Folder, choices: Sequence[Sequence[int]], *, dataset: str = "synthetic",
              dropout: float = 0.0, repeats: int = 0, loss_weight: float = 1.0, masks: _Folder | None = None) -> CacheSet:
    """The CacheSet of one synthetic dataset (see :class:`SyntheticDataset`)."""
    return cache_set_of(text, [SyntheticDataset(latents, choices, dataset, dropout, repeats, loss_weight, masks)])
