"""Turning an image file into the pixel tensor the VAE encodes.

The geometry of every image is decided once, at discovery, from its size alone
(:func:`plan_geometry`), and recorded in the latent cache key; the encoder actors then only
execute it (:func:`load_prepared`). The rules:

1. honour the EXIF orientation (phones store portrait photos as rotated landscape + a tag);
2. convert to RGB (transparency composited on white, 16-bit scaled, CMYK/palette converted);
3. ``maximum_image_size``: an image larger than it (in ``resolution_type`` units) is first
   downsampled (Lanczos) to ``target_downsample_size`` (default: ``maximum_image_size``);
4. the output size: ``crop`` gives the ``crop_aspect`` shape (square, the image's own aspect, the
   closest or a random one of ``crop_aspect_buckets``), no ``crop`` the image's own aspect; its
   scale is set by ``resolution_type``: ``pixel`` = short edge, ``pixel_area`` = same area as a
   ``resolution``² square, ``area`` = ``resolution`` megapixels. Sides are multiples of 32 (the
   DC-AE downsamples 32x): ``pixel`` floors the long side, the area types round each side;
5. resize (Lanczos) to cover the output size, then crop it (``crop_style``: center, corner = top-left,
   random = a place fixed per image, seeded by its path);
6. scale to float32 in [-1, 1], shape [3, H, W].

A loss mask (``datasets[].mask_path``) goes through the same geometry (:func:`load_mask`): its
own EXIF orientation, then the image's downsample, resize (Lanczos) and crop box, so that mask
pixel (x, y) covers image pixel (x, y); it is then averaged down to the latent grid (area
interpolation, as SimpleTuner and kohya's sd-scripts resize masks to the latents).
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

MULTIPLE = 32
DEFAULT_ASPECT_BUCKETS: tuple[float, ...] = (0.5, 0.5625, 0.6667, 0.75, 1.0, 1.3333, 1.5, 1.7778, 2.0)

# Bump when the pixel pipeline changes: it is part of the latent cache key.
PIXELS_VERSION = 2
# Bump when the mask pipeline (load_mask) changes: it is part of the mask cache key.
MASKS_VERSION = 1


@dataclass(frozen=True)
class PixelOptions:
    """The dataset options that decide an image's geometry (a plain copy of DatasetSpec's)."""

    resolution: float = 1024
    resolution_type: str = "pixel"
    crop: bool = True
    crop_style: str = "center"
    crop_aspect: str = "square"
    crop_aspect_buckets: tuple[float, ...] = DEFAULT_ASPECT_BUCKETS
    maximum_image_size: float | None = None
    target_downsample_size: float | None = None
    minimum_image_size: float | None = None

    @classmethod
    def of(cls, dataset: Any) -> "PixelOptions":
        buckets = getattr(dataset, "crop_aspect_buckets", None) or DEFAULT_ASPECT_BUCKETS
        return cls(
            resolution=dataset.resolution,
            resolution_type=getattr(dataset, "resolution_type", "pixel"),
            crop=dataset.crop,
            crop_style="center" if getattr(dataset, "crop_style", "center") == "centre" else getattr(dataset, "crop_style", "center"),
            crop_aspect=getattr(dataset, "crop_aspect", "square"),
            crop_aspect_buckets=tuple(sorted(buckets)),
            maximum_image_size=getattr(dataset, "maximum_image_size", None),
            target_downsample_size=getattr(dataset, "target_downsample_size", None),
            minimum_image_size=getattr(dataset, "minimum_image_size", None),
        )


@dataclass(frozen=True)
class Geometry:
    """What happens to one image: optional downsample, resize, crop box (all in pixels)."""

    downsample: tuple[int, int] | None  # (W, H) of step 3, or None
    resize: tuple[int, int]  # (W, H) of step 5
    box: tuple[int, int, int, int]  # (left, top, right, bottom) in the resized image

    @property
    def size(self) -> tuple[int, int]:
        left, top, right, bottom = self.box
        return right - left, bottom - top

    def to_json(self) -> list:
        return [list(self.downsample) if self.downsample else None, list(self.resize), list(self.box)]

    @classmethod
    def from_json(cls, data: Sequence) -> "Geometry":
        down, resize, box = data
        return cls(tuple(down) if down else None, tuple(resize), tuple(box))


def measure(width: int, height: int, resolution_type: str) -> float:
    """An image's size in ``resolution_type`` units: short edge, sqrt(area), or megapixels."""
    if resolution_type == "pixel":
        return float(min(width, height))
    if resolution_type == "pixel_area":
        return math.sqrt(width * height)
    if resolution_type == "area":
        return width * height / 1e6
    raise ValueError(f"unknown resolution_type {resolution_type!r}")


def scaled_to(width: int, height: int, resolution_type: str, value: float) -> tuple[int, int]:
    """(W, H) of the image scaled (aspect kept) so that its ``measure`` equals ``value``."""
    factor = value / measure(width, height, resolution_type)
    if resolution_type == "area":
        factor = math.sqrt(factor)
    return max(1, round(width * factor)), max(1, round(height * factor))


def _rng(path: str, purpose: str) -> random.Random:
    digest = hashlib.sha256(f"sana-ray-{purpose}:{path}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _aspect(width: int, height: int, options: PixelOptions, path: str) -> float:
    own = width / height
    if not options.crop or options.crop_aspect == "preserve":
        return own
    if options.crop_aspect == "square":
        return 1.0
    buckets = options.crop_aspect_buckets
    if options.crop_aspect == "closest":
        return min(buckets, key=lambda b: (abs(math.log(b / own)), b))
    if options.crop_aspect == "random":
        return _rng(path, "aspect").choice(buckets)
    raise ValueError(f"unknown crop_aspect {options.crop_aspect!r}")


def _floor32(value: float) -> int:
    return max(MULTIPLE, int(value) // MULTIPLE * MULTIPLE)


def _round32(value: float) -> int:
    return max(MULTIPLE, round(value / MULTIPLE) * MULTIPLE)


def output_size(width: int, height: int, options: PixelOptions, path: str = "") -> tuple[int, int]:
    """Final (W, H) of a ``width x height`` image (after step 3) under ``options``."""
    aspect = _aspect(width, height, options, path)
    if options.resolution_type == "pixel":
        edge = int(options.resolution)
        if aspect == 1.0:
            return edge, edge
        if aspect > 1:
            return _floor32(max(edge, round(edge * aspect))), edge
        return edge, _floor32(max(edge, round(edge / aspect)))
    area = options.resolution**2 if options.resolution_type == "pixel_area" else options.resolution * 1e6
    return _round32(math.sqrt(area * aspect)), _round32(math.sqrt(area / aspect))


def plan_geometry(width: int, height: int, options: PixelOptions, path: str = "") -> Geometry:
    """Steps 3-5 for an image of ``width x height`` (EXIF orientation already applied)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    downsample = None
    if options.maximum_image_size and measure(width, height, options.resolution_type) > options.maximum_image_size:
        target = options.target_downsample_size or options.maximum_image_size
        downsample = scaled_to(width, height, options.resolution_type, target)
        width, height = downsample
    out_w, out_h = output_size(width, height, options, path)
    scale = max(out_w / width, out_h / height)
    resize = (max(out_w, round(width * scale)), max(out_h, round(height * scale)))
    spare_w, spare_h = resize[0] - out_w, resize[1] - out_h
    style = options.crop_style if options.crop else "center"
    if style == "corner":
        left, top = 0, 0
    elif style == "random":
        rng = _rng(path, "crop")
        left, top = rng.randint(0, spare_w), rng.randint(0, spare_h)
    else:
        left, top = spare_w // 2, spare_h // 2
    return Geometry(downsample, resize, (left, top, left + out_w, top + out_h))


def target_size(width: int, height: int, resolution: int, crop: bool) -> tuple[int, int]:
    """Final (W, H) with the default options (``pixel``, square centre crop or no crop)."""
    return plan_geometry(width, height, PixelOptions(resolution=resolution, crop=crop)).size


def to_rgb(image: "Image.Image") -> "Image.Image":
    """RGB, with any transparency (RGBA, LA, palette with transparency) composited on white."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: PIL's convert("RGB") clips instead of scaling.
        image = image.point(lambda v: v * (1 / 256)).convert("L")
    elif image.mode == "F":
        image = image.convert("L")
    return image.convert("RGB")


def oriented_size(image: "Image.Image") -> tuple[int, int]:
    """(W, H) as displayed: EXIF orientations 5-8 swap the stored sides."""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block: the stored size
        orientation = 1
    return (image.height, image.width) if orientation in (5, 6, 7, 8) else image.size


def apply_geometry(image: "Image.Image", geometry: Geometry) -> "Image.Image":
    """Steps 1-5 on an open PIL image; returns an RGB image of ``geometry.size``."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image) or image
    image = to_rgb(image)
    if geometry.downsample and geometry.downsample != image.size:
        image = image.resize(geometry.downsample, resample=Image.Resampling.LANCZOS)
    if geometry.resize != image.size:
        image = image.resize(geometry.resize, resample=Image.Resampling.LANCZOS)
    if geometry.box != (0, 0, *image.size):
        image = image.crop(geometry.box)
    return image


def prepare_image(image: "Image.Image", resolution: int, crop: bool) -> "Image.Image":
    """Default options (``pixel``, centre crop): kept for callers of the first version."""
    from PIL import ImageOps

    upright = ImageOps.exif_transpose(image) or image
    return apply_geometry(image, plan_geometry(*upright.size, PixelOptions(resolution=resolution, crop=crop)))


def _to_tensor(prepared: "Image.Image") -> "torch.Tensor":
    import numpy as np
    import torch

    array = np.asarray(prepared, dtype=np.uint8)  # [H, W, 3]
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32)
    return pixels / 127.5 - 1.0


def load_prepared(path: str, geometry: Geometry) -> "torch.Tensor":
    """The image at ``path`` through ``geometry`` as a float32 tensor [3, H, W] in [-1, 1]."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        prepared = apply_geometry(image, geometry)
    return _to_tensor(prepared)


def load_pixels(path: str, resolution: int | float, crop: bool = True, options: PixelOptions | None = None) -> "torch.Tensor":
    """The image at ``path`` as a float32 tensor [3, H, W] in [-1, 1] (see the module doc for the rules).

    ``options`` (all the dataset's pixel options) wins over ``resolution``/``crop`` when given.
    """
    from PIL import Image

    options = options or PixelOptions(resolution=resolution, crop=crop)
    with Image.open(path) as image:
        width, height = oriented_size(image)
    return load_prepared(path, plan_geometry(width, height, options, path))


# --------------------------------------------------------------------------------------------
# Loss masks


def to_mask_gray(image: "Image.Image") -> "Image.Image":
    """8-bit greyscale of a mask image: its luma for colour images, the value for greyscale ones
    (16-bit scaled, not clipped); alpha is ignored (white = train, black = ignore)."""
    if image.mode == "L":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return image.point(lambda v: v * (1 / 256)).convert("L")
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        image = image.convert("RGB" if image.mode.startswith("RGB") else "L")
    return image.convert("L")


def load_mask(path: str, geometry: Geometry, factor: int) -> "torch.Tensor":
    """The mask at ``path`` through the image's ``geometry``, averaged down by ``factor`` (the VAE's
    spatial downsampling) to the latent grid: float32 ``[1, H / factor, W / factor]`` in [0, 1].

    The mask's own EXIF orientation is applied first (a mask need not be stored like its image;
    its displayed size must equal the image's, which discovery checks). Resizing uses the image's
    filter (Lanczos) on the 8-bit mask, so edges land where the image's do; the latent-grid value
    is the mean of the mask over the ``factor x factor`` pixels each latent covers (area
    interpolation), so an all-white mask is exactly 1 everywhere and an all-black one exactly 0.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.load()
        mask = to_mask_gray(ImageOps.exif_transpose(image) or image)
    if geometry.downsample and geometry.downsample != mask.size:
        mask = mask.resize(geometry.downsample, resample=Image.Resampling.LANCZOS)
    if geometry.resize != mask.size:
        mask = mask.resize(geometry.resize, resample=Image.Resampling.LANCZOS)
    if geometry.box != (0, 0, *mask.size):
        mask = mask.crop(geometry.box)
    width, height = geometry.size
    if mask.size != (width, height) or width % factor or height % factor:
        raise ValueError(f"mask {path}: prepared size {mask.size[0]}x{mask.size[1]} does not fit the image's "
                         f"{width}x{height} / {factor}")
    values = torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy()).to(torch.float32) / 255.0  # [H, W]
    pooled = F.interpolate(values[None, None], size=(height // factor, width // factor), mode="area")
    return pooled[0].contiguous()  # [1, h, w]
