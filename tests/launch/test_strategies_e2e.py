"""End-to-end `sana-ray apply` with DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU workers (gloo).

Two fits, each asserting many things (see test_apply_e2e.py for the DDP run and its kill/resume):

* ZeRO-2, fp32, EMA on: rank 0 fails once after step 9 (SANA_RAY_FAULT_AT_STEP), Ray Train
  restarts both workers from the step-6 checkpoint (both ranks' ZeRO shards merged into one
  checkpoint), and steps 7-9 are trained again with exactly the losses they had the first time.
* ZeRO-3 with optimizer offload, bf16, gradient checkpointing every 2nd block, EMA exported:
  the exported transformer is exactly the EMA, reassembled here from the two ranks' partitions.
Both: the loss falls and the export loads in SanaPipeline and generates.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.launch.test_apply_e2e import STEPS, write_manifest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One folder for both runs, so that they share the tiny model and the caches."""
    return tmp_path_factory.mktemp("strategies")


def _apply(workdir: Path, shapes: Path, name: str, *, training: dict, hardware: dict):
    from sana_ray.launch.apply import apply
    from sana_ray.manifest import load_manifest

    path = write_manifest(workdir / f"{name}.yaml", data_dir=shapes, output_dir=workdir / "runs", name=name, **training)
    manifest = yaml.safe_load(path.read_text())
    manifest["spec"]["hardware"] |= hardware
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    assert apply(load_manifest(path)) == 0
    outcome = json.loads((workdir / "runs" / name / "run.json").read_text())
    assert outcome["status"] == "completed" and outcome["steps"] == STEPS
    return outcome


def _loss_history(outcome) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(outcome["mlflow_tracking_uri"])
    return client.get_metric_history(outcome["mlflow_run_id"], "loss")


def _check_falls_and_export_generates(outcome) -> None:
    import torch
    from diffusers import SanaPipeline

    latest = {}
    for m in sorted(_loss_history(outcome), key=lambda m: m.timestamp):
        latest[m.step] = m.value
    losses = [latest[s] for s in range(1, STEPS + 1)]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, f"loss did not fall: {first:.4f} -> {last:.4f}"
    pipeline = SanaPipeline.from_pretrained(outcome["export_path"])
    image = pipeline("a blue square", height=64, width=64, num_inference_steps=2, use_resolution_binning=False,
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_zero2_resumes_exactly_after_a_worker_failure(ray_local, shapes, workdir, monkeypatch, capfd):
    monkeypatch.setenv("SANA_RAY_FAULT_AT_STEP", "9")
    outcome = _apply(
        workdir, shapes, "zero2",
        training={"ema": {"enabled": True, "decay": 0.9}},
        hardware={"strategy": "deepspeed", "deepspeed": {"stage": 2}, "max_failures": 1},
    )
    out = capfd.readouterr()
    assert "resuming from step 6" in out.out + out.err

    # Steps 7-9 were logged twice (before the failure and after the restart): identical losses.
    by_step: dict[int, list[float]] = {}
    for m in _loss_history(outcome):
        by_step.setdefault(m.step, []).append(m.value)
    for step in (7, 8, 9):
        assert len(by_step[step]) == 2, (step, by_step[step])
        assert by_step[step][0] == pytest.approx(by_step[step][1], rel=1e-6), step
    assert all(len(by_step[s]) == 1 for s in range(10, STEPS + 1))

    # One Ray checkpoint holds both ranks' ZeRO shards, the EMA and the state.
    checkpoint = Path(outcome["checkpoint_path"])
    names = {p.name for p in checkpoint.rglob("*")}
    assert {"state.json", "ema.safetensors", "latest"} <= names
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= names
    _check_falls_and_export_generates(outcome)


def test_zero3_offload_bf16_exports_the_gathered_ema(ray_local, shapes, workdir):
    import torch
    from diffusers import SanaTransformer2DModel
    from safetensors.torch import load_file

    outcome = _apply(
        workdir, shapes, "zero3",
        training={"mixed_precision": "bf16", "gradient_checkpointing": True, "gradient_checkpointing_interval": 2,
                  "ema": {"enabled": True, "decay": 0.5, "on_cpu": True, "use_for_export": True}},
        hardware={"strategy": "deepspeed", "deepspeed": {"stage": 3, "offload_optimizer": True}},
    )
    checkpoint = Path(outcome["checkpoint_path"])
    shards = [load_file(str(checkpoint / f"ema-rank-{r:05d}.safetensors")) for r in (0, 1)]
    exported = SanaTransformer2DModel.from_pretrained(outcome["export_path"], subfolder="transformer")
    params = dict(exported.named_parameters())
    assert shards[0].keys() == params.keys()
    for name, param in params.items():
        full = torch.cat([shards[0][name], shards[1][name]])[: param.numel()].view(param.shape)
        assert torch.equal(param.detach(), full), name
    _check_falls_and_export_generates(outcome)
