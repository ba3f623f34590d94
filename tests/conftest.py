"""Shared fixtures: one real local Ray cluster per test session (starting one costs seconds)."""

from __future__ import annotations

import os

import pytest

# Heavy-ish imports and Ray's own noise stay out of test output.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Ray reads some of these once, when it is first imported (e.g. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER,
# without which joining a cluster at 127.0.0.1 is rewritten to the machine's IP and hangs), so they
# must be set before any test imports ray. ray_cluster imports only os.
from sana_ray.launch.ray_cluster import RAY_ENV  # noqa: E402

for _name, _value in RAY_ENV.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="session")
def ray_local():
    """A real Ray cluster on 127.0.0.1 with 2 CPUs (the CI machine's size)."""
    import ray

    from sana_ray.launch.ray_cluster import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()
