"""Finding images and captions: each caption strategy, skip reasons, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from sana_ray.data.samples import DataError, caption_from_filename, discover_samples
from sana_ray.manifest.schema import DatasetSpec


def _png(path: Path, colour=(255, 0, 0), size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    """A folder with good images, a caption-less image, a fake image, an empty file and noise."""
    root = tmp_path / "messy"
    _png(root / "b_cat.png")
    (root / "b_cat.txt").write_text("\n\n  a photo of a cat  \nsecond line\n")
    _png(root / "sub" / "a_dog.JPG")  # upper-case extension, in a sub-folder
    (root / "sub" / "a_dog.txt").write_text("a dog")
    _png(root / "no_caption.png")
    (root / "empty_caption.png").write_bytes((root / "no_caption.png").read_bytes())
    (root / "empty_caption.txt").write_text("   \n\n")
    (root / "fake.jpg").write_text("this is not a jpeg")
    (root / "zero.webp").write_bytes(b"")
    (root / "notes.md").write_text("ignored: not an image extension")
    return root


def test_textfile_captions_and_skips(messy: Path):
    samples, report = discover_samples(DatasetSpec(name="m", path=messy, caption_strategy="textfile"))
    # Sorted by relative path; absolute image paths; first non-empty line, stripped.
    assert [(Path(s.image_path).relative_to(messy).as_posix(), s.caption) for s in samples] == [
        ("b_cat.png", "a photo of a cat"),
        ("sub/a_dog.JPG", "a dog"),
    ]
    assert all(Path(s.image_path).is_absolute() and s.dataset == "m" for s in samples)
    assert report.found == 6 and report.used == 2
    names = {reason: sorted(Path(p).name for p in paths) for reason, paths in report.skipped.items()}
    assert names == {
        "missing caption": ["empty_caption.png", "no_caption.png"],
        "not an image": ["fake.jpg"],
        "empty file": ["zero.webp"],
    }
    assert "2 used of 6 found" in report.summary().replace("images ", "")


def test_filename_captions(tmp_path: Path):
    for name in ["a_red-circle_001.png", "dog photo (2).png", "r2d2.png", "big   blue--square-7.png"]:
        _png(tmp_path / name)
    samples, report = discover_samples(DatasetSpec(name="f", path=tmp_path, caption_strategy="filename"))
    assert sorted(s.caption for s in samples) == ["a red circle", "big blue square", "dog photo", "r2d2"]
    assert report.skipped == {}
    assert caption_from_filename("IMG_1234") == "IMG"
    assert caption_from_filename("cat (1)_02") == "cat"


def test_instance_prompt(messy: Path):
    samples, report = discover_samples(
        DatasetSpec(name="i", path=messy, caption_strategy="instanceprompt", instance_prompt="a photo of sks")
    )
    assert len(samples) == 4 and {s.caption for s in samples} == {"a photo of sks"}
    assert "missing caption" not in report.skipped and report.found == 6


def test_deterministic_order(messy: Path):
    spec = DatasetSpec(name="m", path=messy, caption_strategy="instanceprompt", instance_prompt="x")
    assert discover_samples(spec)[0] == discover_samples(spec)[0]


def test_missing_folder_error(tmp_path: Path):
    with pytest.raises(DataError) as error:
        discover_samples(DatasetSpec(name="pets", path=tmp_path / "nope"))
    message = str(error.value)
    assert "pets" in message and str(tmp_path / "nope") in message and "does not exist" in message
    assert "relative to the manifest" in message  # the fix


def test_no_usable_images_error(tmp_path: Path):
    _png(tmp_path / "x.png")
    with pytest.raises(DataError) as error:
        discover_samples(DatasetSpec(name="pets", path=tmp_path))  # textfile, but no .txt
    message = str(error.value)
    assert "pets" in message and "1 missing caption" in message and "caption_strategy" in message
    with pytest.raises(DataError, match="is a file"):
        discover_samples(DatasetSpec(name="pets", path=tmp_path / "x.png"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images"):
        discover_samples(DatasetSpec(name="pets", path=empty))


def test_shipped_quickstart_dataset():
    root = Path(__file__).resolve().parents[2] / "manifests" / "data" / "shapes"
    samples, report = discover_samples(DatasetSpec(name="shapes", path=root, resolution=64))
    assert report.used == report.found == 48 and not report.skipped
    assert samples[0].caption.startswith("a ") and samples[0].caption.endswith(" background")


def test_package_import_is_light():
    import subprocess
    import sys

    code = "import sys, sana_ray.data; from sana_ray.data import discover_samples, BatchPlan; print(sorted(m for m in ('torch', 'ray', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


def test_textfile_lines_are_caption_choices(tmp_path: Path):
    _png(tmp_path / "cat.png")
    (tmp_path / "cat.txt").write_text("a cat\n\n a grey cat \na cat\n")
    samples, _ = discover_samples(DatasetSpec(name="t", path=tmp_path))
    assert samples[0].caption == "a cat" and samples[0].choices == ("a cat", "a grey cat")  # unique, in order


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_metadata_file_captions(tmp_path: Path, kind: str):
    root = tmp_path / "data"
    for name in ("a.png", "sub/b.png", "c.png"):
        _png(root / name)
    rows = [
        {"image": "a.png", "text": "a red square"},
        {"image": "sub/b.png", "text": ["a red block", "a crimson square"]},  # several choices
        {"image": "gone.png", "text": "listed but missing"},
    ]
    if kind == "jsonl":
        import json

        (root / "meta.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif kind == "csv":
        import csv
        import json

        with open(root / "meta.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["image", "text"])
            writer.writeheader()
            for row in rows:
                text = row["text"] if isinstance(row["text"], str) else json.dumps(row["text"])
                writer.writerow({"image": row["image"], "text": text})
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"image": [r["image"] for r in rows],
                          "text": [r["text"] if isinstance(r["text"], list) else [r["text"]] for r in rows]})
        pq.write_table(table, root / "meta.parquet")
    spec = DatasetSpec(name="m", path=root, caption_strategy="metadata", metadata_file=f"meta.{kind}",
                       file_column="image", caption_column="text")
    samples, report = discover_samples(spec)
    by_name = {Path(s.image_path).name: s.choices for s in samples}
    assert by_name == {"a.png": ("a red square",), "b.png": ("a red block", "a crimson square")}
    assert [Path(p).name for p in report.skipped["missing caption"]] == ["c.png"]
    assert [Path(p).name for p in report.skipped["metadata row without image"]] == ["gone.png"]
    # A wrong column name is a clear error naming the columns the file has.
    with pytest.raises(DataError, match="has no 'file' column"):
        discover_samples(spec.model_copy(update={"file_column": "file"}))


def test_metadata_strategy_needs_a_file():
    with pytest.raises(ValueError, match="metadata_file"):
        DatasetSpec(name="m", path=".", caption_strategy="metadata")


def test_disabled_text_store_and_eval_entries(tmp_path: Path):
    from sana_ray.data.samples import discover_datasets, text_store

    _png(tmp_path / "a" / "x.png")
    _png(tmp_path / "e" / "y.png")
    specs = [
        DatasetSpec(name="train", path=tmp_path / "a", caption_strategy="filename", repeats=2, probability=0.5),
        DatasetSpec(name="held-out", path=tmp_path / "e", caption_strategy="filename", dataset_type="eval"),
        DatasetSpec(name="off", path=tmp_path / "does-not-exist", disabled=True),
        DatasetSpec(name="text", dataset_type="text_embeds", write_batch_size=64, cache_dir="t"),
    ]
    found = discover_datasets(specs)
    assert [(d.name, r.role) for d, _, r in found] == [("train", "train"), ("held-out", "eval")]
    assert found[0][2].samples_per_epoch == 2  # round(0.5 x 1 image x 3 passes)
    assert found[1][2].samples_per_epoch == 0  # never trained on
    assert text_store(specs).write_batch_size == 64
    with pytest.raises(DataError, match="only one dataset_type text_embeds"):
        text_store(specs + [specs[-1].model_copy(update={"name": "text2"})])
    with pytest.raises(DataError, match="at least one must be trained on"):
        discover_datasets(specs[1:])
    with pytest.raises(ValueError, match="takes only name, cache_dir"):
        DatasetSpec(name="text", dataset_type="text_embeds", resolution=512)
