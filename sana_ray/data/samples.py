"""Finding a dataset's images and their captions, and accounting for every file left out.

``discover_samples`` walks a dataset folder (recursively, in sorted order so that two runs see
the same samples in the same order), checks each image file (header, size, and for JPEG/PNG the
whole stream, so truncated files are caught here and not in the middle of a cache build), plans
its geometry (``images.plan_geometry``) and pairs it with its caption(s) according to the
dataset's ``caption_strategy``. Files it cannot use are not errors: they are counted in a
:class:`DatasetReport` by reason, with their paths, so the user sees what was left out and why.

Imports nothing heavy (PIL only, lazily; pyarrow only for a Parquet metadata file).
"""

from __future__ import annotations

import csv
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from sana_ray.data.images import Geometry, PixelOptions, measure, oriented_size, plan_geometry

if TYPE_CHECKING:  # pragma: no cover
    from sana_ray.manifest.schema import DatasetSpec

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
CHECK_THREADS = 8

# Skip reasons (keys of DatasetReport.skipped).
EMPTY_FILE = "empty file"
NOT_AN_IMAGE = "not an image"
UNREADABLE = "unreadable"
TOO_SMALL = "too small"
TOO_LARGE = "too large (decompression bomb)"
MISSING_CAPTION = "missing caption"
NOT_FOUND = "metadata row without image"
MISSING_MASK = "missing mask"  # mask_path has no mask named like the image
UNREADABLE_MASK = "unreadable mask"  # the mask file is empty, not an image, or damaged
MASK_MISMATCH = "mask size mismatch"  # the mask's displayed size differs from the image's


class DataError(Exception):
    """A dataset cannot be used as configured. The message names the dataset, the path and the fix."""


@dataclass(frozen=True)
class Sample:
    dataset: str
    image_path: str  # absolute
    caption: str  # the first (or only) caption
    captions: tuple[str, ...] = ()  # every caption choice (textfile lines, metadata lists); () = (caption,)
    size: tuple[int, int] = (0, 0)  # (W, H) as displayed (EXIF orientation applied)
    geometry: Geometry | None = None
    mask: str | None = None  # its loss mask (absolute path) when the dataset has a mask_path

    @property
    def choices(self) -> tuple[str, ...]:
        return self.captions or (self.caption,)


@dataclass
class DatasetReport:
    dataset: str
    found: int  # files with an image extension
    used: int
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> paths
    details: dict[str, str] = field(default_factory=dict)  # path -> what went wrong (decoder message, sizes)
    role: str = "train"  # train, regularisation or eval
    repeats: int = 0
    probability: float = 1.0
    buckets: dict[str, int] = field(default_factory=dict)  # "WxH" (pixels) -> samples
    loss_weight: float = 1.0  # the dataset's loss_weight (OneTrainer's concept loss weight)
    masked: bool = False  # whether its samples train with loss masks (mask_path)

    def skip(self, reason: str, path: str, detail: str | None = None) -> None:
        self.skipped.setdefault(reason, []).append(path)
        if detail:
            self.details[path] = detail

    @property
    def num_skipped(self) -> int:
        return sum(len(paths) for paths in self.skipped.values())

    @property
    def samples_per_epoch(self) -> int:
        """Draws of this dataset per epoch: round(probability x used x (1 + repeats)); 0 for eval sets."""
        if self.role == "eval":
            return 0
        return round(self.probability * self.used * (1 + self.repeats))

    def summary(self) -> str:
        """One line, e.g. ``shapes: 48 images used of 50 found; skipped: 2 missing caption``."""
        text = f"{self.dataset}: {self.used} images used of {self.found} found"
        if self.skipped:
            parts = ", ".join(f"{len(paths)} {reason}" for reason, paths in sorted(self.skipped.items()))
            text += f"; skipped: {parts}"
        return text

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"samples_per_epoch": self.samples_per_epoch}


def _image_files(root: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    # One global order (relative POSIX path) so the order never depends on the file system.
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def check_image(path: Path) -> tuple[str | None, str | None, tuple[int, int]]:
    """(skip reason or None, detail, displayed (W, H)) of one image file.

    JPEGs are decoded at 1/8 scale (cheap, and still reads the whole stream); PNGs are verified
    chunk by chunk (CRCs); other formats are decoded in full. Images above PIL's
    ``Image.MAX_IMAGE_PIXELS`` are skipped as decompression bombs, never opened in full.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        if path.stat().st_size == 0:
            return EMPTY_FILE, None, (0, 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                limit = Image.MAX_IMAGE_PIXELS
                if limit and image.width * image.height > limit:
                    return TOO_LARGE, f"{image.width}x{image.height} > {limit} pixels (PIL's MAX_IMAGE_PIXELS)", image.size
                if image.format == "PNG":
                    image.verify()  # must come first; it leaves the image unusable
                    with Image.open(path) as again:
                        return None, None, oriented_size(again)
                size = oriented_size(image)
                if image.format == "JPEG":
                    image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
    except Image.DecompressionBombError as error:
        return TOO_LARGE, str(error), (0, 0)
    except UnidentifiedImageError:
        return NOT_AN_IMAGE, None, (0, 0)
    except Exception as error:  # truncated, corrupt, permission denied, ...
        return UNREADABLE, f"{type(error).__name__}: {error}", (0, 0)
    return None, None, size


def mask_index(mask_root: Path) -> dict[str, list[Path]]:
    """Mask files under ``mask_root`` by relative path without extension (``sub/cat``), each list sorted."""
    index: dict[str, list[Path]] = {}
    for path in _image_files(mask_root):
        index.setdefault(path.relative_to(mask_root).with_suffix("").as_posix(), []).append(path)
    return index


def find_mask(index: dict[str, list[Path]], image: Path, root: Path) -> Path | None:
    """The mask named like ``image`` (same relative path and stem): the one with the image's own
    extension if there are several, else the first in sorted order."""
    candidates = index.get(image.relative_to(root).with_suffix("").as_posix())
    if not candidates:
        return None
    same = [c for c in candidates if c.suffix.lower() == image.suffix.lower()]
    return (same or candidates)[0]


def check_mask(mask: Path | None, image_size: tuple[int, int]) -> tuple[str | None, str | None]:
    """(skip reason or None, detail) of an image's mask: missing, unreadable, or another displayed size."""
    if mask is None:
        return MISSING_MASK, None
    reason, detail, size = check_image(mask)
    if reason:
        return UNREADABLE_MASK, f"{mask}: {reason}" + (f" ({detail})" if detail else "")
    if tuple(size) != tuple(image_size):
        return MASK_MISMATCH, (f"mask {mask} is {size[0]}x{size[1]}, the image {image_size[0]}x{image_size[1]} "
                               f"(as displayed, EXIF orientation applied); they must be the same size")
    return None, None


# Trailing counters: "(1)", "[2]", or digits after a separator ("_001", " 2", "-3"); "r2d2" is kept.
_COUNTER = re.compile(r"(?:[\s_\-.]*(?:\(\d+\)|\[\d+\])|[\s_\-.]+\d+)+$")


def caption_from_filename(stem: str) -> str:
    """``a_red-circle_001`` -> ``a red circle``; ``dog photo (2)`` -> ``dog photo``."""
    text = _COUNTER.sub("", stem)
    text = re.sub(r"[_\-]+", " ", text)
    return " ".join(text.split())


def captions_from_textfile(image_path: Path) -> tuple[str, ...]:
    """Every non-empty line of the sibling ``<stem>.txt``, stripped; () if missing or empty."""
    text_path = image_path.with_suffix(".txt")
    try:
        with open(text_path, encoding="utf-8-sig", errors="replace") as handle:
            return tuple(line.strip() for line in handle if line.strip())
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return ()


def caption_from_textfile(image_path: Path) -> str | None:
    """The first non-empty line of the sibling ``<stem>.txt``; None if missing or empty."""
    lines = captions_from_textfile(image_path)
    return lines[0] if lines else None


def _as_captions(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):  # a list stored as JSON text (CSV cells)
            try:
                return _as_captions(json.loads(text))
            except json.JSONDecodeError:
                pass
        return (text,) if text else ()
    if isinstance(value, (list, tuple)) or type(value).__name__ in ("ndarray", "list"):
        return tuple(c for item in value for c in _as_captions(item))
    if isinstance(value, float) and value != value:  # NaN from a CSV/Parquet null
        return ()
    return _as_captions(str(value))


def read_metadata(dataset: "DatasetSpec", root: Path) -> dict[str, tuple[str, ...]]:
    """{absolute image path: captions} from the dataset's metadata file (JSONL, CSV or Parquet)."""
    path = Path(dataset.metadata_file).expanduser()
    if not path.is_absolute():
        path = root / path
    if not path.is_file():
        raise DataError(
            f"dataset '{dataset.name}': metadata_file {path} does not exist (relative paths are relative to "
            f"the dataset folder {root}). Fix spec.datasets[].metadata_file."
        )
    suffix = path.suffix.lower()
    rows: Iterable[dict]
    try:
        if suffix in (".jsonl", ".ndjson"):
            with open(path, encoding="utf-8-sig") as handle:
                rows = [json.loads(line) for line in handle if line.strip()]
        elif suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8-sig"))
        elif suffix in (".csv", ".tsv"):
            with open(path, encoding="utf-8-sig", newline="") as handle:
                rows = list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            wanted = [c for c in (dataset.file_column, dataset.caption_column) if c in names]
            rows = pq.read_table(path, columns=wanted).to_pylist() if dataset.file_column in names else [dict.fromkeys(names)]
        else:
            raise DataError(f"dataset '{dataset.name}': metadata_file {path} must end in .jsonl, .json, .csv, .tsv or .parquet")
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"dataset '{dataset.name}': cannot read metadata_file {path}: {type(error).__name__}: {error}") from error
    table: dict[str, tuple[str, ...]] = {}
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or dataset.file_column not in row:
            columns = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise DataError(
                f"dataset '{dataset.name}': row {number} of {path} has no '{dataset.file_column}' column (it has: "
                f"{columns}). Set file_column (and caption_column) to the names your file uses."
            )
        file = Path(str(row[dataset.file_column])).expanduser()
        absolute = os.path.normpath(file if file.is_absolute() else root / file)
        table[absolute] = table.get(absolute, ()) + _as_captions(row.get(dataset.caption_column))
    return table


_FIXES = {
    "textfile": "put a caption in a .txt file next to each image (same name, e.g. cat.png + cat.txt), "
    "or set caption_strategy: filename or instanceprompt",
    "filename": "check that the file names describe the images",
    "instanceprompt": "check that the images can be opened",
    "metadata": "check that metadata_file lists the images (file_column, relative to the dataset folder) with a caption_column",
}


def _role(dataset: "DatasetSpec") -> str:
    if getattr(dataset, "dataset_type", "image") == "eval":
        return "eval"
    return "regularisation" if getattr(dataset, "is_regularisation_data", False) else "train"


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
    strategy = dataset.caption_strategy
    metadata = read_metadata(dataset, root) if strategy == "metadata" else {}
    options = PixelOptions.of(dataset)

    report = DatasetReport(
        dataset=dataset.name, found=0, used=0, role=_role(dataset),
        repeats=dataset.repeats, probability=getattr(dataset, "probability", 1.0),
        loss_weight=float(getattr(dataset, "loss_weight", 1.0)), masked=getattr(dataset, "mask_path", None) is not None,
    )
    samples: list[Sample] = []
    mask_root = _mask_root(dataset)
    if mask_root == root:
        raise DataError(f"dataset '{dataset.name}': mask_path is the dataset folder itself ({root}); put the masks in "
                        f"a folder of their own (e.g. {root / 'masks'}) and point mask_path at it.")
    files = _image_files(root)
    if mask_root is not None:  # masks kept inside the dataset folder are not training images
        files = [f for f in files if not f.is_relative_to(mask_root)]
    masks = _mask_files(mask_root, root, files)

    def mask_check(mask: Path | None, image_check: tuple) -> tuple[str | None, str | None]:
        return check_mask(mask, image_check[2]) if image_check[0] is None else (None, None)

    with ThreadPoolExecutor(max_workers=CHECK_THREADS) as pool:
        checks = list(pool.map(check_image, files))
        mask_checks = list(pool.map(mask_check, masks, checks)) if masks else []
    for number, (path, (reason, detail, size)) in enumerate(zip(files, checks)):
        report.found += 1
        if reason:
            report.skip(reason, str(path), detail)
            continue
        minimum = options.minimum_image_size
        if minimum and measure(*size, options.resolution_type) < minimum:
            report.skip(TOO_SMALL, str(path), f"{size[0]}x{size[1]} < minimum_image_size {minimum:g} ({options.resolution_type})")
            continue
        if strategy == "textfile":
            captions = captions_from_textfile(path)
        elif strategy == "filename":
            captions = (caption_from_filename(path.stem),)
        elif strategy == "instanceprompt":
            captions = ((dataset.instance_prompt or "").strip(),)
        elif strategy == "metadata":
            captions = metadata.pop(os.path.normpath(path), ())
        else:  # pragma: no cover - the schema forbids it
            raise DataError(f"dataset '{dataset.name}': unknown caption_strategy {strategy!r}")
        captions = tuple(dict.fromkeys(c for c in captions if c))  # unique, in order, non-empty
        if not captions:
            report.skip(MISSING_CAPTION, str(path))
            continue
        mask = None
        if masks:
            mask_reason, mask_detail = mask_checks[number]
            if mask_reason:
                report.skip(mask_reason, str(path), mask_detail)
                continue
            mask = str(masks[number])
        geometry = plan_geometry(*size, options, str(path))
        samples.append(Sample(dataset.name, str(path), captions[0], captions if len(captions) > 1 else (), size, geometry, mask))
        key = "x".join(map(str, geometry.size))
        report.buckets[key] = report.buckets.get(key, 0) + 1
    for missing in sorted(metadata):
        if not os.path.exists(missing):
            report.skip(NOT_FOUND, missing)
    report.used = len(samples)

    if not samples:
        if report.found == 0:
            raise DataError(
                f"dataset '{dataset.name}': no images in {root} (looked recursively for "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))}). Fix spec.datasets[].path or add images."
            )
        examples = "; ".join(f"{reason}: {paths[0]}" for reason, paths in sorted(report.skipped.items()))
        fix = _FIXES[strategy]
        if {MISSING_MASK, UNREADABLE_MASK, MASK_MISMATCH} & set(report.skipped):
            fix = (f"give every image a mask of the same size in mask_path {dataset.mask_path} (same relative path "
                   f"and name, any image extension), or remove mask_path; or {fix}")
        if TOO_SMALL in report.skipped:
            fix = f"lower minimum_image_size (now {options.minimum_image_size:g}) or add larger images; or {fix}"
        raise DataError(
            f"dataset '{dataset.name}': none of the {report.found} images in {root} is usable "
            f"({report.summary()}; e.g. {examples}). Fix: {fix}."
        )
    return samples, report


def _mask_root(dataset: "DatasetSpec") -> Path | None:
    """The dataset's ``mask_path`` folder (resolved), None without one; a DataError when it is not a folder."""
    mask_root = getattr(dataset, "mask_path", None)
    if mask_root is None:
        return None
    mask_root = Path(mask_root).expanduser()
    if not mask_root.is_dir():
        raise DataError(
            f"dataset '{dataset.name}': mask_path {mask_root} is not a folder. Fix spec.datasets[].mask_path (a folder "
            f"of masks named like the images; relative paths are relative to the manifest file)."
        )
    return mask_root.resolve()


def _mask_files(mask_root: Path | None, root: Path, files: list[Path]) -> list[Path | None]:
    """Each image's mask (None: missing) when the dataset has a ``mask_path``; [] when it has none."""
    if mask_root is None:
        return []
    index = mask_index(mask_root)
    return [find_mask(index, path, root) for path in files]


def image_datasets(datasets: Iterable["DatasetSpec"]) -> list["DatasetSpec"]:
    """The entries that are image folders: not disabled, not the text_embeds store."""
    return [
        d for d in datasets
        if not getattr(d, "disabled", False) and getattr(d, "dataset_type", "image") != "text_embeds"
    ]


def text_store(datasets: Iterable["DatasetSpec"]) -> "DatasetSpec | None":
    """The (enabled) ``dataset_type: text_embeds`` entry, if any; more than one is an error."""
    stores = [d for d in datasets if getattr(d, "dataset_type", "image") == "text_embeds" and not d.disabled]
    if len(stores) > 1:
        raise DataError(
            f"only one dataset_type text_embeds entry is supported (found {', '.join(d.name for d in stores)}); "
            f"all datasets share one text-embedding cache. Remove or disable the others."
        )
    return stores[0] if stores else None


def discover_datasets(datasets: Iterable["DatasetSpec"]) -> list[tuple["DatasetSpec", list[Sample], DatasetReport]]:
    """``discover_samples`` for every image dataset (disabled entries and the text store left out)."""
    datasets = list(datasets)
    chosen = image_datasets(datasets)
    text_store(datasets)  # raises on two stores
    if not chosen:
        raise DataError("no enabled image dataset: every entry of spec.datasets is disabled or a text_embeds store")
    found = []
    for dataset in chosen:
        samples, report = discover_samples(dataset)
        found.append((dataset, samples, report))
    if all(report.role == "eval" for _, _, report in found):
        raise DataError("every enabled dataset is dataset_type: eval; at least one must be trained on (dataset_type: image)")
    return found
