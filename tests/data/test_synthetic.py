"""The quickstart dataset generator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

from sana_ray.data.synthetic import make_shapes


def test_make_shapes_deterministic_and_captioned(tmp_path: Path):
    make_shapes(tmp_path / "a", count=30, size=32, seed=3)
    make_shapes(tmp_path / "b", count=30, size=32, seed=3)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(files) == 60 and files[:2] == ["shape_000.png", "shape_000.txt"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    captions = [(tmp_path / "a" / f"shape_{i:03d}.txt").read_text().strip() for i in range(30)]
    assert len(set(captions)) == 24  # every shape x colour x background once before any repeat
    for i, caption in enumerate(captions):
        words = caption.split()
        assert words[0] == "a" and words[1] in {"red", "green", "blue", "yellow"}
        assert words[2] in {"circle", "square", "triangle"} and words[-2:] in (["white", "background"], ["black", "background"])
        image = Image.open(tmp_path / "a" / f"shape_{i:03d}.png")
        assert image.size == (32, 32) and image.mode == "RGB"
        # The corner shows the background named in the caption.
        expected = (255, 255, 255) if "white background" in caption else (0, 0, 0)
        assert image.getpixel((0, 0)) == expected
    make_shapes(tmp_path / "c", count=30, size=32, seed=4)
    assert (tmp_path / "c" / "shape_000.png").read_bytes() != (tmp_path / "a" / "shape_000.png").read_bytes()


def test_cli_and_shipped_dataset_is_current(tmp_path: Path):
    root = Path(__file__).resolve().parents[2]
    subprocess.run(
        [sys.executable, "-m", "sana_ray.data.synthetic", str(tmp_path / "out"), "--count", "48"],
        check=True, cwd=root, capture_output=True,
    )
    shipped = root / "manifests" / "data" / "shapes"
    generated = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert generated == sorted(p.name for p in shipped.iterdir())
    assert all((tmp_path / "out" / n).read_bytes() == (shipped / n).read_bytes() for n in generated)
    assert max((shipped / n).stat().st_size for n in generated) < 8192
