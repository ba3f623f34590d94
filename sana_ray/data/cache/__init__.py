"""The latent and text-embedding caches: built once by the driver, streamed by every training worker.

* ``store``: the files (safetensors shards, checksums, the folder index, keys);
* ``build``: planning and the Ray Data encoder pool (``build_caches`` -> a ``CacheSet``);
* ``index``: the ``CacheSet``, the compact per-sample index that travels to the workers;
* ``reader``: the streamed, prefetching reader the workers train from (cached and online samples alike).

Import-light: ``from sana_ray.data.cache import CacheSet`` does not import torch or Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CacheSet": "index",
    "TextShards": "index",
    "build_caches": "build",
    "CacheReader": "reader",
    "Prefetcher": "reader",
    "open_reader": "reader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sana_ray.data.cache' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sana_ray.data.cache.{module}"), name)
    globals()[name] = value
    return value
