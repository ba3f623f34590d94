"""Checkpoints: a round trip restores weights, optimizer and schedule; a half-written one is refused."""

from __future__ import annotations

import pytest
import torch

from sana_ray.manifest.schema import TrainingSpec
from sana_ray.train import checkpoint as ckpt
from sana_ray.train.optim import build_lr_scheduler, build_optimizer


def _setup(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    training = TrainingSpec(steps=10, lr_scheduler={"warmup_steps": 4})
    optimizer = build_optimizer(model.parameters(), training)
    return model, optimizer, build_lr_scheduler(optimizer, training)


def _step(model, optimizer, scheduler, x):
    loss = model(x).pow(2).mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return loss.item()


def test_round_trip_continues_exactly_like_the_uninterrupted_run(tmp_path):
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    model, optimizer, scheduler = _setup(0)
    for _ in range(3):
        _step(model, optimizer, scheduler, x)
    state = ckpt.TrainState(step=3, micro_batches=3, fingerprint="abc", loss=0.5)
    ckpt.save(tmp_path / "c", model=model, optimizer=optimizer, lr_scheduler=scheduler, state=state)
    uninterrupted = [_step(model, optimizer, scheduler, x) for _ in range(3)]

    fresh, fresh_optimizer, fresh_scheduler = _setup(123)  # different initial weights
    restored = ckpt.load(tmp_path / "c", model=fresh, optimizer=fresh_optimizer, lr_scheduler=fresh_scheduler,
                         device=torch.device("cpu"))
    assert restored == state
    assert fresh_scheduler.get_last_lr() == pytest.approx([1e-4])  # warm-up position restored (step 3 of 4 done)
    resumed = [_step(fresh, fresh_optimizer, fresh_scheduler, x) for _ in range(3)]
    assert resumed == uninterrupted


def test_checkpoint_without_state_file_is_refused(tmp_path):
    model, optimizer, scheduler = _setup(0)
    folder = tmp_path / "c"
    ckpt.save(folder, model=model, optimizer=optimizer, lr_scheduler=scheduler,
              state=ckpt.TrainState(step=1, micro_batches=1, fingerprint="abc", loss=1.0))
    (folder / ckpt.STATE).unlink()  # as if the writer died before its last file
    with pytest.raises(ckpt.IncompleteCheckpoint, match="not completely written"):
        ckpt.load(folder, model=model, optimizer=optimizer, lr_scheduler=scheduler, device=torch.device("cpu"))
