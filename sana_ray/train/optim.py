"""Optimizer and learning-rate schedule from the manifest."""

from __future__ import annotations

import torch

from sana_ray.manifest.schema import TrainingSpec


def build_optimizer(params, training: TrainingSpec) -> torch.optim.Optimizer:
    spec = training.optimizer
    return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay, eps=spec.eps)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """lr multiplier at optimizer step ``step`` (0-based): linear from 1/warmup to 1, then 1."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, training: TrainingSpec) -> torch.optim.lr_scheduler.LRScheduler:
    warmup = training.lr_scheduler.warmup_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_factor(step, warmup))
