"""Pixels: target sizes, value range, EXIF orientation, transparency and palettes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from sana_ray.data.images import load_pixels, target_size


@pytest.mark.parametrize(
    ("size", "resolution", "crop", "expected"),
    [
        ((640, 480), 256, True, (256, 256)),
        ((480, 640), 256, True, (256, 256)),
        ((100, 100), 512, True, (512, 512)),  # small images are scaled up
        ((640, 480), 256, False, (320, 256)),  # 341x256 -> width cropped down to a multiple of 32
        ((480, 640), 256, False, (256, 320)),
        ((1024, 1024), 64, False, (64, 64)),
        ((3000, 1000), 64, False, (192, 64)),
        ((1000, 667), 64, False, (96, 64)),
    ],
)
def test_target_size(size, resolution, crop, expected):
    assert target_size(*size, resolution, crop) == expected


def test_target_size_always_multiple_of_32():
    for width in range(33, 2000, 97):
        for height in range(33, 2000, 89):
            w, h = target_size(width, height, 96, crop=False)
            assert w % 32 == 0 and h % 32 == 0 and min(w, h) == 96


def _left_red_right_blue(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width // 2, height))
    return image


def test_load_pixels_sizes_and_range(tmp_path: Path):
    path = tmp_path / "wide.png"
    _left_red_right_blue(200, 100).save(path)
    cropped = load_pixels(str(path), 64, crop=True)
    assert cropped.shape == (3, 64, 64) and cropped.dtype == torch.float32
    assert cropped.min() >= -1 and cropped.max() <= 1
    assert cropped.min() == -1 and cropped.max() == 1  # pure colours reach both ends
    whole = load_pixels(str(path), 64, crop=False)
    assert whole.shape == (3, 64, 128)
    # Left edge is red: R = 1, B = -1; right edge is blue.
    assert whole[0, 32, 0] == 1 and whole[2, 32, 0] == -1
    assert whole[0, 32, -1] == -1 and whole[2, 32, -1] == 1


def test_exif_orientation_is_applied(tmp_path: Path):
    # Stored landscape (red left half, blue right half); orientation 6 = "rotate 90 degrees clockwise to view".
    stored = _left_red_right_blue(64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)
    pixels = load_pixels(str(path), 32, crop=False)
    assert pixels.shape == (3, 64, 32)  # portrait after rotation
    red = pixels[0]
    # Rotating clockwise puts the stored left (red) half on top.
    assert red[:24].mean() > 0.8 and red[-24:].mean() < -0.8


def test_rgba_composited_on_white_and_palette(tmp_path: Path):
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 0, 255), (0, 0, 16, 32))  # opaque black left half
    rgba.save(tmp_path / "alpha.png")
    pixels = load_pixels(str(tmp_path / "alpha.png"), 32, crop=True)
    assert torch.all(pixels[:, :, -4:] == 1)  # transparent -> white, not red or black
    assert torch.all(pixels[:, :, :4] == -1)

    palette = Image.new("P", (40, 32))
    palette.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    palette.save(tmp_path / "palette.png")
    green = load_pixels(str(tmp_path / "palette.png"), 32, crop=True)
    assert green.shape == (3, 32, 32)
    assert torch.all(green[1] == 1) and torch.all(green[0] == -1)

    Image.new("L", (32, 32), 255).save(tmp_path / "grey.bmp")
    assert torch.all(load_pixels(str(tmp_path / "grey.bmp"), 32, crop=True) == 1)
