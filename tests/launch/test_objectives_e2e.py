"""One end-to-end `sana-ray apply` with every training objective of issue 11 at once, resumed.

Tiny Sana 1.5 (``pretrained: tiny-sana15``, qk norm) on 2 CPU workers (DDP, gloo), two datasets:

* ``subject``: cached latents with loss masks (white, black and grey regions; one image without a
  mask and one with a mask of another size, both skipped and counted, never fatal);
* ``style``: ``cache_latents: false`` (latents and masks made by the workers), ``loss_weight: 2``;

``loss_weighting: cosmap`` and scheduled sampling (every sample, up to 4 rollout steps). Rank 0
fails once after step 5 (SANA_RAY_FAULT_AT_STEP); Ray Train restarts both workers from the step-3
checkpoint inside the same fit, so steps 4 and 5 are trained twice: the first time is the
uninterrupted reference, and the repeat must log the same losses exactly (the data order, noise,
timesteps and rollout plans are pure functions of the seed, rank and micro-batch; the weights and
optimizer state come back bit for bit from the checkpoint). The unit tests of each feature are in
tests/model/test_objectives.py and tests/data/test_masks.py; this one checks they run together,
through the real cache build (masks are a job kind of the Ray Data pool) and a real resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw

pytestmark = pytest.mark.e2e

STEPS = 6
FAULT_AFTER = 5  # checkpoint_every 3: the restart resumes from step 3 and repeats steps 4 and 5


def _datasets(root: Path) -> tuple[Path, Path, Path, Path]:
    from sana_ray.data.synthetic import make_shapes

    subject, subject_masks, style, style_masks = (root / n for n in ("subject", "subject-masks", "style", "style-masks"))
    make_shapes(subject, count=10, size=64, seed=5)
    make_shapes(style, count=6, size=64, seed=6)
    for folder in (subject_masks, style_masks):
        folder.mkdir()
    images = sorted(subject.glob("*.png"))
    for n, image in enumerate(images[:-1]):
        mask = Image.new("L", (64, 64), 0 if n % 3 == 0 else 255)  # black, or white ...
        ImageDraw.Draw(mask).rectangle((8, 8, 40, 48), fill=255 if n % 3 == 0 else 128)  # ... with a region
        if n == 1:
            mask = mask.resize((64, 32))  # another size: skipped as "mask size mismatch"
        mask.save(subject_masks / image.name)
    # images[-1] has no mask: skipped as "missing mask"
    for n, image in enumerate(sorted(style.glob("*.png"))):  # half all white (the exact loss), half half-masked
        mask = Image.new("L", (64, 64), 255)
        if n % 2:
            ImageDraw.Draw(mask).rectangle((0, 0, 63, 31), fill=0)
        mask.save(style_masks / image.with_suffix(".png").name)
    return subject, subject_masks, style, style_masks


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    from sana_ray.launch.apply import apply
    from sana_ray.manifest import load_manifest

    root = tmp_path_factory.mktemp("objectives")
    subject, subject_masks, style, style_masks = _datasets(root)
    manifest = {
        "apiVersion": "sana-ray/v1",
        "kind": "TrainingRun",
        "metadata": {"name": "objectives"},
        "spec": {
            "model": {"pretrained": "tiny-sana15"},
            "datasets": [
                {"name": "subject", "path": str(subject), "mask_path": str(subject_masks), "resolution": 64},
                {"name": "style", "path": str(style), "mask_path": str(style_masks), "resolution": 64,
                 "cache_latents": False, "loss_weight": 2.0},
            ],
            "training": {
                "steps": STEPS, "batch_size": 2, "seed": 11, "checkpoint_every": 3,
                "optimizer": {"lr": 1e-3},
                "loss_weighting": "cosmap",
                "scheduled_sampling": {"max_step_offset": 4, "probability": 1.0},
            },
            "validation": {"prompts": []},
            "hardware": {"num_workers": 2, "max_failures": 1},
            "output": {"dir": str(root / "runs"), "cache_dir": str(root / "cache")},
        },
    }
    path = root / "objectives.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("SANA_RAY_FAULT_AT_STEP", str(FAULT_AFTER))
    try:
        code = apply(load_manifest(path))
    finally:
        monkeypatch.undo()
    return code, root, root / "runs" / "objectives"


def _history(outcome: dict, key: str) -> dict[int, list[float]]:
    from mlflow.tracking import MlflowClient

    by_step: dict[int, list[float]] = {}
    client = MlflowClient(outcome["mlflow_tracking_uri"])
    for m in sorted(client.get_metric_history(outcome["mlflow_run_id"], key), key=lambda m: (m.timestamp, m.step)):
        by_step.setdefault(m.step, []).append(m.value)
    return by_step


def test_all_objectives_train_together_and_resume_exactly(run, capfd):
    import math

    code, root, run_dir = run
    assert code == 0
    outcome = json.loads((run_dir / "run.json").read_text())
    assert outcome["status"] == "completed" and outcome["steps"] == STEPS

    # Steps 4 and 5 ran twice (before the injected failure, and after the restart from step 3):
    # the same losses, bit for bit; every other step once.
    losses = _history(outcome, "loss")
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in (4, 5):
        assert len(losses[step]) == 2 and losses[step][0] == losses[step][1], (step, losses[step])
    assert all(len(losses[s]) == 1 for s in (1, 2, 3, 6))
    assert all(math.isfinite(v) for values in losses.values() for v in values)
    rollouts = _history(outcome, "rollout_forwards")
    assert sum(values[-1] for values in rollouts.values()) > 0  # scheduled sampling ran forward passes
    assert rollouts[4][0] == rollouts[4][1] and rollouts[5][0] == rollouts[5][1]  # the same plans after the resume

    # Masks: the bad ones skipped and counted; the cached dataset's mask folder built by the pool
    # (kind masks); the online dataset has neither latent nor mask shards.
    report = {d["dataset"]: d for d in json.loads((run_dir / "data_report.json").read_text())["datasets"]}
    assert {k: len(v) for k, v in report["subject"]["skipped"].items()} == {"mask size mismatch": 1, "missing mask": 1}
    assert report["subject"]["used"] == 8 and report["subject"]["masked"]
    assert report["style"]["used"] == 6 and report["style"]["loss_weight"] == 2.0
    mask_folders = list((root / "cache" / "masks").iterdir())
    assert len(mask_folders) == 1
    index = json.loads((mask_folders[0] / "index.json").read_text())
    assert index["kind"] == "masks" and index["items_count"] == 8 and index["factor"] == 4
    assert all("error" not in item and item["shape"] == [1, 16, 16] for item in index["items"])
    assert len(list((root / "cache" / "latents").iterdir())) == 1  # subject's; style is encoded online

    # Sana 1.5: the export keeps the qk norm.
    config = json.loads((Path(outcome["export_path"]) / "transformer" / "config.json").read_text())
    assert config["qk_norm"] == "rms_norm_across_heads"
