"""Fixtures shared by the end-to-end tests of `apply`, strategies and sweeps."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """16 generated 64 px shape images with .txt captions (a fresh folder per test module)."""
    from sana_ray.data.synthetic import make_shapes

    folder = tmp_path_factory.mktemp("shapes")
    make_shapes(folder, count=16, size=64, seed=3)
    return folder
