"""Online latents: datasets with ``cache_latents: false`` (SimpleTuner's ``--vae_cache_disable``).

For such a dataset the cache build still discovers, filters and plans every image's geometry
(resize, crop box, bucket) and caches the text embeddings, but writes no latent shards: each
sample's entry in the :class:`~sana_ray.data.cache.CacheSet` is ``"online:<geometry JSON>"``
(:func:`entry_file`) instead of a shard file, and its bucket shape comes from the planned
geometry and the VAE's config (:func:`latent_shape`). In a training worker, :func:`load_data`
reads the cached part as :func:`~sana_ray.data.cache.load_cache` does and returns an
:class:`OnlineData` whose ``batch`` loads the online samples' images with the cache encoder's own
code (``images.load_prepared`` with the planned geometry: same resize, same crop, a random crop
placed where the cache would place it) and encodes them with the run's VAE
(``model.latents.LatentEncoder``: float32, eval mode, no grad, ``* scaling_factor``), loaded once
per worker and only when the run has an online sample. So a batch yields the latents the cache
would have held (up to the float rounding of a different VAE batch), and nothing but the
current batch's images is ever in memory.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sana_ray.data.cache import CachedData, CacheSet, _Folder, load_cache
from sana_ray.data.samples import DataError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from sana_ray.data.samples import Sample
    from sana_ray.manifest.schema import DatasetSpec, ModelSpec

ONLINE_PREFIX = "online:"  # CacheSet.entries[i][0] of a sample encoded in the training loop
ONLINE_KIND = "online"
DECODE_THREADS = 8  # images decoded in parallel per batch (PIL releases the GIL)


def entry_file(geometry: list) -> str:
    """The CacheSet entry "file" of an online sample: its planned geometry, as JSON."""
    return ONLINE_PREFIX + json.dumps(geometry, separators=(",", ":"))


def is_online(entry_file_name: str) -> bool:
    return entry_file_name.startswith(ONLINE_PREFIX)


def entry_geometry(entry_file_name: str):
    from sana_ray.data.images import Geometry

    return Geometry.from_json(json.loads(entry_file_name[len(ONLINE_PREFIX):]))


def vae_layout(model_source: str, revision: str | None = None) -> tuple[int, int]:
    """(latent channels, downsample factor) of the run's VAE, from its config only (no weights)."""
    from diffusers import AutoencoderDC

    kwargs = {"revision": revision} if revision else {}
    config = AutoencoderDC.load_config(model_source, subfolder="vae", **kwargs)
    # As LatentEncoder.downsample_factor (and SanaPipeline's vae_scale_factor) compute it.
    return int(config["latent_channels"]), 2 ** (len(config["encoder_block_out_channels"]) - 1)


def latent_shape(geometry, channels: int, factor: int) -> list[int]:
    """[C, h, w] of the latent of an image prepared with ``geometry``."""
    width, height = geometry.size
    if width % factor or height % factor:
        raise DataError(f"planned image size {width}x{height} is not a multiple of the VAE's downsampling ({factor})")
    return [channels, height // factor, width // factor]


def plan_online(dataset: "DatasetSpec", samples: list["Sample"], model_source: str, model: "ModelSpec", root: Path) -> _Folder:
    """The build's stand-in for a latent folder of a ``cache_latents: false`` dataset: complete
    already (nothing to encode or write), its index listing each image's latent shape and, as its
    "shard", the online entry that carries the planned geometry to the training workers."""
    channels, factor = vae_layout(model_source, model.revision)
    items = []
    for row, sample in enumerate(samples):
        if sample.geometry is None:  # pragma: no cover - discovery always plans one
            raise DataError(f"{sample.image_path}: no planned geometry")
        items.append({
            "path": sample.image_path,
            "shard": entry_file(sample.geometry.to_json()),
            "row": row,
            "shape": latent_shape(sample.geometry, channels, factor),
        })
    paths = [s.image_path for s in samples]
    folder = _Folder(ONLINE_KIND, f"online latents {dataset.name}", ONLINE_KIND, root / ONLINE_KIND, paths, 1, {})
    folder.index = {"kind": ONLINE_KIND, "items": items}
    return folder


# --------------------------------------------------------------------------------------------
# In a training worker


@dataclass
class OnlineData(CachedData):
    """CachedData whose online samples (``online[i]`` is their geometry) are encoded per batch."""

    online: dict[int, Any] = field(default_factory=dict)  # sample -> images.Geometry
    image_paths: list[str] = field(default_factory=list)  # per sample
    encoder: Any = None  # model.latents.LatentEncoder, or a callable returning one (loaded on first use)

    def latent_encoder(self):
        if self.encoder is not None and not hasattr(self.encoder, "encode"):
            self.encoder = self.encoder()  # loaded once, on first use
        if self.encoder is None:
            raise RuntimeError("this data has online samples but no VAE to encode them with")
        return self.encoder

    def encode_online(self, indices: list[int]) -> "torch.Tensor":
        """Latents [n, C, h, w] (float32, CPU) of these online samples, which share a bucket."""
        import torch

        from sana_ray.data.images import load_prepared

        def load(i: int) -> "torch.Tensor":
            try:
                return load_prepared(self.image_paths[i], self.online[i])
            except Exception as error:
                raise DataError(
                    f"cannot load {self.image_paths[i]} for online VAE encoding (cache_latents: false): "
                    f"{type(error).__name__}: {error}"
                ) from error

        with ThreadPoolExecutor(max_workers=max(1, min(DECODE_THREADS, len(indices)))) as pool:
            pixels = torch.stack(list(pool.map(load, indices)))
        encoder = self.latent_encoder()
        return encoder.encode(pixels).to("cpu", torch.float32)

    def batch(self, indices: list[int], key: Any = None) -> dict[str, "torch.Tensor"]:
        import torch

        online = [n for n, i in enumerate(indices) if i in self.online]
        if not online:
            return super().batch(indices, key)
        if not indices:
            raise ValueError("empty batch")
        bucket = self.buckets[indices[0]]
        if any(self.buckets[i] != bucket for i in indices):
            raise ValueError(f"samples {indices} have different latent shapes; batch within a bucket (BatchPlan does)")
        cached = [n for n in range(len(indices)) if indices[n] not in self.online]
        text = self.text_rows.index_select(0, torch.as_tensor(indices, dtype=torch.long)) if key is None else self.text_rows_for(indices, key)
        encoded = self.encode_online([indices[n] for n in online])
        latents = torch.empty(len(indices), *encoded.shape[1:], dtype=torch.float32)
        latents[online] = encoded
        if cached:
            rows = self.latent_rows.index_select(0, torch.as_tensor([indices[n] for n in cached], dtype=torch.long))
            latents[cached] = self.latents[bucket].index_select(0, rows)
        return {
            "latents": latents,
            "prompt_embeds": self.prompt_embeds.index_select(0, text),
            "prompt_attention_mask": self.prompt_attention_mask.index_select(0, text),
        }


def has_online(cache: CacheSet) -> bool:
    return any(is_online(file) for file, _, _ in cache.entries)


def load_data(cache: CacheSet, encoder: Any = None) -> CachedData:
    """What a training worker trains from: :func:`load_cache` when every sample is cached, else an
    :class:`OnlineData` (the cached samples' latents and all text rows in memory; the online
    samples' geometry). ``encoder``: a ``LatentEncoder``, or a callable that loads one (called at
    the first batch with an online sample)."""
    import torch

    online = {i: entry_geometry(entry[0]) for i, entry in enumerate(cache.entries) if is_online(entry[0])}
    if not online:
        return load_cache(cache)
    cached = [i for i in range(len(cache.entries)) if i not in online]
    # load_cache on the cached samples alone (same bucket numbering: bucket_shapes is unchanged).
    part = load_cache(replace(cache, entries=[cache.entries[i] for i in cached], buckets=[cache.buckets[i] for i in cached]))
    latent_rows = torch.full((len(cache.entries),), -1, dtype=torch.long)
    if cached:
        latent_rows[torch.as_tensor(cached, dtype=torch.long)] = part.latent_rows
    return OnlineData(
        latents=part.latents,
        latent_rows=latent_rows,
        buckets=list(cache.buckets),
        prompt_embeds=part.prompt_embeds,
        prompt_attention_mask=part.prompt_attention_mask,
        text_rows=torch.tensor([e[2] for e in cache.entries], dtype=torch.long),
        datasets=list(cache.datasets),
        captions=list(cache.captions),
        caption_rows=list(cache.caption_rows),
        dropout=list(cache.dropout),
        null_text_row=cache.null_text_row,
        online=online,
        image_paths=list(cache.image_paths),
        encoder=encoder,
    )
