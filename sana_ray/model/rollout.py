"""Scheduled sampling ("rollout") for rectified flow, as SimpleTuner defines it.

Teacher forcing trains on the exact noisy latent ``x_t = (1 - sigma) x0 + sigma eps``; at sampling
time the model sees its own, slightly wrong, latents instead (exposure bias). Scheduled sampling
trains some samples from a point the model reached itself:

1. the sample keeps its training sigma ``sigma_t`` (the target) and draws ``k`` in
   ``0 .. max_step_offset`` (``strategy``; with probability ``p``, else ``k = 0``);
2. it starts at the source ``sigma_s = min(1, sigma_t + k / 1000)`` -- ``k`` training timesteps
   noisier -- on the exact path: ``x_s = (1 - sigma_s) x0 + sigma_s eps`` (the same ``eps``);
3. ``k`` Euler steps of the *current* model, without gradients, take it down to ``sigma_t``:
   ``x <- x + (sigma_next - sigma) v(x, sigma)``, ``k`` equal steps in sigma;
4. the training forward then sees that ``x`` at ``sigma_t`` (the target stays ``eps - x0``, so the
   model learns to point back at the data from where it actually is).

A perfect model (``v = eps - x0``) lands exactly on ``x_t``: the rollout changes nothing for it.

``p`` may ramp (``prob_start`` before ``start_step``, then linearly or along a half cosine to
``probability`` over ``ramp_steps`` optimizer steps), as SimpleTuner's ramp does.

Determinism: which samples roll out, and how far, come from a generator seeded by
``(seed, micro_batch)`` -- the same on every rank -- so a resumed run repeats them exactly and every
rank runs the same number of rollout forward passes at every micro-batch (under ZeRO-3 each forward
all-gathers the weights, and DDP may broadcast buffers: ranks must stay in lock-step). The noise and
sigmas stay per rank (the loop's ``(seed, rank, micro_batch)`` generator, untouched by this module).

Cost: the forward passes of step ``j`` run only on the samples still rolling out, so a micro-batch
costs ``max_b k_b`` extra forward calls over ``sum_b k_b`` sample-forwards (no backward, no stored
activations); ``expected_rollout`` gives both for ``sana-ray plan``. Pure Python at import (the
planner uses it without torch); torch is imported by the functions that need it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from sana_ray.manifest.schema import ScheduledSamplingSpec

NUM_TRAIN_TIMESTEPS = 1000  # a rollout step is 1/1000 of sigma (one training timestep), as in SimpleTuner


def rollout_seed(seed: int, micro_batch: int) -> int:
    """A 63-bit seed for the rollout plan of one micro-batch: the same on every rank (see the module docstring)."""
    digest = hashlib.sha256(f"sana-ray-rollout:{seed}:{micro_batch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def rollout_probability(spec: "ScheduledSamplingSpec", step: int) -> float:
    """The chance a sample rolls out at optimizer step ``step`` (0-based: steps done before it)."""
    if spec.max_step_offset <= 0:
        return 0.0
    if spec.ramp_steps <= 0 and spec.start_step <= 0:
        return float(spec.probability)
    if step < spec.start_step:
        return float(spec.prob_start)
    if spec.ramp_steps <= 0:
        return float(spec.probability)
    progress = min(1.0, (step - spec.start_step) / spec.ramp_steps)
    if spec.ramp_shape == "cosine":
        progress = 0.5 - 0.5 * math.cos(math.pi * progress)
    return float(spec.prob_start + (spec.probability - spec.prob_start) * progress)


def offset_distribution(max_step_offset: int, strategy: str) -> list[float]:
    """``P(k = j)`` for ``j = 0 .. max_step_offset`` of a sample that rolls out (the strategies of
    ``plan_rollout``, with r uniform in [0, 1): uniform; biased_early ``round(r^2 m)``; biased_late
    ``round((1 - r^2) m)``). Ties of the rounding have probability 0."""
    m = max_step_offset
    if m <= 0:
        return [1.0]
    if strategy == "uniform":
        return [1.0 / (m + 1)] * (m + 1)

    def cdf_r2(x: float) -> float:  # P(r^2 <= x)
        return math.sqrt(min(1.0, max(0.0, x)))

    probabilities = []
    for j in range(m + 1):
        low, high = (j - 0.5) / m, (j + 0.5) / m  # round(y m) = j  <=>  y in [low, high)
        if strategy == "biased_early":  # y = r^2
            probabilities.append(cdf_r2(high) - cdf_r2(low))
        elif strategy == "biased_late":  # y = 1 - r^2  <=>  r^2 in (1 - high, 1 - low]
            probabilities.append(cdf_r2(1 - low) - cdf_r2(1 - high))
        else:
            raise ValueError(f"unknown scheduled sampling strategy {strategy!r}")
    return probabilities


def expected_rollout(max_step_offset: int, strategy: str, probability: float, batch_size: int) -> tuple[float, float]:
    """``(sample-forwards per sample, forward calls per micro-batch)``, expected, for a batch of
    ``batch_size`` at rollout probability ``probability`` (ignoring the cut at sigma = 1)."""
    if max_step_offset <= 0 or probability <= 0:
        return 0.0, 0.0
    pk = offset_distribution(max_step_offset, strategy)
    per_sample = probability * sum(j * p for j, p in enumerate(pk))
    # k per sample: 0 with 1 - p, else pk. E[max of B] = sum_j P(max >= j) = sum_j 1 - F(j - 1)^B.
    cdf, calls = 1.0 - probability, 0.0
    for j in range(1, max_step_offset + 1):
        cdf += probability * pk[j - 1]
        calls += 1.0 - cdf ** batch_size
    return per_sample, calls


@dataclass(frozen=True)
class RolloutPlan:
    """The rollout steps ``k`` of each sample of one micro-batch (0: trained as usual)."""

    steps: tuple[int, ...]

    @property
    def forward_calls(self) -> int:
        return max(self.steps, default=0)

    @property
    def sample_forwards(self) -> int:
        return sum(self.steps)


def plan_rollout(spec: "ScheduledSamplingSpec", *, seed: int, micro_batch: int, step: int,
                 batch_size: int) -> RolloutPlan | None:
    """This micro-batch's rollout plan, or None when nothing rolls out (then the loss is exactly
    the one without scheduled sampling). Deterministic per ``(seed, micro_batch, step)``."""
    import torch

    probability = rollout_probability(spec, step)
    if probability <= 0:
        return None
    generator = torch.Generator().manual_seed(rollout_seed(seed, micro_batch))
    applied = torch.rand(batch_size, generator=generator, dtype=torch.float64) < probability
    m = spec.max_step_offset
    if spec.strategy == "uniform":
        offsets = torch.randint(0, m + 1, (batch_size,), generator=generator)
    else:
        r = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        y = r.square() if spec.strategy == "biased_early" else 1.0 - r.square()
        offsets = torch.round(y * m).long()
    steps = tuple(int(k) if a else 0 for k, a in zip(offsets.tolist(), applied.tolist()))
    return RolloutPlan(steps) if any(steps) else None


Velocity = Callable[["torch.Tensor", "torch.Tensor", list], "torch.Tensor"]


def roll_out(velocity: Velocity, x_t: "torch.Tensor", x0: "torch.Tensor", noise: "torch.Tensor",
             sigmas: "torch.Tensor", steps: Sequence[int]) -> "torch.Tensor":
    """The rolled-out inputs ``[B, C, h, w]`` at ``sigmas`` (see the module docstring), without gradients.

    ``x_t``: the exact inputs ``(1 - sigma) x0 + sigma eps`` (``model.flow.flow_matching_inputs``);
    rows with ``k = 0`` (or already at sigma = 1) are returned unchanged, bit for bit.
    ``velocity(x, sigma, rows)``: the model's prediction for the samples ``rows`` of the batch
    (``x [n, C, h, w]``, ``sigma [n]`` float32).
    """
    import torch

    if len(steps) != x0.shape[0]:
        raise ValueError(f"{len(steps)} rollout steps for a batch of {x0.shape[0]}")
    target = sigmas.to(device=x0.device, dtype=torch.float32)
    k = [int(s) for s in steps]
    source = torch.clamp(target + torch.tensor(k, device=x0.device, dtype=torch.float32) / NUM_TRAIN_TIMESTEPS, max=1.0)
    moving = [b for b in range(len(k)) if k[b] > 0 and bool(source[b] > target[b])]
    x = x_t.clone()
    if not moving:
        return x

    def per_sample(values: "torch.Tensor") -> "torch.Tensor":
        return values.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    start = per_sample(source[moving])
    x[moving] = (1 - start) * x0[moving] + start * noise[moving]  # the exact path, k timesteps noisier
    step_size = (source - target) / torch.tensor([max(1, n) for n in k], device=x0.device, dtype=torch.float32)
    with torch.no_grad():
        for j in range(max(k[b] for b in moving)):
            rows = [b for b in moving if j < k[b]]
            current = source[rows] - j * step_size[rows]
            # the last step lands on the target exactly (no accumulated rounding in sigma)
            following = torch.stack([target[b] if j == k[b] - 1 else source[b] - (j + 1) * step_size[b] for b in rows])
            v = velocity(x[rows], current, rows)
            x[rows] = x[rows] + per_sample(following - current) * v.to(x.dtype)
    return x
