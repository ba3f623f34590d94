"""Generators of every kind of awkward image file (shared by the bad-image tests)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims ``width x height`` (valid header, no real pixel data): costs nothing to write."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _noise_bytes(fmt: str, size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buffer, fmt)
    return buffer.getvalue()


# name -> expected skip reason (None: used)
EXPECTED = {
    "ok_rgb.png": None,
    "cmyk.jpg": None,
    "grey16.png": None,
    "palette.png": None,
    "alpha.png": None,
    "exif_rotated.jpg": None,
    "tiny.png": "too small",
    "zero.png": "empty file",
    "text.jpg": "not an image",
    "truncated.jpg": "unreadable",
    "truncated.png": "unreadable",
    "corrupt.png": "unreadable",
    "bomb.png": "too large (decompression bomb)",
    "huge.png": "too large (decompression bomb)",
}


def make_bad_images(root: Path, caption: bool = True) -> Path:
    """Write one file of each kind into ``root`` (with .txt captions when ``caption``)."""
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (0, 200, 0)).save(root / "ok_rgb.png")
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(root / "cmyk.jpg", quality=95)  # red in CMYK
    Image.new("I;16", (64, 64), 65535).save(root / "grey16.png")  # 16-bit white
    palette = Image.new("P", (64, 64))
    palette.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    palette.save(root / "palette.png")  # blue through a palette
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent: white after compositing
    rgba.save(root / "alpha.png")
    stored = Image.new("RGB", (96, 64), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 48, 64))  # stored landscape: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: portrait, red on top
    stored.save(root / "exif_rotated.jpg", exif=exif, quality=95)
    Image.new("RGB", (16, 16), (9, 9, 9)).save(root / "tiny.png")
    (root / "zero.png").write_bytes(b"")
    (root / "text.jpg").write_text("not a jpeg at all")
    jpeg = _noise_bytes("JPEG")
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    png = _noise_bytes("PNG")
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    corrupt = bytearray(png)
    corrupt[len(corrupt) // 2] ^= 0xFF  # one flipped byte inside IDAT: the chunk CRC no longer matches
    (root / "corrupt.png").write_bytes(bytes(corrupt))
    png_header_only(root / "bomb.png", 100_000, 100_000)  # > 2x MAX_IMAGE_PIXELS: PIL refuses to open it
    png_header_only(root / "huge.png", 10_000, 9_000)  # > MAX_IMAGE_PIXELS (PIL only warns)
    if caption:
        for name in EXPECTED:
            (root / name).with_suffix(".txt").write_text(f"a picture called {Path(name).stem}\n")
    return root
