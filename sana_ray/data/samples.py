"""Finding a dataset's images and their captions.

``discover_samples`` walks a dataset folder (recursively, in sorted order so that two runs see
the same samples in the same order), checks that each image file can be opened, and pairs it with
a caption according to the dataset's ``caption_strategy``. Files it cannot use are not errors:
they are counted in a :class:`DatasetReport` by reason, so the user sees what was left out.

Imports nothing heavy (PIL only, lazily).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from sana_ray.manifest.schema import DatasetSpec

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})

# Skip reasons (keys of DatasetReport.skipped).
EMPTY_FILE = "empty file"
NOT_AN_IMAGE = "not an image"
UNREADABLE = "unreadable"
MISSING_CAPTION = "missing caption"


class DataError(Exception):
    """A dataset cannot be used as configured. The message names the dataset, the path and the fix."""


@dataclass(frozen=True)
class Sample:
    dataset: str
    image_path: str  # absolute
    caption: str


@dataclass
class DatasetReport:
    dataset: str
    found: int  # files with an image extension
    used: int
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> paths

    def skip(self, reason: str, path: str) -> None:
        self.skipped.setdefault(reason, []).append(path)

    @property
    def num_skipped(self) -> int:
        return sum(len(paths) for paths in self.skipped.values())

    def summary(self) -> str:
        """One line, e.g. ``shapes: 48 images used of 50 found; skipped: 2 missing caption``."""
        text = f"{self.dataset}: {self.used} images used of {self.found} found"
        if self.skipped:
            parts = ", ".join(f"{len(paths)} {reason}" for reason, paths in sorted(self.skipped.items()))
            text += f"; skipped: {parts}"
        return text


def _image_files(root: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    # One global order (relative POSIX path) so the order never depends on the file system.
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _check_image(path: Path) -> str | None:
    """None if PIL can open and verify the file, else the skip reason."""
    from PIL import Image, UnidentifiedImageError

    try:
        if path.stat().st_size == 0:
            return EMPTY_FILE
        with Image.open(path) as image:
            image.verify()
    except UnidentifiedImageError:
        return NOT_AN_IMAGE
    except Exception:  # truncated, corrupt, permission denied, ...
        return UNREADABLE
    return None


# Trailing counters: "(1)", "[2]", or digits after a separator ("_001", " 2", "-3"); "r2d2" is kept.
_COUNTER = re.compile(r"(?:[\s_\-.]*(?:\(\d+\)|\[\d+\])|[\s_\-.]+\d+)+$")


def caption_from_filename(stem: str) -> str:
    """``a_red-circle_001`` -> ``a red circle``; ``dog photo (2)`` -> ``dog photo``."""
    text = _COUNTER.sub("", stem)
    text = re.sub(r"[_\-]+", " ", text)
    return " ".join(text.split())


def caption_from_textfile(image_path: Path) -> str | None:
    """The first non-empty line of the sibling ``<stem>.txt``, stripped; None if missing or empty."""
    text_path = image_path.with_suffix(".txt")
    try:
        with open(text_path, encoding="utf-8-sig", errors="replace") as handle:
            for line in handle:
                if line.strip():
                    return line.strip()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None
    return None


_FIXES = {
    "textfile": "put a caption in a .txt file next to each image (same name, e.g. cat.png + cat.txt), "
    "or set caption_strategy: filename or instanceprompt",
    "filename": "check that the file names describe the images",
    "instanceprompt": "check that the images can be opened",
}


def discover_samples(dataset: "DatasetSpec") -> tuple[list[Sample], DatasetReport]:
    """The dataset's usable samples (sorted by relative path) and a report of what was skipped.

    Raises DataError when the folder does not exist or holds no usable image.
    ``dataset.repeats`` is not applied here (the sampler does that).
    """
    root = Path(dataset.path).expanduser()
    if not root.exists():
        raise DataError(
            f"dataset '{dataset.name}': folder {root} does not exist. Fix spec.datasets[].path "
            f"(relative paths are relative to the manifest file)."
        )
    if not root.is_dir():
        raise DataError(f"dataset '{dataset.name}': {root} is a file, not a folder of images. Point path at the folder.")
    root = root.resolve()

    report = DatasetReport(dataset=dataset.name, found=0, used=0)
    samples: list[Sample] = []
    for path in _image_files(root):
        report.found += 1
        reason = _check_image(path)
        if reason:
            report.skip(reason, str(path))
            continue
        if dataset.caption_strategy == "textfile":
            caption = caption_from_textfile(path)
        elif dataset.caption_strategy == "filename":
            caption = caption_from_filename(path.stem)
        elif dataset.caption_strategy == "instanceprompt":
            caption = (dataset.instance_prompt or "").strip()
        else:  # pragma: no cover - the schema forbids it
            raise DataError(f"dataset '{dataset.name}': unknown caption_strategy {dataset.caption_strategy!r}")
        if not caption:
            report.skip(MISSING_CAPTION, str(path))
            continue
        samples.append(Sample(dataset=dataset.name, image_path=str(path), caption=caption))
    report.used = len(samples)

    if not samples:
        if report.found == 0:
            raise DataError(
                f"dataset '{dataset.name}': no images in {root} (looked recursively for "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))}). Fix spec.datasets[].path or add images."
            )
        examples = "; ".join(f"{reason}: {paths[0]}" for reason, paths in sorted(report.skipped.items()))
        raise DataError(
            f"dataset '{dataset.name}': none of the {report.found} images in {root} is usable "
            f"({report.summary()}; e.g. {examples}). Fix: {_FIXES[dataset.caption_strategy]}."
        )
    return samples, report
