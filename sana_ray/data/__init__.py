"""Datasets: finding samples, loading pixels, the latent/text caches and the batch plan.

Import-light: nothing heavy (torch, ray) is imported until a name is used, so
``from sana_ray.data import discover_samples`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Sample": "samples",
    "DatasetReport": "samples",
    "DataError": "samples",
    "discover_samples": "samples",
    "discover_datasets": "samples",
    "load_pixels": "images",
    "load_prepared": "images",
    "plan_geometry": "images",
    "PixelOptions": "images",
    "Geometry": "images",
    "target_size": "images",
    "CacheSet": "cache",
    "build_caches": "cache",
    "open_reader": "cache",
    "BatchPlan": "sampler",
    "SamplerError": "sampler",
    "make_shapes": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sana_ray.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sana_ray.data.{module}"), name)
    globals()[name] = value
    return value
