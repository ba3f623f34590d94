"""The learning-rate schedule: linear warm-up, then constant."""

from __future__ import annotations

import pytest
import torch

from sana_ray.manifest.schema import TrainingSpec
from sana_ray.train.optim import build_lr_scheduler, build_optimizer


def test_warmup_then_constant():
    training = TrainingSpec(steps=10, optimizer={"lr": 1e-3}, lr_scheduler={"warmup_steps": 4})
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer([param], training)
    scheduler = build_lr_scheduler(optimizer, training)
    lrs = []
    for _ in range(6):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_no_warmup_starts_at_full_lr():
    training = TrainingSpec(steps=10, optimizer={"lr": 2e-5})
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], training)
    assert build_lr_scheduler(optimizer, training).get_last_lr() == pytest.approx([2e-5])
