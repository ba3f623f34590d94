"""The sweep's comparison image: validation prompts (rows) x trials (columns), one PNG.

Every trial renders the same prompts with the same seeds from its own export, so a row shows
what the searched values alone changed. A trial without final images (stopped early, failed)
gets grey cells saying so. Pillow only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MIN_CELL = 128  # px: room for a two-value label under small (64 px) validation images
LINE_HEIGHT = 12
PADDING = 6


@dataclass(frozen=True)
class Column:
    label_lines: list[str]  # e.g. ["lr=1e-03", "flow_shift=3"]
    images: list[Path] | None  # one per prompt, or None (no final images)
    note: str = ""  # what to write in the cells when there are no images


def cell_size(resolution: int) -> int:
    return max(resolution, MIN_CELL)


def label_height(lines: int) -> int:
    return PADDING + LINE_HEIGHT * lines


def grid_size(columns: int, prompts: int, resolution: int, label_lines: int) -> tuple[int, int]:
    """(width, height) in pixels of the grid :func:`make_grid` draws."""
    cell = cell_size(resolution)
    return columns * cell, label_height(label_lines) + prompts * cell


def make_grid(columns: list[Column], prompts: int, resolution: int, out: Path) -> Path:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    lines = max((len(c.label_lines) for c in columns), default=1)
    cell = cell_size(resolution)
    header = label_height(lines)
    width, height = grid_size(len(columns), prompts, resolution, lines)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for col, column in enumerate(columns):
        x = col * cell
        for i, text in enumerate(column.label_lines):
            draw.text((x + 3, 3 + i * LINE_HEIGHT), text, fill="black", font=font)
        for row in range(prompts):
            y = header + row * cell
            if column.images and row < len(column.images):
                with Image.open(column.images[row]) as image:
                    grid.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
            else:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(200, 200, 200), outline="white")
                draw.text((x + 4, y + cell // 2 - 6), column.note or "no image", fill="black", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out
