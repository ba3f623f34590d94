"""Every kind of awkward file: used correctly, or skipped with its reason and path (never a crash)."""

from __future__ import annotations

from pathlib import Path

import torch

from sana_ray.data.images import load_prepared
from sana_ray.data.samples import discover_samples
from sana_ray.manifest.schema import DatasetSpec
from tests.data.bad_images import EXPECTED, make_bad_images


def test_each_bad_kind_is_used_or_skipped_with_reason(tmp_path: Path):
    root = make_bad_images(tmp_path / "bad")
    spec = DatasetSpec(name="bad", path=root, resolution=32, crop=False, minimum_image_size=32)
    samples, report = discover_samples(spec)
    assert report.found == len(EXPECTED)
    skipped = {Path(p).name: reason for reason, paths in report.skipped.items() for p in paths}
    assert skipped == {name: reason for name, reason in EXPECTED.items() if reason}
    used = {Path(s.image_path).name: s for s in samples}
    assert set(used) == {name for name, reason in EXPECTED.items() if reason is None}
    assert report.used == len(used)
    # Details name what was wrong (the table and the artifact show them).
    assert "MAX_IMAGE_PIXELS" in report.details[str(root / "huge.png")]
    assert "16x16" in report.details[str(root / "tiny.png")] and "minimum_image_size 32" in report.details[str(root / "tiny.png")]
    assert "truncated" in report.details[str(root / "truncated.jpg")]

    def pixels(name: str) -> torch.Tensor:
        return load_prepared(used[name].image_path, used[name].geometry)

    red, green, blue = (torch.tensor(c, dtype=torch.float32).view(3, 1, 1) for c in ((1, -1, -1), (-1, 1, -1), (-1, -1, 1)))
    assert torch.allclose(pixels("ok_rgb.png").mean((1, 2), keepdim=True), torch.tensor([-1, 200 / 127.5 - 1, -1]).view(3, 1, 1), atol=0.01)
    assert (pixels("cmyk.jpg") - red).abs().mean() < 0.1  # CMYK converted, not garbled
    assert torch.all(pixels("grey16.png") > 0.98)  # 16-bit white scaled, not clipped to black
    assert torch.all(pixels("palette.png") == blue)
    assert torch.all(pixels("alpha.png") == 1)  # transparent composited on white
    # EXIF orientation honoured: planned as portrait (64 x 96 -> 32 x 48 -> 32 x 32 after the 32 trim)
    assert used["exif_rotated.jpg"].size == (64, 96)
    rotated = pixels("exif_rotated.jpg")
    assert rotated.shape == (3, 32, 32)
    assert rotated[0, :8].mean() > 0.8 and rotated[0, -8:].mean() < -0.8  # red on top after rotation

    # Without a minimum size, the tiny image is used (upscaled), not skipped.
    samples, report = discover_samples(spec.model_copy(update={"minimum_image_size": None}))
    assert "too small" not in report.skipped and any(Path(s.image_path).name == "tiny.png" for s in samples)
