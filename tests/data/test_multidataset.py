"""SimpleTuner's Sana quickstart data setup as a manifest, on generated images: discovery, the
table, the batch plan (ranks in step over many aspect buckets), and the too-small error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sana_ray.data.samples import discover_datasets
from sana_ray.launch.report import discovery_plan, print_discovery_report
from sana_ray.manifest import load_manifest

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "manifests" / "simpletuner-sana-multidataset.yaml"


@pytest.fixture(scope="module")
def manifest_dir(tmp_path_factory) -> Path:
    """The example manifest next to generated datasets it points at (relative paths)."""
    root = tmp_path_factory.mktemp("multi")
    shutil.copy(MANIFEST, root / "manifest.yaml")
    reg = root / "datasets" / "pseudo-camera-10k"
    reg.mkdir(parents=True)
    for i, size in enumerate([(640, 480), (800, 600), (1024, 768), (600, 600), (400, 300)]):
        Image.new("RGB", size, (10 * i, 100, 200)).save(reg / f"a_photo_of_a_street-{i:03d}.png")
    subject = root / "datasets" / "dreambooth-subject"
    subject.mkdir(parents=True)
    for i, size in enumerate([(1024, 1024), (1536, 1024), (1024, 1536), (1280, 1024), (800, 800)]):
        Image.new("RGB", size, (200, 30 * i, 50)).save(subject / f"subject_{i}.png")
    return root


def test_example_manifest_discovery_and_plan(manifest_dir: Path, capsys):
    manifest = load_manifest(manifest_dir / "manifest.yaml")
    spec = manifest.spec
    found = discover_datasets(spec.datasets)
    reports = {d.name: r for d, _, r in found}
    assert list(reports) == ["pseudo-camera-10k-sana", "dreambooth-subject", "dreambooth-subject-512"]  # text store apart

    reg = reports["pseudo-camera-10k-sana"]
    assert (reg.found, reg.used, reg.role) == (5, 4, "regularisation")
    assert [Path(p).name for p in reg.skipped["too small"]] == ["a_photo_of_a_street-004.png"]  # 400x300 < 512 (pixel_area)
    assert reg.buckets == {"512x512": 4} and reg.samples_per_epoch == 4
    reg_samples = found[0][1]
    assert reg_samples[0].caption == "a photo of a street"  # filename strategy, counter stripped
    assert reg_samples[2].geometry.downsample == (591, 443)  # 1024x768 above maximum_image_size: to ~512^2 first

    subject = reports["dreambooth-subject"]
    assert (subject.found, subject.used) == (5, 4) and subject.skipped == {"too small": [str(manifest_dir / "datasets/dreambooth-subject/subject_4.png")]}
    assert subject.buckets == {"1024x1024": 1, "1248x832": 1, "832x1248": 1, "1152x928": 1}  # no crop: aspect kept, ~1 MP
    assert subject.samples_per_epoch == 4 * 1001
    assert {s.caption for s in found[1][1]} == {"the name of your subject goes here"}
    small = reports["dreambooth-subject-512"]
    assert small.used == 5 and small.buckets == {"512x512": 2, "640x416": 1, "416x640": 1, "576x448": 1}
    assert small.samples_per_epoch == 5 * 1001

    # The plan: 512x512 is shared by the regularisation set and the 512 px subject set.
    plan = discovery_plan(found, batch_size=2, world_size=2, seed=1)
    sizes = {}
    for dataset, samples, report in found:
        for s in samples:
            sizes.setdefault(s.geometry.size, 0)
            sizes[s.geometry.size] += (1 + dataset.repeats)
    assert len(sizes) == 8  # eight aspect buckets
    assert plan.samples_per_epoch == sum(n // 4 * 4 for n in sizes.values())
    # Every rank draws from the same bucket at every step, and the ranks' samples differ.
    flat = [s for _, samples, r in found for s in samples]
    for index in range(0, plan.global_batches_per_epoch(), 97):
        ranks = [plan.batch(index, r) for r in range(2)]
        assert len({flat[i].geometry.size for b in ranks for i in b}) == 1
    print_discovery_report(found, spec, out_dir=manifest_dir / "report")
    out = capsys.readouterr().out
    assert "pseudo-camera-10k-sana" in out and "1 too small" in out and "regularisation" in out
    data = json.loads((manifest_dir / "report" / "data_report.json").read_text())
    assert [d["dataset"] for d in data["datasets"]] == list(reports)
    assert data["plan"]["samples_per_epoch"] == plan.samples_per_epoch
    text = (manifest_dir / "report" / "data_report.txt").read_text()
    assert "skipped (too small): " + str(manifest_dir / "datasets/dreambooth-subject/subject_4.png") in text


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sana_ray.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_validate_data_cli_and_too_small_error(manifest_dir: Path):
    ok = _cli("validate", "--data", str(manifest_dir / "manifest.yaml"))
    assert ok.returncode == 0, ok.stderr
    assert "dreambooth-subject-512" in ok.stdout and "samples per epoch" in ok.stdout
    # Only the regularisation set (4 images, 1 bucket) with batch 4 x 2 workers: one global batch of 8 cannot be formed.
    bad = _cli("validate", "--data", str(manifest_dir / "manifest.yaml"), "datasets.1.disabled=true",
               "datasets.2.disabled=true", "training.batch_size=4", "hardware.num_workers=2")
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    assert "global batch of 8 (batch_size 4 x 2 workers)" in bad.stderr and "512x512 px: 4" in bad.stderr
    assert "add repeats" in bad.stderr and "batch_size x num_workers <= 4" in bad.stderr


def test_apply_report_raises_the_same_error_after_the_table(tmp_path: Path, capsys):
    from sana_ray.data.cache import CacheSet
    from sana_ray.data.sampler import SamplerError
    from sana_ray.data.samples import DatasetReport
    from sana_ray.launch.report import print_data_report

    manifest = load_manifest(MANIFEST, ["training.batch_size=2", "hardware.num_workers=2"])
    import numpy as np

    from sana_ray.data.cache import TextShards

    text = TextShards(folder="", files=[], sizes=[], rows_per_shard=8, count=1, embeds_offset=[], mask_offset=[],
                      dtype="F32", shape=(300, 2304))
    ones, zeros = np.ones(3), np.zeros(3, dtype=np.int32)
    cache = CacheSet(latents_dir="", text=text, files=["k/shard_00000.safetensors"], file_sizes=[0], latent_file=zeros,
                     latent_offset=np.arange(3), latent_dtype="F32", buckets=zeros, bucket_shapes=[(32, 16, 16)],
                     caption_offsets=np.arange(4), caption_rows=zeros, dropout=ones * 0, repeats=zeros, weights=ones,
                     groups=zeros, regularisation=zeros.astype(bool), image_paths=[f"/{i}.png" for i in range(3)],
                     dataset_names=["d"], latent_dirs=["k"])
    report = DatasetReport(dataset="d", found=4, used=3, skipped={"unreadable": ["/3.png"]}, details={"/3.png": "OSError: truncated"})
    with pytest.raises(SamplerError, match=r"global batch of 4 .* latent 32x16x16: 3"):
        print_data_report([report], cache, manifest.spec, out_dir=tmp_path)
    out = capsys.readouterr().out
    assert "skipped (unreadable): /3.png - OSError: truncated" in out
    assert json.loads((tmp_path / "data_report.json").read_text())["plan"] is None  # written even so
