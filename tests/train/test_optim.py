"""Optimizers and learning-rate schedules built from the manifest."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from sana_ray.manifest.schema import LrSchedulerSpec, OptimizerSpec, TrainingSpec
from sana_ray.train.optim import build_lr_scheduler, build_optimizer, lr_factor


def _lrs(training: TrainingSpec, steps: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer([param], training)
    scheduler = build_lr_scheduler(optimizer, training)
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_then_constant():
    training = TrainingSpec(steps=10, optimizer={"lr": 1e-3}, lr_scheduler={"warmup_steps": 4})
    assert _lrs(training, 6) == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_no_warmup_starts_at_full_lr():
    training = TrainingSpec(steps=10, optimizer={"lr": 2e-5})
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], training)
    assert build_lr_scheduler(optimizer, training).get_last_lr() == pytest.approx([2e-5])


def test_cosine_and_linear_decay_after_warmup_to_the_floor_at_the_last_step():
    cosine = TrainingSpec(steps=7, optimizer={"lr": 1.0}, lr_scheduler={"name": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1})
    # steps 0,1 warm up; steps 2..6 decay over 4 intervals: 0.1 + 0.9 * (1 + cos(pi * j/4)) / 2
    expected = [0.5, 1.0] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * j / 4)) for j in range(5)]
    assert _lrs(cosine, 7) == pytest.approx(expected)
    assert expected[-1] == pytest.approx(0.1)

    linear = TrainingSpec(steps=5, optimizer={"lr": 2.0}, lr_scheduler={"name": "linear"})
    assert _lrs(linear, 5) == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0])


def test_schedule_is_a_pure_function_of_the_step():
    spec = LrSchedulerSpec(name="cosine", warmup_steps=3)
    assert [lr_factor(s, 10, spec) for s in range(10)] == [lr_factor(s, 10, spec) for s in range(10)]
    assert lr_factor(0, 1, LrSchedulerSpec(name="linear")) == 1.0  # a one-step run does not divide by zero


@pytest.mark.parametrize("name", ["adamw", "optimi-adamw", "lion", "adamw8bit", "paged-lion8bit", "came"])
def test_every_optimizer_builds_and_reduces_a_quadratic(name):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 64))  # bitsandbytes keeps 8-bit states only for >= 4096 elements
    training = TrainingSpec(steps=1, optimizer={"name": name, "lr": 1e-2})
    optimizer = build_optimizer([weight], training)
    start = weight.detach().pow(2).sum().item()
    for _ in range(20):
        weight.pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert weight.detach().pow(2).sum().item() < start
    state = optimizer.state_dict()  # resumable: the state round-trips
    fresh = build_optimizer([torch.nn.Parameter(weight.detach().clone())], training)
    fresh.load_state_dict(state)


def test_came_takes_a_third_beta():
    training = TrainingSpec(steps=1, optimizer={"name": "came", "betas": (0.8, 0.9), "came_beta3": 0.99})
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(4, 4))], training)
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.9, 0.99)
    with pytest.raises(ValidationError):
        OptimizerSpec(name="came", betas=(0.9, 0.999, 0.9999))
