"""The quickstart dataset: small coloured shapes with exact captions.

``make_shapes(out_dir)`` writes ``shape_000.png`` + ``shape_000.txt`` ("a red circle on a white
background"), ... Every (shape, colour, background) combination appears before any repeats, and
the same seed always gives byte-identical files.

CLI: ``python -m sana_ray.data.synthetic OUT_DIR [--count 48] [--size 64] [--seed 0]``
"""

from __future__ import annotations

import argparse
import itertools
import random
from pathlib import Path

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 220), "yellow": (240, 210, 20)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
SUPERSAMPLE = 4  # draw 4x larger, then downsample: smooth edges without an anti-aliasing API


def _draw(shape: str, colour: tuple[int, int, int], background: tuple[int, int, int], size: int, rng: random.Random):
    from PIL import Image, ImageDraw

    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    extent = rng.uniform(0.45, 0.7) * big  # the shape's width
    cx = rng.uniform(extent / 2 + big * 0.05, big - extent / 2 - big * 0.05)
    cy = rng.uniform(extent / 2 + big * 0.05, big - extent / 2 - big * 0.05)
    half = extent / 2
    if shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=colour)
    else:  # pragma: no cover
        raise ValueError(f"unknown shape {shape!r}")
    return image.resize((size, size), resample=Image.Resampling.LANCZOS)


def make_shapes(out_dir: Path, count: int = 48, size: int = 64, seed: int = 0) -> None:
    """Write ``count`` images of ``size`` px with captions into ``out_dir`` (created if needed)."""
    if count < 1 or size < 8:
        raise ValueError(f"count must be >= 1 and size >= 8 (got {count}, {size})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    combos = list(itertools.product(SHAPES, COLOURS, BACKGROUNDS))
    rng.shuffle(combos)
    width = max(3, len(str(count - 1)))
    for index in range(count):
        shape, colour, background = combos[index % len(combos)]
        image = _draw(shape, COLOURS[colour], BACKGROUNDS[background], size, rng)
        stem = f"shape_{index:0{width}d}"
        # optimize=True keeps each PNG at a few hundred bytes; PNG output is deterministic.
        image.save(out_dir / f"{stem}.png", optimize=True)
        (out_dir / f"{stem}.txt").write_text(f"a {colour} {shape} on a {background} background\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sana_ray.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make_shapes(args.out_dir, count=args.count, size=args.size, seed=args.seed)
    print(f"wrote {args.count} images of {args.size}px with captions to {args.out_dir}")


if __name__ == "__main__":
    main()
