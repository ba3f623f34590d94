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


# --- every resolution type and crop option (the geometry is planned from the size alone) -----

from sana_ray.data.images import DEFAULT_ASPECT_BUCKETS, PixelOptions, load_prepared, plan_geometry  # noqa: E402


@pytest.mark.parametrize(
    ("size", "options", "expected"),
    [
        # pixel: the short edge is the resolution; no crop floors the long side to a multiple of 32
        ((800, 600), dict(resolution=512), (512, 512)),
        ((800, 600), dict(resolution=512, crop=False), (672, 512)),
        ((600, 800), dict(resolution=512, crop=False), (512, 672)),
        # pixel_area: the area of a resolution^2 square, each side rounded to a multiple of 32
        ((800, 600), dict(resolution=512, resolution_type="pixel_area"), (512, 512)),
        ((800, 600), dict(resolution=512, resolution_type="pixel_area", crop=False), (576, 448)),
        ((3000, 1000), dict(resolution=1024, resolution_type="pixel_area", crop=False), (1760, 576)),
        # area: megapixels (1.0 -> a 1000 px square -> 992, the nearest multiple of 32)
        ((800, 600), dict(resolution=1.0, resolution_type="area"), (992, 992)),
        ((1000, 500), dict(resolution=0.25, resolution_type="area", crop=False), (704, 352)),
        # crop_aspect: preserve = the image's own aspect; closest = the nearest bucket (16:9 here)
        ((640, 480), dict(resolution=256, crop_aspect="preserve"), (320, 256)),
        ((1000, 560), dict(resolution=256, crop_aspect="closest"), (448, 256)),
        ((560, 1000), dict(resolution=256, crop_aspect="closest"), (256, 448)),
        ((1000, 560), dict(resolution=512, resolution_type="pixel_area", crop_aspect="closest"), (672, 384)),
    ],
)
def test_resolution_types_and_crop_aspects(size, options, expected):
    geometry = plan_geometry(*size, PixelOptions(**options), "/x.png")
    assert geometry.size == expected
    w, h = geometry.size
    assert w % 32 == 0 and h % 32 == 0


def test_sizes_are_multiples_of_32_for_every_option():
    combos = [
        dict(resolution=r, resolution_type=t, crop=c, crop_aspect=a)
        for r, t in ((96, "pixel"), (512, "pixel_area"), (0.3, "area"))
        for c in (True, False)
        for a in ("square", "preserve", "closest", "random")
    ]
    for options in combos:
        for width in range(40, 3000, 331):
            for height in range(40, 3000, 467):
                geometry = plan_geometry(width, height, PixelOptions(**options), f"/img_{width}_{height}.png")
                w, h = geometry.size
                assert w % 32 == 0 and h % 32 == 0 and w >= 32 and h >= 32, (options, width, height)
                left, top, right, bottom = geometry.box
                assert 0 <= left and 0 <= top and right <= geometry.resize[0] and bottom <= geometry.resize[1]


def test_crop_styles():
    # 200x100 at 64 px, square: resized to 128x64, then a 64x64 box.
    center = plan_geometry(200, 100, PixelOptions(resolution=64, crop_style="center"), "/a.png")
    corner = plan_geometry(200, 100, PixelOptions(resolution=64, crop_style="corner"), "/a.png")
    assert center.resize == corner.resize == (128, 64)
    assert center.box == (32, 0, 96, 64) and corner.box == (0, 0, 64, 64)
    # random: a place fixed per image (seeded by its path), different between images
    lefts = set()
    for i in range(20):
        options = PixelOptions(resolution=64, crop_style="random")
        first = plan_geometry(200, 100, options, f"/data/img_{i}.png")
        assert plan_geometry(200, 100, options, f"/data/img_{i}.png") == first
        assert 0 <= first.box[0] <= 64 and first.box[1] == 0
        lefts.add(first.box[0])
    assert len(lefts) > 5
    # crop: false ignores crop_style (only the multiple-of-32 trim, centred)
    assert plan_geometry(200, 100, PixelOptions(resolution=64, crop=False, crop_style="corner"), "/a.png").box == (0, 0, 128, 64)


def test_random_crop_aspect_is_fixed_per_image_and_varied():
    options = PixelOptions(resolution=256, crop_aspect="random")
    sizes = {plan_geometry(500, 500, options, f"/p/{i}.png").size for i in range(40)}
    assert len(sizes) >= 4  # several of the buckets
    assert plan_geometry(500, 500, options, "/p/1.png") == plan_geometry(500, 500, options, "/p/1.png")
    assert len(DEFAULT_ASPECT_BUCKETS) == 9


def test_maximum_image_size_downsamples_first():
    options = PixelOptions(resolution=512, resolution_type="pixel_area", maximum_image_size=512, target_downsample_size=512)
    geometry = plan_geometry(2048, 1024, options, "/big.png")
    assert geometry.downsample == (724, 362)  # sqrt(724 * 362) ~ 512
    assert geometry.size == (512, 512) and geometry.resize == (1024, 512)
    assert plan_geometry(500, 500, options, "/small.png").downsample is None
    # pixel: the short edge decides; target defaults to maximum_image_size
    geometry = plan_geometry(3000, 2000, PixelOptions(resolution=256, maximum_image_size=1000), "/p.png")
    assert geometry.downsample == (1500, 1000)


def test_crop_style_changes_the_pixels(tmp_path: Path):
    path = tmp_path / "wide.png"
    _left_red_right_blue(200, 100).save(path)
    corner = load_pixels(str(path), 64, options=PixelOptions(resolution=64, crop_style="corner"))
    assert corner.shape == (3, 64, 64) and corner[0].mean() > 0.95  # the left (red) end
    geometry = plan_geometry(200, 100, PixelOptions(resolution=64, crop=False), str(path))
    whole = load_prepared(str(path), geometry)
    assert whole.shape == (3, 64, 128)
