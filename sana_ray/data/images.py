"""Turning an image file into the pixel tensor the VAE encodes.

Rules (the same for every image of a dataset, so that the latent cache key can name them):

1. honour the EXIF orientation (phones store portrait photos as rotated landscape + a tag);
2. convert to RGB, compositing any transparency on white;
3. resize (Lanczos) so the SHORT edge equals ``resolution`` (small images are scaled up);
4. ``crop``: centre-crop to ``resolution x resolution``;
   no ``crop``: centre-crop each side down to a multiple of 32 (the DC-AE downsamples 32x);
5. scale to float32 in [-1, 1], shape [3, H, W].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

MULTIPLE = 32

# Bump when the pixel pipeline changes: it is part of the latent cache key.
PIXELS_VERSION = 1


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(W, H) after scaling so that the short edge equals ``resolution``, keeping the aspect ratio."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if width <= height:
        return resolution, max(resolution, round(height * resolution / width))
    return max(resolution, round(width * resolution / height)), resolution


def target_size(width: int, height: int, resolution: int, crop: bool) -> tuple[int, int]:
    """Final (W, H) of an image of ``width x height`` trained at ``resolution``."""
    if crop:
        return resolution, resolution
    new_w, new_h = resized_size(width, height, resolution)
    return max(MULTIPLE, new_w // MULTIPLE * MULTIPLE), max(MULTIPLE, new_h // MULTIPLE * MULTIPLE)


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
    return image.convert("RGB")


def prepare_image(image: "Image.Image", resolution: int, crop: bool) -> "Image.Image":
    """Steps 1-4 above on an open PIL image; returns an RGB image of ``target_size``."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image) or image
    image = to_rgb(image)
    new_w, new_h = resized_size(image.width, image.height, resolution)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), resample=Image.Resampling.LANCZOS)
    out_w, out_h = target_size(image.width, image.height, resolution, crop)
    if (out_w, out_h) != image.size:
        left = (image.width - out_w) // 2
        top = (image.height - out_h) // 2
        image = image.crop((left, top, left + out_w, top + out_h))
    return image


def load_pixels(path: str, resolution: int, crop: bool) -> "torch.Tensor":
    """The image at ``path`` as a float32 tensor [3, H, W] in [-1, 1] (see the module doc for the rules)."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        prepared = prepare_image(image, resolution, crop)
    array = np.asarray(prepared, dtype=np.uint8)  # [H, W, 3]
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32)
    return pixels / 127.5 - 1.0
